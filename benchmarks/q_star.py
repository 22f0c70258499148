"""q* (pairwise reading) at Llama scale against the Gram matmuls it needs, same process.

    python -m benchmarks.q_star [--quick]

N directions in d dimensions (N = 16384, d = 4096 by default; --quick: 4096 × 1024) under an
AIP: q* streams the upper-triangular Gram blocks into a histogram and exact threshold counts.
The baseline is the same whitening and block matmuls with nothing else; the ratio is q*'s wall
time over theirs (goal ≤ 2) and the peak RSS of this process is read after q* (goal ≤ 2 GB).
Also the AIP second moment: the blocked symmetric rank-k update against a plain xᵀx.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from atoms.aip.metric import AIP, syrk_upper_
from atoms.evaluate.metrics import coherence, q_star
from benchmarks.common import median_seconds, record


def random_aip(d: int, gen: torch.Generator) -> AIP:
    """An AIP with a random well-conditioned S̃ = Q diag(λ) Qᵀ (no data needed)."""
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = torch.rand(d, generator=gen, dtype=torch.float64) + 0.5
    return AIP((q * lam) @ q.T, (q * lam.sqrt()) @ q.T, 1 / lam, float(lam.max() / lam.min()),
               0, 0.0)


def gram_matmuls(directions: torch.Tensor, aip: AIP, block: int) -> None:
    """Only the products coherence() computes: whitening, then each row block against itself
    and every later row."""
    w = aip.whitened_units(directions)
    for r0 in range(0, len(w), block):
        rows = w[r0:r0 + block]
        rows @ rows.T
        if r0 + block < len(w):
            rows @ w[r0 + block:].T


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def q_star_figures(n: int, d: int, block: int = 512) -> list:
    gen = torch.Generator().manual_seed(0)
    directions = torch.randn(n, d, generator=gen)
    aip = random_aip(d, gen)
    l0 = torch.randint(8, 96, (8000,), generator=gen)
    before = peak_rss_gb()
    t0 = time.perf_counter()
    coh = coherence(directions, aip, exact_max_n=2048, block=block, l0=l0)
    value = q_star(coh, l0, "pairwise")
    seconds = time.perf_counter() - t0
    peak = peak_rss_gb()
    t0 = time.perf_counter()
    gram_matmuls(directions, aip, block)
    baseline = time.perf_counter() - t0
    return [f"N={n} d={d}", f"{value:.4f}", f"{seconds:.1f}", f"{baseline:.1f}",
            f"{seconds / baseline:.2f}", f"{before:.2f}", f"{peak:.2f}"]


def moment_figures(b: int, d: int) -> list:
    x = torch.randn(b, d, dtype=torch.float64)
    c = torch.zeros(d, d, dtype=torch.float64)
    full = median_seconds(lambda: c.addmm_(x.T, x), 3)
    blocked = median_seconds(lambda: syrk_upper_(c, x), 3)
    return [f"B={b} d={d}", f"{full * 1e3:.0f}", f"{blocked * 1e3:.0f}", f"{full / blocked:.2f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=4096, d=1024")
    args = parser.parse_args()
    n, d = (4096, 1024) if args.quick else (16384, 4096)
    rows = [q_star_figures(n, d)]
    record("q* at scale (benchmarks/q_star.py)",
           ["shape", "q*", "q* s", "Gram matmuls s", "ratio", "RSS before GB", "peak RSS GB"],
           rows, notes="float64 Gram in blocks of 512 rows, q* exact (threshold counts), "
                       "median/p99 from a log histogram. Goals: ratio ≤ 2, peak ≤ 2 GB.")
    record("AIP second moment: blocked symmetric rank-k update (benchmarks/q_star.py)",
           ["shape", "xᵀx ms", "blocked syrk ms", "speed-up"],
           [moment_figures(8192, 2304 if not args.quick else 1024)],
           notes="float64, SecondMoment.update's product; 512-column blocks.")


if __name__ == "__main__":
    main()
