"""The Atari suite: DreamerV3's frame handling on a fake emulator, and a real game for a few steps."""
import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

from envs import EnvConfig, EnvError, make_env
from envs.atari import RepeatMaxPool


class Frames(gym.Env):
    """Frame t is all t (as uint8); reward 1 per frame; a life is lost at frame 6; ends at frame 10."""

    def __init__(self):
        self.observation_space = spaces.Box(0, 255, (4, 4, 3), np.uint8)
        self.action_space = spaces.Discrete(3)
        self.t = 0
        self.actions = []

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros((4, 4, 3), np.uint8), {"lives": 3}

    def step(self, action):
        self.t += 1
        self.actions.append(action)
        frame = np.full((4, 4, 3), self.t if self.t % 2 else 100 - self.t, np.uint8)  # flicker
        return frame, 1.0, self.t >= 10, False, {"lives": 3 if self.t < 6 else 2}


def test_repeat_sums_rewards_and_max_pools_the_last_two_frames():
    env = RepeatMaxPool(Frames(), repeat=4, life_loss=False)
    env.reset(seed=0)
    obs, reward, term, trunc, _ = env.step(1)
    assert reward == 4.0 and not term
    assert (obs == max(3, 100 - 4)).all()  # frames 3 and 4 (flickering): their pixelwise max
    env.step(1)
    obs, reward, term, _, _ = env.step(1)  # frames 9, 10: the episode ends on frame 10
    assert term and reward == 2.0


def test_life_loss_ends_the_episode_only_when_asked():
    env = RepeatMaxPool(Frames(), repeat=4, life_loss=True)
    env.reset(seed=0)
    env.step(0)
    _, reward, term, _, _ = env.step(0)  # frames 5, 6: a life is lost on frame 6
    assert term and reward == 2.0


def test_noops_at_reset():
    inner = Frames()
    env = RepeatMaxPool(inner, repeat=1, life_loss=False, noops=3)
    counts = set()
    for seed in range(20):
        inner.actions.clear()
        env.reset(seed=seed)
        assert set(inner.actions) <= {0}
        counts.add(len(inner.actions))
    assert counts == {0, 1, 2, 3}


def test_pong_runs_with_dreamerv3_frames():
    pytest.importorskip("ale_py")
    env = make_env(EnvConfig(id="atari:Pong", action_repeat=4, time_limit=5))
    td = env.rollout(5)
    assert td["pixels"].shape == (5, 3, 64, 64) and td["pixels"].dtype == torch.uint8
    assert env.action_spec.shape == (18,)  # the full action set by default
    minimal = make_env(EnvConfig(id="atari:Pong", atari={"actions": "minimal"}, grayscale=True))
    assert minimal.action_spec.shape == (6,) and minimal.rollout(2)["pixels"].shape == (2, 1, 64, 64)
    with pytest.raises(EnvError, match="unknown Atari game"):
        make_env(EnvConfig(id="atari:NoSuchGame"))
    with pytest.raises(EnvError, match="noops"):
        EnvConfig(id="atari:Pong", atari={"noops": -1})


@pytest.mark.slow
def test_atari100k_preset_runs_end_to_end(tmp_path):
    pytest.importorskip("ale_py")
    from agents.cli import main

    fast = ["steps=400", "prefill=200", "train_ratio=16", "batch_size=2", "seq_len=8", "log_every=200",
            "eval_episodes=1", "eval_every=0", "progress=false", "collect_every=8", "env.time_limit=50"]
    assert main(["train", "preset=atari100k", f"run_dir={tmp_path}", *fast]) == 0
    assert list((tmp_path / "videos").glob("eval-*.gif"))
