"""Offline datasets in Minari's format, made from the project's own runs.

    longdream dataset kind=replay run_dir=<run>                 the run's replay, as stored (like D4RL's medium-replay)
    longdream dataset kind=policy run_dir=<run> episodes=100 [noise=0.1]
                                                                rollouts of the run's latest checkpoint (a partly
                                                                trained run gives "medium", a final one "expert")
    longdream dataset kind=random env=<env config> episodes=100  a uniformly random policy

A dataset is Minari's own (`minari.create_dataset_from_buffers`, HDF5 storage, written locally, nothing
downloaded) under `root=` (default: Minari's, $MINARI_DATASETS_PATH or ~/.minari/datasets) with the id
`name=` (default `longdream/<env>/<kind>-v0`). Each episode holds T + 1 observations and T actions,
rewards, terminations and truncations; actions are the env's (continuous ones clipped and scaled to
its bounds, discrete ones as indices). What made the dataset is recorded beside it, in
`longdream.json` and in Minari's description: the env config, the kind, the checkpoint step and the
policy's mean return. `ref_random=` and `ref_expert=` (returns) become Minari's reference scores.

From the replay, an episode is kept when it is whole: its first row is an episode start (the buffer
may have overwritten the beginning of the oldest one) and a new episode follows it or it ended in a
termination or at the time limit (the newest one of each stream may still have been running when the
run stopped).

`load(name, root)` reads a dataset back into episodes (Minari's API); TorchRL's
`MinariExperienceReplay(name, load_from_local_minari=True)` reads the same files (tests check both).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

DEFAULTS = {"kind": "", "run_dir": "", "env": "", "episodes": 100, "noise": 0.0, "name": "", "root": "", "seed": 0,
            "ref_random": float("nan"), "ref_expert": float("nan"), "overwrite": False}
KINDS = ("replay", "policy", "random")


@dataclass
class Episode:
    obs: np.ndarray  # (T + 1, ...)
    action: np.ndarray  # (T, A) float, or (T,) int for a discrete action space
    reward: np.ndarray  # (T,)
    terminated: np.ndarray  # (T,) bool
    truncated: np.ndarray  # (T,) bool

    def __len__(self) -> int:
        return len(self.reward)

    @property
    def ret(self) -> float:
        return float(self.reward.sum())


@dataclass
class Dataset:
    name: str
    episodes: list[Episode]
    info: dict = field(default_factory=dict)  # longdream.json: env, kind, checkpoint step, mean return, ...
    observation_space: object = None
    action_space: object = None

    @property
    def discrete(self) -> bool:
        return self.episodes[0].action.ndim == 1


def _error(msg: str):
    from agents.config import ConfigError

    return ConfigError(msg)


def default_root() -> Path:
    return Path(os.environ.get("MINARI_DATASETS_PATH") or Path.home() / ".minari" / "datasets")


@contextlib.contextmanager
def _root(root: str | Path | None):
    """Minari finds datasets through $MINARI_DATASETS_PATH: point it at `root` for the call (made absolute:
    Minari joins a relative root onto its own data path when it sizes a new dataset)."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(Path(root or default_root()).resolve())
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old


def _minari():
    try:
        import h5py  # noqa: F401 - Minari's HDF5 storage
        import minari
    except ImportError:
        raise _error("offline datasets need Minari with HDF5: pip install 'longdream[offline]'") from None
    return minari


def check_name(name: str) -> str:
    if not re.fullmatch(r"([-\w]+/)*[-\w]+-v\d+", name):  # Minari's own id pattern: no dots
        raise _error(f"dataset name '{name}' is not a Minari id: use [namespace/][env/]name-v<version> (letters, digits, "
                     "'-' and '_'), e.g. longdream/hopper/medium-v0")
    return name


# --- spaces ---------------------------------------------------------------------------------------

