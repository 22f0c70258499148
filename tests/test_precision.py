"""Centred statistics stay exact under a large shared offset (residual streams carry one),
against a float64 two-pass computation; the shifted sums still merge across tasks."""

import numpy as np
import pytest
import torch

from atoms.aip.metric import AIP, SecondMoment
from atoms.evaluate.metrics import r2_scores

OFFSETS = [1e5, 1e6, 1e7]


def offset_rows(offset: float, n: int = 6000, d: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    direction = torch.randn(d, generator=g, dtype=torch.float64)
    return offset * direction / direction.norm() + torch.randn(n, d, generator=g,
                                                                dtype=torch.float64) @ mix


def two_pass_cov(x: torch.Tensor) -> np.ndarray:
    a = x.numpy()
    c = a - a.mean(0)
    return c.T @ c / len(a)


def two_pass_r2(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    a, b = x.numpy(), x_hat.numpy()
    return 1 - ((a - b) ** 2).sum() / ((a - a.mean(0)) ** 2).sum()


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("offset", OFFSETS)
def test_centred_moment_and_its_aip_at_a_large_offset(offset):
    x = offset_rows(offset)
    moment = SecondMoment(x.shape[1], centred=True)
    for batch in x.split(1000):
        moment.update(batch)
    exact = two_pass_cov(x)
    assert rel(moment.matrix().numpy(), exact) <= 1e-9
    assert rel(AIP.from_moment(moment).S.numpy(), np.linalg.inv(exact)) <= 1e-9


@pytest.mark.parametrize("offset", OFFSETS)
def test_shifted_sums_merge_to_the_one_pass_moment(offset):
    x = offset_rows(offset)
    one = SecondMoment(x.shape[1], centred=True).update(x)
    merged = SecondMoment(x.shape[1], centred=True)
    for part in (x[:100], x[100:2500], x[2500:2501], x[2501:]):  # each its own shift
        merged.merge(SecondMoment(x.shape[1], centred=True).update(part))
    merged.merge(SecondMoment(x.shape[1], centred=True))  # an empty part changes nothing
    assert merged.n == len(x)
    assert rel(merged.matrix().numpy(), one.matrix().numpy()) <= 1e-9
    assert rel(merged.mean.numpy(), x.numpy().mean(0)) <= 1e-12


def test_the_uncentred_moment_is_the_plain_sum():
    x = offset_rows(10.0)
    moment = SecondMoment(x.shape[1]).update(x[:3000]).merge(SecondMoment(x.shape[1]).update(
        x[3000:]))
    assert rel(moment.matrix().numpy(), x.numpy().T @ x.numpy() / len(x)) <= 1e-13


@pytest.mark.parametrize("offset", OFFSETS)
def test_centred_r2_at_a_large_offset(offset):
    x = offset_rows(offset)
    x_hat = x + 0.3 * torch.randn(x.shape, dtype=torch.float64)
    r2 = r2_scores(x, x_hat)
    assert abs(r2["euclid_centred"] - two_pass_r2(x, x_hat)) <= 1e-9


def test_the_ray_fit_of_a_centred_moment_equals_one_pass(tmp_path, ray_session):
    from atoms.aip.ray_moment import fit_second_moment
    from atoms.extract.shards import ShardSet
    from atoms.train.batches import read_rows
    from tests.shardsets import write_shard_set

    folder = write_shard_set(tmp_path / "resid_post" / "layer_0", offset_rows(1e5).float(), 5)
    s = ShardSet.open(folder)
    rows = read_rows(s.paths, s.d, s.rows)
    one = SecondMoment(s.d, centred=True).update(rows)
    by_tasks = fit_second_moment(folder, centred=True, progress=False)
    assert by_tasks.n == one.n
    assert rel(by_tasks.matrix().numpy(), one.matrix().numpy()) <= 1e-9
