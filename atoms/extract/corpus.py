"""Text corpora as document streams, and fixed-length token windows cut from them.

Built-in, offline corpora: ``wiki-sample`` (105 Wikipedia articles shipped in the ``gensim`` wheel's
test data, markup stripped) and ``pydoc`` (CPython's ``pydoc_data.topics``). Local ``.txt``,
``.jsonl`` and ``.parquet`` files, folders of ``.txt`` files and Hugging Face datasets also work.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from atoms.core.errors import InputError, first_line

BUILTIN_CORPORA = ("wiki-sample", "pydoc")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_CHARS = 500  # shorter pages are stubs and disambiguation lists


class CorpusNotAvailable(InputError):
    """A named corpus that is neither built in, local, nor reachable on the Hugging Face hub."""


@dataclass
class TokenWindow:
    """``context_len`` token ids cut from document ``doc_id`` starting at token ``start``."""

    input_ids: list[int]
    doc_id: int
    start: int


# ---------------------------------------------------------------------------------------- documents


def iter_documents(source: str, text_field: str = "text", split: str = "train",
                   config: str | None = None, limit: int | None = None) -> Iterator[str]:
    """Non-empty documents of ``source``: a built-in name, a local file/folder, or a HF dataset.

    The source is resolved at call time (so a missing file fails here); documents are read lazily.
    """
    if limit is not None and limit < 1:
        raise InputError(f"limit: expected a positive integer or None, got {limit}")
    docs = _open_source(str(source), text_field, split, config)
    return _non_empty(docs, str(source), limit)


def _non_empty(docs: Iterable[str], source: str, limit: int | None) -> Iterator[str]:
    count = 0
    for doc in docs:
        if not doc or not doc.strip():
            continue
        yield doc
        count += 1
        if limit is not None and count >= limit:
            return
    if count == 0:
        raise InputError(f"corpus '{source}' has no documents")


def _open_source(source: str, text_field: str, split: str, config: str | None) -> Iterable[str]:
    if source == "wiki-sample":
        return _wiki_documents(_wiki_file())
    if source == "pydoc":
        return _pydoc_documents()
    path = Path(source).expanduser()
    if path.exists():
        return _local_documents(path, text_field)
    if path.suffix in LOCAL_SUFFIXES or source.startswith(("/", "./", "../", "~")):
        raise InputError(f"{source}: no such file or folder")
    return _hf_documents(source, text_field, split, config)


def _pydoc_documents() -> Iterator[str]:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    for key in sorted(topics):
        yield topics[key]


# ------------------------------------------------------------------------------------- local files


def _local_documents(path: Path, text_field: str) -> Iterable[str]:
    if path.is_dir():
        return (_read_text(p) for p in sorted(path.glob("*.txt")))
    readers: dict[str, Callable[[], Iterable[str]]] = {
        ".txt": lambda: [_read_text(path)],
        ".jsonl": lambda: _jsonl_documents(path, text_field),
        ".parquet": lambda: _parquet_documents(path, text_field),
    }
    if path.suffix not in readers:
        raise InputError(f"{path}: unsupported corpus file type '{path.suffix}' "
                         f"(expected .txt, .jsonl, .parquet or a folder of .txt files)")
    return readers[path.suffix]()


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            yield _field(row, text_field, f"{path}:{lineno}")


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise InputError(f"{path}: not a readable parquet file ({first_line(e)})") from None
    if text_field not in pf.schema_arrow.names:
        raise InputError(f"{path}: no column '{text_field}' "
                         f"(columns: {', '.join(pf.schema_arrow.names)})")
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise InputError(f"{path}: column '{text_field}' holds {kind}, expected strings")
    for batch in pf.iter_batches(columns=[text_field]):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _field(row: object, text_field: str, where: str) -> str:
    if not isinstance(row, dict) or text_field not in row:
        raise InputError(f"{where}: no field '{text_field}'")
    value = row[text_field]
    if value is not None and not isinstance(value, str):
        raise InputError(f"{where}: field '{text_field}' is {type(value).__name__}, not a string")
    return value or ""


# -------------------------------------------------------------------------------- Hugging Face hub


def _hf_documents(source: str, text_field: str, split: str, config: str | None) -> Iterator[str]:
    rows = _hf_rows(source, split, config)
    for i, row in enumerate(rows):
        yield _field(row, text_field, f"dataset '{source}' row {i}")


def _hf_rows(source: str, split: str, config: str | None) -> Iterator[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(source, config, split=split, streaming=True)
        yield from ds
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        raise CorpusNotAvailable(
            f"corpus '{source}' is not available: not a local file, not built in "
            f"({', '.join(BUILTIN_CORPORA)}) and the Hugging Face hub cannot provide it "
            f"({first_line(e)})") from None


# --------------------------------------------------------------------------------------- wikipedia


def _wiki_file() -> Path:
    spec = importlib.util.find_spec("gensim")  # never import gensim: it needs scipy/smart_open
    if spec is None or not spec.submodule_search_locations:
        raise CorpusNotAvailable("corpus 'wiki-sample' needs the gensim wheel's test data: "
                                 "pip install --no-deps gensim==4.4.0")
    path = Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data" / WIKI_FILE
    if not path.is_file():
        raise CorpusNotAvailable(f"corpus 'wiki-sample': {path} is missing "
                                 f"(reinstall with pip install --no-deps gensim==4.4.0)")
    return path


def _wiki_documents(path: Path) -> Iterator[str]:
    with bz2.open(path, "rt", encoding="utf-8") as f:
        raw = f.read()
    for m in re.finditer(r"<text[^>]*>(.*?)</text>", raw, flags=re.S):
        markup = html.unescape(m.group(1))
        if markup.lstrip().upper().startswith("#REDIRECT"):
            continue
        text = strip_wiki_markup(markup)
        if len(text) > WIKI_MIN_CHARS:
            yield text


def strip_wiki_markup(s: str) -> str:
    """Plain prose from MediaWiki markup: drops templates, tables, refs, files, maths, tags."""
    s = re.sub(r"<!--.*?-->", "", s, flags=re.S)
    s = re.sub(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", "", s, flags=re.S)
    s = re.sub(r"<(math|gallery|timeline|chem|score|syntaxhighlight)\b.*?</\1>", "", s, flags=re.S)
    s = _drop_nested(s, "{{", "}}")
    s = _drop_nested(s, "{|", "|}")
    s = _drop_nested(s, "[[", "]]", _is_file_or_category)
    s = re.sub(r"\[\[(?:[^|\[\]]*\|)?([^\[\]]*)\]\]", r"\1", s)  # [[target|label]] -> label
    s = re.sub(r"\[https?://\S+ ?([^\]]*)\]", r"\1", s)
    s = re.sub(r"'{2,}", "", s)
    s = re.sub(r"<[^>]+>", "", s)
    s = re.sub(r"^[=*#:;]+\s*|\s*=+$", "", s, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", html.unescape(s)).strip()


def _is_file_or_category(body: str) -> bool:
    if re.match(r"\s*(?:file|image|media|category)\s*:", body, flags=re.I):
        return True
    return re.fullmatch(r"[a-z]{2,3}(?:-[a-z]+)?:[^|]*", body) is not None  # interlanguage link


def _drop_nested(s: str, open_: str, close: str,
                 drop: Callable[[str], bool] = lambda body: True) -> str:
    """Remove outermost ``open_ … close`` spans (nesting-aware) whose body ``drop`` accepts."""
    pieces, depth, start, last = [], 0, 0, 0
    for m in re.finditer(re.escape(open_) + "|" + re.escape(close), s):
        if m.group() == open_:
            start = m.start() if depth == 0 else start
            depth += 1
        elif depth > 0:
            depth -= 1
            if depth == 0 and drop(s[start + len(open_):m.start()]):
                pieces.append(s[last:start])
                last = m.end()
    pieces.append(s[last:])
    return "".join(pieces)


# ----------------------------------------------------------------------------------- token windows


def token_windows(documents: Iterable[str], tokenizer, context_len: int, prepend_bos: bool = True,
                  max_windows: int | None = None, per_document: int = 0
                  ) -> Iterator[TokenWindow]:
    """Full windows of ``context_len`` ids cut consecutively from each tokenised document.

    Documents are tokenised without special tokens; with ``prepend_bos`` each window is the
    tokenizer's BOS id followed by ``context_len - 1`` document ids. A short tail is dropped;
    ``per_document`` > 0 keeps only each document's first that-many windows (more documents
    for the same tokens).
    """
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 2:
        raise InputError(f"context_len: expected an integer >= 2, got {context_len!r}")
    if max_windows is not None and max_windows < 1:
        raise InputError(f"max_windows: expected a positive integer or None, got {max_windows}")
    if per_document < 0:
        raise InputError(f"per_document: expected ≥ 0, got {per_document}")
    bos = getattr(tokenizer, "bos_token_id", None) if prepend_bos else None
    if prepend_bos and bos is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise InputError(f"tokenizer '{name}' has no BOS token; pass prepend_bos=False")
    return _windows(documents, tokenizer, context_len - 1 if prepend_bos else context_len,
                    bos, max_windows, per_document)


def _windows(documents: Iterable[str], tokenizer, step: int, bos: int | None,
             max_windows: int | None, per_document: int) -> Iterator[TokenWindow]:
    count = 0
    for doc_id, doc in enumerate(documents):
        ids = _encode(tokenizer, doc)
        starts = range(0, len(ids) - step + 1, step)
        for start in starts[:per_document] if per_document else starts:
            chunk = ids[start:start + step]
            yield TokenWindow([bos, *chunk] if bos is not None else chunk, doc_id, start)
            count += 1
            if max_windows is not None and count >= max_windows:
                return


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (and without the over-length warning)."""
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