def spaces(env, obs_key: str):
    """gymnasium spaces from a TorchRL env's specs: the observation key's Box, and Discrete or Box actions."""
    import gymnasium as gym

    spec = env.observation_spec[obs_key]
    dtype = spec.dtype.__str__().replace("torch.", "")
    if obs_key == "pixels":
        obs_space = gym.spaces.Box(0, 255, tuple(spec.shape), np.uint8)
    else:
        space = getattr(spec, "space", None)
        low = space.low.numpy() if hasattr(space, "low") else np.full(spec.shape, -np.inf)
        high = space.high.numpy() if hasattr(space, "high") else np.full(spec.shape, np.inf)
        obs_space = gym.spaces.Box(low.astype(dtype), high.astype(dtype), tuple(spec.shape), np.dtype(dtype))
    a = env.action_spec
    if a.domain == "discrete":
        act_space = gym.spaces.Discrete(int(a.shape[-1]))
    else:
        act_space = gym.spaces.Box(a.space.low.numpy().astype(np.float32), a.space.high.numpy().astype(np.float32),
                                   tuple(a.shape), np.float32)
    return obs_space, act_space


def to_unit(action: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Env actions (N, ...) in [low, high] -> the actor's units, (N, A) in [-1, 1] (the inverse of
    DreamerPolicy.to_env)."""
    return ((action.float().reshape(len(action), -1) - low) / (high - low) * 2 - 1).clamp(-1, 1)


def env_action(policy, raw: torch.Tensor) -> np.ndarray:
    """The env's action for the actor's raw one: an index for one-hot actions, else clipped and scaled."""
    if policy.agent.wm.spec.discrete:
        return raw.argmax(-1).numpy().astype(np.int64)
    return policy.to_env(raw.float()).numpy().astype(np.float32)


# --- making episodes ------------------------------------------------------------------------------

def replay_episodes(replay, policy, time_limit: int) -> list[Episode]:
    """The whole episodes of every stream of a replay (see the module docstring); an episode of
    `time_limit` steps is whole even with nothing after it."""
    episodes = []
    for e in range(replay.n_envs):
        lo, hi = replay.lo[e], replay.hi[e]
        if hi - lo < 2:
            continue
        slots = replay._slots(torch.full((hi - lo,), e), torch.arange(lo, hi))
        rows = replay.rows[slots]
        first = rows["is_first"].numpy()
        term = rows["is_terminal"].numpy()
        starts = np.flatnonzero(first)
        for i, s in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else len(first)  # rows [s, end) are one episode
            whole = i + 1 < len(starts) or term[end - 1] or end - s - 1 >= time_limit
            if not whole or end - s < 2:
                continue
            ep = rows[s:end]
            T = end - s - 1
            terminated = np.zeros(T, bool)
            terminated[-1] = bool(term[end - 1])
            episodes.append(Episode(obs=ep["obs"].numpy(), action=env_action(policy, ep["action"][1:]),
                                    reward=ep["reward"][1:].numpy().astype(np.float32), terminated=terminated,
                                    truncated=~terminated & (np.arange(T) == T - 1)))
    return episodes


class NoisyPolicy:
    """The policy's action plus Gaussian noise of std `noise` (in the actor's [-1, 1] units) for
    continuous actions, or a uniformly random one with probability `noise` for discrete ones. The
    model's next input is the perturbed action, as if the policy had chosen it."""

    def __init__(self, policy, noise: float, generator: torch.Generator):
        self.policy, self.noise, self.gen = policy, noise, generator

    def __call__(self, td):
        td = self.policy(td)
        if self.noise <= 0:
            return td
        raw = td["next", "prev_action"]
        if self.policy.agent.wm.spec.discrete:
            flip = torch.rand(raw.shape[:-1], generator=self.gen) < self.noise
            other = torch.nn.functional.one_hot(torch.randint(raw.shape[-1], raw.shape[:-1], generator=self.gen),
                                                raw.shape[-1]).to(raw.dtype)
            raw = torch.where(flip[..., None], other, raw)
        else:
            raw = raw + self.noise * torch.randn(raw.shape, generator=self.gen)
        td["next", "prev_action"] = raw
        td["action"] = self.policy.to_env(raw.to(self.policy.low.device)).to(td["action"].device)
        return td


