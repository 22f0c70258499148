"""The threshold-SAE training step on a GPU, as a fraction of the card's bf16 matmul rate.

    python -m benchmarks.gpu_step [--rows 4096] [--d 2304] [--latents 9216]

Default shape: Gemma2-2B's residual width H = 2304 at |D| = 4H. Measured in one process: the
bf16 (B×d)·(d×N) matmul rate, then our step (bf16 matmuls, fp32 thresholds and master weights)
at initial density (dense path) and at a trained sparsity (L0 ≈ 48, auto path), and the autograd
reference step in fp32 and under bf16 autocast. Before timing, the fast step's gradients are
checked against autograd on this device (fp32, both paths). Needs CUDA.
"""

from __future__ import annotations

import argparse
import time

import torch

from atoms.sae.model import SAEConfig, ThresholdSAE
from atoms.train.fast_step import FastThresholdStep
from atoms.train.loop import SAEObjective, TrainConfig, Trainer
from benchmarks.common import record


def cuda_seconds(fn, repeats: int = 20, warmup: int = 5) -> float:
    """Mean seconds per call between CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / repeats


def make_sae(d: int, n: int, x: torch.Tensor, l0: float | None) -> ThresholdSAE:
    sae = ThresholdSAE(SAEConfig(d_in=d, d_sae=n, bandwidth=0.001, init_threshold=0.001)).cuda()
    if l0 is not None:
        with torch.no_grad():
            sae.threshold.copy_(torch.quantile(x[:1024] @ sae.W_enc, 1 - l0 / n, dim=0))
    return sae


def check_gradients(d: int, n: int) -> dict[str, float]:
    """Per parameter, the largest gradient error of the fast step (fp32, dense and sparse) vs
    autograd, relative to the largest reference gradient entry."""
    worst: dict[str, float] = {}
    x = torch.randn(512, d, device="cuda") / d**0.5
    for mode, l0, compiled in (("dense", None, False), ("dense", None, True),
                               ("sparse", 48, False)):
        sae = make_sae(d, n, x, l0)
        loss, *_ = SAEObjective(sae)(x, 1e-3)
        loss.backward()
        ref = {k: p.grad.clone() for k, p in sae.named_parameters()}
        sae.zero_grad(set_to_none=True)
        FastThresholdStep(sae, mode, amp=False, compiled=compiled)(x, 1e-3)
        for k, p in sae.named_parameters():
            err = (p.grad - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-30)
            worst[k] = max(worst.get(k, 0.0), float(err))
    return worst


def step_fn(sae: ThresholdSAE, step: str, x: torch.Tensor, autocast: bool = False,
            compiled: bool = True):
    cfg = TrainConfig(steps=10**9, lr=1e-7, lr_warmup_steps=0, lr_decay_fraction=0.0,
                      sparsity_coeff=1e-3, sparsity_warmup_steps=0, log_every=10**8, step=step)
    trainer = Trainer(sae, cfg)
    if trainer.fast is not None:
        trainer.fast.compiled = compiled
    if not autocast:
        return lambda: trainer.step(x), trainer

    def run():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            trainer.step(x)
    return run, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--d", type=int, default=2304)
    parser.add_argument("--latents", type=int, default=9216)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu_step.py needs a CUDA device")
    b, d, n = args.rows, args.d, args.latents
    torch.manual_seed(0)
    grad_err = check_gradients(d, n)
    x = torch.randn(b, d, device="cuda") / d**0.5
    xa, wa = x.bfloat16(), torch.randn(d, n, device="cuda", dtype=torch.bfloat16)
    ceiling = 2 * b * d * n / cuda_seconds(lambda: xa @ wa, 50) / 1e12
    cases = [("ours (default: compiled dense, bf16)", "auto", None, False, True),
             ("ours (default: compiled dense, bf16)", "auto", 48, False, True),
             ("ours, eager dense, bf16", "dense", None, False, False),
             ("ours, sparse, bf16", "sparse", 48, False, False),
             ("autograd reference, fp32", "reference", None, False, False),
             ("autograd reference, bf16 autocast", "reference", None, True, False)]
    rows, first_calls = [], []
    for name, step, l0, autocast, compiled in cases:
        sae = make_sae(d, n, x, l0)
        fn, trainer = step_fn(sae, step, x, autocast, compiled)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first_calls.append(f"{name}: {time.perf_counter() - t0:.1f} s")
        seconds = cuda_seconds(fn)
        measured = float((sae.encode(x)[0] != 0).sum(1).float().mean())
        path = trainer.fast.last_path if trainer.fast is not None else "autograd"
        tflops = 10 * b * d * n / seconds / 1e12
        rows.append([name, "init" if l0 is None else "trained", f"{measured:.0f}", path,
                     f"{b / seconds:,.0f}", f"{seconds * 1e3:.2f}", f"{tflops:.0f}",
                     f"{tflops / ceiling:.2f}"])
    device = torch.cuda.get_device_name()
    record(f"TSAE step on {device} (benchmarks/gpu_step.py)",
           ["step", "regime", "L0", "path", "rows/s", "ms/step", "TFLOP/s (10·BdN)",
            "fraction of bf16 matmul"], rows,
           notes=f"B={b} d={d} N={n} (Gemma2-2B width at 4H), torch {torch.__version__}; bf16 "
                 f"matmul ceiling {ceiling:.0f} TFLOP/s measured in the same run. Fast-step "
                 f"gradients vs autograd on this device (fp32), max error relative to the "
                 f"largest entry: " + ", ".join(f"{k} {v:.1e}" for k, v in grad_err.items())
                 + ". First call (compilation, excluded from the figures): "
                 + "; ".join(first_calls[:1]) + ".")


if __name__ == "__main__":
    main()
