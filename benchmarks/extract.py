"""Extraction throughput against a plain truncated forward, bytes per token, peak memory, and
AIP accumulation against the machine's matmul rate — all in one process.

    python benchmarks/extract.py [--quick]

Baseline: the same model and batches through the first l+1 blocks only (trunk, no LM head, no
hooks, nothing written). Extraction: hooks, position selection, Parquet shards with checksums.
Goal: extraction ≥ 90% of the baseline's tokens/s.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import torch

from atoms.aip.metric import SecondMoment
from atoms.extract.extraction import ExtractConfig, ShardExtractor, build_windows
from atoms.extract.models import load_model, transformer_layers
from benchmarks.common import median_seconds, record


def truncated_forward(model, ids: torch.Tensor, layer: int, batch: int) -> None:
    trunk = model.model
    full = trunk.layers
    trunk.layers = full[: layer + 1]
    try:
        with torch.inference_mode():
            for b0 in range(0, len(ids), batch):
                trunk(input_ids=ids[b0 : b0 + batch], use_cache=False)
    finally:
        trunk.layers = full


def matmul_rate(n: int, d: int, dtype: torch.dtype) -> float:
    a, b = torch.randn(d, n, dtype=dtype), torch.randn(n, d, dtype=dtype)
    return 2 * n * d * d / median_seconds(lambda: a @ b, 5) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer windows and repeats")
    args = parser.parse_args()
    windows, repeats, layer = (16, 2, 5) if args.quick else (64, 3, 15)
    with tempfile.TemporaryDirectory() as out:
        cfg = ExtractConfig(model="smollm2-135m", layers=[layer], context_len=128,
                            max_tokens=128 * windows, windows_per_shard=windows, out=out)
        loaded = load_model(cfg.model)
        w = build_windows(cfg, loaded.tokenizer)
        ids = torch.as_tensor(w.input_ids)
        tokens = ids.numel()
        extractor = ShardExtractor(cfg, loaded)
        assert len(transformer_layers(loaded.model)) > layer
        base, ext = [], []
        for _ in range(repeats):  # alternate, so drift on a noisy machine hits both
            base.append(median_seconds(
                lambda: truncated_forward(loaded.model, ids, layer, cfg.batch_windows), 1, 0))
            ext.append(median_seconds(lambda: extractor.write(0, w.input_ids, w.doc_ids), 1, 0))
        base_tps, ext_tps = tokens / min(base), tokens / min(ext)
        written = sum(p.stat().st_size for p in Path(out).rglob("shard-*.parquet"))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    n, d = 65536, 576
    x = torch.randn(n, d)
    acc = median_seconds(lambda: SecondMoment(d).update(x), 3)
    acc_gflops = 2 * n * d * d / acc / 1e9
    f64, f32 = matmul_rate(n, d, torch.float64), matmul_rate(n, d, torch.float32)

    record(
        "Activation extraction and AIP accumulation (benchmarks/extract.py)",
        ["measure", "value", "baseline", "ratio"],
        [
            [f"extraction tokens/s (smollm2-135m, resid_post layer {layer}, {tokens} tokens)",
             f"{ext_tps:,.0f}", f"{base_tps:,.0f} (truncated forward)",
             f"{ext_tps / base_tps:.2f}"],
            ["bytes written per token (float32, d=576)", f"{written / tokens:,.0f}",
             f"{576 * 4} (activation alone)", f"{written / tokens / (576 * 4):.3f}"],
            ["peak RSS of the process (MB)", f"{peak_mb:,.0f}", "", ""],
            [f"AIP accumulation GFLOP/s (float64 xᵀx, n={n}, d={d})", f"{acc_gflops:.1f}",
             f"{f64:.1f} (float64 matmul); {f32:.1f} (float32)", f"{acc_gflops / f64:.2f}"],
        ],
        notes="Goal: extraction ≥ 0.90 of the truncated forward.",
    )


if __name__ == "__main__":
    main()
