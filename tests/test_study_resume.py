"""A study resumed into a folder whose finished trials were made under other settings is
refused with one line; growing the grid is not a change."""

import dataclasses

import pandas as pd
import pytest

from atoms.core.errors import ConfigError
from atoms.store.results import ROWS, ResultStore
from atoms.study.config import StudyConfig
from atoms.study.plan import check_resume, write_plan


def _finished_study(tmp_path) -> StudyConfig:
    cfg = StudyConfig(out=str(tmp_path / "out"))
    write_plan(cfg, {}, 1)
    rows = tmp_path / "out" / ROWS
    rows.mkdir(parents=True)
    pd.DataFrame({"objective": [0.5]}).to_parquet(rows / "trial-0.parquet")
    return cfg


def test_a_changed_sae_setting_is_refused_naming_the_field(tmp_path):
    cfg = _finished_study(tmp_path)
    changed = dataclasses.replace(cfg, sae=dataclasses.replace(cfg.sae, bandwidth=0.2))
    with pytest.raises(ConfigError) as err:
        check_resume(changed, ResultStore(changed.out))
    message = str(err.value)
    assert "\n" not in message and "sae.bandwidth = 0.05" in message and "0.2" in message
    assert "study.json" in message


def test_an_unchanged_or_grown_study_resumes(tmp_path):
    cfg = _finished_study(tmp_path)
    check_resume(cfg, ResultStore(cfg.out))
    grown = dataclasses.replace(cfg, grid=dataclasses.replace(cfg.grid, seeds=[0, 1, 2, 3]))
    check_resume(grown, ResultStore(grown.out))
    empty = StudyConfig(out=str(tmp_path / "new"))
    check_resume(empty, ResultStore(empty.out))


def test_fields_newer_than_the_recorded_config_count_as_their_defaults(tmp_path):
    import json

    cfg = _finished_study(tmp_path)
    path = tmp_path / "out" / "study.json"
    recorded = json.loads(path.read_text())
    del recorded["config"]["data"]["aip"]  # a study made before S̃ had a recipe
    path.write_text(json.dumps(recorded))
    check_resume(cfg, ResultStore(cfg.out))  # its default is what was done then
    del recorded["config"]["train"]["pre_act_coeff"]  # made before the pre-activation loss
    path.write_text(json.dumps(recorded))
    with pytest.raises(ConfigError, match="train.pre_act_coeff = 0.0"):
        check_resume(cfg, ResultStore(cfg.out))
    no_loss = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, pre_act_coeff=0.0))
    check_resume(no_loss, ResultStore(cfg.out))


def test_a_recorded_field_the_config_no_longer_has_is_refused(tmp_path):
    import json

    cfg = _finished_study(tmp_path)
    path = tmp_path / "out" / "study.json"
    recorded = json.loads(path.read_text())
    recorded["config"]["train"]["pre_act_window"] = 250  # steps, before the window was in rows
    path.write_text(json.dumps(recorded))
    with pytest.raises(ConfigError, match="train.pre_act_window = 250, the config no longer has"):
        check_resume(cfg, ResultStore(cfg.out))
