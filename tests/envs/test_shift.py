"""Shifted dynamics (envs/shift.py): a shift changes the parameters it names and only those, the
dynamics follow, ranges are drawn per episode, and bad shifts are one-line errors."""
import numpy as np
import pytest

from envs.make import EnvConfig, EnvError, make_env
from envs.gym import make_gymnasium


def rollout(env, steps=5, seed=0):
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for t in range(steps):
        obs, *_ = env.step(np.full(env.action_space.shape, 0.5 * (-1) ** t, dtype=env.action_space.dtype))
        out.append(obs)
    return np.stack(out)


def test_pendulum_mass_shift_changes_mass_only_and_the_dynamics():
    base = make_gymnasium(EnvConfig(id="Pendulum-v1"))
    heavy = make_gymnasium(EnvConfig(id="Pendulum-v1", shift={"m": 1.5}))
    assert (heavy.unwrapped.m, heavy.unwrapped.l, heavy.unwrapped.g) == (1.5, 1.0, 10.0)
    assert heavy.get_wrapper_attr("shift") == {"m": 1.5}
    a, b = rollout(base), rollout(heavy)
    np.testing.assert_array_equal(a[0], b[0])  # the same start state
    assert np.abs(a[1:] - b[1:]).max() > 1e-3  # the same torques move a heavier pendulum differently
    again = rollout(make_gymnasium(EnvConfig(id="Pendulum-v1", shift={"m": 1.0})))
    np.testing.assert_array_equal(a, again)  # a scale of one is no shift at all


def test_mujoco_shift_scales_the_named_arrays_only():
    pytest.importorskip("mujoco")
    ref = make_gymnasium(EnvConfig(id="Hopper-v5")).unwrapped.model
    env = make_gymnasium(EnvConfig(id="Hopper-v5", shift={"mass": 2.0, "friction": 0.5}))
    m = env.unwrapped.model
    np.testing.assert_allclose(m.body_mass, 2.0 * ref.body_mass)
    np.testing.assert_allclose(m.geom_friction, 0.5 * ref.geom_friction)
    np.testing.assert_array_equal(m.dof_damping, ref.dof_damping)
    np.testing.assert_array_equal(m.opt.gravity, ref.opt.gravity)


def test_dmc_shift_range_draws_a_scale_every_episode():
    pytest.importorskip("dm_control")
    env = make_env(EnvConfig(id="dmc:cartpole-swingup", shift_range={"mass": [0.5, 2.0]}), seed=0)
    physics = env.base_env._env.physics
    shifter = env.base_env._env.shifter
    masses = physics.model.body_mass.copy()
    seen = []
    for _ in range(4):
        env.reset()
        s = shifter.scales["mass"]
        assert 0.5 <= s <= 2.0
        np.testing.assert_allclose(physics.model.body_mass, shifter.defaults["mass"] * s)
        seen.append(s)
    assert len(set(seen)) == 4 and not np.allclose(physics.model.body_mass, masses)


def test_unknown_or_bad_shifts_are_one_line_errors():
    cases = [(dict(id="Pendulum-v1", shift={"mass": 2.0}), "has no parameter 'mass' to shift (it has: g, m, l)"),
             (dict(id="CartPole-v1", shift={"m": 2.0}), "has no parameter 'm' to shift (it has: none)"),
             (dict(id="Pendulum-v1", shift={"m": -1.0}), "env.shift.m must be a positive scale"),
             (dict(id="Pendulum-v1", shift_range={"m": [2.0, 1.0]}), "must be [low, high] with 0 < low <= high"),
             (dict(id="Pendulum-v1", shift={"m": 1.5}, shift_range={"m": [1, 2]}), "in both env.shift and env.shift_range")]
    for kwargs, msg in cases:
        with pytest.raises(EnvError) as e:
            make_env(EnvConfig(**kwargs))
        assert msg in str(e.value) and "\n" not in str(e.value), kwargs


def test_shift_from_the_command_line():
    """env.shift.<p>=x and env.shift_range.<p>=[lo,hi] need no `+`, though their keys are the user's."""
    from agents.config import load_config

    cfg, _ = load_config(["env=pendulum", "env.shift.m=1.5", "env.shift_range.l=[0.5,1.5]"])
    assert dict(cfg.env.shift) == {"m": 1.5} and {k: list(v) for k, v in dict(cfg.env.shift_range).items()} == {"l": [0.5, 1.5]}
    cfg, _ = load_config(["env=bsuite_memory_len", "env.kwargs.memory_length=30"])  # an existing key still overrides
    assert cfg.env.kwargs["memory_length"] == 30


def test_a_trial_is_several_episodes_of_one_draw():
    """env.trial=3: two inner episode ends pass as ordinary steps, the third ends the trial; the drawn
    mass holds within the trial and is drawn anew for the next one."""
    env = make_gymnasium(EnvConfig(id="Pendulum-v1", shift_range={"m": [0.5, 2.0]}, trial=3, time_limit=20))
    env.reset(seed=0)
    m0, ends, last = env.unwrapped.m, [], None
    for t in range(60):
        obs, _, terminated, truncated, info = env.step(np.zeros(1, dtype=np.float32))
        assert env.unwrapped.m == m0
        if info.get("trial_episode_end"):
            ends.append(t)
        if terminated or truncated:
            last = t
            break
    assert ends == [19, 39] and last == 59
    env.reset()
    assert env.unwrapped.m != m0
    for kwargs, msg in [(dict(trial=2), "env.trial > 1 needs env.shift_range"),
                        (dict(trial=0), "env.trial must be >= 1"),
                        (dict(id="dmc:cartpole-swingup", trial=2, shift_range={"mass": [1, 2]}), "is for gymnasium envs")]:
        with pytest.raises(EnvError, match=msg):
            EnvConfig(**{"id": "Pendulum-v1", **kwargs})


def test_trial_episode_length_for_the_agent():
    """Through TorchRL, a trial of 2 episodes of 15 steps is one episode of 30 agent steps."""
    env = make_env(EnvConfig(id="Pendulum-v1", shift_range={"m": [0.5, 2.0]}, trial=2, time_limit=15), seed=0)
    td = env.rollout(100, break_when_any_done=True)
    assert td.shape[0] == 30
