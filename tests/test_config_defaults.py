"""The defaults written in configs/*.yaml and those of the config dataclasses cannot disagree: every
key the YAML gives for a dataclass has the dataclass's default (or None where the size preset fills it)."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from agents.dreamer import AgentConfig
from worldmodels.model import BACKBONES, LossConfig
from worldmodels.nets import NetsConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def disagreements(values: dict, cls, where: str) -> list[str]:
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    out = []
    for key, value in values.items():
        if key not in defaults:
            out.append(f"{where}: '{key}' is not a field of {cls.__name__}")
        elif defaults[key] is not dataclasses.MISSING and value != defaults[key]:
            out.append(f"{where}: {key} = {value!r} in YAML, {defaults[key]!r} in {cls.__name__}")
    return out


def test_train_yaml_agent_and_loss_match_the_dataclasses():
    train = yaml.safe_load((CONFIGS / "train.yaml").read_text())
    bad = disagreements(train["agent"], AgentConfig, "train.yaml agent") + \
        disagreements(train["loss"], LossConfig, "train.yaml loss")
    probe = yaml.safe_load((CONFIGS / "probe.yaml").read_text())
    bad += disagreements(probe["loss"], LossConfig, "probe.yaml loss")
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_world_model_yaml_matches_its_dataclass(name):
    values = yaml.safe_load((CONFIGS / "world_model" / f"{name}.yaml").read_text())
    assert values.pop("name") == name
    bad = disagreements(values, BACKBONES[name][1], f"world_model/{name}.yaml")
    assert not bad, "; ".join(bad)


@pytest.mark.parametrize("size", ["xs", "s", "m"])
def test_size_yaml_matches_the_nets_dataclass(size):
    values = yaml.safe_load((CONFIGS / "size" / f"{size}.yaml").read_text())
    assert values.pop("name") == size
    bad = disagreements(values, NetsConfig, f"size/{size}.yaml")
    assert not bad, "; ".join(bad)


def test_a_disagreement_is_caught():
    assert disagreements({"horizon": 16}, AgentConfig, "x") == ["x: horizon = 16 in YAML, 15 in AgentConfig"]
    assert disagreements({"horizn": 15}, AgentConfig, "x")
