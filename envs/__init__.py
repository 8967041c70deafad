"""Environment construction for longdream: gymnasium, dm-control and the memory-probe suite."""
import contextlib
import importlib.util
import io
import sys


def quiet_gym_import() -> None:
    """Import the old `gym` package, where it is installed (the memory extra brings it for memory-maze),
    with its import-time notice about being unmaintained swallowed. TorchRL imports `gym` whenever it
    finds it, even with gymnasium as its backend, so every run would otherwise print that notice; call
    this before TorchRL is imported. Environments here use gymnasium; only memory-maze uses `gym`."""
    if "gym" in sys.modules or importlib.util.find_spec("gym") is None:
        return
    with contextlib.redirect_stderr(io.StringIO()):
        import gym  # noqa: F401


quiet_gym_import()

import envs.memory  # noqa: E402,F401  registers the memory-probe tasks with gymnasium
from envs.make import EnvConfig, EnvError, list_envs, make_env  # noqa: E402

__all__ = ["EnvConfig", "EnvError", "list_envs", "make_env", "quiet_gym_import"]
