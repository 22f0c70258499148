"""Exact q* from streamed counts: the same answer as the whole sorted sample."""

import numpy as np
import pytest
import torch

from atoms.aip.metric import AIP, SecondMoment, syrk_upper_
from atoms.evaluate.metrics import coherence, q_star
from atoms.evaluate.threshold_counts import ThresholdCounts, below_at_levels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_decide_every_level_as_numpys_quantile_does(seed):
    rng = np.random.default_rng(seed)
    values = np.round(rng.random(997) ** 3, 4)  # ties included
    qs = np.linspace(0, 1, 2001)
    mu = np.quantile(values, qs, method="linear")
    # Thresholds at, just above and just below the quantiles: j + 1 = c happens often.
    t = mu * (1 + rng.choice([-1e-9, 0.0, 1e-9, 0.3, -0.3], size=qs.size))
    t[::97] = np.inf
    counts = ThresholdCounts(t)
    for part in np.array_split(rng.permutation(values), 7):
        counts.add(torch.from_numpy(part))
    got = below_at_levels(counts, qs, t)
    assert counts.n == values.size
    np.testing.assert_array_equal(got, mu < t)
    assert 0 < got.sum() < got.size


def test_streamed_q_star_equals_the_exact_one():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 24, generator=gen) @ torch.randn(24, 24, generator=gen)
    aip = AIP.from_moment(SecondMoment(24).update(x))
    directions = torch.randn(900, 24, generator=gen)
    for l0 in (torch.randint(1, 5, (3000,), generator=gen), torch.randint(0, 3, (500,))):
        exact = coherence(directions, aip, exact_max_n=10_000)
        streamed = coherence(directions, aip, exact_max_n=10, block=128, l0=l0)
        assert exact.exact and not streamed.exact and streamed.counts is not None
        want = q_star(exact, l0)
        assert 0 < want < 1
        assert q_star(streamed, l0) == want
        np.testing.assert_allclose(streamed.per_unit, exact.per_unit, rtol=1e-12)
        assert streamed.mu == pytest.approx(exact.mu, rel=1e-12)
        summary, reference = streamed.summary(), exact.summary()
        assert summary["coherence_median"] == pytest.approx(reference["coherence_median"],
                                                            rel=5e-3)


def test_blocked_rank_k_update_keeps_the_upper_triangle_exact():
    x = torch.randn(300, 70, dtype=torch.float64)
    c = syrk_upper_(torch.zeros(70, 70, dtype=torch.float64), x, block=16)
    full = x.T @ x
    iu = torch.triu_indices(70, 70)
    torch.testing.assert_close(c[iu[0], iu[1]], full[iu[0], iu[1]])
    assert c[40, 0] == 0  # below the diagonal blocks: never touched
    moment = SecondMoment(70)
    for part in x.split(64):
        moment.update(part)
    torch.testing.assert_close(moment.matrix(), full / 300)
