"""Activation shards on a storage URI (a real S3 server): extraction, resume, pulling them back,
the second moment over stored shards, and the CLI refusing an unwritable ``out``."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from atoms.aip.fit import AIPFitConfig, fit_layer_aip
from atoms.aip.metric import load_aip
from atoms.aip.ray_moment import fit_second_moment
from atoms.core.errors import ConfigError, InputError
from atoms.core.io import file_sha256
from atoms.extract.extraction import ExtractConfig, claim_output, pending_shards
from atoms.extract.ray_extract import run_extraction
from atoms.extract.shard_store import layer_folders, layer_rel, local_layer, pull_shard
from atoms.extract.shards import ShardSet, layer_folder, load_manifest, shard_name
from atoms.store.storage import Storage, mirror_path
from tests.s3server import SECRET

LAYERS = [(site, layer) for site in ("resid_post", "mlp_key") for layer in (0, 2)]


def config(out, **kw) -> ExtractConfig:
    base = dict(model="tiny-random", corpus="pydoc", sites=["resid_post", "mlp_key"],
                layers=[0, 2], positions="no_bos", context_len=16, max_tokens=16 * 20,
                windows_per_shard=6, batch_windows=4, out=str(out))
    return ExtractConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def runs(tmp_path_factory, s3_server, ray_session):
    """The same extraction into an S3 URI and into a local folder (own mirror folder)."""
    tmp = tmp_path_factory.mktemp("stored")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATOMS_STORAGE_CACHE", str(tmp / "writer-cache"))
        remote, local = config(s3_server.uri()), config(tmp / "acts")
        stored = run_extraction(remote, progress=False)
        run_extraction(local, progress=False)
        yield remote, local, stored


def test_stored_folder_holds_shards_sidecars_and_manifests(runs):
    remote, _, stored = runs
    store = Storage(remote.out)
    assert stored == [store.uri_of(f"{layer_rel(s, layer)}/manifest.json")
                      for s, layer in LAYERS]
    files = set(store.files(recursive=True))
    expected = {"extract_config.json"} | {
        f"{layer_rel(s, layer)}/{name}" for s, layer in LAYERS
        for i in range(4) for name in (shard_name(i), shard_name(i).replace("parquet", "json"))
    } | {f"{layer_rel(s, layer)}/manifest.json" for s, layer in LAYERS}
    assert files == expected
    assert pending_shards(remote, 4) == []
    assert [str(f) for f in layer_folders(remote.out)] == [
        store.uri_of(layer_rel(s, layer)) for s, layer in sorted(LAYERS)]


def test_local_layer_verifies_and_equals_a_local_extraction(runs, storage_cache):
    remote, local, _ = runs
    for site, layer in LAYERS:
        folder = local_layer(Storage(remote.out).uri_of(layer_rel(site, layer)))
        assert folder.is_relative_to(storage_cache)  # a fresh mirror: everything pulled
        pulled = ShardSet.open(folder, verify=True)
        here = ShardSet.open(layer_folder(local.out, site, layer), verify=True)
        assert pulled.manifest.shards == here.manifest.shards  # same bytes (sha256) per shard
        assert (pulled.d, pulled.rows) == (here.d, here.rows)
        assert torch.equal(pulled.read_all(), here.read_all())
    plain = layer_folder(local.out, "resid_post", 0)
    assert local_layer(plain) == plain and local_layer(str(plain)) == plain


def test_second_moment_and_aip_over_a_uri_equal_local(runs, storage_cache):
    remote, local, _ = runs
    uri = Storage(remote.out).uri_of(layer_rel("resid_post", 2))
    here = fit_second_moment(layer_folder(local.out, "resid_post", 2), progress=False)
    there = fit_second_moment(uri, progress=False)
    assert there.n == here.n == 20 * 15
    assert torch.allclose(there.matrix(), here.matrix(), rtol=1e-12, atol=0)
    # Tasks pulled their shard into the (driver's) mirror folder passed to the workers.
    assert len(list(mirror_path(uri).glob("shard-*.parquet"))) == 4
    path, aip, rows = fit_layer_aip(uri, AIPFitConfig(), progress=False)
    assert path == mirror_path(uri) / "aip.safetensors" and rows == 300
    assert Storage(uri).size("aip.safetensors") == path.stat().st_size
    assert torch.allclose(load_aip(path)[0].S, aip.S)


def test_second_moment_over_a_uri_with_a_missing_shard_fails_in_one_line(runs, s3_server):
    remote, _, _ = runs
    manifest = Storage(remote.out).read_bytes(f"{layer_rel('resid_post', 0)}/manifest.json")
    lone = Storage(s3_server.uri())
    lone.write_bytes("manifest.json", manifest)
    with pytest.raises(InputError, match=r"shard-00000\.parquet: missing although the manifest"):
        fit_second_moment(lone.uri, progress=False)


def test_pull_shard_replaces_a_stale_mirror_copy(runs, storage_cache):
    remote, _, _ = runs
    folder = Storage(remote.out).uri_of(layer_rel("mlp_key", 0))
    info = load_manifest(local_layer(folder)).shards[1]
    path = mirror_path(folder) / info.name
    path.write_bytes(b"\0" * info.bytes)  # same size, other bytes: pull_file alone keeps it
    assert pull_shard(Storage(folder).uri_of(info.name), info.sha256) == path
    assert file_sha256(path) == info.sha256


def test_rerun_with_another_config_is_refused_without_the_secret(runs):
    remote, _, _ = runs
    with pytest.raises(ConfigError, match="context_len=16, not 32") as e:
        claim_output(dataclasses.replace(remote, context_len=32))
    assert SECRET not in str(e.value) and "***" in str(e.value)


@pytest.mark.slow
def test_rerun_skips_finished_and_redoes_exactly_the_unfinished(s3_server, ray_session,
                                                                 storage_cache, monkeypatch):
    cfg = config(s3_server.uri(), sites=["resid_post"], layers=[1])
    run_extraction(cfg, progress=False)
    store = Storage(cfg.out).child(layer_rel("resid_post", 1))
    mirror = layer_folder(mirror_path(cfg.out), "resid_post", 1)  # where the actors wrote
    stamps = {p.name: p.stat().st_mtime_ns for p in mirror.glob("shard-*.parquet")}

    def shard_files() -> dict[str, int]:
        return {k: v for k, v in store.files().items() if k != "manifest.json"}

    listing = shard_files()
    assert len(stamps) == 4 and len(listing) == 8
    before = ShardSet.open(local_layer(store.uri_of())).read_all()

    import atoms.extract.ray_extract

    seen = []
    spy = atoms.extract.ray_extract.pending_shards
    monkeypatch.setattr(atoms.extract.ray_extract, "pending_shards",
                        lambda *a: seen.append(spy(*a)) or seen[-1])
    run_extraction(cfg, progress=False)  # nothing to do
    assert seen == [[]] and shard_files() == listing and store.exists("manifest.json")
    assert {p.name: p.stat().st_mtime_ns for p in mirror.glob("shard-*.parquet")} == stamps

    store.delete("shard-00001.json")  # a killed run: published parquet, no sidecar
    assert pending_shards(cfg, 4) == [1]
    store.write_bytes(shard_name(2), b"truncated")  # a stored parquet of another size
    assert pending_shards(cfg, 4) == [1, 2]
    store.delete("manifest.json")
    seen.clear()
    run_extraction(cfg, progress=False)
    assert seen == [[1, 2]]
    after = {p.name: p.stat().st_mtime_ns for p in mirror.glob("shard-*.parquet")}
    assert {n for n in after if after[n] != stamps[n]} == {shard_name(1), shard_name(2)}
    assert shard_files() == listing and store.exists("manifest.json")
    assert torch.equal(ShardSet.open(local_layer(store.uri_of())).read_all(), before)


CLI_CONFIG = """
extract:
  model: tiny-random
  corpus: pydoc
  sites: [resid_post]
  layers: [0]
  context_len: 16
  max_tokens: 320
  windows_per_shard: 6
  out: {out}
