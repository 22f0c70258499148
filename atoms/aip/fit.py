"""S̃ for one layer folder: fitted from every shard, kept as ``aip.safetensors`` beside them.

This module owns the file: its name, where it lives for a layer folder (a path or a storage
URI), fitting it and loading it. A stored layer's S̃ is written into the node mirror, then
published beside the shards.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from atoms.aip.metric import AIP, load_aip, save_aip
from atoms.aip.ray_moment import EXCLUDES, RowFilter, fit_second_moment
from atoms.core.config import require
from atoms.extract.shard_store import load_layer_manifest
from atoms.store.storage import Storage, fetch, is_remote, mirror_path

AIP_FILE = "aip.safetensors"
AIP_CENTRED_FILE = "aip_centred.safetensors"
"""The centred Cov⁻¹ (with its mean), beside the paper's uncentred S̃: the covariance-whitening
control's geometry."""


def aip_file(centred: bool = False) -> str:
    return AIP_CENTRED_FILE if centred else AIP_FILE


@dataclass
class AIPFitConfig:
    centred: bool = False
    """Centred covariance instead of the paper's uncentred E[mmᵀ] (ablation)."""
    floor: float = 1e-6
    """Eigenvalue floor relative to λ_max."""
    allow_floor: bool = False
    """Floor an ill-conditioned moment instead of failing."""
    exclude: list[str] = field(default_factory=list)
    """Rows left out of E[mmᵀ]: 'bos' (position-0 rows of an extraction that prepended BOS)
    and 'sinks' (norm above ``sink_factor`` × the shard's median norm). Recorded in S̃'s file."""
    sink_factor: float = 10.0

    def __post_init__(self):
        require(0 < self.floor < 1, "floor", f"must be in (0, 1), got {self.floor}")
        bad = [e for e in self.exclude if e not in EXCLUDES]
        require(not bad, "exclude", f"{bad[0] if bad else ''!r} is unknown (choose from "
                f"{', '.join(EXCLUDES)})")
        require(self.sink_factor > 1, "sink_factor", f"must be > 1, got {self.sink_factor}")

    def recipe(self) -> dict:
        """What S̃'s file records of how it was fitted (a reuse must match it)."""
        return {"centred": self.centred, "exclude": sorted(self.exclude),
                "sink_factor": self.sink_factor if "sinks" in self.exclude else None}


def layer_aip_uri(folder: Path | str, centred: bool = False) -> str:
    """Where the S̃ (or centred Cov⁻¹) of the layer folder ``folder`` lives (a path or a URI)."""
    return Storage(folder).uri_of(aip_file(centred))


def has_layer_aip(folder: Path | str, centred: bool = False) -> bool:
    return Storage(folder).size(aip_file(centred)) is not None


def fit_layer_aip(folder: Path | str, cfg: AIPFitConfig, progress: bool = True
                  ) -> tuple[Path, AIP, int]:
    """Fit S̃ from every shard of ``folder`` and write ``folder/aip.safetensors`` (centred:
    ``aip_centred.safetensors``);
    returns (path, S̃, rows). For a stored layer folder (URI) the file is written into the
    node mirror and then published beside the shards; the returned path is the mirror's."""
    manifest = load_layer_manifest(folder)
    rows = RowFilter(bos="bos" in cfg.exclude and bool(manifest.config.get("prepend_bos", True)),
                     sinks="sinks" in cfg.exclude, sink_factor=cfg.sink_factor)
    dropped: dict = {}
    moment = fit_second_moment(folder, cfg.centred, progress=progress, rows=rows,
                               dropped=dropped)
    aip = AIP.from_moment(moment, cfg.floor, cfg.allow_floor)
    meta = {"model": manifest.model, "revision": manifest.revision, "site": manifest.site,
            "layer": manifest.layer, "rows": moment.n, "positions": manifest.positions,
            "corpus": manifest.corpus, "dropped_bos": dropped["bos"],
            "dropped_sinks": dropped["sinks"], **cfg.recipe()}
    name = aip_file(cfg.centred)
    path = save_aip(aip, mirror_path(folder) / name, meta)
    if is_remote(folder):
        Storage(folder).put_file(path, name)
    return path, aip, moment.n


def ensure_layer_aip(folder: Path | str, cfg: AIPFitConfig, progress: bool = True) -> str:
    """The S̃ of ``folder`` (path or URI), fitted from every shard when it is missing or was
    fitted by another recipe (``AIPFitConfig.recipe``: other exclusions)."""
    if not has_layer_aip(folder, cfg.centred) or not _same_recipe(folder, cfg):
        _, aip, rows = fit_layer_aip(folder, cfg, progress)
        what = "centred Cov⁻¹" if cfg.centred else "S̃"
        print(f"fitted {what} on {rows} rows (condition number {aip.condition_number:.3g})")
    return layer_aip_uri(folder, cfg.centred)


def _same_recipe(folder: Path | str, cfg: AIPFitConfig) -> bool:
    _, meta = load_aip_once(layer_aip_uri(folder, cfg.centred))
    recorded = {"centred": meta.get("centred", False), "exclude": meta.get("exclude", []),
                "sink_factor": meta.get("sink_factor")}
    return recorded == cfg.recipe()


@functools.lru_cache(maxsize=4)
def _load(path: str, stamp: tuple) -> tuple[AIP, dict]:
    return load_aip(path)


def load_aip_once(uri: str | Path) -> tuple[AIP, dict]:
    """``load_aip`` of a path or URI, read once per process while the file is unchanged."""
    path = fetch(uri)
    st = Path(path).stat()
    return _load(str(path), (st.st_size, st.st_mtime_ns))
