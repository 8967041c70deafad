"""Multi Doors Keys: collect coloured keys, remember them for hundreds of steps, open matching doors."""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.memory.grid import BRIGHT, FLOOR, MOVES, TINTS, VOID, WALL, EgoView, check_obs_size, bfs, check_int, path_to


class MultiDoorsKeys(gym.Env):
    """Multi Doors Keys, after the task of the same name in S4WM (Deng, Park, Ahn, "Facing Off World
    Model Backbones: RNNs, Transformers, and S4", NeurIPS 2023).

    Tests long-horizon memory of an evolving state: which keys the agent carries (they are not shown
    anywhere once picked up), where the doors are and which are already open. A square room of
    (7 + keys)^2 cells, with a few pillars and tinted floor tiles as landmarks, holds `keys` keys of
    distinct colours; its walls hold one locked door per colour, each in front of a one-cell closet.
    Walking onto a key picks it up. Walking into a locked door while holding the key of its colour opens
    it (the key is used up, reward 1); without the key the door blocks. Episodes last `max_steps` steps
    (truncated); the view is agent-centred, 7 x 7 tiles.

    Actions: 0 up, 1 down, 2 left, 3 right. The scripted policy visits every key and every door once, in
    random order, spread over the first `max_steps - 150` steps with random wandering in between; a door
    tried before its key was picked up stays shut (reward 0). From step `max_steps - 100`, where the
    query starts, it collects any key left and opens every door still locked, nearest first (within
    about 50 steps), then wanders. So whether bumping into a door pays depends on a key pickup hundreds
    of steps back. probe_split = (max_steps - 100, 100), i.e. (500, 100) by default. info: "success" (all
    doors open), "doors_opened", "keys_held" and "state" (binary float vectors "keys_held", "doors_open").
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, keys: int = 3, max_steps: int = 600, obs_size: int = 64, render_mode: str | None = None):
        self.keys = check_int("keys", keys, 1, len(BRIGHT))
        self.max_steps = check_int("max_steps", max_steps, 200)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.obs_size = check_obs_size(obs_size)
        self.observation_space = spaces.Box(0, 255, (self.obs_size, self.obs_size, 3), np.uint8)
        self.action_space = spaces.Discrete(4)
        self.size = 7 + self.keys  # interior side
        self.probe_split = (self.max_steps - 100, 100)
        self.open_at = self.max_steps - 100  # the scripted policy's final sweep starts here
        self.view = EgoView(3, size=self.obs_size)

    # ---------------------------------------------------------------------------------- gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        rng, L, N = self.np_random, self.size, self.keys
        G = L + 4  # closet ring, wall ring, interior, wall ring, closet ring
        self.free = np.zeros((G, G), bool)
        self.free[2:L + 2, 2:L + 2] = True
        colours = np.empty((G, G, 3), np.uint8)
        colours[:] = VOID
        colours[1:L + 3, 1:L + 3] = WALL
        colours[2:L + 2, 2:L + 2] = FLOOR
        tinted = rng.random((L, L)) < 0.15
        colours[2:L + 2, 2:L + 2][tinted] = TINTS[rng.integers(len(TINTS), size=int(tinted.sum()))]
        for i in range(1, L - 1, 2):  # isolated pillars never cut the room apart
            for j in range(1, L - 1, 2):
                if rng.random() < 0.25:
                    self.free[2 + i, 2 + j] = False
                    colours[2 + i, 2 + j] = WALL
        # doors: every other wall cell along each side; closet behind, approach cell in front
        slots = []
        for k in range(0, L, 2):
            slots += [((1, 2 + k), (0, 2 + k)), ((L + 2, 2 + k), (L + 3, 2 + k)),
                      ((2 + k, 1), (2 + k, 0)), ((2 + k, L + 2), (2 + k, L + 3))]
        picks = rng.choice(len(slots), size=N, replace=False)
        self.palette = BRIGHT[rng.permutation(len(BRIGHT))[:N]]
        self.doors = [slots[int(p)][0] for p in picks]
        for i, (door, closet) in enumerate(slots[int(p)] for p in picks):
            colours[door] = self.palette[i]
            colours[closet] = FLOOR
            self.free[closet] = True  # reachable only through its door
        self._door_at = {d: i for i, d in enumerate(self.doors)}
        cells = np.argwhere(self.free[2:L + 2, 2:L + 2]) + 2
        chosen = rng.choice(len(cells), size=N + 1, replace=False)
        self.key_pos: list[tuple[int, int] | None] = [tuple(int(v) for v in cells[c]) for c in chosen[:N]]
        self._key_at = {p: i for i, p in enumerate(self.key_pos)}
        self.pos = tuple(int(v) for v in cells[chosen[N]])
        self.held = np.zeros(N, bool)
        self.opened = np.zeros(N, bool)
        self._padded = self.view.pad(colours)
        self.t = 0
        self._plan: list = []
        # the scripted policy's agenda: every key and every door once, in random order, one item every
        # `_spacing` steps; a door tried before its key stays shut and is opened in the final sweep
        self._agenda = [("key" if k < N else "door", k % N) for k in rng.permutation(2 * N)]
        self._spacing = max(1, (self.open_at - 50) // (2 * N))
        self._started, self._next_due = 0, 0
        self._obs = self._observe()
        return self._obs, self._info()

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r}; expected an integer in [0, 4)")
        self.t += 1
        dy, dx = MOVES[int(action)]
        target = (self.pos[0] + dy, self.pos[1] + dx)
        reward = 0.0
        door = self._door_at.get(target)
        if door is not None and not self.opened[door]:
            if self.held[door]:  # unlock: the key is used up, the agent stays in front of the door
                self.held[door] = False
                self.opened[door] = True
                self.free[target] = True
                r = self.view.radius
                self._padded[target[0] + r, target[1] + r] = self.palette[door] // 3 + FLOOR // 2
                reward = 1.0
        elif 0 <= target[0] < self.free.shape[0] and 0 <= target[1] < self.free.shape[1] and self.free[target]:
            self.pos = target
            key = self._key_at.pop(target, None)
            if key is not None:
                self.held[key] = True
                self.key_pos[key] = None
        truncated = self.t >= self.max_steps
        self._obs = self._observe()
        return self._obs, reward, False, truncated, self._info()

    def render(self):
        return self._obs.copy()

    def scripted_action(self) -> int:
        """Work through the agenda (each key and each door once, random order, wandering in between),
        then from `open_at` collect what is left and open every locked door, nearest first, then wander.
        Paths are planned by breadth-first search and replanned if the agent is off them."""
        if self._plan and self._plan[0][1] != self.pos:
            self._plan = []  # someone else moved the agent: replan from here
        if not self._plan:
            self._plan = self._make_plan()
        action, _ = self._plan.pop(0)
        return action

    # ----------------------------------------------------------------------------------- helpers

    def _make_plan(self) -> list:
        """A list of (action, cell the agent should be in before taking it)."""
        dist, how = bfs(self.free, self.pos)
        if self.t >= self.open_at:  # final sweep: remaining keys, then every locked door, nearest first
            keys = [p for p in self.key_pos if p is not None]
            if keys:
                return self._with_starts(path_to(how, self.pos, min(keys, key=lambda p: dist[p])))
            locked = [i for i in range(self.keys) if not self.opened[i]]
            if locked:
                return self._door_plan(min(locked, key=lambda i: dist[self._front(i)]), how)
        elif self._agenda and self.t >= self._next_due:
            kind, i = self._agenda.pop(0)
            self._started += 1
            self._next_due = self._started * self._spacing
            if kind == "key" and self.key_pos[i] is not None:
                return self._with_starts(path_to(how, self.pos, self.key_pos[i]))
            if kind == "door" and not self.opened[i]:
                return self._door_plan(i, how)  # fails (the door stays shut) if its key is not held yet
            return self._make_plan()  # nothing left to do for this item
        reachable = np.argwhere(dist > 0)
        goal = tuple(int(v) for v in reachable[self.np_random.integers(len(reachable))])
        steps = path_to(how, self.pos, goal)
        if self.t < self.open_at:  # be back in time for the next item or the final sweep
            due = min(self._next_due, self.open_at) if self._agenda else self.open_at
            steps = steps[:max(1, due - self.t)]
        return self._with_starts(steps)

    def _front(self, i: int) -> tuple[int, int]:
        """The interior cell in front of door i."""
        (y, x), s = self.doors[i], self.size
        return (2, x) if y == 1 else (s + 1, x) if y == s + 2 else (y, 2) if x == 1 else (y, s + 1)

    def _door_plan(self, i: int, how: np.ndarray) -> list:
        front = self._front(i)
        steps = path_to(how, self.pos, front)
        steps.append((MOVES.index((self.doors[i][0] - front[0], self.doors[i][1] - front[1])), self.doors[i]))
        return self._with_starts(steps)

    def _with_starts(self, steps: list) -> list:
        out, cell = [], self.pos
        for action, nxt in steps:
            out.append((action, cell))
            cell = nxt if self.free[nxt] else cell  # a move into a locked door leaves the agent in place
        return out

    def _observe(self) -> np.ndarray:
        r, (y, x) = self.view.radius, self.pos
        tiles = self.view.crop(self._padded, y, x)
        glyphs = []
        for i, p in enumerate(self.key_pos):
            if p is not None and abs(p[0] - y) <= r and abs(p[1] - x) <= r:
                glyphs.append((p[0] - y + r, p[1] - x + r, self.palette[i]))
        return self.view.image(tiles, glyphs)

    def _info(self) -> dict:
        return {"success": bool(self.opened.all()), "doors_opened": int(self.opened.sum()),
                "keys_held": int(self.held.sum()),
                "state": {"keys_held": self.held.astype(np.float32), "doors_open": self.opened.astype(np.float32)}}