"""


@pytest.mark.parametrize("where", ["under_a_file", "wrong_credentials"])
def test_cli_refuses_an_unwritable_out_in_one_line(where, tmp_path, s3_server, monkeypatch,
                                                   capsys):
    import experiments.extract
    from atoms.core.cli import run

    def no_work(*a, **k):
        raise AssertionError("work started although out is not writable")

    monkeypatch.setattr(experiments.extract, "run_extraction", no_work)
    if where == "under_a_file":
        (tmp_path / "file").write_text("x")
        out, check = str(tmp_path / "file" / "acts"), None
    else:
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_CONFIG_FILE",
                     "AWS_SHARED_CREDENTIALS_FILE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "wrong")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
        prefix = f"denied-{tmp_path.name}"
        out, check = s3_server.uri(prefix, credentials=False), s3_server.uri(prefix)
    cfg = tmp_path / "extract.yaml"
    cfg.write_text(CLI_CONFIG.format(out=tmp_path / "config-out"))
    assert run(experiments.extract.main, ["--config", str(cfg), "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out: ") and "not writable" in err[0]
    assert not (tmp_path / "config-out").exists()
    if check is None:
        assert (tmp_path / "file").read_text() == "x"
    else:
        monkeypatch.delenv("AWS_ACCESS_KEY_ID")
        monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
        assert Storage(check).files(recursive=True) == {}
