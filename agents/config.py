"""Hydra config -> frozen dataclasses, one per component.

Each default is written once. The components' defaults live in their dataclasses (AgentConfig,
LossConfig, NetsConfig and each backbone's config) and reach Hydra through its ConfigStore
(`register_defaults`): the `world_model` and `size` groups have one option per backbone and per size
preset, built from the dataclasses, and `agent_defaults` / `loss_defaults` give the `agent` and
`loss` keys. The YAML files under configs/ hold the run's own settings (train.yaml's and probe.yaml's
top level, env/, task/) and overrides only (recipe/, preset/).

`compose(overrides)` reads configs/train.yaml with the command line's key=value overrides; `build`
turns each group into its component's dataclass. A mistyped or unknown key is a ConfigError that
names it; derived values (size presets) are filled in by each dataclass.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from agents.dreamer import AgentConfig
from agents.offline.decision import DecisionConfig
from envs.make import EnvConfig
from worldmodels.model import BACKBONES, LossConfig
from worldmodels.nets import NET_SIZES, NetsConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Keys that may differ between a checkpoint and the command that resumes it.
RESUMABLE_KEYS = {"steps", "offline_updates", "run_dir", "device", "eval_every", "eval_episodes", "log_every", "video_every",
                  "checkpoint_every", "progress", "collector", "ray"}
RAY_KEYS = {"address", "cpus_per_worker", "memory_gb", "start_timeout", "log_to_driver"}


class ConfigError(ValueError):
    """A bad configuration; its message is one line that names the key and how to fix it."""


@dataclass(frozen=True)
class TrainConfig:
    steps: int  # environment steps to train for (agent steps x action repeat), counted across resumes
    seed: int
    device: str
    run_dir: str
    envs: int  # env streams: env processes (collector=local, more than one: MultiSyncCollector) or Ray actors
    collector: str  # local | ray (agents/collect.py)
    ray: dict  # collector=ray: address (join a cluster; None: start a local one), cpus_per_worker, memory_gb, ...
    prefill: int  # random-policy env steps before learning starts
    train_ratio: float  # replayed steps (B x T per update) per agent step
    batch_size: int  # B
    seq_len: int  # T
    replay_capacity: int  # rows kept in the replay buffer (split evenly over the envs)
    replay_context: bool  # windows start from the model state stored with their first row (DreamerV3)
    replay_context_every: int  # store the state every k rows and burn in between (0: by the state's size)
    collect_every: int  # agent steps per env between learner phases
    eval_every: int  # env steps between evaluations (0: only at the start and end)
    eval_episodes: int
    log_every: int  # env steps between scalar logs
    video_every: int  # env steps between open-loop videos (pixel envs)
    checkpoint_every: float  # seconds between checkpoints
    progress: bool  # show a progress bar
    algo: str  # dreamer | decision (a return-conditioned sequence policy trained offline: agents/offline/decision.py)
    offline: str | None  # a Minari dataset id to learn from alone (agents/offline/dataset.py)
    offline_root: str | None  # where that dataset lives (default: Minari's)
    offline_updates: int  # offline Dreamer: learner steps to train for (eval_every / log_every count updates too)


@dataclass(frozen=True)
class Config:
    train: TrainConfig
    env: EnvConfig
    backbone: str
    core: object  # the backbone's own config dataclass
    nets: NetsConfig
    agent: AgentConfig
    loss: LossConfig
    raw: DictConfig  # the resolved config, saved to the run directory
    decision: object = None  # DecisionConfig (agents/offline/decision.py)

    def __post_init__(self):
        if self.backbone not in BACKBONES or not isinstance(self.core, BACKBONES[self.backbone][1]):
            raise ConfigError(f"world model '{self.backbone}' with a {type(self.core).__name__}: the backbone "
                              "and its config must agree (build both from world_model=<name>)")


def _build(cls, node, where: str):
    values = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise ConfigError(f"unknown config key '{key}' (valid here: {', '.join(sorted(names))})")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad value in '{where}': {e}") from None


def field_defaults(cls) -> dict:
    """A config dataclass's defaults as a plain dict (None where a size preset fills the field in)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        if dataclasses.is_dataclass(out.get(f.name)):  # a nested options block (env.atari): a plain node
            out[f.name] = dataclasses.asdict(out[f.name])
    return out


