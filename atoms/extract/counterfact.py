"""CounterFact (ROME's record format) as a corpus of fact prompts, each located subject and all.

A record holds ``requested_rewrite.{prompt, subject, relation_id, target_true, target_new}``
(``prompt`` a template with ``{}`` where the subject goes) and lists ``paraphrase_prompts``,
``neighborhood_prompts``, ``attribute_prompts``, ``generation_prompts``. Which of them become
texts is ``fields``. Records come from a local ``.json`` (an array, as ROME ships
``counterfact.json``) or ``.jsonl`` file, a Hugging Face dataset id (e.g.
``azhx/counterfact``), or the built-in ``counterfact-sample`` (200 facts, offline). The
subject's character span is exact: the template's ``{}`` for the rewrite prompt, the last
verbatim occurrence in any other prompt (none: the prompt has no located subject; a
``subject_last`` extraction skips and counts it, never guesses).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from atoms.core.errors import InputError
from atoms.extract import counterfact_sample
from atoms.extract.corpus import _hf_rows

PROMPT_FIELDS = {"rewrite": None, "paraphrase": "paraphrase_prompts",
                 "neighborhood": "neighborhood_prompts", "attribute": "attribute_prompts",
                 "generation": "generation_prompts"}
"""A prompt field's name in configs and the record key holding its list (rewrite: the
``requested_rewrite.prompt`` template filled with the subject)."""
TEMPLATE_SLOT = "{}"


@dataclass(frozen=True)
class FactPrompt:
    """One prompt text of record ``record_id``; ``subject`` is the subject's character span
    [start, end) in ``text`` (None: the subject does not occur in it)."""

    text: str
    record_id: int
    field: str
    subject: tuple[int, int] | None


def check_fields(fields: Sequence[str]) -> None:
    unknown = [f for f in fields if f not in PROMPT_FIELDS]
    if unknown or not fields:
        raise InputError(f"counterfact_prompts: {unknown[0] if unknown else 'nothing'!r} "
                         f"is not a prompt field (choose from {', '.join(PROMPT_FIELDS)})")


def fact_prompts(source: str, fields: Sequence[str] = ("rewrite",), split: str = "train",
                 config: str | None = None) -> Iterator[FactPrompt]:
    """The prompts of every record of ``source``, record by record, ``fields`` in order.

    A record without ``requested_rewrite``, ``prompt`` or ``subject``, or whose rewrite prompt
    neither has a ``{}`` slot nor contains the subject, is one InputError naming the record."""
    check_fields(fields)
    for index, (where, record) in enumerate(_records(str(source), split, config)):
        yield from record_prompts(record, index, fields, where)


def record_prompts(record: object, index: int, fields: Sequence[str],
                   where: str) -> list[FactPrompt]:
    """``fact_prompts`` of one parsed record (``index``: its place in the file, the record id
    when it has no integer ``case_id``)."""
    rewrite = record.get("requested_rewrite") if isinstance(record, dict) else None
    if not isinstance(rewrite, dict):
        raise InputError(f"{where}: no 'requested_rewrite' (not a CounterFact record)")
    for key in ("prompt", "subject"):
        if not isinstance(rewrite.get(key), str) or not rewrite[key].strip():
            raise InputError(f"{where}: requested_rewrite has no '{key}'")
    subject, template = rewrite["subject"], rewrite["prompt"]
    case_id = record.get("case_id")
    rid = case_id if isinstance(case_id, int) and not isinstance(case_id, bool) else index
    out = []
    for name in fields:
        if name == "rewrite":
            text, span = _fill(template, subject, where)
            out.append(FactPrompt(text, rid, name, span))
            continue
        texts = record.get(PROMPT_FIELDS[name]) or []
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise InputError(f"{where}: '{PROMPT_FIELDS[name]}' is not a list of strings")
        for text in texts:
            at = text.rfind(subject)
            out.append(FactPrompt(text, rid, name,
                                  None if at < 0 else (at, at + len(subject))))
    return out


def _fill(template: str, subject: str, where: str) -> tuple[str, tuple[int, int]]:
    """The rewrite prompt and its subject span: the first ``{}`` slot filled (ROME's
    ``prompt.format(subject)``), else the subject's last verbatim occurrence."""
    slot = template.find(TEMPLATE_SLOT)
    if slot >= 0:
        text = template[:slot] + subject + template[slot + len(TEMPLATE_SLOT):]
        return text, (slot, slot + len(subject))
    at = template.rfind(subject)
    if at < 0:
        raise InputError(f"{where}: subject {subject!r} is not in its prompt {template!r} "
                         "(no '{}' slot either)")
    return template, (at, at + len(subject))


# ------------------------------------------------------------------------------------ records