def rollout_episodes(env, policy, act, n: int, time_limit: int, obs_key: str, desc: str = "episodes") -> list[Episode]:
    """`n` episodes of `act` (a policy, possibly noisy) in `env`, as the env saw them."""
    from tqdm import tqdm

    episodes = []
    for _ in tqdm(range(n), desc=desc, unit="ep", leave=False):
        td = env.rollout(time_limit, policy=act, break_when_any_done=True)
        T = td.shape[0]
        obs = torch.cat([td[obs_key], td["next", obs_key][-1:]]).numpy()
        terminated = td["next", "terminated"].reshape(T).numpy().astype(bool)
        truncated = td["next", "done"].reshape(T).numpy().astype(bool) & ~terminated
        truncated[-1] = truncated[-1] or not terminated[-1]  # the rollout's step limit ends it too
        episodes.append(Episode(obs=obs, action=env_action(policy, td["next", "prev_action"]),
                                reward=td["next", "reward"].reshape(T).numpy().astype(np.float32),
                                terminated=terminated, truncated=truncated))
    return episodes


# --- writing and reading --------------------------------------------------------------------------

def write(name: str, episodes: list[Episode], obs_space, act_space, info: dict, root: str | Path | None = None,
          overwrite: bool = False) -> Path:
    """Write episodes as a Minari dataset; returns its directory."""
    minari = _minari()
    from minari.data_collector import EpisodeBuffer

    check_name(name)
    if not episodes:
        raise _error(f"no whole episode to write for dataset '{name}' (a replay needs at least one finished episode)")
    ref = {"ref_min_score": info.get("ref_random"), "ref_max_score": info.get("ref_expert")}
    ref = {k: float(v) for k, v in ref.items() if v is not None and np.isfinite(v)}
    if len(ref) == 1:
        raise _error("give both ref_random and ref_expert (Minari keeps reference scores only as a pair)")
    with _root(root):
        path = default_root() / name
        if path.exists():
            if not overwrite:
                raise _error(f"dataset '{name}' exists in {default_root()}; choose another name or pass overwrite=true")
            minari.delete_dataset(name)
        buffers = [EpisodeBuffer(id=i, observations=ep.obs, actions=ep.action, rewards=list(ep.reward),
                                 terminations=list(ep.terminated), truncations=list(ep.truncated))
                   for i, ep in enumerate(episodes)]
        returns = [ep.ret for ep in episodes]
        info = {**info, "episodes": len(episodes), "steps": int(sum(len(ep) for ep in episodes)),
                "mean_return": float(np.mean(returns)), "std_return": float(np.std(returns))}
        description = (f"longdream {info['kind']} dataset of {info['env']}: {info['episodes']} episodes, "
                       f"{info['steps']} steps, mean return {info['mean_return']:.1f}"
                       + (f", policy of checkpoint step {info['checkpoint_step']}" if info.get("checkpoint_step") is not None else ""))
        with warnings.catch_warnings():  # a non-gymnasium env has no EnvSpec (longdream.json records the env)
            for unset in ("env_spec is None", "`eval_env` is set", "`code_permalink` is set", "`author` is set",
                          "`author_email` is set"):
                warnings.filterwarnings("ignore", message=unset)
            minari.create_dataset_from_buffers(name, buffers, env=_env_spec(info.get("env_config", {})),
                                               observation_space=obs_space, action_space=act_space,
                                               algorithm_name=f"longdream-{info['kind']}", description=description,
                                               jpeg_encoding=False, **ref)
        (path / "longdream.json").write_text(json.dumps(info, indent=1))
    return path


