import json
import pydoc_data.topics

import datasets.config
import huggingface_hub.constants
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from atoms.core.errors import InputError
from atoms.extract.corpus import (
    BUILTIN_CORPORA,
    CorpusNotAvailable,
    TokenWindow,
    iter_documents,
    strip_wiki_markup,
    token_windows,
)


class CharTokenizer:
    """One id per character (its code point); BOS id 1 unless ``bos`` is None."""

    name_or_path = "char-tokenizer"

    def __init__(self, bos: int | None = 1):
        self.bos_token_id = bos

    def __call__(self, text, add_special_tokens=True, verbose=True):
        assert add_special_tokens is False
        return {"input_ids": [ord(c) for c in text]}


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ATOMS_CACHE", str(tmp_path_factory.mktemp("atoms-cache")))
        from atoms.extract.models import load_model

        return load_model("tiny-random").tokenizer


# ------------------------------------------------------------------------------------ built-ins


def test_builtin_names():
    assert BUILTIN_CORPORA == ("wiki-sample", "pydoc")


def test_wiki_sample_is_clean_prose():
    docs = list(iter_documents("wiki-sample"))
    assert len(docs) >= 100
    assert docs[0].startswith("Anarchism is a political philosophy")
    for doc in docs:
        assert "[[" not in doc and "{{" not in doc and "<ref" not in doc
        assert "]]" not in doc and "}}" not in doc
    assert sum(len(d) for d in docs) > 2_000_000


def test_pydoc_sorted_by_topic():
    docs = list(iter_documents("pydoc"))
    topics = pydoc_data.topics.topics
    assert len(docs) >= 70
    assert docs == [topics[k] for k in sorted(topics) if topics[k].strip()]


def test_limit():
    assert len(list(iter_documents("pydoc", limit=3))) == 3
    with pytest.raises(InputError, match="limit: expected a positive integer"):
        iter_documents("pydoc", limit=0)


def test_strip_wiki_markup():
    markup = (
        "{{Infobox thing|name={{lang|x|Y}}|size=3}}\n"
        "'''Albedo''' is the [[diffuse reflection|diffuse]] [[reflection]] of light.<ref name=a>"
        "A ''book''.</ref> It is {{convert|1|m}}measured.<ref name=b/>\n"
        "[[File:Albedo.png|thumb|Caption with a [[link]] inside]]\n"
        "== History ==\n"
        '{| class="wikitable"\n| a || b\n|}\n'
        "<!-- hidden -->See [https://example.org the site] &amp; more.\n"
        "[[Category:Optics]]\n[[de:Albedo]]"
    )
    assert strip_wiki_markup(markup) == (
        "Albedo is the diffuse reflection of light. It is measured.\n\n"
        "History\n\nSee the site & more."
    )


# ---------------------------------------------------------------------------------- local files


def test_txt_file_and_folder(tmp_path):
    (tmp_path / "b.txt").write_text("second document\n")
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "c.txt").write_text("   \n")  # blank: skipped
    (tmp_path / "notes.md").write_text("ignored")
    assert list(iter_documents(str(tmp_path / "a.txt"))) == ["first document\n"]
    assert list(iter_documents(str(tmp_path))) == ["first document\n", "second document\n"]


