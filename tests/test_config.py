from dataclasses import dataclass, field

import pytest

from atoms.core.config import from_dict, load_yaml, to_dict
from atoms.core.errors import ConfigError
from atoms.sae.model import SAEConfig
from atoms.train.loop import TrainConfig


@dataclass
class Outer:
    name: str
    sae: SAEConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    sizes: list[int] = field(default_factory=lambda: [1])


def test_round_trip():
    cfg = from_dict(Outer, {"name": "a", "sae": {"d_in": 4, "d_sae": 8}, "sizes": [2, 3]})
    assert cfg.sae.d_sae == 8 and cfg.sizes == [2, 3]
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"name": "a", "sae": {"d_in": 4, "d_sae": "big"}},
            "sae.d_sae: expected an integer, got 'big'",
        ),
        (
            {"name": "a", "sae": {"d_in": 4, "d_sae": 8, "kind": "gated"}},
            "sae.kind: expected one of",
        ),
        ({"sae": {"d_in": 4, "d_sae": 8}}, "name: required field is missing"),
        ({"name": "a", "sae": {"d_in": 4, "d_sae": 8}, "bogus": 1}, "bogus: unknown field"),
        (
            {"name": "a", "sae": {"d_in": 4, "d_sae": 8}, "sizes": [1, "x"]},
            r"sizes\[1\]: expected an integer",
        ),
        (
            {"name": "a", "sae": {"d_in": 4, "d_sae": 8}, "train": {"lr": 0}},
            "train.lr: must be positive",
        ),
        (
            {"name": "a", "sae": {"d_in": 4, "d_sae": 8, "bias": "yes"}},
            "sae.bias: expected true/false",
        ),
    ],
)
def test_errors_name_the_field(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_yaml_errors_name_the_file(tmp_path):
    missing = tmp_path / "none.yaml"
    with pytest.raises(ConfigError, match="none.yaml: config file not found"):
        load_yaml(Outer, missing)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_yaml(Outer, broken)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("name: a\nsae: {d_in: 4, d_sae: -1}\n")
    with pytest.raises(ConfigError, match="wrong.yaml: sae.d_sae: must be positive"):
        load_yaml(Outer, wrong)
