"""Fit the atomic inner product S̃ = E[mmᵀ]⁻¹ for every extracted (site, layer).

    python experiments/fit_aip.py [--config experiments/configs/models/smollm2-135m.yaml]

Writes aip.safetensors (S̃, S̃^{1/2}, eigenvalues, metadata) beside each layer's shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

from atoms.aip import AIP, save_aip
from atoms.config import load_yaml
from atoms.distributed import fit_second_moment
from atoms.shards import layer_folders, load_manifest
from experiments.common import config_parser, run
from experiments.data_config import DEFAULT_MODEL_CONFIG, AIPFitConfig, DataConfig


def fit_layer_aip(folder: Path, cfg: AIPFitConfig, progress: bool = True) -> tuple[Path, AIP, int]:
    """Fit S̃ from every shard of ``folder`` and write ``folder/aip.safetensors``;
    returns (path, S̃, rows)."""
    manifest = load_manifest(folder)
    moment = fit_second_moment(folder, cfg.centred, progress=progress)
    aip = AIP.from_moment(moment, cfg.floor, cfg.allow_floor)
    meta = {"model": manifest.model, "revision": manifest.revision, "site": manifest.site,
            "layer": manifest.layer, "rows": moment.n, "centred": cfg.centred,
            "positions": manifest.positions}
    return save_aip(aip, folder / "aip.safetensors", meta), aip, moment.n


def main(argv: list[str] | None = None) -> None:
    args = config_parser(__doc__.splitlines()[0], DEFAULT_MODEL_CONFIG).parse_args(argv)
    cfg = load_yaml(DataConfig, args.config)
    root = Path(args.out) if args.out is not None else cfg.root
    for folder in layer_folders(root):
        path, aip, rows = fit_layer_aip(folder, cfg.aip, progress=not args.quiet)
        manifest = load_manifest(folder)
        print(f"{manifest.site} layer {manifest.layer}: {rows} rows, condition number "
              f"{aip.condition_number:.3g}, {aip.n_floored} floored → {path}")


if __name__ == "__main__":
    sys.exit(run(main))
