import pytest
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
        m, _ = update(agent, opts, batch())
        assert m["train/nonfinite"] == 0
        for part in ("wm.encoder", "wm.core", "wm.decoder", "actor", "critic", "slow_critic"):
            changed = any(not torch.equal(v, before[k]) for k, v in agent.state_dict().items() if k.startswith(part + "."))
            assert changed, part


def test_nonfinite_loss_never_reaches_the_weights():
    agent, opts = make()
    before = {k: v.clone() for k, v in agent.state_dict().items()}
    b = batch()
    b["reward"][0, 3] = float("nan")
    m, _ = update(agent, opts, b)
    assert m["train/nonfinite"] == 1
    for k, v in agent.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_return_normaliser_uses_percentile_range():
    agent, _ = make()
    norm = agent.retnorm

    def step(ret):
        scale, state = norm.propose(ret)
        norm.commit(state)
        return scale

    ret = torch.linspace(0, 100, 1001)
    torch.testing.assert_close(step(ret), torch.tensor(90.0))  # the first step initialises to the batch's range
    scale, _ = norm.propose(torch.zeros(10))  # proposed, not committed (a skipped step): the EMA stays
    torch.testing.assert_close(scale, torch.tensor(89.1))
    torch.testing.assert_close(step(torch.zeros(10)), torch.tensor(89.1))  # then moves by 1% towards zero range
    small = type(norm)(agent.cfg)
    torch.testing.assert_close(small.propose(torch.zeros(10))[0], torch.tensor(1.0))  # never below 1


def test_each_loss_trains_only_its_own_module():
    """With dynamics gradients the actor loss reaches through the world model and critic; those must
    still get exactly the gradients of their own losses."""
    import agents.dreamer as dreamer

    for grad in ("dynamics", "reinforce"):
        agent, opts = make()
        agent.cfg = AgentConfig(actor_grad=grad)
        b = batch()
        captured = {}
        real_step = torch.optim.Adam.step

        def spy(self, *args, **kwargs):
            captured[id(self)] = [p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None]
            return real_step(self, *args, **kwargs)

        torch.manual_seed(3)
        state = {k: v.clone() for k, v in agent.state_dict().items()}
        torch.optim.Adam.step = spy
        try:
            update(agent, opts, b)
        finally:
            torch.optim.Adam.step = real_step
        # the world model's gradient alone, recomputed from the same weights and batch
        agent.load_state_dict(state)
        agent.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        total = agent.wm.loss(b["obs"], b["action"], b["reward"], b["is_first"], b["is_terminal"])[0]
        total.backward()
        torch.nn.utils.clip_grad_norm_(agent.wm.parameters(), agent.cfg.wm_clip)
        expect = [p.grad for p in agent.wm.parameters() if p.grad is not None]
        got = captured[id(opts["wm"])]
        assert len(got) == len(expect)
        for g, e in zip(got, expect):
            torch.testing.assert_close(g, e)
        actor_grads = captured[id(opts["actor"])]
        assert actor_grads and any(g.abs().sum() > 0 for g in actor_grads), grad
        assert dreamer.actor_grad_mode(agent) == grad


def test_actor_grad_config():
    import pytest

    from agents.dreamer import actor_grad_mode

    with pytest.raises(ValueError, match="actor_grad"):
        AgentConfig(actor_grad="backprop")
    agent, _ = make(discrete=True)
    assert actor_grad_mode(agent) == "reinforce"
    agent.cfg = AgentConfig(actor_grad="dynamics")
    with pytest.raises(ValueError, match="continuous"):
        actor_grad_mode(agent)


def _agent(backbone, precision):
    from worldmodels.model import BACKBONES

    torch.manual_seed(0)
    wm = WorldModel(backbone, BACKBONES[backbone][1](), NetsConfig(), ObsSpec(pixels=False, obs_dim=3, action_dim=2))
    agent = Agent(wm, AgentConfig(precision=precision))
    return agent, agent.optimizers()


@pytest.mark.parametrize("backbone", ["rssm", "transformer", "s4wm", "s5wm", "mamba"])
def test_bf16_update_tracks_the_fp32_update(backbone):
    """The same update from the same weights, batch and seed in fp32 and under bf16 autocast: the world
    model's losses agree to a few percent and the weights move the same way (cosine of the two
    updates of the world model's weights), everything finite."""
    b = batch(B=4, T=16)
    moves, metrics = [], []
    for precision in ("fp32", "bf16"):
        agent, opts = _agent(backbone, precision)
        before = torch.cat([p.detach().flatten().clone() for p in agent.wm.parameters()])
        torch.manual_seed(3)
        m, _ = update(agent, opts, b)
        assert m["train/nonfinite"] == 0, precision
        moves.append(torch.cat([p.detach().flatten() for p in agent.wm.parameters()]) - before)
        metrics.append(m)
    for k in ("loss/dec", "loss/reward", "loss/cont", "loss/dyn"):
        torch.testing.assert_close(metrics[1][k], metrics[0][k], rtol=0.05, atol=1e-3, msg=k)
    assert torch.nn.functional.cosine_similarity(moves[0], moves[1], 0) > 0.9


