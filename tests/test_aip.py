import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atoms.aip.metric import AIP, SecondMoment
from atoms.core.errors import InputError, SingularMomentError


def random_invertible(d: int, seed: int, condition: float = 20.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return (u * torch.logspace(0, np.log10(condition), d, dtype=torch.float64)) @ v.T


def test_second_moment_hand_computed():
    m = SecondMoment(2).update(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    assert torch.allclose(m.matrix(), torch.tensor([[1.0, 1.0], [1.0, 2.0]], dtype=torch.float64))
    c = SecondMoment(2, centred=True).update(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    # mean (1, 1): covariance [[0, 0], [0, 1]]
    assert torch.allclose(c.matrix(), torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64))


@given(split=st.integers(1, 49), d=st.integers(1, 6), centred=st.booleans())
@settings(max_examples=25, deadline=None)
def test_merge_equals_single_pass(split, d, centred):
    x = torch.randn(50, d, dtype=torch.float64)
    whole = SecondMoment(d, centred).update(x)
    parts = (
        SecondMoment(d, centred).update(x[:split]).merge(SecondMoment(d, centred).update(x[split:]))
    )
    assert parts.n == 50
    assert torch.allclose(whole.matrix(), parts.matrix(), atol=1e-12)


def test_inverse_and_square_root():
    x = torch.randn(500, 5, dtype=torch.float64) @ random_invertible(5, 1)
    aip = AIP.from_moment(SecondMoment(5).update(x))
    m2 = x.T @ x / 500
    assert torch.allclose(aip.S, torch.linalg.inv(m2), rtol=1e-8)
    assert torch.allclose(aip.S_half @ aip.S_half, aip.S, rtol=1e-8)
    assert aip.condition_number == pytest.approx(float(torch.linalg.cond(m2)), rel=1e-6)
    # Whitened data has identity second moment.
    w = aip.whiten(x)
    assert torch.allclose(w.T @ w / 500, torch.eye(5, dtype=torch.float64), atol=1e-9)


def test_inner_norm_cosine_hand_computed():
    aip = AIP.from_moment(torch.diag(torch.tensor([0.5, 1.0])))  # S̃ = diag(2, 1)
    u, v = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, -1.0]])
    assert float(aip.inner(u, v)) == pytest.approx(2 - 1)
    assert float(aip.norm(u)) == pytest.approx(3**0.5)
    assert float(aip.cosine(u, v)) == pytest.approx(1 / 3)


@given(d=st.integers(2, 8), seed=st.integers(0, 10_000))
@settings(max_examples=30, deadline=None)
def test_whitening_makes_aip_orthonormal_atoms_identity(d, seed):
    a = random_invertible(d, seed)
    aip = AIP.from_moment(a @ a.T)  # S̃ = (A Aᵀ)⁻¹
    q, _ = torch.linalg.qr(
        torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    )
    atoms = q.T @ a.T  # rows dⱼ = A qⱼ are orthonormal under S̃
    assert torch.allclose(aip.gram(atoms), torch.eye(d, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(aip.norm(atoms), torch.ones(d, dtype=torch.float64), atol=1e-8)


@given(seed=st.integers(0, 10_000))
@settings(max_examples=20, deadline=None)
def test_aip_cosine_invariant_under_reparameterisation(seed):
    """cos_S̃ between activations does not change when the space is mapped by any invertible A."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 4, generator=g, dtype=torch.float64) + 1.0
    a = random_invertible(4, seed + 1)
    y = x @ a.T
    cx = AIP.from_moment(SecondMoment(4).update(x)).cosine(x[:10], x[10:20])
    cy = AIP.from_moment(SecondMoment(4).update(y)).cosine(y[:10], y[10:20])
    assert torch.allclose(cx, cy, atol=1e-8)


def test_singular_moment_is_a_clear_error():
    x = torch.randn(3, 6)  # 3 rows cannot span 6 dimensions
    with pytest.raises(SingularMomentError, match="from only 3 rows for d=6"):
        AIP.from_moment(SecondMoment(6).update(x))
    floored = AIP.from_moment(SecondMoment(6).update(x), allow_floor=True)
    assert floored.n_floored == 3 and torch.isfinite(floored.S).all()


@pytest.mark.parametrize(
    "batch, match",
    [
        (torch.tensor([[1.0, float("nan")]]), "1 NaN/Inf values"),
        (torch.ones(2, 3), "expected width d=2"),
        (torch.ones(2), "expected a 2-D"),
        (torch.ones(0, 2), "no rows"),
    ],
)
def test_bad_batches(batch, match):
    with pytest.raises(InputError, match=match):
        SecondMoment(2).update(batch)


def test_bad_moments():
    with pytest.raises(InputError, match="square"):
        AIP.from_moment(torch.ones(2, 3))
    with pytest.raises(InputError, match="not symmetric"):
        AIP.from_moment(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
    with pytest.raises(InputError, match="no rows"):
        SecondMoment(2).matrix()
    with pytest.raises(InputError, match="cannot merge"):
        SecondMoment(2).merge(SecondMoment(3))
