"""extract.py → fit_aip.py → shift.py on the tiny model, as a user runs them."""

import pandas as pd
import pytest

from atoms.aip.metric import load_aip
from atoms.core.cli import run
from experiments import extract, fit_aip, shift

TINY = """
extract:
  model: tiny-random
  corpus: pydoc
  sites: [resid_post]
  layers: [1, 3]
  context_len: 32
  max_tokens: 8192
  windows_per_shard: 64
  actor_cpus: 1.0
  out: {out}
shift:
  sample: 200
"""


def test_three_commands(tmp_path, ray_session, capsys):
    cfg = tmp_path / "tiny.yaml"
    out = tmp_path / "acts"
    cfg.write_text(TINY.format(out=out))
    for command in (extract, fit_aip, shift):
        assert run(command.main, ["--config", str(cfg), "--quiet"]) == 0, capsys.readouterr().err
    aip, meta = load_aip(out / "resid_post" / "layer_3" / "aip.safetensors")
    assert aip.S.shape == (64, 64) and meta["rows"] == 256 * 31 and meta["centred"] is False
    table = pd.read_parquet(out / "shift" / "shift.parquet")
    assert list(table.layer) == [1, 3]
    assert (abs(table.aip_mean - 90) < 2).all()
    assert (out / "shift" / "shift.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("command", [extract, fit_aip, shift])
def test_bad_config_is_one_line(tmp_path, capsys, command):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("extract:\n  sites: [attn]\n")
    assert run(command.main, ["--config", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "extract.sites: 'attn' is unknown" in err


def test_fit_aip_without_extraction_says_so(tmp_path, capsys):
    assert run(fit_aip.main, ["--out", str(tmp_path)]) == 2
    assert "run experiments/extract.py first" in capsys.readouterr().err
