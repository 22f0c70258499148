"""Parquet activation shards: bit-exact round trips, sidecars, resume, manifest checks."""

import json
import logging
import re

import numpy as np
import pyarrow as pa
import pytest
import torch

import atoms.extract.shards as shards
from atoms.core.errors import InputError
from atoms.core.io import file_sha256
from atoms.extract.shards import (
    Manifest,
    ShardSet,
    finished_shards,
    layer_folder,
    load_manifest,
    read_shard,
    shard_name,
    write_manifest,
    write_shard,
)

UINT = {"float32": np.uint32, "float16": np.uint16}


def ids(rows, start=0):
    r = np.arange(start, start + rows)
    return {"token_ids": r % 50000, "doc_ids": r // 7, "positions": r % 128}


def special_rows(dtype):
    big = 3.0e38 if dtype == "float32" else 65504.0
    tiny = 1e-8 if dtype == "float32" else 6e-8  # float16's smallest subnormal is ~6e-8
    rng = np.random.default_rng(0)
    a = rng.standard_normal((37, 9)).astype(dtype)
    a[0, :6] = [tiny, -0.0, 0.0, big, -big, -tiny]
    return a


def make_folder(root, sizes=(5, 7, 3), d=6, dtype="float32", **manifest_fields):
    """A finished folder of shards with the given row counts; returns (folder, arrays)."""
    folder = layer_folder(root, "resid_post", 3)
    arrays, infos, start = [], [], 0
    for i, rows in enumerate(sizes):
        a = np.random.default_rng(i).standard_normal((rows, d)).astype(dtype)
        infos.append(write_shard(folder, i, a, **ids(rows, start), dtype=dtype))
        arrays.append(a)
        start += rows
    write_manifest(folder, manifest(infos, d=d, dtype=dtype, **manifest_fields))
    return folder, arrays


def manifest(infos, d=6, dtype="float32", **fields):
    base = dict(model="m", revision="r0", site="resid_post", layer=3, positions="all", d=d,
                dtype=dtype, rows=sum(i.rows for i in infos),
                tokens_seen=sum(i.tokens for i in infos), shards=list(infos), context_len=128,
                corpus="corpus", config={"batch": 4})
    return Manifest(**{**base, **fields})


def one_line_error(match, fn, *args, **kwargs):
    with pytest.raises(InputError, match=match) as e:
        fn(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


# ------------------------------------------------------------------------------- naming


def test_layer_dir_and_shard_name(tmp_path):
    assert layer_folder(tmp_path, "mlp_key", 7) == tmp_path / "mlp_key" / "layer_7"
    assert shard_name(7) == "shard-00007.parquet"
    assert shard_name(123456) == "shard-123456.parquet"
    with pytest.raises(InputError, match="site"):
        layer_folder(tmp_path, "attn", 0)
    with pytest.raises(InputError, match="index"):
        shard_name(-1)


# ------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("as_torch", [False, True])
def test_round_trip_is_bit_exact(tmp_path, dtype, as_torch):
    a = special_rows(dtype)
    x = torch.from_numpy(a) if as_torch else a
    write_shard(tmp_path, 0, x, **ids(len(a), 10), dtype=dtype)
    back = read_shard(tmp_path / "shard-00000.parquet")
    assert back["activation"].dtype == np.dtype(dtype)
    assert back["activation"].shape == a.shape
    np.testing.assert_array_equal(back["activation"].view(UINT[dtype]), a.view(UINT[dtype]))
    for key, col in ids(len(a), 10).items():
        np.testing.assert_array_equal(back[key.removesuffix("s")], col)
    assert back["token_id"].dtype == np.int32 and back["doc_id"].dtype == np.int64
    assert back["position"].dtype == np.int32
    assert all(v.flags.writeable for v in back.values())  # torch.from_numpy without a warning


def test_numpy_view_copies_immutable_arrow_memory():
    frozen = pa.Array.from_buffers(pa.float16(), 3, [None, pa.py_buffer(b"\x00<\x00@\x00B")])
    view = shards._numpy(frozen)
    assert view.flags.writeable and view.tolist() == [1.0, 2.0, 3.0]
    sliced = shards._numpy(pa.array(np.arange(6, dtype=np.int32)).slice(2, 3))
    assert sliced.tolist() == [2, 3, 4]


def test_float32_input_is_cast_to_float16(tmp_path):
    x = torch.randn(20, 4)
    write_shard(tmp_path, 0, x, **ids(20), dtype="float16")
    back = read_shard(tmp_path / shard_name(0))["activation"]
    np.testing.assert_array_equal(back.view(np.uint16), x.half().numpy().view(np.uint16))


def test_many_row_groups_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_ROW_GROUP_BYTES", 4 * 5 * 3)  # 3 rows per row group
    a = np.random.default_rng(1).standard_normal((10, 5)).astype(np.float32)
    write_shard(tmp_path, 0, a, **ids(10))
    np.testing.assert_array_equal(read_shard(tmp_path / shard_name(0))["activation"], a)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"activations": np.full((3, 2), np.nan, np.float32)}, "activations: 6 NaN/Inf"),
        ({"activations": np.full((3, 2), 1e5, np.float32), "dtype": "float16"}, "float16"),
        ({"activations": np.zeros((3, 2), np.int64)}, "activations: expected floating"),
        ({"activations": np.zeros(3, np.float32)}, r"activations: expected .* \(rows, d\)"),
        ({"dtype": "bfloat16"}, "dtype: expected one of"),
        ({"token_ids": np.arange(2)}, r"token_id: expected shape \(3,\)"),
        ({"positions": np.zeros(3)}, "position: expected integers"),
        ({"token_ids": np.full(3, 2**40)}, "token_id: values outside the int32 range"),
        ({"tokens": -1}, "tokens: expected a non-negative integer"),
    ],
)
def test_write_shard_rejects_bad_input(tmp_path, change, match):
    args = {"activations": np.zeros((3, 2), np.float32), **ids(3), **change}
    one_line_error(match, write_shard, tmp_path, 0, **args)
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------- sidecars


