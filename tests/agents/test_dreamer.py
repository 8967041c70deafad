import torch

from agents.dreamer import Agent, AgentConfig, update
from worldmodels.model import ObsSpec, WorldModel
from worldmodels.nets import NetsConfig
from worldmodels.rssm import RSSMConfig


def make(discrete=False):
    torch.manual_seed(0)
    wm = WorldModel("rssm", RSSMConfig(), NetsConfig(), ObsSpec(pixels=False, obs_dim=3, action_dim=2, discrete=discrete))
    agent = Agent(wm, AgentConfig())
    return agent, agent.optimizers()


def batch(B=2, T=6):
    g = torch.Generator().manual_seed(1)
    return {"obs": torch.randn(B, T, 3, generator=g), "action": torch.rand(B, T, 2, generator=g) * 2 - 1,
            "reward": torch.randn(B, T, generator=g), "is_first": torch.zeros(B, T), "is_terminal": torch.zeros(B, T)}


def test_update_changes_every_part_and_tracks_slow_critic():
    for discrete in (False, True):
        agent, opts = make(discrete)
        before = {k: v.clone() for k, v in agent.state_dict().items()}
        m = update(agent, opts, batch())
        assert m["train/nonfinite"] == 0
        for part in ("wm.encoder", "wm.core", "wm.decoder", "actor", "critic", "slow_critic"):
            changed = any(not torch.equal(v, before[k]) for k, v in agent.state_dict().items() if k.startswith(part + "."))
            assert changed, part


def test_nonfinite_loss_never_reaches_the_weights():
    agent, opts = make()
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    b = batch()
    b["reward"][0, 3] = float("nan")
    m = update(agent, opts, b)
    assert m["train/nonfinite"] == 1
    for k, v in agent.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_return_normaliser_uses_percentile_range():
    agent, _ = make()
    ret = torch.linspace(0, 100, 1001)
    scale = agent.retnorm.update(ret)  # first call initialises to the batch's range
    torch.testing.assert_close(scale, torch.tensor(90.0))
    scale = agent.retnorm.update(torch.zeros(10))  # then moves by 1% towards the new (zero) range
    torch.testing.assert_close(scale, torch.tensor(89.1))
    small = type(agent.retnorm)(agent.cfg)
    torch.testing.assert_close(small.update(torch.zeros(10)), torch.tensor(1.0))  # never below 1