def test_bf16_reaches_the_matrix_products_and_the_heads_stay_float32():
    agent, opts = _agent("rssm", "bf16")
    seen = {}

    def spy(name):
        def hook(module, inputs, out):
            seen.setdefault(name, out.dtype)
        return hook

    first = next(m for m in agent.wm.encoder.modules() if isinstance(m, torch.nn.Linear))
    first.register_forward_hook(spy("linear"))
    agent.wm.reward.register_forward_hook(spy("reward"))
    # the critic's logits, whichever way they were computed (its module, or the imagination heads'
    # shared first layer), reach its value readout
    critic_mean = agent.critic.mean
    agent.critic.mean = lambda logits: seen.setdefault("critic", logits.dtype) and critic_mean(logits)
    m, _ = update(agent, opts, batch())
    assert m["train/nonfinite"] == 0
    assert seen == {"linear": torch.bfloat16, "critic": torch.float32, "reward": torch.float32}
    assert all(p.dtype == torch.float32 for p in agent.parameters())


def test_precision_must_be_known():
    with pytest.raises(ValueError, match="agent.precision must be fp32 or bf16"):
        AgentConfig(precision="fp16")


def _snapshot(agent, opts):
    from agents.dreamer import mutable_state

    return [t.detach().clone() for t in mutable_state(agent, opts)]


@pytest.mark.parametrize("discrete", [False, True])
def test_graphable_update_equals_the_update(discrete):
    """The CUDA graph's step run eagerly (no read-back, undo on the device) is the same step."""
    runs = []
    for graphable in (False, True):
        agent, opts = make(discrete)
        torch.manual_seed(3)
        out = [update(agent, opts, batch(), graphable=graphable) for _ in range(3)]
        runs.append((agent, opts, out))
    (a1, o1, out1), (a2, o2, out2) = runs
    for x, y in zip(_snapshot(a1, o1), _snapshot(a2, o2)):
        assert torch.equal(x, y)
    for (m1, s1), (m2, s2) in zip(out1, out2):
        assert m1.keys() == m2.keys() and all(torch.equal(m1[k], m2[k]) for k in m1)
        assert all(torch.equal(s1[k], s2[k]) for k in s1)


@pytest.mark.parametrize("first", [True, False])
def test_graphable_update_undoes_a_nonfinite_step(first):
    """A NaN loss: every weight, optimiser moment and step count, the return normaliser and the slow
    critic are as before (a first step's new optimiser state is a fresh one's zeros), and the next
    finite step is the one an agent that never saw the NaN batch takes."""
    bad = batch()
    bad["reward"][0, 3] = float("nan")
    agent, opts = make()
    ref, ref_opts = make()
    if not first:
        for a, o in ((agent, opts), (ref, ref_opts)):
            torch.manual_seed(5)
            update(a, o, batch(), graphable=True)
    before = _snapshot(agent, opts)
    m, states = update(agent, opts, bad, graphable=True)
    assert m["train/nonfinite"] == 1 and states is not None
    after = _snapshot(agent, opts)
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    assert all(not t.any() for t in after[len(before):])  # state the NaN step created: zeros
    torch.manual_seed(7)
    update(agent, opts, batch(), graphable=True)
    torch.manual_seed(7)
    update(ref, ref_opts, batch(), graphable=True)
    for x, y in zip(_snapshot(agent, opts), _snapshot(ref, ref_opts)):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_one_hot_actor_distribution_scores_as_torch():
    from agents.dreamer import OneHot

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(64, 5, generator=g) + 0.01
    ref = torch.distributions.OneHotCategorical(probs=probs)
    d = OneHot(probs)
    value = torch.nn.functional.one_hot(torch.randint(5, (64,), generator=g), 5).float()
    torch.testing.assert_close(d.log_prob(value), ref.log_prob(value))
    torch.testing.assert_close(d.entropy(), ref.entropy())
    torch.manual_seed(0)
    draws = OneHot(probs[:1].expand(20000, 5)).sample()
    assert draws.sum(-1).eq(1).all()
    torch.testing.assert_close(draws.mean(0), ref.probs[0], atol=0.015, rtol=0)


def test_graphable_update_and_capturable_optimisers_need_adam():
    wm = WorldModel("rssm", RSSMConfig(), NetsConfig(), ObsSpec(pixels=False, obs_dim=3, action_dim=2))
    agent = Agent(wm, AgentConfig(optimizer="laprop"))
    with pytest.raises(ValueError, match="needs agent.optimizer=adam"):
        agent.optimizers(capturable=True)
    with pytest.raises(ValueError, match="needs agent.optimizer=adam"):
        update(agent, agent.optimizers(), batch(), graphable=True)
