"""Shared benchmark helpers: timing, the matmul ceiling, and RESULTS.md rows."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")


def median_seconds(fn, repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_gflops(b: int, d: int, n: int, repeats: int = 5) -> float:
    """Measured fp32 GFLOP/s of a (b, d) @ (d, n) matmul: the machine's ceiling here."""
    x, w = torch.randn(b, d), torch.randn(d, n)
    out = torch.empty(b, n)
    seconds = median_seconds(lambda: torch.mm(x, w, out=out), repeats)
    return 2 * b * d * n / seconds / 1e9


def step_shapes(description: str, shapes: list[tuple]) -> tuple[list[tuple], int]:
    """(shapes, repeats) from the command line: ``--quick`` keeps the first shape and 3
    repeats, else every shape and 5."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="first shape only, fewer repeats")
    quick = parser.parse_args().quick
    return (shapes[:1], 3) if quick else (list(shapes), 5)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} threads"


def record(title: str, header: list[str], rows: list[list], notes: str = "") -> None:
    """Append a dated Markdown table to benchmarks/RESULTS.md and print it."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"\n## {title} — {stamp}\n", f"Machine: {machine()}\n"]
    if notes:
        lines.append(f"{notes}\n")
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nEach section is appended by a script in `benchmarks/`; "
            "ratios are against a baseline run in the same process.\n"
        )
    with RESULTS.open("a") as f:
        f.write(text)
