"""The Atari suite (ALE through ale-py, `pip install 'longdream[atari]'`; its ROMs ship with it), on
DreamerV3's protocol: `env.id=atari:<Game>` (e.g. `atari:Pong`) builds ALE/<Game>-v5 with

- sticky actions (`env.atari.sticky`, 0.25: ALE v5's repeat_action_probability),
- an action repeat of `env.action_repeat` frames (4) that sums the rewards and max-pools the last two
  frames (flicker), done here with the emulator's own frame skip off,
- the full action set (18) or the game's minimal one (`env.atari.actions=all|minimal`),
- an optional life-loss signal: `env.atari.lives=unused` (the default) or `terminal` (a lost life ends
  the episode, as in some older protocols),
- up to `env.atari.noops` random no-op actions at each reset (0),
- RGB frames resized to the model's image size (64 x 64 unless `env.image_size` says otherwise),
  grayscale with `env.grayscale=true`; no frame stacking (the world model is the memory).

`preset=atari100k` is the Atari 100K benchmark as DreamerV3 runs it: 100K agent steps = 400K frames,
no sticky actions, the minimal action set, up to 30 no-ops, train ratio 256.
"""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from torchrl.envs import EnvBase

from envs.errors import EnvError


@dataclass(frozen=True)
class AtariOptions:
    sticky: float = 0.25  # probability that the emulator repeats the previous action (ALE v5)
    actions: str = "all"  # all (18) | minimal (the game's own set)
    lives: str = "unused"  # unused | terminal: a lost life ends the episode
    noops: int = 0  # up to this many random no-op actions at each reset

    def __post_init__(self):
        if not 0.0 <= self.sticky < 1.0:
            raise ValueError(f"env.atari.sticky must be in [0, 1), got {self.sticky}")
        if self.actions not in ("all", "minimal"):
            raise ValueError(f"env.atari.actions must be all or minimal, got '{self.actions}'")
        if self.lives not in ("unused", "terminal"):
            raise ValueError(f"env.atari.lives must be unused or terminal, got '{self.lives}'")
        if self.noops < 0:
            raise ValueError(f"env.atari.noops must be >= 0, got {self.noops}")


class RepeatMaxPool(gym.Wrapper):
    """Repeat each action `repeat` frames, sum the rewards, return the max over the last two frames;
    with `life_loss`, a lost life terminates the episode; up to `noops` no-op frames after each reset."""

    def __init__(self, env: gym.Env, repeat: int, life_loss: bool, noops: int = 0):
        super().__init__(env)
        self.repeat, self.life_loss, self.noops = repeat, life_loss, noops
        self.lives = 0

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        for _ in range(int(self.np_random.integers(self.noops + 1)) if self.noops else 0):
            obs, _, terminated, truncated, info = self.env.step(0)  # action 0 is NOOP in every ALE set
            if terminated or truncated:
                obs, info = self.env.reset()
        self.lives = info.get("lives", 0)
        return obs, info

    def step(self, action):
        total, frames = 0.0, []
        for _ in range(self.repeat):
            obs, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            frames = (frames + [obs])[-2:]
            lost = self.life_loss and info.get("lives", 0) < self.lives
            self.lives = info.get("lives", 0)
            if terminated or truncated or lost:
                terminated = terminated or lost
                break
        obs = np.maximum(frames[0], frames[-1]) if len(frames) == 2 else frames[-1]
        return obs, total, terminated, truncated, info


def make_atari(cfg, seed: int, render: bool) -> EnvBase:
    import importlib

    from torchrl.envs import GymWrapper

    from envs.gym import INSTALL
    from envs.observations import ModelObservations

    try:
        ale_py = importlib.import_module("ale_py")
    except ModuleNotFoundError:
        raise EnvError(f"env '{cfg.id}' needs ale-py, which is not installed: {INSTALL['ale_py']}") from None
    gym.register_envs(ale_py)
    game = cfg.id.split(":", 1)[1]
    name = f"ALE/{game}-v5"
    if name not in gym.envs.registry:
        raise EnvError(f"unknown Atari game '{game}' (ALE has e.g. Pong, Breakout, MsPacman); list them with `longdream envs`")
    opts = cfg.atari
    env = gym.make(name, frameskip=1, repeat_action_probability=opts.sticky, full_action_space=opts.actions == "all",
                   obs_type="rgb", **cfg.kwargs)
    env = RepeatMaxPool(env, cfg.action_repeat, opts.lives == "terminal", opts.noops)
    env = ModelObservations(env, cfg.image_size or 64, cfg.grayscale)
    wrapped = GymWrapper(env, frame_skip=1)  # the repeat happened above, with max-pooling
    wrapped.set_seed(seed)
    return wrapped


def list_ids() -> list[str]:
    import importlib.util

    if importlib.util.find_spec("ale_py") is None:
        return []
    import ale_py

    gym.register_envs(ale_py)
    return sorted(f"atari:{k[4:-3]}" for k in gym.envs.registry if k.startswith("ALE/") and k.endswith("-v5"))
