"""Threshold-SAE training step throughput against the fp32 matmul ceiling, same process.

A dense step (forward, backward, Adam, constraints) needs 10·B·d·N FLOPs: two forward matmuls
and three backward ones (no gradient w.r.t. the input); its rate is read against the matmul
ceiling. Three steps per shape: autograd through the module ('reference'), the hand-written dense
step, and the sparse one at a trained sparsity (θ set so that L0 ≈ 48); the last is faster than
10·B·d·N allows, so it is read as a speed-up. Goal: dense ≥ 0.80 of the ceiling.

    python -m benchmarks.train_step [--quick]
"""

from __future__ import annotations

import torch

from atoms.sae.model import SAEConfig, ThresholdSAE
from atoms.train.loop import TrainConfig, Trainer
from benchmarks.common import matmul_gflops, median_seconds, record, step_shapes

SHAPES = [(4096, 576, 2304), (2048, 2304, 9216)]
STEPS = {"reference": ("reference", False), "dense": ("dense", False), "sparse": ("sparse", True)}


def step_seconds(b: int, d: int, n: int, step: str, trained: bool, repeats: int) -> float:
    torch.manual_seed(0)
    sae = ThresholdSAE(SAEConfig(d_in=d, d_sae=n, bandwidth=0.001, init_threshold=0.001))
    x = torch.randn(b, d) / d**0.5
    if trained:
        with torch.no_grad():
            sae.threshold.copy_(torch.quantile(x[:1024] @ sae.W_enc, 1 - 48 / n, dim=0))
    trainer = Trainer(sae, TrainConfig(steps=10**9, lr=1e-6, lr_warmup_steps=0,
                                       sparsity_warmup_steps=0, log_every=10**8, step=step))
    return median_seconds(lambda: trainer.step(x), repeats, warmup=2)


def main() -> None:
    shapes, repeats = step_shapes(__doc__.splitlines()[0], SHAPES)
    rows = []
    for b, d, n in shapes:
        # Alternate ceiling and step measurements so drift on a noisy machine hits both.
        ceilings, times = [], {k: [] for k in STEPS}
        for _ in range(2):
            ceilings.append(matmul_gflops(b, d, n, repeats))
            for name, (step, trained) in STEPS.items():
                times[name].append(step_seconds(b, d, n, step, trained, repeats))
        ceiling = max(ceilings)
        seconds = {k: min(v) for k, v in times.items()}
        for name in STEPS:
            rate = 10 * b * d * n / seconds[name] / 1e9
            rows.append([f"B={b} d={d} N={n}", name, f"{b / seconds[name]:,.0f}",
                         f"{rate:.1f}", f"{ceiling:.1f}", f"{rate / ceiling:.2f}",
                         f"{seconds['reference'] / seconds[name]:.2f}"])
    record("TSAE training step (benchmarks/train_step.py)",
           ["shape", "step", "rows/s", "GFLOP/s (10·B·d·N)", "matmul GFLOP/s",
            "fraction of ceiling", "vs reference"],
           rows, notes="fp32; reference and dense at initial density, sparse at L0 ≈ 48. "
                       "Goal: dense ≥ 0.80 of the ceiling.")

if __name__ == "__main__":
    main()
