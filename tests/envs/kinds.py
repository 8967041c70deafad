"""Small synthetic gymnasium envs, one per observation kind, registered on import as
`longdream-test/<Kind>-v0` (the tests reach them as `tests.envs.kinds:<id>`, a third-party module)."""
import gymnasium as gym
import numpy as np
from gymnasium import spaces

SPACES = {
    "AtariLike": lambda: spaces.Box(0, 255, (210, 160, 3), np.uint8),
    "CHW": lambda: spaces.Box(0, 255, (3, 24, 24), np.uint8),
    "Gray": lambda: spaces.Box(0, 255, (40, 40), np.uint8),
    "Box2D": lambda: spaces.Box(-1, 1, (4, 5), np.float32),
    "Discrete": lambda: spaces.Discrete(5),
    "MultiDiscrete": lambda: spaces.MultiDiscrete([3, 2]),
    "MultiBinary": lambda: spaces.MultiBinary(4),
    "DictVector": lambda: spaces.Dict({"pos": spaces.Box(-1, 1, (2,), np.float64), "flag": spaces.Discrete(2)}),
    "DictImageText": lambda: spaces.Dict({"image": spaces.Box(0, 255, (32, 32, 3), np.uint8),
                                          "note": spaces.Text(8)}),
    "DictImageVector": lambda: spaces.Dict({"image": spaces.Box(0, 255, (32, 32, 3), np.uint8),
                                            "pos": spaces.Box(-1, 1, (3,), np.float32), "flag": spaces.Discrete(2)}),
    "DictTwoImages": lambda: spaces.Dict({"a": spaces.Box(0, 255, (8, 8, 3), np.uint8),
                                          "b": spaces.Box(0, 255, (8, 8, 3), np.uint8)}),
    "OnlyText": lambda: spaces.Text(8),
}


class Kinds(gym.Env):
    """Random observations of the given space; action 1 pays 1, 20 steps an episode."""

    metadata = {"render_modes": []}

    def __init__(self, kind: str):
        self.observation_space = SPACES[kind]()
        self.action_space = spaces.Discrete(2)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.observation_space.seed(int(self.np_random.integers(2**31)))
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action):
        self.t += 1
        return self.observation_space.sample(), float(action == 1), False, self.t >= 20, {}


for _kind in SPACES:
    if f"longdream-test/{_kind}-v0" not in gym.envs.registry:
        gym.register(id=f"longdream-test/{_kind}-v0", entry_point="tests.envs.kinds:Kinds", kwargs={"kind": _kind})
