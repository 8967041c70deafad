"""The gymnasium suite: any registered id (classic control, MuJoCo v5, Box2D, the memory suite) and
any id a third-party package registers when it is imported.

- `env.id=<module>:<EnvId>` (gymnasium's own convention, e.g. `ale_py:ALE/Pong-v5`) imports the
  module, which registers its envs, before the id is looked up; `env.imports=[pkg, ...]` imports
  packages first for ids given without a module.
- A package that is not installed, or an env whose own dependency is missing (gymnasium's
  DependencyNotInstalled), is a one-line EnvError naming the `pip install` to run.
- Observations of any space pass through `ModelObservations` (envs/observations.py): the model sees
  one uint8 image resized to its image size and/or one float vector.
"""
from __future__ import annotations

import importlib

from torchrl.envs import EnvBase

from envs.errors import EnvError

# Where a missing package is one of the project's extras, the install line names the extra.
INSTALL = {"ale_py": "pip install 'longdream[atari]'", "Box2D": "pip install 'longdream[box2d]'",
           "bsuite": "pip install 'longdream[memory]'", "memory_maze": "pip install 'longdream[memory]'"}


def _import(module: str, env_id: str) -> None:
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        how = INSTALL.get(missing.split(".")[0], f"pip install {missing.split('.')[0].replace('_', '-')}")
        raise EnvError(f"env '{env_id}' needs the package '{missing}', which is not installed: {how}") from None


def resolve(env_id: str, imports: tuple[str, ...] = ()) -> str:
    """The registered id for `env_id`, importing `module:` prefixes and `imports` first."""
    import gymnasium

    for module in imports:
        _import(module, env_id)
    name = env_id
    if ":" in env_id:
        module, name = env_id.split(":", 1)
        _import(module, env_id)
    if name not in gymnasium.envs.registry:
        raise EnvError(f"unknown gymnasium id '{env_id}'; list valid ones with `longdream envs` "
                       "(a third-party env: env.id=<module>:<EnvId>)")
    return name


def make_gymnasium(cfg, render: bool = False):
    """The gymnasium env itself (before TorchRL), with one-line errors for missing dependencies."""
    import gymnasium

    name = resolve(cfg.id, tuple(cfg.imports))
    kwargs = dict(cfg.kwargs)
    if render:
        kwargs["render_mode"] = "rgb_array"
    if cfg.trial > 1:  # each episode of a trial ends at the time limit, inside the trial
        kwargs.setdefault("max_episode_steps", cfg.time_limit * cfg.action_repeat)
    try:
        env = gymnasium.make(name, **kwargs)
    except gymnasium.error.DependencyNotInstalled as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EnvError(f"env '{cfg.id}' needs a package that is not installed: {first}") from None
    except (TypeError, ValueError) as e:
        raise EnvError(f"env '{cfg.id}' does not take env.kwargs={dict(cfg.kwargs)}: {str(e).splitlines()[0]}") from None
    if cfg.shift or cfg.shift_range:
        from envs.shift import wrap_gym

        env = wrap_gym(env, cfg.id, cfg.shift, cfg.shift_range, cfg.trial)
    return env


def make_gym(cfg, seed: int, render: bool) -> EnvBase:
    """`render` adds rendered frames under "pixels" beside vector observations, for eval videos."""
    from torchrl.envs import GymWrapper

    from envs.observations import ModelObservations, ObservationError

    if cfg.pixels:
        raise EnvError("env.pixels=true needs a dm-control task (env.id=dmc:<domain>-<task>); "
                       "gymnasium image envs are detected from their observation space")
    env = make_gymnasium(cfg)
    try:
        env = ModelObservations(env, cfg.image_size, cfg.grayscale)
    except ObservationError as e:
        raise EnvError(f"env '{cfg.id}': {e}") from None
    # rendered frames only where the observation has no image of its own and the env can draw one
    render = render and "pixels" not in getattr(env.observation_space, "spaces", {}) \
        and "rgb_array" in env.metadata.get("render_modes", [])
    if render:
        env.close()
        env = ModelObservations(make_gymnasium(cfg, render=True), cfg.image_size, cfg.grayscale)
    wrapped = GymWrapper(env, frame_skip=cfg.action_repeat, from_pixels=render, pixels_only=False)
    wrapped.set_seed(seed)
    return wrapped


def list_ids() -> list[str]:
    import gymnasium

    import envs  # noqa: F401  registers the memory suite

    for module in INSTALL:  # packages that register envs when imported, where they are installed
        if importlib.util.find_spec(module) is not None and module not in ("bsuite", "memory_maze", "Box2D"):
            importlib.import_module(module)
    return sorted(k for k in gymnasium.envs.registry if "-v" in k)