def test_sidecar_records_the_parquet(tmp_path):
    info = write_shard(tmp_path, 4, np.ones((6, 3), np.float32), **ids(6), tokens=9)
    parquet = tmp_path / "shard-00004.parquet"
    side = json.loads((tmp_path / "shard-00004.json").read_text())
    assert side == {"name": "shard-00004.parquet", "rows": 6, "sha256": file_sha256(parquet),
                    "bytes": parquet.stat().st_size, "tokens": 9}
    assert side == info.__dict__
    assert write_shard(tmp_path, 5, np.ones((6, 3), np.float32), **ids(6)).tokens == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "shard-00004.json", "shard-00004.parquet", "shard-00005.json", "shard-00005.parquet"]


def test_interrupted_parquet_write_leaves_no_shard(tmp_path, monkeypatch):
    def broken_write(table, where, **kwargs):
        where.write_bytes(b"PAR1 half a shard")
        raise KeyboardInterrupt

    monkeypatch.setattr(shards.pq, "write_table", broken_write)
    with pytest.raises(KeyboardInterrupt):
        write_shard(tmp_path, 0, np.ones((4, 2), np.float32), **ids(4))
    assert list(tmp_path.iterdir()) == []


def test_interrupted_sidecar_write_is_redone(tmp_path, monkeypatch, caplog):
    def broken_json(path, data):
        with shards.atomic_path(path) as tmp:
            tmp.write_text("{")
            raise OSError("disk full")

    monkeypatch.setattr(shards, "_write_json", broken_json)
    with pytest.raises(OSError):
        write_shard(tmp_path, 0, np.ones((4, 2), np.float32), **ids(4))
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000.parquet"]
    with caplog.at_level(logging.WARNING):
        assert finished_shards(tmp_path) == {}
    assert "shard-00000.parquet: no sidecar" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_finished_shards_verifies_and_cleans_up(tmp_path, caplog):
    infos = [write_shard(tmp_path, i, np.full((5, 3), i, np.float32), **ids(5)) for i in range(5)]
    corrupt = tmp_path / shard_name(1)
    raw = bytearray(corrupt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(raw))
    (tmp_path / "shard-00002.json").unlink()          # parquet without sidecar
    (tmp_path / shard_name(3)).unlink()               # sidecar without parquet
    (tmp_path / ".shard-00005.parquet.abc.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("keep me")

    with caplog.at_level(logging.WARNING, logger="atoms.extract.shards"):
        done = finished_shards(tmp_path)
    assert done == {0: infos[0], 4: infos[4]}
    for name in ("shard-00001.parquet", "shard-00002.parquet", "shard-00003.parquet",
                 ".shard-00005.parquet.abc.tmp"):
        assert name in caplog.text
    assert "sha256 does not match" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "notes.txt", "shard-00000.json", "shard-00000.parquet",
        "shard-00004.json", "shard-00004.parquet"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="atoms.extract.shards"):
        assert finished_shards(tmp_path) == done
    assert caplog.text == ""


