"""The dm-control suite: `env.id=dmc:<domain>-<task>`, from the state (one concatenated vector) or from
rendered pixels (`env.pixels=true`, rendered at the model's image size, 64 x 64 unless
`env.image_size` says otherwise)."""
from __future__ import annotations

from torchrl.envs import EnvBase

from envs.errors import EnvError


def make_dmc(cfg, seed: int, render: bool) -> EnvBase:
    from dm_control import suite
    from torchrl.envs.libs.dm_control import DMControlWrapper

    name = cfg.id.split(":", 1)[1]
    domain, _, task = name.partition("-")
    task = task.replace("-", "_")
    if (domain, task) not in suite.ALL_TASKS:
        raise EnvError(f"unknown dm-control task '{name}'; list valid ones with `longdream envs`")
    size = cfg.image_size or 64
    env = suite.load(domain, task, task_kwargs={"random": seed})
    if cfg.shift or cfg.shift_range:
        from envs.shift import wrap_dmc

        env = wrap_dmc(env, cfg.id, cfg.shift, cfg.shift_range, seed)
    # DMControlEnv forwards render_kwargs to the task and fails; the wrapper renders at the size directly.
    return DMControlWrapper(env, from_pixels=cfg.pixels or render,
                            pixels_only=cfg.pixels, render_kwargs={"height": size, "width": size}, frame_skip=cfg.action_repeat)


def list_ids() -> list[str]:
    from dm_control import suite

    return sorted(f"dmc:{d}-{t}" for d, t in suite.ALL_TASKS)