def _env_spec(env_cfg: dict):
    """The gymnasium EnvSpec (id, kwargs, time limit) of a plain gymnasium env, so that Minari users can
    recover it; None for dm-control, Atari and transformed observations."""
    import gymnasium as gym

    env_id = env_cfg.get("id", "")
    if not env_id or ":" in env_id or env_cfg.get("pixels") or env_cfg.get("action_repeat", 1) != 1:
        return None
    try:
        spec = gym.spec(env_id)
    except gym.error.Error:
        return None
    return dataclasses.replace(spec, kwargs={**spec.kwargs, **(env_cfg.get("kwargs") or {})},
                               max_episode_steps=env_cfg.get("time_limit") or spec.max_episode_steps)


def _existing(name: str) -> Path:
    """The folder of dataset `name` under the current root; a missing one is a one-line error."""
    path = default_root() / check_name(name)
    if not (path / "data").exists():
        raise _error(f"no dataset '{name}' in {default_root()}; make one with `longdream dataset` or pass root=")
    return path


def read_info(name: str, root: str | Path | None = None) -> dict:
    """A dataset's provenance (longdream.json) without reading its episodes."""
    with _root(root):
        path = _existing(name) / "longdream.json"
        return json.loads(path.read_text()) if path.exists() else {}


def load(name: str, root: str | Path | None = None) -> Dataset:
    """A dataset's episodes and provenance; a missing or malformed dataset is a one-line error."""
    minari = _minari()
    with _root(root):
        _existing(name)
        try:
            ds = minari.load_dataset(name)
            episodes = [Episode(obs=np.asarray(e.observations), action=np.asarray(e.actions),
                                reward=np.asarray(e.rewards, np.float32), terminated=np.asarray(e.terminations, bool),
                                truncated=np.asarray(e.truncations, bool)) for e in ds.iterate_episodes()]
            obs_space, act_space = ds.observation_space, ds.action_space
        except Exception as err:  # noqa: BLE001 - Minari raises many kinds for a damaged file
            raise _error(f"dataset '{name}' in {default_root()} cannot be read ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''}); make it again") from None
    info = read_info(name, root)
    for ep in episodes:
        if not (len(ep.obs) == len(ep) + 1 == len(ep.action) + 1 == len(ep.terminated) + 1):
            raise _error(f"dataset '{name}' is malformed: an episode's observations, actions and rewards do not line up")
    if not episodes:
        raise _error(f"dataset '{name}' holds no episodes; make it again")
    return Dataset(name, episodes, info, obs_space, act_space)


def load_for(cfg) -> Dataset:
    """The dataset a training config names (train.offline, train.offline_root), checked against its env."""
    t = cfg.train
    ds = load(t.offline, t.offline_root or None)
    made = ds.info.get("env_config") or ({"id": ds.info["env"]} if ds.info.get("env") else {})
    now = dataclasses.asdict(cfg.env)
    differ = [k for k in ("id", "action_repeat", "time_limit", "pixels", "kwargs") if k in made and made[k] != now.get(k)]
    if differ:
        raise _error(f"dataset '{t.offline}' was made with env {', '.join(f'{k}={made[k]}' for k in differ)} but this "
                     f"run has {', '.join(f'{k}={now.get(k)}' for k in differ)}; pass the env settings it was made with")
    return ds


# --- the command ----------------------------------------------------------------------------------

