"""make_env builds every kind of env with the same keys and transforms."""
import pytest
import torch

from agents.train import obs_spec
from envs import EnvConfig, EnvError, make_env


def check_rollout(env, steps=5):
    td = env.rollout(steps)
    assert td["is_init"][0].all() and not td["is_init"][1:].any()
    assert "episode_reward" in td["next"].keys() and "step_count" in td["next"].keys()
    return td


def test_gymnasium_continuous_vector():
    env = make_env(EnvConfig(id="Pendulum-v1", time_limit=3, action_repeat=2))
    td = check_rollout(env, 10)
    assert td["observation"].dtype == torch.float32 and td["observation"].shape == (3, 3)
    assert td["next", "truncated"][-1].all()  # the time limit ends the episode after 3 agent steps
    spec = obs_spec(env)
    assert not spec.pixels and spec.obs_dim == 3 and spec.action_dim == 1 and not spec.discrete


def test_gymnasium_discrete_one_hot():
    spec = obs_spec(make_env(EnvConfig(id="CartPole-v1")))
    assert spec.discrete and spec.action_dim == 2


def test_dmc_state_is_one_vector():
    env = make_env(EnvConfig(id="dmc:walker-walk", time_limit=4, action_repeat=2))
    td = check_rollout(env, 4)
    assert td["observation"].shape == (4, 24) and td["observation"].dtype == torch.float32
    assert obs_spec(env).action_dim == 6


def test_dmc_pixels_are_uint8_chw():
    env = make_env(EnvConfig(id="dmc:cartpole-swingup", pixels=True, time_limit=3))
    td = check_rollout(env, 3)
    assert td["pixels"].shape == (3, 3, 64, 64) and td["pixels"].dtype == torch.uint8
    assert obs_spec(env).pixels


@pytest.mark.parametrize("bad", [EnvConfig(id="Nope-v3"), EnvConfig(id="dmc:walker-moonwalk"),
                                 EnvConfig(id="Pendulum-v1", pixels=True)])
def test_bad_ids_are_one_line_errors(bad):
    with pytest.raises(EnvError) as e:
        make_env(bad)
    assert "\n" not in str(e.value)


def test_bad_options_are_errors():
    with pytest.raises(EnvError):
        EnvConfig(action_repeat=0)
