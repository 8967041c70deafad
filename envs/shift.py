"""Shifted dynamics: physical parameters scaled from an env's defaults, fixed (`env.shift`) or drawn anew
for every episode (`env.shift_range`, domain randomisation).

    env.shift={m: 1.5, l: 1.5}                  Pendulum-v1 with 1.5x the mass and the length
    env.shift_range={mass: [0.75, 1.25]}        every episode draws one scale in the range (uniform)
    env.trial=3                                 gymnasium: 3 episodes of the same draw make one (RL^2)

Parameters, as scales of the env's own values:
- gymnasium Pendulum-v1: `g`, `m`, `l` (the attributes its step reads);
- MuJoCo (gymnasium's v5 envs, dm-control): `mass` (every body), `damping` (every joint), `friction`
  (every geom's sliding, torsional and rolling coefficients), `gravity`.
Any other name is a one-line error listing those the env has. A shifted env records the scales in
force as `shift` (what the adaptation benchmark reports).
"""
from __future__ import annotations

import numpy as np

from envs.errors import EnvError

PENDULUM = ("g", "m", "l")
MUJOCO = {"mass": "body_mass", "damping": "dof_damping", "friction": "geom_friction"}  # + gravity: opt.gravity


def check(shift: dict, ranges: dict) -> None:
    """Scales must be positive, ranges [low, high] with 0 < low <= high, and a parameter shifted one way only."""
    for name, s in shift.items():
        if not isinstance(s, (int, float)) or s <= 0:
            raise EnvError(f"env.shift.{name} must be a positive scale, got {s!r}")
    for name, r in ranges.items():
        if len(r) != 2 or not all(isinstance(x, (int, float)) for x in r) or not 0 < r[0] <= r[1]:
            raise EnvError(f"env.shift_range.{name} must be [low, high] with 0 < low <= high, got {list(r)!r}")
    both = sorted(set(shift) & set(ranges))
    if both:
        raise EnvError(f"'{both[0]}' is in both env.shift and env.shift_range; give it in one of them")


class Shifter:
    """Scales named parameters of one simulator from their values at construction. `params`: {name:
    (get, set)} for the parameters this simulator has."""

    def __init__(self, env_id: str, params: dict, shift: dict, ranges: dict, seed: int):
        check(shift, ranges)
        unknown = sorted((set(shift) | set(ranges)) - set(params))
        if unknown:
            names = ", ".join(params) or "none"
            raise EnvError(f"env '{env_id}' has no parameter '{unknown[0]}' to shift (it has: {names})")
        self.params = {k: params[k] for k in {**shift, **ranges}}
        self.defaults = {k: np.array(get(), copy=True) for k, (get, _) in self.params.items()}
        self.fixed, self.ranges = dict(shift), dict(ranges)
        self.rng = np.random.default_rng(seed)
        self.scales: dict[str, float] = {}
        self.apply()

    def apply(self) -> None:
        """Set every shifted parameter: fixed scales as given, ranged ones drawn anew."""
        self.scales = {**self.fixed, **{k: float(self.rng.uniform(*r)) for k, r in self.ranges.items()}}
        for k, s in self.scales.items():
            self.params[k][1](self.defaults[k] * s)

    def episode(self) -> None:
        if self.ranges:
            self.apply()


def mujoco_params(model) -> dict:
    """(get, set) of the MuJoCo parameters on an MjModel (arrays updated in place)."""
    def field(name):
        def put(v):
            getattr(model, name)[...] = v
        return (lambda: getattr(model, name)), put

    params = {k: field(f) for k, f in MUJOCO.items()}

    def put_gravity(v):
        model.opt.gravity[...] = v
    params["gravity"] = (lambda: model.opt.gravity), put_gravity
    return params


def gym_params(env) -> dict:
    """The shiftable parameters of a gymnasium env (its unwrapped core), {} where it has none."""
    core = env.unwrapped
    if env.spec is not None and env.spec.id == "Pendulum-v1":
        def attr(name):
            return (lambda: getattr(core, name)), (lambda v: setattr(core, name, float(v)))
        return {k: attr(k) for k in PENDULUM}
    model = getattr(core, "model", None)
    if model is not None and type(model).__name__ == "MjModel":
        return mujoco_params(model)
    return {}


def wrap_gym(env, env_id: str, shift: dict, ranges: dict, trial: int = 1):
    """The gymnasium env with its dynamics shifted; ranged parameters are drawn at every reset. With
    trial = k > 1, k episodes of the env make one (a trial, as in RL^2): where an episode ends before
    the k-th, the env resets within the trial (the next observation is the new start; no termination
    reaches the agent), and the ranged parameters are drawn once per trial, so that a recurrent model
    trained on trials learns to tell the dynamics from what it has seen of them."""
    import gymnasium

    class Shifted(gymnasium.Wrapper):
        def __init__(self, env):
            super().__init__(env)
            self.shifter = Shifter(env_id, gym_params(env), shift, ranges, seed=0)
            self.left = trial

        @property
        def shift(self) -> dict:
            return dict(self.shifter.scales)

        def reset(self, *, seed=None, options=None):
            if seed is not None:
                self.shifter.rng = np.random.default_rng(seed)
            self.shifter.episode()
            self.left = trial
            return self.env.reset(seed=seed, options=options)

        def step(self, action):
            obs, reward, terminated, truncated, info = self.env.step(action)
            if (terminated or truncated) and self.left > 1:  # the next episode of the trial, same dynamics
                self.left -= 1
                obs, info = self.env.reset()
                return obs, reward, False, False, {**info, "trial_episode_end": True}
            return obs, reward, terminated, truncated, info

    return Shifted(env)


def wrap_dmc(env, env_id: str, shift: dict, ranges: dict, seed: int):
    """A dm-control env with its physics shifted; ranged parameters are drawn as each episode begins
    (before the task sets up the episode's initial state)."""
    shifter = Shifter(env_id, mujoco_params(env.physics.model), shift, ranges, seed)
    task = env.task
    begin = task.initialize_episode

    def initialize_episode(physics):
        shifter.episode()
        return begin(physics)

    task.initialize_episode = initialize_episode
    env.shifter = shifter
    return env
