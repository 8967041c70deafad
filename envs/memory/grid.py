"""Small helpers shared by the grid-world memory tasks: colours, an agent-centred tile renderer and
breadth-first path planning for the scripted data-collection policies. Everything is plain numpy."""
from __future__ import annotations

from collections import deque

import numpy as np

# Moves shared by the grid tasks: action index -> (dy, dx).
UP, DOWN, LEFT, RIGHT = 0, 1, 2, 3
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))

VOID = np.array([0, 0, 0], np.uint8)
FLOOR = np.array([48, 48, 52], np.uint8)
WALL = np.array([128, 128, 128], np.uint8)
AGENT = np.array([255, 255, 255], np.uint8)

# Bright, well-separated colours (cues, keys, objects) followed by darker/paler ones (room walls).
BRIGHT = np.array([
    [230, 40, 40],    # red
    [40, 200, 60],    # green
    [50, 90, 235],    # blue
    [240, 220, 40],   # yellow
    [220, 60, 220],   # magenta
    [40, 220, 220],   # cyan
    [250, 140, 30],   # orange
], np.uint8)
EXTRA = np.array([
    [128, 0, 0],      # maroon
    [0, 110, 40],     # dark green
    [20, 30, 130],    # navy
    [130, 130, 20],   # olive
    [110, 30, 140],   # purple
    [0, 120, 120],    # teal
    [140, 80, 30],    # brown
    [250, 160, 190],  # pink
    [170, 250, 80],   # lime
], np.uint8)
PALETTE = np.concatenate([BRIGHT, EXTRA])  # 16 colours
# Subtle floor tints: landmarks that make places recognisable without looking like objects.
TINTS = np.array([[70, 52, 52], [52, 70, 56], [52, 56, 76], [70, 68, 48]], np.uint8)


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """A keyword argument that must be an integer in [low, high]; a one-line ValueError otherwise."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
    if ok and value >= low and (high is None or value <= high):
        return int(value)
    bound = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


OBS_SIZES = (16, 32, 64)  # image sides the memory tasks render at (`obs_size`); 64 is S4WM's


def check_obs_size(size) -> int:
    """The `obs_size` keyword of the memory tasks: one of OBS_SIZES; a one-line ValueError otherwise."""
    if size not in OBS_SIZES or isinstance(size, bool):
        raise ValueError(f"obs_size must be one of {', '.join(map(str, OBS_SIZES))}, got {size!r}")
    return int(size)


class EgoView:
    """Renders the (2r+1) x (2r+1) tiles around a cell as a size x size RGB image: each tile becomes a
    square of size // (2r+1) pixels, centred on a border of `border` colour. Small inset squares
    ("glyphs") mark objects and the agent inside their tiles; where a tile is under 3 pixels the glyph
    fills it. A smaller `size` keeps every tile and glyph, only at fewer pixels (cheaper to model)."""

    def __init__(self, radius: int, border=VOID, size: int = 64):
        self.radius = radius
        self.n = 2 * radius + 1
        self.size = size
        self.tile = size // self.n
        if self.tile < 1:
            raise ValueError(f"a {self.n} x {self.n} tile view needs at least {self.n} pixels, got {size}")
        self.offset = (size - self.n * self.tile) // 2
        self.inset = max(1, self.tile // 4) if self.tile >= 3 else 0
        self._frame = np.empty((size, size, 3), np.uint8)
        self._frame[:] = border

    def pad(self, colours: np.ndarray, fill=VOID) -> np.ndarray:
        """The map with `radius` cells of `fill` on each side, so that a view never leaves it."""
        r = self.radius
        out = np.empty((colours.shape[0] + 2 * r, colours.shape[1] + 2 * r, 3), np.uint8)
        out[:] = fill
        out[r:r + colours.shape[0], r:r + colours.shape[1]] = colours
        return out

    def crop(self, padded: np.ndarray, y: int, x: int) -> np.ndarray:
        """A copy of the tiles around map cell (y, x) of the padded map, shape (n, n, 3)."""
        return padded[y:y + self.n, x:x + self.n].copy()

    def image(self, tiles: np.ndarray, glyphs=(), agent=AGENT) -> np.ndarray:
        """Upsample (n, n, 3) tiles to size x size; glyphs are (row, col, colour) in view coordinates."""
        t, o, m = self.tile, self.offset, self.inset
        frame = self._frame.copy()
        frame[o:o + self.n * t, o:o + self.n * t] = tiles.repeat(t, 0).repeat(t, 1)
        for i, j, colour in glyphs:
            frame[o + i * t + m:o + (i + 1) * t - m, o + j * t + m:o + (j + 1) * t - m] = colour
        if agent is not None:
            c = self.radius
            frame[o + c * t + m:o + (c + 1) * t - m, o + c * t + m:o + (c + 1) * t - m] = agent
        return frame


def bfs(free: np.ndarray, start: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Shortest paths over the True cells of `free` from `start`: the distance to every cell (-1 where
    unreachable) and the move index that reached it."""
    H, W = free.shape
    dist = np.full((H, W), -1, np.int32)
    how = np.full((H, W), -1, np.int8)
    dist[start] = 0
    queue = deque([start])
    while queue:
        y, x = queue.popleft()
        d = dist[y, x] + 1
        for a, (dy, dx) in enumerate(MOVES):
            ny, nx = y + dy, x + dx
            if 0 <= ny < H and 0 <= nx < W and free[ny, nx] and dist[ny, nx] < 0:
                dist[ny, nx] = d
                how[ny, nx] = a
                queue.append((ny, nx))
    return dist, how


def path_to(how: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> list[tuple[int, tuple[int, int]]]:
    """The moves from `start` to `goal` read back from bfs's `how`: a list of (action, cell reached)."""
    steps = []
    cell = goal
    while cell != start:
        a = int(how[cell])
        if a < 0:
            raise ValueError(f"cell {goal} is not reachable from {start}")
        steps.append((a, cell))
        dy, dx = MOVES[a]
        cell = (cell[0] - dy, cell[1] - dx)
    steps.reverse()
    return steps