def test_finished_shards_redoes_an_unreadable_sidecar(tmp_path, caplog):
    write_shard(tmp_path, 0, np.ones((2, 2), np.float32), **ids(2))
    (tmp_path / "shard-00000.json").write_text('{"name": "shard-00000.parquet"')
    with caplog.at_level(logging.WARNING, logger="atoms.extract.shards"):
        assert finished_shards(tmp_path) == {}
    assert "shard-00000.json: not valid JSON" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_finished_shards_of_a_missing_folder_is_empty(tmp_path):
    assert finished_shards(tmp_path / "nope") == {}


def test_rewriting_a_shard_replaces_its_sidecar(tmp_path):
    write_shard(tmp_path, 0, np.zeros((3, 2), np.float32), **ids(3))
    info = write_shard(tmp_path, 0, np.ones((4, 2), np.float32), **ids(4))
    assert finished_shards(tmp_path) == {0: info}


# ------------------------------------------------------------------------------- manifest


def test_manifest_round_trip(tmp_path):
    folder, _ = make_folder(tmp_path)
    text = (folder / "manifest.json").read_text()
    assert text.startswith("{\n  ") and text.endswith("}\n")
    m = load_manifest(folder)
    assert m.rows == 15 and m.d == 6 and m.dtype == "float32" and m.config == {"batch": 4}
    assert [s.name for s in m.shards] == [shard_name(i) for i in range(3)]
    assert m.code_version and re.match(r"\d{4}-\d\d-\d\dT", m.created)
    assert m == Manifest(**json.loads(text) | {"shards": m.shards})


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: m.pop("corpus"), "manifest.json: corpus: required field is missing"),
        (lambda m: m.update(dtype="bf16"), "manifest.json: dtype: expected one of"),
        (lambda m: m.update(d="576"), "manifest.json: d: expected an integer"),
        (lambda m: m.update(site="attn"), "manifest.json: site: expected one of"),
        (lambda m: m["shards"][1].update(sha256="xyz"), r"manifest.json: shards\[1\].sha256"),
        (lambda m: m["shards"][1].update(name="../x"), r"manifest.json: shards\[1\].name"),
        (lambda m: m.update(config=[1]), "manifest.json: config: expected a mapping"),
        (lambda m: m["shards"].append(m["shards"][0]), "shard-00000.parquet is listed twice"),
    ],
)
def test_load_manifest_errors_name_file_and_field(tmp_path, edit, match):
    folder, _ = make_folder(tmp_path)
    data = json.loads((folder / "manifest.json").read_text())
    edit(data)
    (folder / "manifest.json").write_text(json.dumps(data))
    one_line_error(match, load_manifest, folder)


def test_load_manifest_rejects_bad_json(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    one_line_error("manifest.json: not valid JSON", load_manifest, tmp_path)


# ------------------------------------------------------------------------------- ShardSet


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_read_all_and_iter_batches_in_shard_order(tmp_path, dtype):
    folder, arrays = make_folder(tmp_path, sizes=(5, 7, 3, 1), dtype=dtype)
    s = ShardSet.open(folder)
    assert (s.d, s.rows) == (6, 16)
    assert s.paths == [folder / shard_name(i) for i in range(4)]
    want = torch.from_numpy(np.concatenate(arrays).astype(np.float32))
    assert torch.equal(s.read_all(), want)
    assert s.read_all(torch.float16).dtype == torch.float16
    assert torch.equal(s.read_all(torch.bfloat16), want.bfloat16())
    for batch_rows in (1, 4, 6, 16, 100):
        batches = list(s.iter_batches(batch_rows))
        assert [len(b) for b in batches[:-1]] == [batch_rows] * (len(batches) - 1)
        assert torch.equal(torch.cat(batches), want)
    assert torch.equal(torch.cat(list(s.iter_batches(5, torch.float64))), want.double())


def test_iter_batches_across_record_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "_READ_ROWS", 2)
    folder, arrays = make_folder(tmp_path, sizes=(5, 7))
    s = ShardSet.open(folder)
    want = torch.from_numpy(np.concatenate(arrays))
    assert torch.equal(torch.cat(list(s.iter_batches(3))), want)
    assert torch.equal(s.read_all(), want)
    with pytest.raises(InputError, match="batch_rows"):
        next(s.iter_batches(0))


