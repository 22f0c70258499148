"""The AIP-geometry training step against the Euclidean one, same process, both shapes.

Under geometry 'aip' the trainer's batches are rows already in the training geometry,
(x − c)·S̃^{1/2}: an in-memory |M| is mapped once before training, a streamed one batch by
batch (one more (B, d)·(d, d) product). Both are timed against the Euclidean step, dense (the
initial density) and sparse (θ set so that L0 ≈ 48), alternating so drift hits all alike.
Goal: the AIP step ≤ 1.1× the Euclidean step.

    python -m benchmarks.geometry_step [--quick]
"""

from __future__ import annotations

import torch

from atoms.aip.metric import AIP, SecondMoment, Whitening
from atoms.sae.model import SAEConfig, ThresholdSAE
from atoms.train.loop import TrainConfig, Trainer
from benchmarks.common import median_seconds, record, step_shapes
from benchmarks.train_step import SHAPES

VARIANTS = ("euclidean", "aip (mapped once)", "aip (mapped per batch)")


def step_seconds(b: int, d: int, n: int, variant: str, trained: bool, repeats: int) -> float:
    torch.manual_seed(0)
    raw = torch.randn(b, d) @ torch.randn(d, d) / d
    geometry = "euclidean" if variant == "euclidean" else "aip"
    sae = ThresholdSAE(SAEConfig(d_in=d, d_sae=n, geometry=geometry))
    w = Whitening.of(AIP.from_moment(SecondMoment(d).update(raw), allow_floor=True))
    if geometry == "aip":
        sae.set_whitening(w)
    sae.fit_input_scale(raw)
    x = raw if geometry == "euclidean" else sae.to_geometry(raw)
    if trained:
        with torch.no_grad():
            z = sae.pre_activations(x[:1024] * sae.input_scale)
            sae.threshold.copy_(torch.quantile(z, 1 - 48 / n, dim=0))
    trainer = Trainer(sae, TrainConfig(steps=10**9, lr=1e-6, lr_warmup_steps=0,
                                       sparsity_warmup_steps=0, log_every=10**8, step=
                                       "sparse" if trained else "dense"))
    if variant == "aip (mapped per batch)":
        cast = w.to(raw)
        return median_seconds(lambda: trainer.step(cast.apply(raw)), repeats, warmup=2)
    return median_seconds(lambda: trainer.step(x), repeats, warmup=2)


def main() -> None:
    shapes, repeats = step_shapes(__doc__.splitlines()[0], SHAPES)
    rows = []
    for b, d, n in shapes:
        for trained in (False, True):
            times = {v: [] for v in VARIANTS}
            for _ in range(2):
                for v in VARIANTS:
                    times[v].append(step_seconds(b, d, n, v, trained, repeats))
            best = {v: min(t) for v, t in times.items()}
            for v in VARIANTS:
                rows.append([f"B={b} d={d} N={n}", "sparse, L0 ≈ 48" if trained else "dense",
                             v, f"{best[v] * 1e3:.1f}", f"{best[v] / best['euclidean']:.3f}"])
    record("AIP-geometry step vs Euclidean step (benchmarks/geometry_step.py)",
           ["shape", "step", "geometry", "ms / step", "vs Euclidean"], rows,
           notes="fp32, one process, alternating. Goal: AIP ≤ 1.1× Euclidean.")


if __name__ == "__main__":
    main()
