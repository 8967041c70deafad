"""Build a TorchRL environment from config: a small dict of env suites plus the common transforms.

Suites, one module each: gymnasium ids (envs/gym.py: classic control, MuJoCo v5, Box2D, the memory
suite, any third-party package's ids as `<module>:<EnvId>`) and dm-control (envs/dmc.py:
`dmc:<domain>-<task>`, state or pixels). Every env comes out with the same keys: "pixels" (uint8
(C, S, S), the model's image size) and/or "observation" (a float32 vector), "action" (one-hot for
discrete actions), and the transforms the agent relies on: action repeat, a time limit (StepCounter),
episode-start flags (InitTracker's "is_init") and the episode return (RewardSum).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

# Pixels without a GPU go through Mesa's software EGL; this must be set before dm-control is imported.
os.environ.setdefault("MUJOCO_GL", "egl")
# Classic-control rendering (pygame/SDL) for eval videos needs no display or sound device.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
os.environ.setdefault("SDL_AUDIODRIVER", "dummy")

from torchrl.envs import (CatTensors, Compose, DoubleToFloat, InitTracker, PermuteTransform,
                          RewardSum, StepCounter, TransformedEnv)


from envs.atari import AtariOptions  # noqa: E402
from envs.errors import EnvError  # noqa: E402,F401  (re-exported: envs.make.EnvError)


@dataclass(frozen=True)
class EnvConfig:
    id: str = "Pendulum-v1"  # gymnasium id (<module>:<EnvId> for a third-party one), dmc:<domain>-<task>, atari:<Game>
    pixels: bool = False  # dm-control: 64x64 RGB observations instead of the state vector
    action_repeat: int = 1  # env frames per agent step (rewards are summed)
    time_limit: int = 1000  # agent steps per episode before truncation
    kwargs: dict = field(default_factory=dict)  # passed to gymnasium.make
    imports: list = field(default_factory=list)  # packages to import first (they register gymnasium ids)
    image_size: int = 0  # side of the model's square images: 0 keeps an env's own square power-of-two side, else 64
    grayscale: bool = False  # image observations as one gray channel
    atari: AtariOptions = field(default_factory=AtariOptions)  # the Atari suite's options (envs/atari.py)
    shift: dict = field(default_factory=dict)  # {parameter: scale} of the physics (envs/shift.py), e.g. {m: 1.5}
    shift_range: dict = field(default_factory=dict)  # {parameter: [low, high]}: a scale drawn for every episode
    trial: int = 1  # > 1: that many episodes of one shift_range draw make one episode (envs/shift.py; gymnasium)

    def __post_init__(self):
        if isinstance(self.atari, dict):
            try:
                object.__setattr__(self, "atari", AtariOptions(**self.atari))
            except (TypeError, ValueError) as e:
                raise EnvError(str(e)) from None
        if self.image_size and (self.image_size < 8 or self.image_size & (self.image_size - 1)):
            raise EnvError(f"env.image_size must be 0 (auto) or a power of two from 8 up, got {self.image_size}")
        if self.action_repeat < 1:
            raise EnvError(f"env.action_repeat must be >= 1, got {self.action_repeat}")
        if self.time_limit < 1:
            raise EnvError(f"env.time_limit must be >= 1, got {self.time_limit}")
        from envs.shift import check

        # plain dicts and lists from here on (Hydra hands over its own containers)
        object.__setattr__(self, "shift", dict(self.shift))
        object.__setattr__(self, "shift_range", {k: list(v) for k, v in dict(self.shift_range).items()})
        check(self.shift, self.shift_range)
        if (self.shift or self.shift_range) and self.id.startswith("atari:"):
            raise EnvError(f"env '{self.id}' has no physical parameters to shift (env.shift needs Pendulum-v1, "
                           "a MuJoCo env or a dm-control task)")
        if self.trial < 1:
            raise EnvError(f"env.trial must be >= 1, got {self.trial}")
        if self.trial > 1 and not self.shift_range:
            raise EnvError("env.trial > 1 needs env.shift_range (a trial is several episodes of one draw of the dynamics)")
        if self.trial > 1 and (self.id.startswith("dmc:") or self.id.startswith("atari:")):
            raise EnvError("env.trial > 1 is for gymnasium envs (Pendulum-v1, MuJoCo v5); dm-control and Atari have no trials")


def _suite(env_id: str):
    """The suite module that builds `env_id`: {prefix: builder}, gymnasium for everything else."""
    from envs.atari import make_atari
    from envs.dmc import make_dmc
    from envs.gym import make_gym

    suites = {"dmc": make_dmc, "atari": make_atari}
    prefix = env_id.split(":", 1)[0] if ":" in env_id else ""
    return suites.get(prefix, make_gym)


def make_env(cfg: EnvConfig, seed: int = 0, render: bool = False) -> TransformedEnv:
    """`render` adds rendered frames under "pixels" to a state-based env (for videos)."""
    base = _suite(cfg.id)(cfg, seed, render)
    transforms = []
    obs_spec = base.observation_spec
    if "pixels" in obs_spec.keys():
        transforms.append(PermuteTransform((-1, -3, -2), in_keys=["pixels"]))  # (H, W, C) -> (C, H, W)
    if not cfg.pixels:
        keys = [k for k in obs_spec.keys() if k not in ("observation", "pixels")]
        if keys:  # dm-control state: concatenate every entry into one vector
            transforms.append(CatTensors(keys + (["observation"] if "observation" in obs_spec.keys() else []),
                                         out_key="observation", del_keys=True))
        transforms.append(DoubleToFloat())
    # time_limit is per episode; a trial of several episodes is one episode to the agent
    transforms += [StepCounter(max_steps=cfg.time_limit * cfg.trial), InitTracker(), RewardSum()]
    return TransformedEnv(base, Compose(*transforms))


def list_envs() -> str:
    from envs import atari, dmc, gym

    parts = [("gymnasium", gym.list_ids()), ("dm-control", dmc.list_ids()),
             ("atari (ale-py)", atari.list_ids() or ["(pip install 'longdream[atari]')"])]
    return "\n".join(f"{name}:\n  " + "\n  ".join(ids) for name, ids in parts)
