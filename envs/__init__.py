"""Environment construction for longdream: gymnasium, dm-control and the memory-probe suite."""
import envs.memory  # noqa: F401  registers the memory-probe tasks with gymnasium
from envs.make import EnvConfig, EnvError, list_envs, make_env

__all__ = ["EnvConfig", "EnvError", "list_envs", "make_env"]