def test_jsonl_file(tmp_path):
    path = tmp_path / "docs.jsonl"
    rows = [{"body": "alpha"}, {"body": ""}, {"body": "beta", "id": 2}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(iter_documents(str(path), text_field="body")) == ["alpha", "beta"]
    with pytest.raises(InputError, match=r"docs\.jsonl:1: no field 'text'"):
        list(iter_documents(str(path)))


def test_jsonl_errors(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(InputError, match=r"bad\.jsonl:2: not valid JSON"):
        list(iter_documents(str(path)))
    path.write_text('{"text": 3}\n')
    with pytest.raises(InputError, match="field 'text' is int, not a string"):
        list(iter_documents(str(path)))


def test_parquet_file(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": ["one", None, "two", "three"], "n": [1, 2, 3, 4]}), path,
                   row_group_size=2)
    assert list(iter_documents(str(path))) == ["one", "two", "three"]
    with pytest.raises(InputError, match=r"parquet: no column 'content' \(columns: text, n\)"):
        list(iter_documents(str(path), text_field="content"))
    with pytest.raises(InputError, match="column 'n' holds int64, expected strings"):
        list(iter_documents(str(path), text_field="n"))


def test_empty_corpora(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(InputError, match=f"^corpus '{empty}' has no documents$"):
        list(iter_documents(str(empty)))
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"text": ""}\n{"text": "  "}\n')
    with pytest.raises(InputError, match="has no documents"):
        list(iter_documents(str(blank)))
    folder = tmp_path / "nothing"
    folder.mkdir()
    with pytest.raises(InputError, match="has no documents"):
        list(iter_documents(str(folder)))


def test_bad_paths(tmp_path):
    with pytest.raises(InputError, match=r"missing\.jsonl: no such file or folder"):
        iter_documents(str(tmp_path / "missing.jsonl"))
    csv = tmp_path / "data.csv"
    csv.write_text("text\nx\n")
    with pytest.raises(InputError, match=r"unsupported corpus file type '\.csv'"):
        iter_documents(str(csv))


def test_hub_dataset_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(CorpusNotAvailable) as err:
        list(iter_documents("no-such-org/no-such-dataset"))
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("corpus 'no-such-org/no-such-dataset' is not available")
    assert isinstance(err.value, InputError)


# -------------------------------------------------------------------------------- token windows


def test_token_windows_bookkeeping_with_bos():
    docs = ["abcdefgh", "xy", "0123456"]
    windows = list(token_windows(docs, CharTokenizer(), context_len=4))
    assert windows == [
        TokenWindow([1, *map(ord, "abc")], 0, 0),
        TokenWindow([1, *map(ord, "def")], 0, 3),  # "gh" is a short tail: dropped
        TokenWindow([1, *map(ord, "012")], 2, 0),  # doc 1 is shorter than a window
        TokenWindow([1, *map(ord, "345")], 2, 3),
    ]


def test_token_windows_without_bos_and_max_windows():
    docs = ["abcdefgh", "0123456"]
    windows = list(token_windows(docs, CharTokenizer(bos=None), 4, prepend_bos=False))
    assert [(w.doc_id, w.start, "".join(map(chr, w.input_ids))) for w in windows] == [
        (0, 0, "abcd"), (0, 4, "efgh"), (1, 0, "0123")]
    limited = list(token_windows(docs, CharTokenizer(), 4, max_windows=3))
    assert [(w.doc_id, w.start) for w in limited] == [(0, 0), (0, 3), (1, 0)]


def test_token_windows_real_tokenizer(tiny_tokenizer):
    docs = list(iter_documents("pydoc", limit=5))
    windows = list(token_windows(docs, tiny_tokenizer, context_len=64))
    assert windows and all(len(w.input_ids) == 64 for w in windows)
    assert all(w.input_ids[0] == tiny_tokenizer.bos_token_id for w in windows)
    for w in windows[:50]:
        ids = tiny_tokenizer(docs[w.doc_id], add_special_tokens=False)["input_ids"]
        assert w.input_ids[1:] == ids[w.start:w.start + 63]
    per_doc = [len(tiny_tokenizer(d, add_special_tokens=False)["input_ids"]) // 63 for d in docs]
    assert len(windows) == sum(per_doc)


def test_token_windows_errors():
    with pytest.raises(InputError, match="context_len: expected an integer >= 2, got 1"):
        token_windows(["abc"], CharTokenizer(), 1)
    with pytest.raises(InputError, match="tokenizer 'char-tokenizer' has no BOS token"):
        token_windows(["abc"], CharTokenizer(bos=None), 8)
    with pytest.raises(InputError, match="max_windows: expected a positive integer"):
        token_windows(["abc"], CharTokenizer(), 8, max_windows=0)


def test_token_windows_per_document_keeps_each_documents_first_windows():
    docs = ["abcdefghijkl", "0123456789", "xyz"]
    windows = list(token_windows(docs, CharTokenizer(bos=None), 3, prepend_bos=False,
                                 per_document=2))
    assert [(w.doc_id, "".join(map(chr, w.input_ids))) for w in windows] == [
        (0, "abc"), (0, "def"), (1, "012"), (1, "345"), (2, "xyz")]
    capped = list(token_windows(docs, CharTokenizer(bos=None), 3, prepend_bos=False,
                                max_windows=3, per_document=1))
    assert [w.doc_id for w in capped] == [0, 1, 2]
