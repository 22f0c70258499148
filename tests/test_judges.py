"""LLM judges: delphi-style detection scoring with scripted clients, the in-process hf judge on
SmolLM2, the OpenAI-compatible judge against a real `transformers serve` on 127.0.0.1, and the
one-line errors."""

import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from analysis.judges import (
    DetectionJudge,
    HFClient,
    OpenAIClient,
    balanced_accuracy,
    make_judge,
    parse_explanation,
    parse_yes_no,
)
from analysis.monosemanticity import judge_units, score_table, top_contexts
from atoms.core.config import from_dict
from atoms.core.errors import ConfigError, InputError
from atoms.evaluate.units import UnitSet
from atoms.study.config import StudyConfig
from tests.test_monosemanticity import WORDS, D, shard_folder


class Scripted:
    """A client whose explanation names the planted word and whose answers follow ``answer``."""

    def __init__(self, answer, explanation="the word w7"):
        self.name, self.answer, self.explanation, self.calls = "scripted", answer, explanation, 0

    def complete(self, messages, max_tokens):
        self.calls += 1
        text = messages[-1]["content"]
        if text.startswith("Texts:"):
            return self.explanation
        return self.answer(text.split("Text: ", 1)[1])


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder, _ = shard_folder(tmp_path_factory.mktemp("judged") / "shards")
    recs = top_contexts(UnitSet.neurons(D), folder, WORDS, n_units=D, top_k=5, window=2)
    return recs


def planted(records):
    return [r for r in records if r["unit"] == 0]


def test_an_oracle_scores_one_and_a_yes_sayer_one_half(records):
    active = {r["context"].replace("«", "").replace("»", "") for r in planted(records)
              if r["role"] == "detect"}
    oracle = DetectionJudge(Scripted(lambda text: "Yes." if text.split("\n")[0] in active
                                     else "no"))
    verdict = oracle(planted(records))
    assert verdict == {"score": 1.0, "attempts": 5, "parse_failures": 0}
    yes = DetectionJudge(Scripted(lambda text: "yes"))
    assert yes(planted(records))["score"] == 0.5
    entry = oracle.log[0]
    assert entry["explanation"] == "the word w7" and len(entry["answers"]) == 4
    assert "«" in entry["explain_prompt"][-1]["content"]  # the explainer sees marked tokens
    assert all("«" not in a["context"] for a in entry["answers"])  # the detector does not


def test_garbage_is_counted_as_parse_failures_never_as_scores(records):
    garbage = DetectionJudge(Scripted(lambda text: "Perhaps, who knows"))
    scores = judge_units(records, garbage)
    assert scores["score"].isna().all()
    assert (scores["parse_failures"] == scores["attempts"] - 1).all()
    table = score_table(scores)
    assert table["parse_failure_fraction"].iloc[0] == pytest.approx(4 / 5)
    assert math.isnan(table["score_mean"].iloc[0])
    mute = DetectionJudge(Scripted(lambda text: "yes", explanation="   \n..."))
    verdict = mute(planted(records))
    assert math.isnan(verdict["score"]) and verdict["parse_failures"] == verdict["attempts"] == 5
    assert mute.client.calls == 1  # no explanation: nothing is asked
    with pytest.raises(InputError, match="not a number in"):
        judge_units(records, lambda r: math.nan)  # a plain judge's NaN is not a parse failure
    lonely = [r for r in planted(records) if r["rank"] == 0]  # one context: nothing held out
    verdict = garbage(lonely)
    assert math.isnan(verdict["score"]) and verdict["attempts"] == 0
    assert "skipped" in garbage.log[-1]


def test_parsers():
    assert parse_yes_no(" Yes, it is") is True and parse_yes_no("no.") is False
    assert parse_yes_no("Maybe yes") is None and parse_yes_no("") is None
    assert parse_explanation("\nExplanation: the token 'of'\nmore") == "the token 'of'"
    assert parse_explanation(" \n--- ") is None
    assert balanced_accuracy([(True, True), (True, None), (False, True), (False, False)]) == 0.75
    assert math.isnan(balanced_accuracy([(True, True), (False, None)]))


def test_hf_judge_in_process(records):
    judge = make_judge("hf:smollm2-135m")
    assert isinstance(judge.client, HFClient) and judge.__name__ == "hf:smollm2-135m"
    verdict = judge(planted(records))
    entry = judge.log[0]
    parsed = sum(a["parsed"] is not None for a in entry["answers"])
    assert verdict["attempts"] == 5 and verdict["parse_failures"] == 4 - parsed
    assert entry["explain_raw"] and all(isinstance(a["raw"], str) for a in entry["answers"])
    assert math.isnan(verdict["score"]) or 0 <= verdict["score"] <= 1


def test_openai_judge_errors_are_one_line(monkeypatch):
    monkeypatch.delenv("ATOMS_NO_KEY", raising=False)
    with pytest.raises(InputError, match="no API key .*ATOMS_NO_KEY") as e:
        OpenAIClient("m", "http://127.0.0.1:9/v1", key_env="ATOMS_NO_KEY")
    assert "\n" not in str(e.value)
    monkeypatch.setenv("ATOMS_KEY", "k")
    with pytest.raises(InputError, match="unreachable") as e:
        OpenAIClient("m", f"http://127.0.0.1:{free_port()}/v1", key_env="ATOMS_KEY",
                     timeout=5)
    assert "\n" not in str(e.value)
    with pytest.raises(InputError, match="expected 'heuristic'"):
        make_judge("gpt5")
    with pytest.raises(ConfigError, match="monosemanticity.judge"):
        from_dict(StudyConfig, {"monosemanticity": {"judge": "claude"}})


# ------------------------------------------------------------------ a real server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_smollm2():
    """`transformers serve` on 127.0.0.1 serving the local SmolLM2 folder; stopped after."""
    from atoms.extract.models import _ensure_smollm2

    folder, port = str(_ensure_smollm2()), free_port()
    cli = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen([str(cli), "serve", folder, "--host", "127.0.0.1", "--port",
                             str(port), "--device", "cpu"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited: {proc.stderr.read().decode()[-500:]}")
            try:
                urllib.request.urlopen(f"{url}/models", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("transformers serve did not answer within 180 s")
                time.sleep(1)
        yield url, folder
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.ci
def test_openai_judge_against_transformers_serve(served_smollm2, records, monkeypatch):
    url, folder = served_smollm2
    monkeypatch.setenv("ATOMS_JUDGE_KEY", "local")
    judge = make_judge(f"openai:{folder}", url, "ATOMS_JUDGE_KEY")
    verdict = judge(planted(records))
    entry = judge.log[0]
    assert entry["explain_raw"].strip()  # the server's model wrote something
    parsed = sum(a["parsed"] is not None for a in entry["answers"])
    assert verdict["attempts"] == 5 and verdict["parse_failures"] == 4 - parsed
    assert math.isnan(verdict["score"]) or 0 <= verdict["score"] <= 1
