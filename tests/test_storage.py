"""The storage layer against a local folder and a real S3 server on 127.0.0.1 (SeaweedFS)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from atoms.core.errors import InputError
from atoms.store.storage import Storage, StorageError, mirror_path, pull, pull_file, redact


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Storage:
    if request.param == "local":
        return Storage(tmp_path / "store")
    return Storage(request.getfixturevalue("s3_server").uri())


def test_write_read_list_delete(store):
    assert store.write_json("a/b.json", {"x": 1}) == store.uri_of("a/b.json")
    store.write_bytes("a/c.bin", b"\x00" * 10)
    store.write_text("top.txt", "hi")
    assert store.read_json("a/b.json") == {"x": 1}
    assert store.files("a") == {"a/b.json": len(store.read_bytes("a/b.json")), "a/c.bin": 10}
    assert store.files("", "*.txt") == {"top.txt": 2}
    assert set(store.files(recursive=True)) == {"a/b.json", "a/c.bin", "top.txt"}
    assert store.size("a/c.bin") == 10 and store.size("a/missing") is None
    assert store.exists("a") and not store.exists("nope")
    assert store.child("a").read_bytes("c.bin") == b"\x00" * 10
    store.delete("a")
    assert store.files(recursive=True) == {"top.txt": 2}
    store.delete("a")  # missing: nothing to do


def test_missing_file_is_an_input_error_naming_it(store):
    with pytest.raises(InputError, match=r"missing\.json: not found"):
        store.read_bytes("missing.json")


def test_overwrite_replaces_whole_file(store):
    store.write_bytes("f", b"long contents")
    store.write_bytes("f", b"short")
    assert store.read_bytes("f") == b"short"


def test_put_and_get_file_round_trip_large(store, tmp_path):
    data = bytes(range(256)) * (40_000)  # 10 MB: more than one copy chunk
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    store.put_file(src, "big/src.bin")
    back = store.get_file("big/src.bin", tmp_path / "back" / "x.bin")
    assert back.read_bytes() == data
    assert not [p for p in back.parent.iterdir() if p.name.startswith(".")]


def test_put_tree_publishes_marker_last_and_skips_temporaries(store, tmp_path):
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for name in ("z.json", "a.bin", "sub/m.bin", "done.json"):
        (tree / name).write_text(name)
    (tree / ".tmp-partial").write_text("x")
    (tree / ".hidden-dir").mkdir()
    (tree / ".hidden-dir" / "f").write_text("x")
    order = store.put_tree(tree, "pub", last=("done.json",))
    assert order[-1] == store.uri_of("pub/done.json")
    assert set(store.files("pub", recursive=True)) == {"pub/z.json", "pub/a.bin",
                                                         "pub/sub/m.bin", "pub/done.json"}


def test_pull_mirrors_and_skips_files_already_there(store, storage_cache):
    store.write_bytes("d/one", b"1")
    store.write_bytes("d/sub/two", b"22")
    folder = pull(store.uri_of("d"))
    assert (folder / "one").read_bytes() == b"1" and (folder / "sub" / "two").read_bytes() == b"22"
    if not store.remote:
        assert folder == mirror_path(store.uri_of("d")) == Path(store.path("d"))
        return
    assert folder.is_relative_to(storage_cache)
    stamp = (folder / "one").stat().st_mtime_ns
    store.write_bytes("d/sub/two", b"changed size")
    pull(store.uri_of("d"))
    assert (folder / "one").stat().st_mtime_ns == stamp  # same size: kept
    assert (folder / "sub" / "two").read_bytes() == b"changed size"
    assert pull_file(store.uri_of("d/one")) == folder / "one"


def test_mirror_path_drops_credentials_and_query(s3_server, storage_cache):
    uri = s3_server.uri("some/prefix")
    local = mirror_path(uri)
    assert local == storage_cache / "s3" / "atoms-test" / "some" / "prefix"
    assert "secret" not in str(local)


def test_storage_pickles_by_uri(store):
    store.write_bytes("p", b"x")
    again = pickle.loads(pickle.dumps(store))
    assert again.uri == store.uri and again.read_bytes("p") == b"x"


def test_messages_redact_secrets(s3_server):
    uri = s3_server.uri("r")
    assert "atoms-secret" in uri
    assert "atoms-secret" not in redact(uri) and redact(uri).startswith("s3://atoms:***@")
    store = Storage(uri)
    with pytest.raises(InputError) as e:
        store.read_bytes("missing")
    assert "atoms-secret" not in str(e.value)
    assert "atoms-secret" not in repr(store)


def test_check_writable_passes_and_leaves_nothing(store):
    store.check_writable("out")
    assert store.files(recursive=True) == {}


def test_unwritable_local_path_fails_with_one_line(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(StorageError) as e:
        Storage(blocker / "out").check_writable("out")
    message = str(e.value)
    assert message.startswith(f"out: {blocker / 'out'} is not writable (")
    assert "\n" not in message
    assert blocker.read_text() == "not a folder"


def test_wrong_credentials_fail_with_one_line(s3_server):
    uri = s3_server.uri().replace("atoms-secret", "wrong-secret")
    with pytest.raises(StorageError) as e:
        Storage(uri).check_writable("out")
    message = str(e.value)
    assert message.startswith("out: s3://atoms:***@atoms-test/") and "\n" not in message
    assert "wrong-secret" not in message


def test_unknown_scheme_is_a_storage_error():
    with pytest.raises(StorageError, match=r"nosuch://x/y: cannot open"):
        Storage("nosuch://x/y")


def test_check_writable_removes_the_local_folders_it_created(tmp_path):
    Storage(tmp_path / "a" / "b" / "c").check_writable("out")
    assert list(tmp_path.iterdir()) == []
