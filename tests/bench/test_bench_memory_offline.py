"""`longdream bench memory_offline` (tiny sizes): whole episodes with the cue at the first step and the
reward at the last, the linear probe, rows and report, one-line errors."""
import json

import pytest
import torch

from bench import memory_offline


def test_episodes_put_the_cue_first_and_the_reward_last():
    data = memory_offline.episodes(4, 6, seed=0, actions="random")
    obs, act, rew = data["obs"], data["action"], data["reward"]
    assert obs.shape[:2] == (6, 6) and act.shape == (6, 6, 2) and rew.shape == (6, 6)
    assert (act[:, 0] == 0).all() and (act[:, 1:].sum(-1) == 1).all()  # no action before the first step
    # the cue is shown by the reset and the first step's observation (BSuite's timing), then never again
    assert (obs[:, 0, 2].abs() == 1).all() and (obs[:, 1, 2] == obs[:, 0, 2]).all() and (obs[:, 2:, 2] == 0).all()
    assert (rew[:, :-1] == 0).all() and (rew[:, -1].abs() == 1).all()
    right = (act[:, -1, 1] > 0) == (obs[:, 0, 2] > 0)  # the last action matches the cue
    assert ((rew[:, -1] > 0) == right).all()
    fixed = memory_offline.episodes(4, 6, seed=0, actions="fixed")
    assert (fixed["action"][:, 1:, 1] == 1).all()


def test_linear_probe_reads_a_separable_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g)
    assert memory_offline.linear_probe(x, (x[:, 3] > 0).float()) > 0.95
    assert memory_offline.linear_probe(x, torch.randint(0, 2, (400,), generator=g).float()) < 0.65


def test_rows_report_and_rerun(tmp_path):
    argv = ["backbones=s5wm,rssm", "lengths=3", "updates=4", "every=2", "batch_size=2", "train_episodes=8",
            "test_episodes=8", "progress=false", f"out={tmp_path}"]
    data = memory_offline.main(argv)
    rows = data["runs"]
    assert [(r["backbone"], r["memory_length"]) for r in rows] == [("s5wm", 3), ("rssm", 3)]
    for r in rows:
        assert [p["updates"] for p in r["curve"]] == [0, 2, 4]
        assert r["reward_acc"] == r["curve"][-1]["reward_acc"] and 0 <= r["reward_acc"] <= 1
        assert r["learnt_at"] is None or r["curve"][[p["updates"] for p in r["curve"]].index(r["learnt_at"])]["reward_acc"] >= 0.95
    text = (tmp_path / "memory_offline.md").read_text()
    assert "| s5wm | 3 | random |" in text and "| rssm | 3 | random |" in text
    memory_offline.main([*argv[:1], "lengths=3", "updates=4", "every=2", "batch_size=2", "train_episodes=8",
                         "test_episodes=8", "progress=false", f"out={tmp_path}", "backbones=rssm"])
    again = json.loads((tmp_path / "memory_offline.json").read_text())["runs"]
    assert len(again) == 2  # the same settings replace their row


@pytest.mark.parametrize("arg, msg", [("actions=greedy", "actions must be random or fixed"),
                                      ("backbones=gru", "unknown backbone gru"),
                                      ("lengths=ten", "lengths must be comma-separated integers"),
                                      ("updates=0", "must be >= 1")])
def test_one_line_errors(arg, msg):
    from agents.config import ConfigError

    with pytest.raises(ConfigError, match=msg):
        memory_offline.main([arg])
