"""LLM judges for the monosemanticity harness, scored the way delphi scores explanations.

A judge is built from a spec: ``hf:<model>`` (a local folder, a hub id or a built-in such as
``smollm2-135m``, through transformers, in-process) or ``openai:<model>`` (any
OpenAI-compatible endpoint through the ``openai`` client; base URL given, key read from an
environment variable). ``DetectionJudge`` scores one unit:

1. the explainer (the same LLM) reads the unit's ``explain`` contexts, the most active token
   marked «…», and writes a one-line explanation;
2. the judge labels held-out contexts, the unit's ``detect`` contexts (active) and as many
   ``negative`` ones (where it is 0), each as fitting the explanation or not (yes/no);
3. score = balanced accuracy ½(TPR + TNR) over the answers that parse.

An answer that is not yes/no, or an empty explanation, is a parse failure, never a score; a
unit with no parsed answer on either side, or too few active contexts to hold one out, has no
score (NaN). Every prompt and raw answer is
kept in ``log`` for the harness to write beside the scores.
"""

from __future__ import annotations

import math
import os
import re
from typing import Protocol

from atoms.core.errors import InputError, first_line

EXPLAIN_SYSTEM = ("You explain what a unit inside a language model responds to. You are shown "
                  "texts where the unit is active; the token where it is most active is marked "
                  "«like this». Reply with one short line naming what the marked tokens share.")
DETECT_SYSTEM = ("A unit inside a language model responds to what its explanation says. Decide "
                 "whether the unit is active on the text. Reply with yes or no only.")
EXPLANATION_TOKENS = 40
ANSWER_TOKENS = 3


class Client(Protocol):
    name: str

    def complete(self, messages: list[dict], max_tokens: int) -> str: ...


class HFClient:
    """Greedy chat completion with a transformers causal LM, in this process."""

    def __init__(self, model: str):
        from atoms.extract.models import load_model

        self.name = f"hf:{model}"
        self.loaded = load_model(model)
        self.tokenizer = self.loaded.tokenizer

    def complete(self, messages: list[dict], max_tokens: int) -> str:
        import torch

        tok, model = self.tokenizer, self.loaded.model
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)["input_ids"]
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n"
            ids = tok(text, return_tensors="pt")["input_ids"]
        ids = ids.to(next(model.parameters()).device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or tok.eos_token_id)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class OpenAIClient:
    """Chat completions from an OpenAI-compatible endpoint (temperature 0). The endpoint is
    reached once here, so an unreachable one or a refused key fails before any unit."""

    def __init__(self, model: str, base_url: str | None = None,
                 key_env: str = "OPENAI_API_KEY", timeout: float = 60.0):
        import openai

        self.name, self.model = f"openai:{model}", model
        key = os.environ.get(key_env)
        if not key:
            raise InputError(f"judge {self.name}: no API key (set the environment variable "
                             f"{key_env})")
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout,
                                    max_retries=1)
        where = base_url or "api.openai.com"
        try:
            self.client.models.list()
        except openai.APIConnectionError as e:
            raise InputError(f"judge {self.name}: endpoint {where} is unreachable "
                             f"({first_line(e)})") from None
        except openai.APIStatusError as e:
            raise InputError(f"judge {self.name}: endpoint {where} refused the request "
                             f"(HTTP {e.status_code})") from None

    def complete(self, messages: list[dict], max_tokens: int) -> str:
        reply = self.client.chat.completions.create(model=self.model, messages=messages,
                                                    max_tokens=max_tokens, temperature=0)
        return reply.choices[0].message.content or ""


def make_client(spec: str, base_url: str | None = None,
                key_env: str = "OPENAI_API_KEY") -> Client:
    """The client of a judge spec ``hf:<model>`` or ``openai:<model>``."""
    kind, _, model = spec.partition(":")
    if kind == "hf" and model:
        return HFClient(model)
    if kind == "openai" and model:
        return OpenAIClient(model, base_url, key_env)
    raise InputError(f"judge {spec!r}: expected 'heuristic', 'hf:<model>' or 'openai:<model>'")


# ---------------------------------------------------------------------------- prompts


def _plain(context: str) -> str:
    return context.replace("«", "").replace("»", "")


