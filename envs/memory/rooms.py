"""Rooms and Teleport: tour a set of distinctly coloured rooms, then come back to them."""
from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.memory.grid import BRIGHT, FLOOR, MOVES, PALETTE, VOID, EgoView, check_obs_size, bfs, check_int, path_to

INNER = 5  # interior side of a room
BLOCK = INNER + 2  # a room with its own wall ring (walls between rooms are two cells thick)


def room_grid(rooms: int) -> tuple[int, int]:
    """Rows and columns of the room layout: the most square factorisation (10 -> 2 x 5)."""
    rows = max(d for d in range(1, int(math.isqrt(rooms)) + 1) if rooms % d == 0)
    return rows, rooms // rows


class Rooms(gym.Env):
    """Rooms: a layout of `rooms` rooms (2 x 5 for 10), after the room-revisiting memory tasks of S4WM
    (Deng, Park, Ahn, "Facing Off World Model Backbones: RNNs, Transformers, and S4", NeurIPS 2023).

    Tests long-term spatial memory: every room has walls of its own colour (drawn per episode) and two
    coloured objects at random places; doorways between neighbouring rooms are at random positions.
    The view is agent-centred, 7 x 7 tiles, so a room is recognised only from inside or through a
    doorway. Walking onto an object pays 1 (every time). Episodes last `context + query - 1` steps.

    Actions: 0 up, 1 down, 2 left, 3 right. The scripted policy tours the rooms during the context
    (nearest room not yet seen first, touching one of its objects; the tour is guaranteed to fit), then
    wanders; from the last context step on it tours every room again, touching the other object, so
    the query revisits places seen long before and a model has to recall what each room looks like and
    where its objects are. probe_split = (C, C) with C = 14 * rooms + 10 (18 * rooms + 10 when the rooms
    form a single row of more than three), e.g. (66, 66) for 4 rooms and (150, 150) for 10.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}
    teleport = False

    def __init__(self, rooms: int = 4, obs_size: int = 64, render_mode: str | None = None):
        self.rooms = check_int("rooms", rooms, 2, len(PALETTE))
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.render_mode = render_mode
        self.obs_size = check_obs_size(obs_size)
        self.observation_space = spaces.Box(0, 255, (self.obs_size, self.obs_size, 3), np.uint8)
        self.action_space = spaces.Discrete(4)
        self.grid_rows, self.grid_cols = room_grid(self.rooms)
        # long enough for the context tour (checked at reset); a single row of rooms needs backtracking
        context = (14 if self.grid_rows > 1 or self.rooms <= 3 else 18) * self.rooms + 10
        self.probe_split = (context, context)
        self.switch = context - 1  # the step after which the query's tour starts (Teleport: the jump)
        self.max_steps = 2 * context - 1  # observations 0 .. 2C-1: exactly context + query
        self.view = EgoView(3, size=self.obs_size)

    # ---------------------------------------------------------------------------------- gym API

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        while True:  # redraw the (rare) layouts whose context tour would not fit
            self._build()
            self._plan = self._tour(self.pos, self._targets[0], {self.room_of(self.pos)})
            if len(self._plan) <= self.switch - 1:
                break
        self.t = 0
        self.seen = [{self.room_of(self.pos)}, set()]  # rooms entered during the context / the query
        self.visited = {self.pos}  # cells the agent stood on during the context
        self._obs = self._observe()
        return self._obs, self._info(False)

    def step(self, action):
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r}; expected an integer in [0, 4)")
        self.t += 1
        dy, dx = MOVES[int(action)]
        target = (self.pos[0] + dy, self.pos[1] + dx)
        reward = 0.0
        if self.free[target]:
            self.pos = target
            reward = float(target in self._objects)
        teleported = False
        if self.t == self.switch and self.teleport:
            self.pos = self._teleport_target()
            teleported = True
        query = self.t >= self.switch
        if not query:
            self.visited.add(self.pos)
        self.seen[int(query)].add(self.room_of(self.pos))
        truncated = self.t >= self.max_steps
        self._obs = self._observe()
        return self._obs, reward, False, truncated, self._info(teleported)

    def render(self):
        return self._obs.copy()

    def scripted_action(self) -> int:
        """Context: the planned tour, then wandering; query (from the last context step): a tour of all
        rooms again, touching the other object, then wandering. Replans if the agent is off the plan."""
        if self.t == self.switch:
            self._plan = self._tour(self.pos, self._targets[1], set())
        elif self._plan and self._plan[0][1] != self.pos:
            phase = int(self.t >= self.switch)
            self._plan = self._tour(self.pos, self._targets[phase], self.seen[phase])
        if not self._plan:
            self._plan = self._wander()
        return self._plan.pop(0)[0]

    def room_of(self, cell: tuple[int, int]) -> int:
        return (cell[0] // BLOCK) * self.grid_cols + cell[1] // BLOCK

    # ----------------------------------------------------------------------------------- helpers

    def _build(self):
        rng, R, C = self.np_random, self.grid_rows, self.grid_cols
        H, W = R * BLOCK, C * BLOCK
        self.free = np.zeros((H, W), bool)
        colours = np.empty((H, W, 3), np.uint8)
        walls = PALETTE[rng.permutation(len(PALETTE))[:self.rooms]]
        self.wall_colours = walls
        for k in range(self.rooms):
            y0, x0 = (k // C) * BLOCK, (k % C) * BLOCK
            colours[y0:y0 + BLOCK, x0:x0 + BLOCK] = walls[k]
            colours[y0 + 1:y0 + BLOCK - 1, x0 + 1:x0 + BLOCK - 1] = FLOOR
            self.free[y0 + 1:y0 + BLOCK - 1, x0 + 1:x0 + BLOCK - 1] = True
        for gy in range(R):  # a doorway through each wall between neighbours, at a random place
            for gx in range(C):
                y0, x0 = gy * BLOCK, gx * BLOCK
                if gx + 1 < C:
                    y = y0 + 1 + int(rng.integers(INNER))
                    for x in (x0 + BLOCK - 1, x0 + BLOCK):
                        self.free[y, x], colours[y, x] = True, FLOOR
                if gy + 1 < R:
                    x = x0 + 1 + int(rng.integers(INNER))
                    for y in (y0 + BLOCK - 1, y0 + BLOCK):
                        self.free[y, x], colours[y, x] = True, FLOOR
        self._objects: dict[tuple[int, int], np.ndarray] = {}
        self._targets: list[list[tuple[int, int]]] = [[], []]  # per room: context and query objects
        start_room = int(rng.integers(self.rooms))
        for k in range(self.rooms):
            y0, x0 = (k // C) * BLOCK + 1, (k % C) * BLOCK + 1
            cells = rng.choice(INNER * INNER, size=3, replace=False)
            spots = [(y0 + int(c) // INNER, x0 + int(c) % INNER) for c in cells]
            for spot in spots[:2]:
                self._objects[spot] = BRIGHT[rng.integers(len(BRIGHT))]
            first = int(rng.integers(2))
            self._targets[0].append(spots[first])
            self._targets[1].append(spots[1 - first])
            if k == start_room:
                self.pos = spots[2]
        self._padded = self.view.pad(colours, VOID)

    def _tour(self, start, targets, seen) -> list:
        """Steps (action, cell before it) visiting every room not in `seen`: repeatedly the room whose
        target object is nearest, marking every room walked through on the way."""
        seen, pos, out = set(seen) | {self.room_of(start)}, start, []
        while len(seen) < self.rooms:
            dist, how = bfs(self.free, pos)
            k = min((k for k in range(self.rooms) if k not in seen), key=lambda k: (dist[targets[k]], k))
            for action, cell in path_to(how, pos, targets[k]):
                out.append((action, pos))
                pos = cell
                seen.add(self.room_of(cell))
        return out

    def _wander(self) -> list:
        dist, how = bfs(self.free, self.pos)
        reachable = np.argwhere(dist > 0)
        goal = tuple(int(v) for v in reachable[self.np_random.integers(len(reachable))])
        steps, out, pos = path_to(how, self.pos, goal), [], self.pos
        for action, cell in steps:
            out.append((action, pos))
            pos = cell
        if self.t < self.switch:
            out = out[:self.switch - self.t]  # the query's tour starts on time
        return out

    def _teleport_target(self) -> tuple[int, int]:
        """A cell visited during the context: in another room and at least a room's width away if there
        is one, else in another room, else anywhere else."""
        here, (y, x) = self.room_of(self.pos), self.pos
        other = sorted(c for c in self.visited if self.room_of(c) != here)
        far = [c for c in other if abs(c[0] - y) + abs(c[1] - x) >= BLOCK]
        cells = far or other or sorted(c for c in self.visited if c != self.pos) or [self.pos]
        return cells[int(self.np_random.integers(len(cells)))]

    def _observe(self) -> np.ndarray:
        r, (y, x) = self.view.radius, self.pos
        tiles = self.view.crop(self._padded, y, x)
        glyphs = [(oy - y + r, ox - x + r, colour) for (oy, ox), colour in self._objects.items()
                  if abs(oy - y) <= r and abs(ox - x) <= r]
        return self.view.image(tiles, glyphs)

    def _info(self, teleported: bool) -> dict:
        return {"room": self.room_of(self.pos), "pos": np.array(self.pos, np.int64), "teleported": teleported,
                "rooms_seen": len(self.seen[0])}


class Teleport(Rooms):
    """Teleport: the Rooms world (after the teleport memory tasks of S4WM: Deng, Park, Ahn, "Facing Off
    World Model Backbones: RNNs, Transformers, and S4", NeurIPS 2023), but on the last context step the
    agent is moved to a random cell it stood on earlier in the context, in another room and at least a
    room's width away when possible.

    Tests recall from a single glimpse: the last context frame shows the landing place, and imagining the
    query (the tour of every room starting from there) needs the model to recognise the place and recall
    the surroundings and the rest of the layout seen long before, not just continue the recent past.
    info["teleported"] is True on the jump. Same actions, episode length and probe_split as Rooms.
    """

    teleport = True
