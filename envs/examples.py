"""Example of bringing your own env: a module that registers gymnasium ids when it is imported.

`env.id=envs.examples:longdream/PendulumDict-v1` is Pendulum-v1 with its observation split into a Dict
(`angle`: cos and sin, `velocity`), the same numbers as the flat Box; the benchmark of Dict
observations trains it beside the flat Pendulum (README, Environments).
"""
import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.wrappers import TransformObservation

PENDULUM_DICT = spaces.Dict({"angle": spaces.Box(-1.0, 1.0, (2,), np.float32),
                             "velocity": spaces.Box(-8.0, 8.0, (1,), np.float32)})


def pendulum_dict(**kwargs) -> gym.Env:
    env = gym.make("Pendulum-v1", **kwargs)
    return TransformObservation(env, lambda obs: {"angle": obs[:2], "velocity": obs[2:]}, PENDULUM_DICT)


if "longdream/PendulumDict-v1" not in gym.envs.registry:
    gym.register("longdream/PendulumDict-v1", entry_point=pendulum_dict)
