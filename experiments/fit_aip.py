"""Fit the atomic inner product S̃ = E[mmᵀ]⁻¹ for every extracted (site, layer).

    python experiments/fit_aip.py [--config experiments/configs/models/smollm2-135m.yaml]
                                  [--out FOLDER | s3://bucket/prefix]

Writes aip.safetensors (S̃, S̃^{1/2}, eigenvalues, metadata) beside each layer's shards.
"""

from __future__ import annotations

import sys
from pathlib import Path

from atoms.aip.metric import AIP, save_aip
from atoms.core.config import load_yaml
from atoms.extract.ray_extract import fit_second_moment
from atoms.extract.shard_store import layer_folders_of, load_layer_manifest
from atoms.store.storage import Storage, is_remote, mirror_path
from experiments.common import config_parser, run
from experiments.data_config import DEFAULT_MODEL_CONFIG, AIPFitConfig, DataConfig

AIP_FILE = "aip.safetensors"


def fit_layer_aip(folder: Path | str, cfg: AIPFitConfig, progress: bool = True
                  ) -> tuple[Path, AIP, int]:
    """Fit S̃ from every shard of ``folder`` and write ``folder/aip.safetensors``;
    returns (path, S̃, rows). For a stored layer folder (URI) the file is written into the
    node mirror and then published beside the shards; the returned path is the mirror's."""
    manifest = load_layer_manifest(folder)
    moment = fit_second_moment(folder, cfg.centred, progress=progress)
    aip = AIP.from_moment(moment, cfg.floor, cfg.allow_floor)
    meta = {"model": manifest.model, "revision": manifest.revision, "site": manifest.site,
            "layer": manifest.layer, "rows": moment.n, "centred": cfg.centred,
            "positions": manifest.positions}
    if not is_remote(folder):
        return save_aip(aip, Path(folder) / AIP_FILE, meta), aip, moment.n
    path = save_aip(aip, mirror_path(folder) / AIP_FILE, meta)
    Storage(folder).put_file(path, AIP_FILE)
    return path, aip, moment.n


def main(argv: list[str] | None = None) -> None:
    args = config_parser(__doc__.splitlines()[0], DEFAULT_MODEL_CONFIG).parse_args(argv)
    cfg = load_yaml(DataConfig, args.config)
    root = str(args.out) if args.out is not None else cfg.extract.out
    for folder in layer_folders_of(root):
        path, aip, rows = fit_layer_aip(folder, cfg.aip, progress=not args.quiet)
        manifest = load_layer_manifest(folder)
        where = f"{path} and {Storage(folder).show(AIP_FILE)}" if is_remote(folder) else path
        print(f"{manifest.site} layer {manifest.layer}: {rows} rows, condition number "
              f"{aip.condition_number:.3g}, {aip.n_floored} floored → {where}")


if __name__ == "__main__":
    sys.exit(run(main))