def explain_messages(contexts: list[str]) -> list[dict]:
    shown = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(contexts))
    return [{"role": "system", "content": EXPLAIN_SYSTEM},
            {"role": "user", "content": f"Texts:\n{shown}\n\nWhat do the marked tokens share?"}]


def detect_messages(explanation: str, context: str) -> list[dict]:
    return [{"role": "system", "content": DETECT_SYSTEM},
            {"role": "user", "content": f"Explanation: {explanation}\nText: {_plain(context)}\n"
                                        "Is the unit active on this text? Answer yes or no."}]


def parse_explanation(raw: str) -> str | None:
    """The first non-empty line, without a leading 'Explanation:' (None: nothing usable)."""
    for line in raw.splitlines():
        line = re.sub(r"^\s*(explanation|answer)\s*:\s*", "", line.strip(), flags=re.I)
        if re.search(r"\w", line):
            return line[:200]
    return None


def parse_yes_no(raw: str) -> bool | None:
    """True for an answer whose first word is yes, False for no, None otherwise."""
    m = re.match(r"\W*(\w+)", raw)
    word = m.group(1).lower() if m else ""
    return {"yes": True, "no": False}.get(word)


def balanced_accuracy(labels: list[tuple[bool, bool | None]]) -> float:
    """½(TPR + TNR) over (truth, parsed answer) pairs whose answer parsed; NaN when a side
    has no parsed answer."""
    pos = [a for t, a in labels if t and a is not None]
    neg = [a for t, a in labels if not t and a is not None]
    if not pos or not neg:
        return math.nan
    return 0.5 * (sum(pos) / len(pos) + sum(not a for a in neg) / len(neg))


class DetectionJudge:
    """Explain from a unit's ``explain`` records, then detect on its ``detect`` and
    ``negative`` records (as many of each); returns a dict the harness reads: score,
    attempts (the explanation and every answer) and parse_failures among them."""

    def __init__(self, client: Client):
        self.client, self.__name__, self.log = client, client.name, []

    def __call__(self, records: list[dict]) -> dict:
        shown = [r["context"] for r in records if r.get("role", "explain") == "explain"]
        active = [r for r in records if r.get("role") == "detect"]
        negative = [r for r in records if r.get("role") == "negative"]
        n = min(len(active), len(negative))
        if not shown or n == 0:  # too few contexts to hold any out: nothing to judge
            self.log.append({"unit_set": records[0]["unit_set"], "unit": records[0]["unit"],
                             "skipped": f"{len(shown)} explain, {len(active)} detect and "
                                        f"{len(negative)} negative contexts"})
            return {"score": math.nan, "attempts": 0, "parse_failures": 0}
        prompt = explain_messages(shown)
        raw = self.client.complete(prompt, EXPLANATION_TOKENS)
        explanation = parse_explanation(raw)
        entry = {"unit_set": records[0]["unit_set"], "unit": records[0]["unit"],
                 "explain_prompt": prompt, "explain_raw": raw, "explanation": explanation,
                 "answers": []}
        self.log.append(entry)
        pairs = [(True, r) for r in active[:n]] + [(False, r) for r in negative[:n]]
        if explanation is None:  # nothing to judge against: every answer fails
            return {"score": math.nan, "attempts": 1 + len(pairs),
                    "parse_failures": 1 + len(pairs)}
        labels, failures = [], 0
        for truth, r in pairs:
            answer = self.client.complete(detect_messages(explanation, r["context"]),
                                          ANSWER_TOKENS)
            parsed = parse_yes_no(answer)
            failures += parsed is None
            labels.append((truth, parsed))
            entry["answers"].append({"context": _plain(r["context"]), "active": truth,
                                     "raw": answer, "parsed": parsed})
        return {"score": balanced_accuracy(labels), "attempts": 1 + len(labels),
                "parse_failures": failures}


def make_judge(spec: str = "heuristic", base_url: str | None = None,
               key_env: str = "OPENAI_API_KEY"):
    """The harness's judge for ``spec``: the offline heuristic, or a ``DetectionJudge``."""
    if spec == "heuristic":
        from analysis.monosemanticity import heuristic_judge

        return heuristic_judge
    return DetectionJudge(make_client(spec, base_url, key_env))
