"""Distracting Memory: carry a cue colour down a long hallway full of random colours."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.memory.grid import BRIGHT, FLOOR, PALETTE, WALL, EgoView, check_obs_size, check_int


class DistractingMemory(gym.Env):
    """Distracting Memory, after the task of the same name in S4WM (Deng, Park, Ahn, "Facing Off World
    Model Backbones: RNNs, Transformers, and S4", NeurIPS 2023).

    Tests whether a model keeps one piece of information, seen once at the start, across a long stretch
    of irrelevant, unpredictable observations. The agent starts in a small room whose walls show a cue
    colour, walks a one-tile-high hallway of `length` cells whose floor tiles flash random colours (drawn
    afresh every step, the cue colours among them), and reaches a junction with one end cell above and one
    below. The end cells always show the two cue colours in the same places (colour 0 above, colour 1
    below); stepping into the end cell of the cue's colour pays 1, into the other 0; either ends the
    episode. The reward is therefore a function of the cue and the final action alone: a model that
    remembers the cue predicts it even while imagining the last steps (S4WM's evaluation, where S4WM
    scores 100% and the RSSM about 50%), one that does not is at chance.

    The view is agent-centred, 5 x 5 tiles: the cue is out of sight from the third hallway cell on and
    the end cells come into sight two cells before the junction, so predicting the final reward requires
    remembering the cue for about `length` steps.

    Actions: 0 left, 1 right, 2 up, 3 down (up/down choose an end cell at the junction, else no-ops).
    The scripted policy walks right to the junction and picks an end cell at random (reward 1 half the
    time): `length + 4` steps, `length + 5` observations. probe_split = (7, length - 2): the context ends
    two steps after the cue went out of view and the query ends at the reward. info: "success", "cue",
    "x" and "state" (the cue as a one-hot float vector, a target for probing the model's memory).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    LEFT, RIGHT, UP, DOWN = 0, 1, 2, 3
    ROOM = 3  # width of the start room (cells whose walls show the cue)
    DISTRACTOR_P = 0.5  # chance that a visible hallway floor tile shows a random colour on a step

    ENDS = (0, 1)  # the cue colours of the end cells above and below the junction, fixed

    def __init__(self, length: int = 100, obs_size: int = 64, render_mode: str | None = None):
        self.length = check_int("length", length, 4)
        self.colors = len(self.ENDS)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.obs_size = check_obs_size(obs_size)
        self.observation_space = spaces.Box(0, 255, (self.obs_size, self.obs_size, 3), np.uint8)
        self.action_space = spaces.Discrete(4)
        # columns: 0 wall | 1..ROOM start room | hallway | junction J | wall
        self.junction = self.ROOM + self.length + 1
        self.max_steps = 4 * (self.junction + 1)  # truncation for policies that never choose
        steps = self.junction  # scripted: junction - 1 moves right, then one choice
        self.probe_split = (7, steps + 1 - 7)
        self.view = EgoView(2, size=self.obs_size)
        self._hall = (self.ROOM + 1, self.ROOM + self.length)  # first and last hallway column

    # ---------------------------------------------------------------------------------- gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng = self.np_random
        self.cue = int(rng.integers(self.colors))
        self.ends = self.ENDS  # (up, down)
        self._choice = int(rng.integers(2))  # the scripted policy's pick, independent of the cue
        J = self.junction
        world = np.empty((3, J + 2, 3), np.uint8)
        world[:] = WALL
        world[1, 1:J + 1] = FLOOR
        world[0, 1:self.ROOM + 1] = world[2, 1:self.ROOM + 1] = BRIGHT[self.cue]
        world[0, J], world[2, J] = BRIGHT[self.ends[0]], BRIGHT[self.ends[1]]
        self._padded = self.view.pad(world)
        self.y, self.x, self.t = 1, 1, 0
        self._obs = self._observe()
        return self._obs, self._info(False)

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r}; expected an integer in [0, 4)")
        action = int(action)
        self.t += 1
        reward, terminated, success = 0.0, False, False
        if action == self.LEFT:
            self.x = max(1, self.x - 1)
        elif action == self.RIGHT:
            self.x = min(self.junction, self.x + 1)
        elif self.x == self.junction:
            side = 0 if action == self.UP else 1
            self.y = 0 if side == 0 else 2
            success = self.ends[side] == self.cue
            reward, terminated = float(success), True
        truncated = not terminated and self.t >= self.max_steps
        self._obs = self._observe()
        return self._obs, reward, terminated, truncated, self._info(success)

    def render(self):
        return self._obs.copy()

    def scripted_action(self) -> int:
        """Walk to the junction, then take the end cell picked at random at reset."""
        if self.x < self.junction:
            return self.RIGHT
        return self.UP if self._choice == 0 else self.DOWN

    # ----------------------------------------------------------------------------------- helpers

    def _observe(self) -> np.ndarray:
        rng, r = self.np_random, self.view.radius
        tiles = self.view.crop(self._padded, self.y, self.x)
        show = rng.random(self.view.n) < self.DISTRACTOR_P
        colour = rng.integers(len(PALETTE), size=self.view.n)
        lo, hi = self._hall
        for j in range(self.view.n):
            col = self.x - r + j
            if show[j] and lo <= col <= hi:
                tiles[r + 1 - self.y, j] = PALETTE[colour[j]]  # the hallway floor row (world row 1)
        return self.view.image(tiles)

    def _info(self, success: bool) -> dict:
        onehot = np.zeros(self.colors, np.float32)
        onehot[self.cue] = 1.0
        return {"success": bool(success), "cue": self.cue, "x": self.x, "state": {"cue": onehot}}
