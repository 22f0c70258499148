"""The cross-seed stability columns of a study's results table.

For every (unit set, family, |D|, |M|, k) measured with two or more seeds, the chosen trial of
each seed's cell (``best_per_cell``) gives its unit directions (``ResultStore.read_units``);
``atoms.evaluate.stability.seed_stability`` scores every seed pair under the study's S̃. Every
row of the group gets ``stability_matched_fraction`` and ``stability_pw_mcc`` (mean, _lo, _hi),
``stability_pairs`` and, for scale, ``stability_random_pw_mcc``: two random sets of that size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.summary import best_per_cell
from atoms.aip.metric import AIP
from atoms.evaluate.stability import random_baseline, seed_stability
from atoms.store.results import ResultStore

KEYS = ["unit_set", "family", "d_sae", "train_rows", "k"]
COLUMNS = ["stability_pairs", "stability_matched_fraction", "stability_matched_fraction_lo",
           "stability_matched_fraction_hi", "stability_pw_mcc", "stability_pw_mcc_lo",
           "stability_pw_mcc_hi", "stability_random_pw_mcc"]


def with_stability(table: pd.DataFrame, store: ResultStore, aip: AIP | None) -> pd.DataFrame:
    """``table`` with the stability columns (NaN where fewer than two seeds)."""
    out = table.assign(**dict.fromkeys([c for c in COLUMNS if c not in table], np.nan))
    if table.empty or "seed" not in table:
        return out
    keys = [k for k in KEYS if k in table]
    chosen = best_per_cell(table)
    for key, group in chosen.groupby(keys, dropna=False, sort=False):
        by_seed = group.drop_duplicates("seed")
        if len(by_seed) < 2:
            continue
        sets = {int(r.seed): store.read_units(r.trial_key, r.unit_set)
                for r in by_seed.itertuples()}
        scores = seed_stability(sets, aip)
        first = next(iter(sets.values()))
        scores["stability_random_pw_mcc"] = random_baseline(*first.shape, aip)["pw_mcc"]
        match = np.ones(len(out), dtype=bool)
        for name, value in zip(keys, key, strict=True):
            col = out[name]
            match &= col.isna().to_numpy() if pd.isna(value) else (col == value).to_numpy()
        for name, value in scores.items():
            out.loc[match, name] = value
    return out
