"""Fit the atomic inner product S̃ = E[mmᵀ]⁻¹ for every extracted (site, layer).

    python experiments/fit_aip.py [--config experiments/configs/models/smollm2-135m.yaml]
                                  [--out FOLDER | s3://bucket/prefix]

Writes aip.safetensors (S̃, S̃^{1/2}, eigenvalues, metadata) beside each layer's shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

from atoms.aip.data_plane import DataConfig
from atoms.aip.fit import fit_layer_aip, layer_aip_uri
from atoms.core.cli import config_parser, run
from atoms.core.config import load_yaml
from atoms.extract.shard_store import layer_folders, load_layer_manifest
from atoms.store.storage import is_remote, redact

DEFAULT_MODEL_CONFIG = Path(__file__).with_name("configs") / "models" / "smollm2-135m.yaml"


def main(argv: list[str] | None = None) -> None:
    args = config_parser(__doc__.splitlines()[0], DEFAULT_MODEL_CONFIG, DataConfig).parse_args(argv)
    cfg = load_yaml(DataConfig, args.config)
    root = str(args.out) if args.out is not None else cfg.extract.out
    for folder in layer_folders(root):
        path, aip, rows = fit_layer_aip(folder, cfg.aip, progress=not args.quiet)
        manifest = load_layer_manifest(folder)
        stored = redact(layer_aip_uri(folder, cfg.aip.centred))
        where = f"{path} and {stored}" if is_remote(folder) else path
        print(f"{manifest.site} layer {manifest.layer}: {rows} rows, condition number "
              f"{aip.condition_number:.3g}, {aip.n_floored} floored → {where}")


if __name__ == "__main__":
    sys.exit(run(main))
