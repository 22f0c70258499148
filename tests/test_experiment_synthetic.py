import pandas as pd
import pytest

from atoms.core.cli import run
from experiments.synthetic import UNIT_SETS, main

TINY = """
d: 32
n_atoms: 48
coherences: [0.25, 0.5]
ks: [1, 3]
n_samples: 3000
eval_samples: 200
train: {steps: 60, batch_size: 256, resample_every: 20, sparsity_warmup_steps: 20}
"""


def test_study_writes_table_and_plot(tmp_path):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(TINY)
    assert run(main, ["--config", str(cfg), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    table = pd.read_parquet(tmp_path / "out" / "synthetic.parquet")
    assert len(table) == 2 * 2 * len(UNIT_SETS)
    assert set(table.unit_set) == set(UNIT_SETS)
    for col in (
        "epsilon",
        "k",
        "theorem_holds",
        "support_exact",
        "r2_aip_centred",
        "config",
        "code_version",
        "threshold_mean_end",
        "atom_recovery_099",
    ):
        assert col in table
    # The closed-form TSAE is exact inside the condition, and ReLU leaks.
    inside = table[(table.unit_set == "closed_form_tsae") & table.theorem_holds]
    assert len(inside) > 0 and (inside.support_exact == 1.0).all()
    relu = table[table.unit_set == "closed_form_relu"]
    assert (relu.l0_excess > 1).all()
    png = (tmp_path / "out" / "synthetic.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


@pytest.mark.parametrize(
    "text, message",
    [
        ("coherences: [1.5]\n", "coherences: values must be in [0, 1)"),
        ("ks: []\n", "ks: must list at least one value"),
        ("train: {steps: zero}\n", "train.steps: expected an integer"),
    ],
)
def test_bad_config_is_one_line_and_writes_nothing(tmp_path, capsys, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    assert run(main, ["--config", str(cfg), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err and "bad.yaml" in err
    assert not (tmp_path / "out").exists()
