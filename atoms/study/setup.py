"""Everything a study does before its first trial: checks that need no model and no Ray, the
shard folder (given or extracted), S̃, and the context every trial shares."""

from __future__ import annotations

import dataclasses
import json

from atoms.aip.fit import AIPFitConfig, ensure_layer_aip, load_aip_once
from atoms.core.config import to_dict
from atoms.core.errors import ConfigError
from atoms.core.io import code_version
from atoms.extract.extraction import check_model_layers
from atoms.extract.models import site_width
from atoms.extract.ray_extract import run_extraction
from atoms.extract.shard_store import load_layer_manifest, local_layer
from atoms.extract.shards import MANIFEST, layer_folder, load_manifest
from atoms.store.storage import Storage, redact, redact_all
from atoms.study.config import StudyConfig
from atoms.study.plan import check_against_manifest, check_scale, planned_split
from atoms.study.trial import StudyContext
from atoms.train.batches import DataSplit, held_out_rows


def _extracted_layer(cfg: StudyConfig) -> str:
    """Where the extraction puts the study's (site, layer): a path or a URI."""
    ex = cfg.data.extract
    return str(layer_folder(ex.out, ex.sites[0], ex.layers[0]))


def precheck(cfg: StudyConfig) -> None:
    """Every check that needs no model and no Ray: the output (and extraction) storage is
    writable, |M| and held-out sizes against the rows that exist (or that the extraction will
    give), and the grid against H."""
    Storage(cfg.out).check_writable("out")
    for p in cfg.baselines.pretrained:
        if not Storage(p.path).exists():
            raise ConfigError(f"baselines.pretrained: {p.name}: {redact(p.path)} does not exist")
    ex = cfg.data.extract
    if not cfg.data.shards:
        Storage(ex.out).check_writable("data.extract.out")
    folder = cfg.data.shards or _extracted_layer(cfg)
    if cfg.data.shards or Storage(folder).exists(MANIFEST):
        manifest = load_layer_manifest(folder)  # a stored one is read, not its shards
        check_against_manifest(cfg, manifest, redact(folder))
    else:
        check_model_layers(ex)
        planned = planned_split(cfg)
        if planned is not None:
            check_scale(cfg, *planned, f"data.extract (max_tokens={ex.max_tokens})")


def planned_width(cfg: StudyConfig) -> int:
    """H of the study's activations without extracting them: the shard set's when it exists,
    else the model config's width of the site (no weights, no Ray)."""
    folder = cfg.data.shards or _extracted_layer(cfg)
    if cfg.data.shards or Storage(folder).exists(MANIFEST):
        return load_layer_manifest(folder).d
    ex = cfg.data.extract
    return site_width(ex.model, ex.sites[0], ex.revision)


def shard_folder(cfg: StudyConfig, progress: bool) -> str:
    """The study's shard folder (path or URI): given, or extracted now (finished shards are
    kept)."""
    if cfg.data.shards:
        return cfg.data.shards
    run_extraction(cfg.data.extract, progress=progress)
    return Storage(_extracted_layer(cfg)).uri


def study_aip(cfg: StudyConfig, folder: str, progress: bool) -> str:
    """The S̃ of the study (path or URI), fitted (uncentred) when missing: on the training
    layer ``folder``, or on ``data.aip.source`` (extracted now, finished shards kept), leaving
    out ``data.aip.exclude``; the centred Cov⁻¹ beside it too when a geometry trains in it."""
    recipe = cfg.data.aip
    if recipe.source is not None:
        run_extraction(recipe.source, progress=progress)
        src = recipe.source
        folder = str(layer_folder(src.out, src.sites[0], src.layers[0]))
    fit = AIPFitConfig(floor=cfg.data.aip_floor, exclude=list(recipe.exclude),
                       sink_factor=recipe.sink_factor)
    if "aip_centred" in cfg.grid.geometries:
        ensure_layer_aip(folder, dataclasses.replace(fit, centred=True, allow_floor=True),
                         progress)
    return ensure_layer_aip(folder, fit, progress)


def aip_provenance(aip_path: str) -> dict:
    """What every row records of its S̃: the corpus of its rows, how many, the exclusions and
    the rows they dropped."""
    _, meta = load_aip_once(aip_path)
    return {"aip_corpus": meta.get("corpus"), "aip_rows": meta.get("rows"),
            "aip_exclude": ",".join(meta.get("exclude", [])),
            "aip_dropped_bos": meta.get("dropped_bos", 0),
            "aip_dropped_sinks": meta.get("dropped_sinks", 0)}


def context(cfg: StudyConfig, folder: str, aip_path: str) -> StudyContext:
    """What every trial shares: the held-out validation and test rows, S̃, the provenance."""
    local = local_layer(folder)  # a URI's shards come to this node's mirror
    split = DataSplit.of(local, cfg.data.holdout_shards)  # every sha256 checked
    check_scale(cfg, split.train_rows, split.holdout_rows, redact(folder))
    pool = cfg.data.validation_rows + cfg.data.test_rows
    held = held_out_rows(split, pool, pool)  # validation first: a run's own held-out rows
    manifest = load_manifest(local)
    meta = {"model": manifest.model, "revision": manifest.revision, "site": manifest.site,
            "layer": manifest.layer, "positions": manifest.positions, **aip_provenance(aip_path),
            "data_folder": redact(Storage(folder).uri), "code_version": code_version(),
            "study_config": json.dumps(redact_all(to_dict(cfg)), sort_keys=True)}
    threads = max(1, int(cfg.execution.cpus_per_trial))
    return StudyContext(cfg, Storage(folder).uri, split.d, Storage(aip_path).uri,
                        held[: cfg.data.validation_rows].clone(),
                        held[cfg.data.validation_rows:].clone(), meta, threads)
