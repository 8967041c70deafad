"""Build a TorchRL environment from config: gymnasium ids (classic control, MuJoCo v5, the memory
suite), dm-control suite tasks with state or 64x64 pixel observations.

Every env comes out with the same keys: "observation" (float vector) or "pixels" (uint8 (3, 64, 64)),
"action" (one-hot for discrete actions), and the transforms the agent relies on: action repeat, a time
limit (StepCounter), episode-start flags (InitTracker's "is_init") and the episode return (RewardSum).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

# Pixels without a GPU go through Mesa's software EGL; this must be set before dm-control is imported.
os.environ.setdefault("MUJOCO_GL", "egl")
# Classic-control rendering (pygame/SDL) for eval videos needs no display or sound device.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

import torch
from torchrl.envs import (CatTensors, Compose, DoubleToFloat, EnvBase, InitTracker, PermuteTransform,
                          RenameTransform, RewardSum, StepCounter, TransformedEnv)



class EnvError(ValueError):
    """A bad environment id or option; its message is one line that says how to fix it."""


@dataclass(frozen=True)
class EnvConfig:
    id: str = "Pendulum-v1"  # gymnasium id, or dmc:<domain>-<task>
    pixels: bool = False  # dm-control: 64x64 RGB observations instead of the state vector
    action_repeat: int = 1  # env frames per agent step (rewards are summed)
    time_limit: int = 1000  # agent steps per episode before truncation
    kwargs: dict = field(default_factory=dict)  # passed to gymnasium.make

    def __post_init__(self):
        if self.action_repeat < 1:
            raise EnvError(f"env.action_repeat must be >= 1, got {self.action_repeat}")
        if self.time_limit < 1:
            raise EnvError(f"env.time_limit must be >= 1, got {self.time_limit}")


def _renders_extra_frames(gymnasium, cfg: EnvConfig) -> bool:
    """Whether eval videos need rendered frames beside the observations: not for image observations
    (they are the video), and not for envs that cannot render rgb_array frames (e.g. BSuite)."""
    env = gymnasium.make(cfg.id, **cfg.kwargs)
    try:
        space = env.observation_space
        image = space.dtype == "uint8" and len(space.shape) == 3
        return not image and "rgb_array" in env.metadata.get("render_modes", [])
    finally:
        env.close()


def _gym_env(cfg: EnvConfig, seed: int, render: bool) -> EnvBase:
    import gymnasium

    import envs  # noqa: F401  registers the memory suite
    from torchrl.envs import GymEnv

    if cfg.id not in gymnasium.envs.registry:
        raise EnvError(f"unknown gymnasium id '{cfg.id}'; list valid ones with `longdream envs`")
    kwargs = dict(cfg.kwargs)
    if render and not _renders_extra_frames(gymnasium, cfg):
        render = False
    if render:  # rendered frames under "pixels" beside the state, for eval videos only
        kwargs.update(from_pixels=True, pixels_only=False)
    env = GymEnv(cfg.id, frame_skip=cfg.action_repeat, **kwargs)
    env.set_seed(seed)
    return env


def _dmc_env(cfg: EnvConfig, seed: int, render: bool) -> EnvBase:
    from dm_control import suite
    from torchrl.envs.libs.dm_control import DMControlWrapper

    name = cfg.id.split(":", 1)[1]
    domain, _, task = name.partition("-")
    if (domain, task.replace("-", "_")) not in suite.ALL_TASKS:
        raise EnvError(f"unknown dm-control task '{name}'; list valid ones with `longdream envs`")
    task = task.replace("-", "_")
    # DMControlEnv forwards render_kwargs to the task and fails; the wrapper renders at 64x64 directly.
    return DMControlWrapper(suite.load(domain, task, task_kwargs={"random": seed}), from_pixels=cfg.pixels or render,
                            pixels_only=cfg.pixels, render_kwargs={"height": 64, "width": 64}, frame_skip=cfg.action_repeat)


def make_env(cfg: EnvConfig, seed: int = 0, render: bool = False) -> TransformedEnv:
    """`render` adds rendered frames under "pixels" to a state-based env (for videos)."""
    if cfg.id.startswith("dmc:"):
        base = _dmc_env(cfg, seed, render)
    else:
        if cfg.pixels:
            raise EnvError("env.pixels=true needs a dm-control task (env.id=dmc:<domain>-<task>); "
                           "gymnasium image envs are detected from their observation space")
        base = _gym_env(cfg, seed, render)

    transforms = []
    obs_spec = base.observation_spec
    if "pixels" in obs_spec.keys():
        transforms.append(PermuteTransform((-1, -3, -2), in_keys=["pixels"]))  # (H, W, C) -> (C, H, W)
    if "observation" in obs_spec.keys() and obs_spec["observation"].dtype == torch.uint8:
        # Image observations from gymnasium (the memory suite): same path as dm-control pixels.
        transforms += [RenameTransform(["observation"], ["pixels"]), PermuteTransform((-1, -3, -2), in_keys=["pixels"])]
    elif not cfg.pixels:
        keys = [k for k in obs_spec.keys() if k not in ("observation", "pixels")]
        if keys:  # dm-control state: concatenate every entry into one vector
            transforms.append(CatTensors(keys + (["observation"] if "observation" in obs_spec.keys() else []),
                                         out_key="observation", del_keys=True))
        transforms.append(DoubleToFloat())
    transforms += [StepCounter(max_steps=cfg.time_limit), InitTracker(), RewardSum()]
    return TransformedEnv(base, Compose(*transforms))


def list_envs() -> str:
    import gymnasium
    from dm_control import suite

    import envs  # noqa: F401

    gym_ids = sorted(k for k in gymnasium.envs.registry if "-v" in k)
    dmc = sorted(f"dmc:{d}-{t}" for d, t in suite.ALL_TASKS)
    return "gymnasium:\n  " + "\n  ".join(gym_ids) + "\ndm-control:\n  " + "\n  ".join(dmc)
