"""Representation shift per layer: Euclidean vs AIP pairwise angles between activations.

    python experiments/shift.py [--config experiments/configs/models/smollm2-135m.yaml]

Needs experiments/extract.py and experiments/fit_aip.py first. Writes <activations>/shift/
shift.parquet (centre statistics per layer) and shift.png (both histograms per layer).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from atoms.aip.data_plane import DataConfig
from atoms.aip.fit import layer_aip_uri, load_aip_once
from atoms.aip.shift import angle_centre, pairwise_angles, sample_rows
from atoms.core.cli import config_parser, run
from atoms.core.config import load_yaml
from atoms.core.io import atomic_path
from atoms.extract.shard_store import layer_folders

DEFAULT_MODEL_CONFIG = Path(__file__).with_name("configs") / "models" / "smollm2-135m.yaml"


def plot(angles: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(angles)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    bins = np.arange(0, 181, 2)
    for ax, (name, (euclid, metric)) in zip(axes.flat, angles.items(), strict=False):
        ax.hist(euclid, bins=bins, alpha=0.6, density=True, label="Euclidean")
        ax.hist(metric, bins=bins, alpha=0.6, density=True, label="AIP")
        ax.axvline(90, color="k", lw=0.8, ls="--")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("pairwise angle (°)", fontsize=8)
    for ax in axes.flat[n:]:
        ax.axis("off")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = config_parser(__doc__.splitlines()[0], DEFAULT_MODEL_CONFIG, DataConfig).parse_args(argv)
    cfg = load_yaml(DataConfig, args.config)
    root = Path(args.out) if args.out is not None else cfg.root
    table, angles = [], {}
    for folder in layer_folders(root):
        aip, meta = load_aip_once(layer_aip_uri(folder))
        x = sample_rows(folder, cfg.shift.sample, cfg.shift.seed)
        euclid, metric = pairwise_angles(x), pairwise_angles(x, aip)
        row = {"site": meta["site"], "layer": meta["layer"], "pairs": len(euclid)}
        row.update({f"euclid_{k}": v for k, v in angle_centre(euclid).items()})
        row.update({f"aip_{k}": v for k, v in angle_centre(metric).items()})
        table.append(row)
        angles[f"{meta['site']} layer {meta['layer']}"] = (euclid, metric)
    df = pd.DataFrame(table)
    out = root / "shift"
    with atomic_path(out / "shift.parquet") as tmp:
        df.to_parquet(tmp, index=False)
    plot(angles, out / "shift.png", f"Representation shift: {meta['model']}")
    print(df.to_string(index=False, float_format="%.2f"))
    print(f"\nwrote {out / 'shift.parquet'} and {out / 'shift.png'}")


if __name__ == "__main__":
    sys.exit(run(main))