def parse(argv: list[str]) -> dict:
    opts = dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise _error(f"dataset takes key=value arguments, got '{arg}'")
        if key not in DEFAULTS:
            raise _error(f"unknown dataset option '{key}' (valid: {', '.join(sorted(DEFAULTS))})")
        kind = type(DEFAULTS[key])
        try:
            opts[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise _error(f"{key} must be a {kind.__name__}, got '{value}'") from None
    if opts["kind"] not in KINDS:
        raise _error("usage: longdream dataset kind=replay|policy|random (run_dir=<run> | env=<env config>) "
                     "[episodes=N noise=S name=<id> root=<dir>]")
    if opts["kind"] in ("replay", "policy") and not opts["run_dir"]:
        raise _error(f"kind={opts['kind']} needs run_dir=<a training run>")
    if opts["kind"] == "random" and not (opts["env"] or opts["run_dir"]):
        raise _error("kind=random needs env=<env config> (or run_dir=<run> for its env)")
    if opts["episodes"] < 1 or opts["noise"] < 0:
        raise _error("episodes must be at least 1 and noise at least 0")
    return opts


def main(argv: list[str]) -> Path:
    from omegaconf import OmegaConf

    from agents import checkpoint
    from agents.config import load_config
    from agents.policy import EVAL, RANDOM
    from agents.replay import Replay
    from agents.train import _collect_env, build_agent

    opts = parse(argv)
    if opts["name"]:
        check_name(opts["name"])  # before any rollout
    if opts["name"] and not opts["overwrite"]:  # before any rollout: an existing dataset stays as it is
        with _root(opts["root"] or None):
            if (default_root() / check_name(opts["name"])).exists():
                raise _error(f"dataset '{opts['name']}' exists in {default_root()}; choose another name or pass overwrite=true")
    step = None
    if opts["run_dir"]:
        run_dir = Path(opts["run_dir"])
        if not (run_dir / "overrides.json").exists():
            raise _error(f"'{run_dir}' is not a longdream run directory (no overrides.json); pass the run_dir of a training run")
        cfg, _ = load_config([f"run_dir={run_dir}"])
    else:
        cfg, _ = load_config([f"env={opts['env']}", f"seed={opts['seed']}"])
    env_name = re.sub(r"[^a-z0-9]+", "_", re.sub(r"-v\d+$", "", cfg.raw.env.id.split(":")[-1].lower())).strip("_")
    agent, policy, shapes = build_agent(cfg, "cpu")
    if len(policy.obs_keys) > 1:
        raise _error("datasets hold one observation key; this env gives several (pixels and a vector)")
    obs_key = policy.obs_keys[0]
    env = _collect_env(cfg.env, opts["seed"] + 70_000, shapes)
    obs_space, act_space = spaces(env, obs_key)
    if opts["kind"] in ("replay", "policy"):
        ckpt = checkpoint.latest(run_dir)
        if ckpt is None:
            raise checkpoint.CheckpointError(f"no checkpoint in '{run_dir}'; train first")
        agent.load_state_dict(checkpoint.load(ckpt)[0]["agent"])
        step = int(ckpt.name.split("-")[1])
    torch.manual_seed(opts["seed"])
    if opts["kind"] == "replay":
        episodes = replay_episodes(Replay.open(run_dir / "replay", ckpt), policy, cfg.env.time_limit)
    else:
        policy.mode.fill_(EVAL if opts["kind"] == "policy" else RANDOM)
        act = NoisyPolicy(policy, opts["noise"], torch.Generator().manual_seed(opts["seed"]))
        episodes = rollout_episodes(env, policy, act, opts["episodes"], cfg.env.time_limit, obs_key, opts["kind"])
    env.close()
    name = opts["name"] or f"longdream/{env_name}/{opts['kind']}-v0"
    info = {"env": cfg.raw.env.id, "env_config": OmegaConf.to_container(cfg.raw.env, resolve=True),
            "kind": opts["kind"], "obs_key": obs_key, "run_dir": opts["run_dir"] or None, "checkpoint_step": step,
            "noise": opts["noise"], "seed": opts["seed"], "ref_random": opts["ref_random"], "ref_expert": opts["ref_expert"]}
    path = write(name, episodes, obs_space, act_space, info, opts["root"] or None, opts["overwrite"])
    meta = json.loads((path / "longdream.json").read_text())
    print(f"dataset {name}: {meta['episodes']} episodes, {meta['steps']} steps, mean return {meta['mean_return']:.1f} "
          f"(std {meta['std_return']:.1f})\nwritten: {path}")
    return path
