"""The sparsity controller: λ steered so that the trained SAE sits at a target L0."""

import pytest

from atoms.evaluate.evaluator import evaluate_sae
from atoms.evaluate.synthetic import SyntheticConfig, make_atom_set
from atoms.sae.model import SAEConfig, build_sae
from atoms.train.loop import TrainConfig, train_sae


@pytest.fixture(scope="module")
def planted():
    syn = make_atom_set(SyntheticConfig(d=32, n_atoms=96, k=6, exact_k=False, n_samples=9000,
                                        coherence=0.3))
    return syn.activations.float()


@pytest.mark.parametrize("kind,start,target", [("threshold", 1e-3, 8.0), ("relu", 1e-2, 8.0),
                                               ("threshold", 1e-3, 3.0)])
def test_the_controller_reaches_the_target_l0_on_held_out_rows(planted, kind, start, target):
    sae = build_sae(SAEConfig(d_in=32, d_sae=192, kind=kind, seed=0))
    cfg = TrainConfig(steps=800, batch_size=256, lr=2e-3, sparsity_coeff=start,
                      target_l0=target, sparsity_warmup_steps=50, lr_warmup_steps=20,
                      l0_until=0.8)
    result = train_sae(sae, planted[:8000], cfg, progress=False)
    held = evaluate_sae(sae, planted[8000:])["eval_l0_mean"]
    assert abs(held / target - 1) <= 0.10, (held, target)
    lams = [r["sparsity_coeff"] for r in result.history]
    assert lams[-1] != start and lams[-1] == lams[-2]  # steered, then frozen


def test_without_a_target_lambda_follows_the_schedule(planted):
    sae = build_sae(SAEConfig(d_in=32, d_sae=64, seed=0))
    cfg = TrainConfig(steps=100, batch_size=256, sparsity_coeff=1e-3, sparsity_warmup_steps=10)
    result = train_sae(sae, planted[:2000], cfg, progress=False)
    assert {r["sparsity_coeff"] for r in result.history} == {1e-3}


def test_a_training_run_steers_by_its_held_out_rows(tmp_path):
    """train_local reads the controller's L0 on its held-out rows, so the reported held-out
    L0 (not only the training one) sits at the target."""
    from atoms.train.run import train_local
    from tests.shardsets import synthetic_shard_set
    from tests.test_train_run import job

    data = synthetic_shard_set(tmp_path / "layer", rows=12288)
    spec = job(data, tmp_path / "run", sae={"d_sae": 128, "bandwidth": 0.01,
                                             "init_threshold": 0.001, "bias": True},
               train={"steps": 600, "sparsity_coeff": 1e-3, "target_l0": 6.0,
                      "sparsity_warmup_steps": 50, "lr": 2e-3})
    metrics = train_local(spec, progress=False)
    assert abs(metrics["eval_l0_mean"] / 6.0 - 1) <= 0.10, metrics["eval_l0_mean"]
    assert metrics["history"][-1]["sparsity_coeff"] != 1e-3


def test_a_controlled_run_needs_a_positive_starting_lambda():
    from atoms.core.errors import ConfigError

    with pytest.raises(ConfigError, match="sparsity_coeff.*starting λ"):
        TrainConfig(target_l0=8.0, sparsity_coeff=0.0)


def test_a_threshold_sae_ends_calibrated_to_the_target_on_its_probe_rows(planted):
    from atoms.train.batches import TensorBatches
    from atoms.train.loop import Trainer, train_epochs

    def run(calibrate):
        sae = build_sae(SAEConfig(d_in=32, d_sae=192, seed=0))
        cfg = TrainConfig(steps=200, batch_size=256, lr=2e-3, sparsity_coeff=1e-2,
                          target_l0=8.0, sparsity_warmup_steps=20, l0_calibrate=calibrate)
        sae.fit_input_scale(planted[:8000])
        trainer = Trainer(sae, cfg)
        trainer.set_l0_probe(planted[8000:])
        train_epochs(trainer, TensorBatches(planted[:8000], 256, 0))
        return trainer, evaluate_sae(sae, planted[8000:])["eval_l0_mean"]

    plain, l0_plain = run(False)
    calibrated, l0 = run(True)
    assert plain.state.threshold_scale is None
    assert abs(l0 / 8.0 - 1) <= 0.02, (l0, l0_plain)  # the probe rows are these rows
    assert calibrated.state.threshold_scale != 1.0


def test_threshold_scale_for_hits_the_target_and_moves_with_it():
    import torch

    from atoms.train.loop import threshold_scale_for

    pre = torch.rand(500, 100)
    theta = torch.full((100,), 0.5)
    for target in (5.0, 20.0, 80.0):
        c = threshold_scale_for(pre, theta, target)
        assert abs(float((pre > c * theta).sum(1).float().mean()) - target) < 0.5
    assert threshold_scale_for(pre, theta, 5.0) > threshold_scale_for(pre, theta, 80.0)


@pytest.fixture(scope="module")
def tiny_random_rows():
    """resid_post rows of the tiny random Llama at layer 1 on the Python docs (no Ray)."""
    import torch

    from atoms.extract.extraction import ExtractConfig, ShardExtractor, build_windows

    cfg = ExtractConfig(model="tiny-random", corpus="pydoc", layers=[1], context_len=16,
                        max_tokens=16 * 400, windows_per_doc=6, out="unused")
    extractor = ShardExtractor(cfg)
    windows = build_windows(cfg, extractor.loaded.tokenizer)
    rows = [next(iter(r.activations.values())) for _, r in extractor.extract(windows.input_ids)]
    return torch.cat([torch.as_tensor(r) for r in rows]).float()


@pytest.mark.parametrize("kind,start", [("threshold", 1e-3), ("relu", 1e-2)])
def test_the_controller_reaches_the_target_l0_on_tiny_random_activations(tiny_random_rows,
                                                                         kind, start):
    x = tiny_random_rows
    cut = len(x) * 4 // 5
    sae = build_sae(SAEConfig(d_in=x.shape[1], d_sae=128, kind=kind, seed=0))
    cfg = TrainConfig(steps=600, batch_size=256, lr=2e-3, sparsity_coeff=start, target_l0=8.0,
                      sparsity_warmup_steps=50, lr_warmup_steps=20)
    from atoms.train.batches import TensorBatches
    from atoms.train.loop import Trainer, train_epochs

    sae.fit_input_scale(x[:cut])
    trainer = Trainer(sae, cfg)
    import torch

    held_out = x[cut:][torch.randperm(len(x) - cut, generator=torch.Generator().manual_seed(0))]
    trainer.set_l0_probe(held_out[:512])  # validation and test: two samples, as in a study
    train_epochs(trainer, TensorBatches(x[:cut], 256, 0))
    held = evaluate_sae(sae, held_out[512:])["eval_l0_mean"]  # rows the probe never saw
    assert abs(held / 8.0 - 1) <= 0.10, held
