"""Each default is written once: the components' defaults come from their dataclasses (through
Hydra's ConfigStore), and the YAML default files do not repeat them."""
import dataclasses
from pathlib import Path

import pytest
import yaml

from agents.config import compose, field_defaults
from agents.dreamer import AgentConfig
from worldmodels.model import BACKBONES, LossConfig
from worldmodels.nets import NET_SIZES, NetsConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def disagreements(values: dict, cls, where: str) -> list[str]:
    defaults = field_defaults(cls)
    out = []
    for key, value in values.items():
        if key not in {f.name for f in dataclasses.fields(cls)}:
            out.append(f"{where}: '{key}' is not a field of {cls.__name__}")
        elif key in defaults and value != defaults[key]:
            out.append(f"{where}: {key} = {value!r}, {defaults[key]!r} in {cls.__name__}")
    return out


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("size", sorted(NET_SIZES))
def test_composed_defaults_are_the_dataclasses(backbone, size):
    raw = compose([f"world_model={backbone}", f"size={size}", "recipe=dv3_2023"])
    wm = dict(raw.world_model)
    assert wm.pop("name") == backbone
    bad = disagreements(dict(raw.agent), AgentConfig, "agent") + disagreements(dict(raw.loss), LossConfig, "loss") \
        + disagreements(wm, BACKBONES[backbone][1], "world_model") \
        + disagreements({k: v for k, v in raw.size.items() if k != "name"}, NetsConfig, "size")
    assert not bad, "; ".join(bad)
    assert raw.size.name == size
    assert set(raw.agent) == {f.name for f in dataclasses.fields(AgentConfig)}  # every field settable by key


def test_the_default_files_hold_no_component_defaults():
    """train.yaml and probe.yaml hold the run's own settings; the components' defaults are the
    dataclasses'. (Recipes and presets may name a value equal to today's default: theirs is a
    setting of its own that must not follow a later change of the default.)"""
    for name in ("train", "probe"):
        data = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        assert not {"agent", "loss", "world_model", "size"} & set(data), f"{name}.yaml repeats component defaults"
    assert not (CONFIGS / "world_model").exists() and not (CONFIGS / "size").exists()


def test_a_disagreement_is_caught():
    assert disagreements({"horizon": 16}, AgentConfig, "x") == ["x: horizon = 16, 15 in AgentConfig"]
    assert disagreements({"horizn": 15}, AgentConfig, "x")
