"""Gymnasium adapters for external memory benchmarks (the optional `memory` extra): BSuite's memory_len
and discounting_chain (Osband et al., "Behaviour Suite for Reinforcement Learning", ICLR 2020) and
Memory Maze (Pasukonis, Lillicrap, Hafner, "Evaluating Long-Term Memory in 3D Mazes", ICLR 2023).

Their packages are imported lazily: constructing an adapter without them raises an ImportError whose one
line says what to install."""
from __future__ import annotations

import importlib
import os

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.memory.grid import check_int

EXTRA = "pip install 'longdream[memory]'"


def _require(module: str, package: str, who: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{who} needs the '{package}' package ({e}); install it with: {EXTRA}") from None


def _end(ts) -> tuple[bool, bool]:
    """(terminated, truncated) of a dm_env timestep: an episode that ends with discount 0 terminated,
    one that ends with a non-zero discount was cut by a time limit."""
    if not ts.last():
        return False, False
    terminated = ts.discount is not None and float(ts.discount) == 0.0
    return terminated, not terminated


class _BSuite(gym.Env):
    """A BSuite dm_env environment as a gymnasium env: the observation flattened to a float32 vector,
    Discrete actions. Seeded resets rebuild the environment with that seed."""

    metadata = {"render_modes": []}
    experiment = ""
    bounds: tuple[float, float] | None = None  # range of every observation entry, where known

    def __init__(self, **settings):
        self._bsuite = _require("bsuite", "bsuite", type(self).__name__)
        self._settings = settings
        self._env = None
        probe = self._load(0)
        spec = probe.observation_spec()
        self._dim = int(np.prod(spec.shape))
        self.action_space = spaces.Discrete(int(probe.action_spec().num_values))
        low, high = self.bounds if self.bounds else (-np.inf, np.inf)
        self.observation_space = spaces.Box(low, high, (self._dim,), np.float32)

    def _load(self, seed: int):
        raise NotImplementedError

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None or self._env is None:
            self._env = self._load(int(self.np_random.integers(2**31)))
        ts = self._env.reset()
        return self._vec(ts.observation), {}

    def step(self, action):
        ts = self._env.step(int(action))
        terminated, truncated = _end(ts)
        reward = float(ts.reward or 0.0)
        info = {"success": bool(terminated and reward > 0)}
        return self._vec(ts.observation), reward, terminated, truncated, info

    def _vec(self, obs) -> np.ndarray:
        return np.asarray(obs, np.float32).reshape(self._dim)


class BSuiteMemoryLen(_BSuite):
    """BSuite memory_len: a context bit (+1 / -1) shown on the first step must be repeated by the action
    after `memory_length` more steps (reward +1 right, -1 wrong); observation (time left, query, context)."""

    experiment = "memory_len"
    bounds = (-1.0, 1.0)

    def __init__(self, memory_length: int = 10):
        self.memory_length = check_int("memory_length", memory_length, 1)
        super().__init__(memory_length=self.memory_length)

    def _load(self, seed: int):
        return self._bsuite.load("memory_len", {"memory_length": self.memory_length, "seed": seed})


class BSuiteDiscountingChain(_BSuite):
    """BSuite discounting_chain: the first action picks a chain whose reward comes after 1, 3, 10, 30 or
    100 steps; one chain (set by `mapping_seed`) pays 10% more. Tests credit assignment over long delays."""

    experiment = "discounting_chain"
    bounds = (-1.0, 5.0)  # (chosen chain or -1 before the first action, time / 100)

    def __init__(self, mapping_seed: int = 0):
        self.mapping_seed = check_int("mapping_seed", mapping_seed, 0)
        super().__init__(mapping_seed=self.mapping_seed)

    def _load(self, seed: int):
        return self._bsuite.load("discounting_chain", {"mapping_seed": self.mapping_seed})


class MemoryMaze(gym.Env):
    """Memory Maze (Pasukonis, Lillicrap, Hafner 2022) through its `memory_maze.tasks` dm_env API: a 3D
    maze of `size` x `size` cells (9, 11, 13 or 15) with coloured targets; the agent must go to the target
    whose colour the image border shows, again and again, so remembering the layout and where each target
    is pays. Observations: the 64 x 64 RGB egocentric image; Discrete(6) actions (noop, forward, left,
    right, forward+left, forward+right); episodes of 1000 / 2000 / 3000 / 4000 steps.

    info["probe"] carries the hidden state for probing: the wall layout (`maze_layout`, binary), the
    targets' and the agent's positions and the agent's direction. A seeded reset rebuilds the maze
    environment (a few seconds); unseeded resets draw the next maze. scripted_action() explores at random
    with persistence (mostly forward, turning when stuck); probe_split = (500, 100).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 4}
    SIZES = (9, 11, 13, 15)
    PROBE_KEYS = ("maze_layout", "targets_pos", "agent_pos", "agent_dir")

    def __init__(self, size: int = 9, render_mode: str | None = None):
        if size not in self.SIZES or isinstance(size, bool):
            raise ValueError(f"size must be one of {', '.join(map(str, self.SIZES))}, got {size!r}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        # the maze renders through MuJoCo: headless by default, as elsewhere in longdream
        os.environ.setdefault("MUJOCO_GL", "egl")
        self._tasks = _require("memory_maze.tasks", "memory-maze", "MemoryMaze")
        self.size = int(size)
        self.render_mode = render_mode
        self.observation_space = spaces.Box(0, 255, (64, 64, 3), np.uint8)
        self.action_space = spaces.Discrete(6)
        self.probe_split = (500, 100)
        self._env = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if seed is not None or self._env is None:
            if self._env is not None:
                self._env.close()
            build = getattr(self._tasks, f"memory_maze_{self.size}x{self.size}")
            self._env = build(global_observables=True, seed=int(self.np_random.integers(2**31)))
        ts = self._env.reset()
        self._hold, self._action, self._last = 0, 1, None
        return self._take(ts), self._info(ts)

    def step(self, action):
        ts = self._env.step(int(action))
        terminated, truncated = _end(ts)
        self._last = self._pos
        return self._take(ts), float(ts.reward or 0.0), terminated, truncated, self._info(ts)

    def render(self):
        return self._image.copy()

    def close(self):
        if self._env is not None:
            self._env.close()
            self._env = None

    def scripted_action(self) -> int:
        """Random exploration: hold an action for 2-8 steps (forward-heavy); turn when stuck."""
        rng = self.np_random
        stuck = self._last is not None and self._action in (1, 4, 5) and np.abs(self._pos - self._last).max() < 1e-3
        if stuck:
            self._action, self._hold = int(rng.choice([2, 3])), int(rng.integers(2, 6))
        elif self._hold <= 0:
            self._action = int(rng.choice(6, p=[0.0, 0.5, 0.1, 0.1, 0.15, 0.15]))
            self._hold = int(rng.integers(2, 9))
        self._hold -= 1
        return self._action

    def _take(self, ts) -> np.ndarray:
        obs = ts.observation
        self._image = np.asarray(obs["image"], np.uint8)
        self._pos = np.asarray(obs["agent_pos"], np.float64)
        return self._image

    def _info(self, ts) -> dict:
        obs = ts.observation
        return {"probe": {k: np.asarray(obs[k], np.float32) for k in self.PROBE_KEYS if k in obs}}
