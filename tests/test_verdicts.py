"""The verdicts on the paper's two claims, from constructed results tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.verdicts import claim_jump, claim_q_star

H = 64
SEEDS = (0, 1, 2)


def _row(family, unit_set, d, m, seed, **metrics):
    return {"model": "m", "site": "resid_post", "layer": 1, "family": family,
            "unit_set": unit_set, "d_sae": d, "d_sae_over_h": d / H if d else None,
            "train_rows": m, "seed": seed, "status": "finished", "h": H,
            "cell": f"{unit_set}-D{d}-M{m}-s{seed}", "k": None, **metrics}


def _curves(train, held, exemplar_held=0.6, ds=(32, 64, 128, 256, 512, 1024),
            ms=(128, 256, 512), seeds=SEEDS):
    """Atoms rows whose R² is train(d, m) / held(d, m) plus seed noise; exemplar rows beside."""
    rng = np.random.default_rng(0)
    rows = []
    for m in ms:
        for d in ds:
            for s in seeds:
                e = rng.normal(0, 0.003, 2)
                rows.append(_row("tsae_aip", "atoms_aip", d, m, s, target_l0=8.0, l0_mean=8.0,
                                 train_r2_euclid_centred=train(d, m) + e[0],
                                 r2_euclid_centred=held(d, m) + e[1], q_star_pairwise=0.5))
                rows.append(_row("exemplar", "exemplar_k8", d, m, s, l0_mean=8.0,
                                 train_r2_euclid_centred=1.0 if d >= m else 0.5,
                                 r2_euclid_centred=exemplar_held, q_star_pairwise=0.9))
    return pd.DataFrame(rows)


def _step(low, high):
    return lambda d, m: high if d >= m else low


def _verdict(table):
    (v,) = claim_jump(table)
    return v


def test_a_held_out_jump_is_identification():
    v = _verdict(_curves(_step(0.5, 0.99), _step(0.5, 0.98)))
    assert v.verdict == "identification"
    assert "held-out R² jumps" in v.sentence and "|M| = 512" in v.sentence


def test_a_train_only_jump_is_memorisation():
    v = _verdict(_curves(_step(0.6, 0.99), lambda d, m: 0.70))
    assert v.verdict == "memorisation"
    assert "held-out R² does not jump" in v.sentence
    assert "exemplar control, which stores training rows" in v.sentence


def test_a_held_out_jump_the_exemplar_control_also_reaches_is_memorisation():
    v = _verdict(_curves(_step(0.5, 0.99), _step(0.5, 0.97), exemplar_held=0.98))
    assert v.verdict == "memorisation" and "same held-out R²" in v.sentence


def test_flat_curves_are_no_jump():
    v = _verdict(_curves(lambda d, m: 0.8, lambda d, m: 0.7))
    assert v.verdict == "no jump"


def test_a_rise_that_stops_short_of_one_is_no_jump():
    v = _verdict(_curves(_step(0.5, 0.85), _step(0.4, 0.75)))
    assert v.verdict == "no jump" and "transition" in v.sentence


def test_too_few_dictionary_sizes_says_so():
    v = _verdict(_curves(_step(0.5, 0.99), _step(0.5, 0.98), ds=(64, 512)))
    assert v.verdict == "too few points"


def test_the_jump_is_located_at_its_ratio():
    v = _verdict(_curves(_step(0.5, 0.99), _step(0.5, 0.98), ms=(256,)))
    ratio = float(v.sentence.split("|D|*/|M| = ")[2].split(" ")[0])  # the held-out one
    assert 0.5 <= ratio <= 1.0  # the crossing lies between |D| = 128 and |D| = 256 = |M|


# ---------------------------------------------------------------------------------- claim 1


def _sets(q, r2=None, l0=None, seeds=SEEDS, spread=0.01):
    """One cell (|D| = 256, |M| = 512) with unit sets of the given q* (seed values ± spread)."""
    r2, l0 = r2 or {}, l0 or {}
    fam = {"atoms_aip": "tsae_aip", "relu_features": "relu", "neurons": "neurons",
           "random": "random", "exemplar_k8": "exemplar"}
    rows = []
    for name, value in q.items():
        for i, s in enumerate(seeds):
            d = H if name == "neurons" else 256
            m = 512 if fam[name] in ("tsae_aip", "relu", "exemplar") else None
            rows.append(_row(fam[name], name, d, m, s, q_star_pairwise=value + spread * (i - 1),
                             r2_euclid_centred=r2.get(name, 0.8),
                             l0_mean=l0.get(name, 8.0 if name != "neurons" else 60.0),
                             target_l0=8.0 if fam[name] in ("tsae_aip", "relu") else None))
    return pd.DataFrame(rows)


def _q(table):
    (v,) = claim_q_star(table)
    return v


BASE = {"relu_features": 0.3, "neurons": 0.2, "random": 0.1, "exemplar_k8": 0.4}


def test_atoms_above_every_set_and_control_support_claim_1():
    v = _q(_sets({"atoms_aip": 0.6, **BASE}))
    assert v.verdict == "supported"
    assert "relu_features 0.300 [" in v.sentence and "matched" in v.sentence


def test_a_feature_set_above_the_atoms_contradicts_claim_1():
    assert _q(_sets({"atoms_aip": 0.25, **BASE})).verdict == "contradicted"


def test_a_control_as_high_as_the_atoms_makes_q_star_uninformative():
    v = _q(_sets({"atoms_aip": 0.6, **BASE, "exemplar_k8": 0.6}))
    assert v.verdict == "uninformative" and "exemplar_k8" in v.sentence


def test_overlapping_intervals_one_seed_and_unmatched_sparsity_are_inconclusive():
    assert _q(_sets({"atoms_aip": 0.31, **BASE})).verdict == "inconclusive"
    one = _q(_sets({"atoms_aip": 0.6, **BASE}, seeds=(0,)))
    assert one.verdict == "inconclusive" and "no intervals" in one.sentence
    off = _q(_sets({"atoms_aip": 0.6, **BASE}, l0={"atoms_aip": 12.0}))
    assert off.verdict == "inconclusive" and "target L0" in off.sentence


def test_an_unmatched_feature_set_does_not_decide():
    v = _q(_sets({"atoms_aip": 0.6, **BASE, "relu_features": 0.9}, l0={"relu_features": 30.0}))
    assert v.verdict == "supported" and "not matched" in v.sentence


def test_higher_q_star_at_much_lower_r2_is_not_comparable():
    v = _q(_sets({"atoms_aip": 0.6, **BASE}, r2={"atoms_aip": 0.5}))
    assert v.verdict == "inconclusive" and "R² more than" in v.sentence


@pytest.mark.parametrize("claim", [claim_q_star, claim_jump])
def test_a_table_without_atoms_gives_no_verdict(claim):
    assert claim(_sets({"relu_features": 0.3, "neurons": 0.2})) == []