def test_open_missing_manifest(tmp_path):
    folder = layer_folder(tmp_path, "mlp_out", 0)
    write_shard(folder, 0, np.ones((2, 2), np.float32), **ids(2))
    msg = one_line_error("not found", ShardSet.open, folder)
    assert msg.startswith(f"{folder / 'manifest.json'}:")


def replace_shard(folder, index, rows, d, dtype):
    """Overwrite shard ``index`` and give the manifest its new sidecar (a consistent lie)."""
    info = write_shard(folder, index, np.ones((rows, d), dtype), **ids(rows), dtype=dtype)
    m = load_manifest(folder)
    m.shards[index] = info
    write_manifest(folder, m)


def test_open_rejects_a_shard_of_another_d(tmp_path):
    folder, _ = make_folder(tmp_path, d=6)
    replace_shard(folder, 2, 3, 4, "float32")
    msg = one_line_error("d=4 but the manifest says d=6", ShardSet.open, folder)
    assert msg.startswith(f"{folder / shard_name(2)}:")


def test_open_rejects_a_shard_of_another_dtype(tmp_path):
    folder, _ = make_folder(tmp_path, dtype="float32")
    replace_shard(folder, 1, 7, 6, "float16")
    msg = one_line_error("dtype=float16 but the manifest says dtype=float32",
                         ShardSet.open, folder)
    assert msg.startswith(f"{folder / shard_name(1)}:")


def test_open_rejects_manifest_rows_that_do_not_add_up(tmp_path):
    folder, _ = make_folder(tmp_path, rows=16)
    msg = one_line_error("rows=16 but its shards list 15 rows", ShardSet.open, folder)
    assert msg.startswith(f"{folder / 'manifest.json'}:")


def test_open_rejects_shard_rows_that_differ(tmp_path):
    folder, _ = make_folder(tmp_path)
    m = load_manifest(folder)
    m.shards[0].rows, m.shards[1].rows = 4, 8
    write_manifest(folder, m)
    msg = one_line_error("rows=5 but the manifest says rows=4", ShardSet.open, folder)
    assert msg.startswith(f"{folder / shard_name(0)}:")


def test_open_rejects_a_wrong_sha256(tmp_path):
    folder, _ = make_folder(tmp_path)
    m = load_manifest(folder)
    m.shards[1].sha256 = "0" * 64
    write_manifest(folder, m)
    msg = one_line_error("sha256=.* but the manifest says sha256=0{64}", ShardSet.open, folder)
    assert msg.startswith(f"{folder / shard_name(1)}:")
    assert ShardSet.open(folder, verify=False).rows == 15  # verify=False skips checksums


def test_open_rejects_a_corrupted_shard(tmp_path):
    folder, _ = make_folder(tmp_path)
    path = folder / shard_name(0)
    raw = bytearray(path.read_bytes())
    raw[8] ^= 0x01
    path.write_bytes(bytes(raw))
    msg = one_line_error("sha256=", ShardSet.open, folder)
    assert msg.startswith(f"{path}:")


def test_open_rejects_a_missing_shard_file(tmp_path):
    folder, _ = make_folder(tmp_path)
    (folder / shard_name(2)).unlink()
    msg = one_line_error("shard file not found", ShardSet.open, folder, verify=False)
    assert msg.startswith(f"{folder / shard_name(2)}:")


def test_open_rejects_a_file_that_is_not_parquet(tmp_path):
    folder, _ = make_folder(tmp_path)
    (folder / shard_name(1)).write_bytes(b"hello")
    msg = one_line_error("not a readable Parquet file", ShardSet.open, folder)
    assert msg.startswith(f"{folder / shard_name(1)}:")