def register_defaults() -> None:
    """Put the components' dataclass defaults into Hydra's ConfigStore (see the module docstring)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, (_, cls) in BACKBONES.items():
        node = field_defaults(cls)
        node.pop("size")  # the size group sets it (build_model)
        cs.store(group="world_model", name=name, node={"name": name, **node})
    for size in NET_SIZES:
        cs.store(group="size", name=size, node={**field_defaults(NetsConfig), "name": size})
    cs.store(name="env_defaults", node={"env": field_defaults(EnvConfig)})
    cs.store(name="agent_defaults", node={"agent": field_defaults(AgentConfig)})
    cs.store(name="loss_defaults", node={"loss": field_defaults(LossConfig)})
    cs.store(name="decision_defaults", node={"decision": field_defaults(DecisionConfig)})


OPEN = ("env.kwargs", "env.shift", "env.shift_range")  # dicts whose keys the user chooses


def open_keys(override: str) -> str:
    """`env.kwargs.g=9.0` (a key of a dict whose keys are the user's, such as env.shift) as Hydra's
    add-or-override `++env.kwargs.g=9.0`, so that it needs no `+` whether or not the key exists yet."""
    key = override.split("=", 1)[0]
    if "=" in override and any(key.startswith(d + ".") or key == d for d in OPEN):
        return "++" + override
    return override


def compose(overrides: list[str], config_name: str = "train") -> DictConfig:
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_defaults()
    overrides = [open_keys(o) for o in overrides]
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return hydra_compose(config_name=config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        msg = str(e)
        key = re.search(r"Key '([^']+)' is not in struct", msg) or re.search(r"Could not override '([^']+)'", msg)
        if key:
            where = {"agent": "AgentConfig in agents/dreamer.py", "loss": "LossConfig in worldmodels/model.py",
                     "world_model": "the backbone's config in worldmodels/", "size": "NetsConfig in worldmodels/nets.py"}
            part = where.get(key.group(1).split(".")[0], f"configs/{config_name}.yaml")
            raise ConfigError(f"unknown config key '{key.group(1)}'; see {part} for the valid keys") from None
        group = re.search(r"Could not find '([^']+)'", msg)
        if group:
            options = re.search(r"Available options in '[^']*':(.*?)Config search path", msg, re.S)
            opts = ", ".join(options.group(1).split()) if options else "none"
            raise ConfigError(f"no config '{group.group(1)}' (available: {opts})") from None
        raise ConfigError(msg.strip().splitlines()[0]) from None


def build(cfg: DictConfig) -> Config:
    top = {k: v for k, v in cfg.items() if k not in ("env", "world_model", "size", "agent", "loss", "decision")}
    train = _build(TrainConfig, OmegaConf.create(top), "")
    if train.steps < 0 or train.batch_size < 1 or train.seq_len < 2 or train.envs < 1:
        raise ConfigError("steps must be >= 0, batch_size >= 1, seq_len >= 2 and envs >= 1")
    if train.collector not in ("local", "ray"):
        raise ConfigError(f"collector must be local or ray, got '{train.collector}'")
    unknown = sorted(set(train.ray) - RAY_KEYS)
    if unknown:
        raise ConfigError(f"unknown config key 'ray.{unknown[0]}' (valid: {', '.join(sorted(RAY_KEYS))})")
    if train.replay_context_every < 0 or train.replay_context_every > train.seq_len:
        raise ConfigError(f"replay_context_every must be between 0 (chosen by the state's size) and seq_len ({train.seq_len})")
    if train.algo not in ("dreamer", "decision"):
        raise ConfigError(f"algo must be dreamer or decision, got '{train.algo}'")
    if train.algo == "decision" and not train.offline:
        raise ConfigError("algo=decision learns from a dataset: pass offline=<dataset id> (make one with `longdream dataset`)")
    if train.offline_updates < 0:
        raise ConfigError(f"offline_updates must be >= 0, got {train.offline_updates}")
    name, core, nets = build_model(cfg)
    decision = _build(DecisionConfig, cfg.decision, "decision") if "decision" in cfg else None
    return Config(train=train, env=_build(EnvConfig, cfg.env, "env"), backbone=name, core=core, nets=nets,
                  agent=_build(AgentConfig, cfg.agent, "agent"), loss=_build(LossConfig, cfg.loss, "loss"), raw=cfg,
                  decision=decision)


def build_model(cfg: DictConfig) -> tuple[str, object, NetsConfig]:
    """The `world_model` and `size` groups of a config: the backbone's name, its config dataclass and
    the shared nets' sizes (training and the memory probe both build their models here)."""
    wm = OmegaConf.to_container(cfg.world_model, resolve=True)
    name = wm.pop("name")
    if name not in BACKBONES:
        raise ConfigError(f"unknown world_model '{name}' (choose one of {', '.join(BACKBONES)})")
    nets = _build(NetsConfig, cfg.size, "size")
    return name, _build(BACKBONES[name][1], {**wm, "size": nets.name}, "world_model"), nets


def config_mismatch(saved: DictConfig, new: DictConfig, baseline: DictConfig | None = None) -> list[str]:
    """Keys whose values differ and that a resume may not change. A key the saved config lacks (added to
    the project since the run was made) is compared with `baseline`, the config the run's own overrides
    give today: at its default it matches, set to something else on the command line it does not."""
    a = _flat(OmegaConf.to_container(saved, resolve=True))
    b = _flat(OmegaConf.to_container(new, resolve=True))
    base = _flat(OmegaConf.to_container(baseline, resolve=True)) if baseline is not None else {}
    return sorted(k for k in set(a) | set(b) if k.split(".")[0] not in RESUMABLE_KEYS
                  and (a[k] if k in a else base.get(k)) != b.get(k))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def save_overrides(run_dir: Path, overrides: list[str]) -> None:
    """Record a new run's overrides (all but run_dir) in run_dir/overrides.json, which resume, eval,
    dataset and adapt read back; an existing record stays as it is."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "overrides.json").exists():
        (run_dir / "overrides.json").write_text(json.dumps([o for o in overrides if _key(o) != "run_dir"]))


def _merge_overrides(old: list[str], new: list[str]) -> list[str]:
    """Later overrides of the same key win (Hydra rejects a key given twice)."""
    merged = {_key(o): o for o in old}
    merged.update({_key(o): o for o in new})
    return list(merged.values())


def load_config(overrides: list[str]) -> tuple[Config, list[str]]:
    """The training config of a command line; inside an existing run directory the run's own overrides
    come first. Returns the config and the overrides it was made from."""
    run_dir = next((o.split("=", 1)[1] for o in overrides if _key(o) == "run_dir"), None)
    saved = Path(run_dir) / "overrides.json" if run_dir else None
    if saved is not None and saved.exists():
        overrides = _merge_overrides(json.loads(saved.read_text()), overrides)
    raw = compose(overrides)
    if raw.run_dir is None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{raw.env.id}-{raw.world_model.name}-{raw.size.name}-seed{raw.seed}")
        OmegaConf.update(raw, "run_dir", str(Path("runs") / name))
    return build(raw), overrides