def _records(source: str, split: str, config: str | None) -> Iterator[tuple[str, dict]]:
    if source == counterfact_sample.NAME:
        return ((f"{source}: record {i}", r)
                for i, r in enumerate(counterfact_sample.sample_records()))
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".jsonl":
            return _jsonl_records(path)
        if path.suffix == ".json":
            return _json_records(path)
        raise InputError(f"{path}: a CounterFact file is .json (an array) or .jsonl")
    if path.suffix in (".json", ".jsonl") or source.startswith(("/", "./", "../", "~")):
        raise InputError(f"{source}: no such file")
    return ((f"dataset '{source}' row {i}", row)
            for i, row in enumerate(_hf_rows(source, split, config)))


def _json_records(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    return ((f"{path}: record {i}", r) for i, r in enumerate(data))


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None


# ------------------------------------------------------------------------ token positions


def subject_last_token(offsets: Sequence[tuple[int, int]], span: tuple[int, int]) -> int | None:
    """Index of the last token whose character offsets cover the subject's last character
    (a token merged across the subject's end still counts: it is where the subject ends);
    None when no token covers it."""
    last_char = span[1] - 1
    hits = [i for i, (a, b) in enumerate(offsets) if a <= last_char < b]
    return hits[-1] if hits else None


@dataclass
class PromptBatch:
    """Prompts as right-padded windows: ids (n, T) int64, each window's record id, and ``keep``
    (n, T) bool, the positions whose rows are kept. With causal attention a padded tail never
    changes the hidden states before it, so no attention mask is needed."""

    input_ids: np.ndarray
    doc_ids: np.ndarray
    keep: np.ndarray
    lengths: np.ndarray
    counts: dict = field(default_factory=dict)
    """prompts kept, and skipped by reason (no_subject, subject_not_tokenised, too_long)."""


def prompt_windows(prompts: Iterable[FactPrompt], tokenizer, positions: str, max_len: int,
                   prepend_bos: bool = True, max_tokens: int | None = None) -> PromptBatch:
    """Tokenise ``prompts`` (with offsets, never re-tokenising pieces) into a ``PromptBatch``.

    positions: ``subject_last`` (one row a prompt, at ``subject_last_token``), ``last`` (the
    prompt's final token), ``all``, or ``no_bos``. A prompt longer than ``max_len`` tokens, or
    (subject_last) one without a located subject, is skipped and counted. Stops once the kept
    prompts hold ``max_tokens`` tokens."""
    bos = getattr(tokenizer, "bos_token_id", None) if prepend_bos else None
    if prepend_bos and bos is None:
        raise InputError(f"tokenizer '{_name(tokenizer)}' has no BOS token; "
                         "set prepend_bos: false")
    rows, counts, tokens = [], Counter(), 0
    for p in prompts:
        ids, offsets = _encode(tokenizer, p.text)
        at = None
        if positions == "subject_last":
            if p.subject is None:
                counts["no_subject"] += 1
                continue
            at = subject_last_token(offsets, p.subject)
            if at is None:
                counts["subject_not_tokenised"] += 1
                continue
        if bos is not None:
            ids, at = [bos, *ids], None if at is None else at + 1
        if len(ids) > max_len or not ids:
            counts["too_long" if ids else "empty"] += 1
            continue
        rows.append((ids, p.record_id, at))
        tokens += len(ids)
        if max_tokens is not None and tokens >= max_tokens:
            break
    if not rows:
        raise InputError(f"no prompt kept for positions {positions!r} (skipped: "
                         f"{dict(counts) or 'none'})")
    counts["prompts"] = len(rows)
    return _pad(rows, positions, _pad_id(tokenizer), bos is not None, dict(counts))


def _pad(rows, positions: str, pad: int, has_bos: bool, counts: dict) -> PromptBatch:
    width = max(len(ids) for ids, _, _ in rows)
    ids = np.full((len(rows), width), pad, dtype=np.int64)
    keep = np.zeros((len(rows), width), dtype=bool)
    for i, (row, _, at) in enumerate(rows):
        ids[i, :len(row)] = row
        if positions == "subject_last":
            keep[i, at] = True
        elif positions == "last":
            keep[i, len(row) - 1] = True
        else:
            keep[i, int(has_bos and positions == "no_bos"):len(row)] = True
    docs = np.array([rid for _, rid, _ in rows], dtype=np.int64)
    lengths = np.array([len(row) for row, _, _ in rows], dtype=np.int64)
    return PromptBatch(ids, docs, keep, lengths, counts)


def _encode(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True,
                        verbose=False)
    except NotImplementedError:
        raise InputError(f"tokenizer '{_name(tokenizer)}' gives no offset mapping (a fast "
                         "tokenizer is needed to locate subjects)") from None
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
