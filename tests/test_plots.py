"""The report's figures: the heat map's boundary status, and thresholds against the theorem
interval on the closed-form TSAE, where every learned θ lies inside it."""

import numpy as np
import pandas as pd
import pytest

from analysis import plots
from atoms.evaluate.synthetic import SyntheticConfig, make_atom_set
from atoms.sae.model import ThresholdSAE
from atoms.sae.saelens import save_sae

GRID = pd.DataFrame([[0.5, 0.9], [0.5, 0.5]], index=[1000.0, 4000.0], columns=[1.0, 2.0])


def _dstar(status: list[str], d: list[float]) -> pd.DataFrame:
    d = np.asarray(d)
    return pd.DataFrame({"train_rows": GRID.index, "status": status, "d_star_over_h": d,
                         "d_star_lo_over_h": d / 1.2, "d_star_hi_over_h": d * 1.2, "h": 16.0})


@pytest.mark.parametrize("status, d, law, title", [
    (["no transition"] * 2, [np.nan] * 2, None, "no transition at any |M|: no boundary |D|*"),
    (["transition", "no transition"], [1.4, np.nan], {"supported": False},
     "boundary |D|*(|M|) at 1 of 2 |M|; no power-law fit"),
    (["transition"] * 2, [1.4, 2.8], {"supported": True, "a": np.log(22.4 / 1000**0.5),
                                      "alpha": 0.5}, "|D|* ∝ |M|^0.50"),
], ids=["none", "one", "law"])
def test_heat_map_states_the_boundary(status, d, law, title):
    fig = plots.r2_heatmap(GRID, _dstar(status, d), law)
    assert title in fig.axes[0].get_title()
    assert plots.png(fig)[:4] == b"\x89PNG"


def test_closed_form_thresholds_sit_inside_the_interval(tmp_path):
    s = make_atom_set(SyntheticConfig(d=24, n_atoms=24, coherence=0.0, k=2, n_samples=400,
                                      delta_min=1.0, delta_max=2.0, seed=0))
    sae = ThresholdSAE.from_dictionary(s.atoms, s.aip, 0.5)
    row = pd.Series({"trial_key": "t", "d_sae_over_h": 1.0, "train_rows": 400.0,
                     "checkpoint_path": str(save_sae(sae, tmp_path / "sae"))})
    items, notes = plots.threshold_items(pd.DataFrame([row]), s.activations.float(), s.aip)
    assert notes == [] and items[0]["interval_feasible"]
    assert items[0]["thresholds_inside"] == 1.0
    assert items[0]["theta"] == pytest.approx(np.full(24, 0.5), rel=1e-4)
    assert plots.png(plots.threshold_histograms(items))[:4] == b"\x89PNG"
    missing = row.copy()
    missing["checkpoint_path"] = str(tmp_path / "gone")
    items, notes = plots.threshold_items(pd.DataFrame([missing]), s.activations.float(), s.aip)
    assert items == [] and "saved SAE not found" in notes[0]
