"""A real kill: extract.py is SIGKILLed mid-run, then rerun; finished shards are not redone."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from atoms.aip.data_plane import DataConfig
from atoms.core.config import load_yaml
from atoms.extract.extraction import build_windows
from atoms.extract.models import load_model, transformer_layers
from atoms.extract.shards import ShardSet, layer_folder

CONFIG = """
extract:
  model: tiny-random
  corpus: pydoc
  sites: [resid_post]
  layers: [3]
  context_len: 32
  max_tokens: 51200
  windows_per_shard: 16
  batch_windows: 16
  actor_cpus: 1.0
  out: {out}
"""


def start(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "experiments/extract.py", "--config", str(cfg), "--quiet"],
        cwd=Path(__file__).resolve().parents[1],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_killed_extraction_resumes(tmp_path):
    out = tmp_path / "acts"
    cfg = tmp_path / "kill.yaml"
    cfg.write_text(CONFIG.format(out=out))
    folder = layer_folder(out, "resid_post", 3)
    proc = start(cfg)
    deadline = time.time() + 120
    while len(list(folder.glob("shard-*.json"))) < 3:
        assert proc.poll() is None, proc.stderr.read()
        assert time.time() < deadline, "no shard finished within 120 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (folder / "manifest.json").exists()  # the killed run never looks complete
    survivors = {
        p.name: p.stat().st_mtime_ns
        for p in folder.glob("shard-*.parquet")
        if p.with_suffix(".json").exists()
    }
    assert 3 <= len(survivors) < 100

    rerun = start(cfg)
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    shards = ShardSet.open(folder)
    assert len(shards.paths) == 100 and shards.rows == 1600 * 31
    for name, stamp in survivors.items():
        assert (folder / name).stat().st_mtime_ns == stamp, f"{name} was recomputed"
    # Survivors and redone shards alike hold what a plain forward gives for their windows.
    loaded = load_model("tiny-random")
    cfg_obj = load_yaml(DataConfig, cfg).extract
    ids = torch.as_tensor(build_windows(cfg_obj, loaded.tokenizer).input_ids)
    seen = []  # the last block's output (hidden_states[-1] is after the final norm)
    block = transformer_layers(loaded.model)[3]
    handle = block.register_forward_hook(
        lambda m, a, o: seen.append(o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        loaded.model(input_ids=ids)
    handle.remove()
    assert torch.equal(shards.read_all(), seen[0][:, 1:].reshape(-1, 64))
