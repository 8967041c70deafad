"""Hand-worked cases for the loss maths: each fails when one piece of it is wrong (the sign of the actor
loss, which side of the KL is detached, free bits, the slow-critic rate, the continuation weights, the
discount, the std bounds, the env-action bounds, REINFORCE on clipped samples, the actor's input)."""
import math

import pytest
import torch
from torch import nn

from agents import dreamer
from agents.dreamer import Actor, Agent, AgentConfig, imagine_losses, replay_returns, update
from agents.optim import LaProp
from agents.policy import DreamerPolicy
from worldmodels.model import BACKBONES, LossConfig, ObsSpec, WorldModel
from worldmodels.nets import NetsConfig, action_input

H = 5


class ToyCore(nn.Module):
    """Imagination whose features are [the action just taken (A), 1]: rewards can be any function of it."""

    def __init__(self, A):
        super().__init__()
        self.A, self.feat_size = A, A + 1

    def imagine(self, state, policy, horizon):
        N = state["x"].shape[0]
        feat = torch.cat([torch.zeros(N, self.A), torch.ones(N, 1)], -1) + 0 * state["x"]
        feats, acts = [feat], [policy(feat)]
        for _ in range(horizon):
            feats.append(torch.cat([action_input(acts[-1]), torch.ones(N, 1)], -1))
            acts.append(policy(feats[-1]))
        return torch.stack(feats, 1), torch.stack(acts, 1)


class Head(nn.Module):
    """A head with a fixed readout: forward passes the features, mean applies `fn`."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, feat):
        return feat

    def mean(self, x):
        return self.fn(x)


class ToyWM(nn.Module):
    def __init__(self, A, discrete, reward, cont_logit=20.0):
        super().__init__()
        self.spec = ObsSpec(pixels=False, obs_dim=1, action_dim=A, discrete=discrete)
        self.nets = NetsConfig()
        self.core = ToyCore(A)
        self.reward = Head(reward)
        self.cont_logit = cont_logit
        self.loss_cfg = LossConfig()

    def cont(self, feat):
        return torch.full((*feat.shape[:-1], 1), self.cont_logit)


def toy_agent(discrete, reward, **cfg):
    torch.manual_seed(0)
    A = 2 if discrete else 1
    return Agent(ToyWM(A, discrete, reward, cfg.pop("cont_logit", 20.0)), AgentConfig(horizon=H, **cfg))


def starts(N=256):
    """N posterior states as `update` hands them over, (B, T, ...) with B = N, T = 1."""
    return {"x": torch.zeros(N, 1, 1)}, torch.ones(N)


# --- the actor's gradient ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["reinforce", "dynamics"])
def test_actor_step_climbs_the_reward(mode):
    """One SGD step on the actor loss moves a continuous policy's mean towards the reward's peak at 0.5."""
    agent = toy_agent(False, lambda f: -(f[..., 0] - 0.5) ** 2, actor_grad=mode)
    feat = torch.cat([torch.zeros(1, 1), torch.ones(1, 1)], -1)
    before = agent.actor.dist(feat).base_dist.mean.item()
    opt = torch.optim.SGD(agent.actor.parameters(), lr=0.05)
    for _ in range(3):
        torch.manual_seed(1)
        losses, *_ = imagine_losses(agent, *starts())
        opt.zero_grad()
        losses["actor"].backward(inputs=list(agent.actor.parameters()))
        opt.step()
    after = agent.actor.dist(feat).base_dist.mean.item()
    assert abs(after - 0.5) < abs(before - 0.5) - 1e-3, (before, after)


def test_discrete_actor_step_prefers_the_rewarded_action():
    agent = toy_agent(True, lambda f: f[..., 0], actor_grad="reinforce")  # action 0 pays 1, action 1 pays 0
    feat = torch.cat([torch.zeros(1, 2), torch.ones(1, 1)], -1)
    before = agent.actor.dist(feat).probs[0, 0].item()
    opt = torch.optim.SGD(agent.actor.parameters(), lr=0.5)
    torch.manual_seed(1)
    losses, *_ = imagine_losses(agent, *starts())
    opt.zero_grad()
    losses["actor"].backward(inputs=list(agent.actor.parameters()))
    opt.step()
    assert agent.actor.dist(feat).probs[0, 0].item() > before + 1e-3


def test_reinforce_on_raw_samples_matches_the_reparameterised_gradient():
    """A 1-D bounded normal, a third of whose samples fall outside [-1, 1], under a reward of the clipped
    action: the score-function gradient of E[f] at the samples `sample` returns equals the pathwise one
    (Monte Carlo, 400K samples); scoring clipped samples would be off by 20% or more."""
    cfg = AgentConfig()
    actor = Actor(1, 1, False, 8, 1, cfg)
    with torch.no_grad():
        actor.net[-1].weight.zero_()
        actor.net[-1].bias.copy_(torch.tensor([math.atanh(0.7), 0.0]))  # mean 0.7, std ~0.9
    feat = torch.ones(400_000, 1)
    f = lambda a: -(a.clamp(-1, 1) - 0.2) ** 2  # noqa: E731
    torch.manual_seed(0)
    a = actor.sample(feat)
    assert (a.abs() > 1).float().mean() > 0.25
    fa = f(a).squeeze(-1)
    logp = actor.dist(feat).log_prob(a)
    score = torch.autograd.grad(((fa - fa.mean()).detach() * logp).mean(), actor.net[-1].bias)[0]
    torch.manual_seed(0)
    path = torch.autograd.grad(f(actor.rsample(feat)).mean(), actor.net[-1].bias)[0]
    torch.testing.assert_close(score, path, rtol=0.05, atol=2e-3)


def test_dynamics_gradient_reaches_the_actor_through_its_actions_only():
    """With dynamics gradients, the features the actor reads in imagination carry no gradient (sg(s_t)),
    yet its loss still has one."""
    agent = toy_agent(False, lambda f: -(f[..., 0] - 0.5) ** 2, actor_grad="dynamics")
    seen = []
    real = agent.actor.rsample

    def spy(feat):
        seen.append(feat.requires_grad)
        return real(feat)

    agent.actor.rsample = spy
    losses, *_ = imagine_losses(agent, *starts(16))
    assert len(seen) == H + 1 and not any(seen)
    grads = torch.autograd.grad(losses["actor"], list(agent.actor.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


# --- weights, discount, returns ------------------------------------------------------------------

def test_critic_weights_are_the_cumulative_continuation():
    """Critic logits start uniform (zero-initialised output), so each step's two cross-entropies are
    2 log K whatever the targets: the critic loss is 2 log K times the mean weight, and the weight of
    step t is prod_{k<t} c_k with c = sigmoid(0) = 1/2 from a start that is not terminal."""
    agent = toy_agent(False, lambda f: torch.zeros_like(f[..., 0]), cont_logit=0.0)
    losses, *_ = imagine_losses(agent, *starts(8))
    mean_weight = sum(0.5 ** t for t in range(H)) / H
    torch.testing.assert_close(losses["critic"], torch.tensor(2 * math.log(255) * mean_weight), rtol=1e-5, atol=1e-6)


def test_discount_is_in_the_returns():
    """Reward 1 per step, values 0, nothing terminal: R_t = sum_{k < H - t} (gamma lam)^k."""
    gamma, lam = 0.9, 0.5
    agent = toy_agent(False, lambda f: torch.ones_like(f[..., 0]), gamma=gamma, lam=lam)
    _, metrics, _, ret = imagine_losses(agent, *starts(8))
    expect = torch.tensor([sum((gamma * lam * torch.sigmoid(torch.tensor(20.0))) ** k for k in range(H - t)) for t in range(H)])
    torch.testing.assert_close(ret[0], expect.float(), rtol=1e-5, atol=1e-5)


def test_replay_returns_hand_worked():
    """Rows 0-3 of one window; row 2 is terminal, row 3 starts a new episode; gamma 0.5, lam 0.5.
    R_3 = boot_3 = 8
    R_2 = r_3 + g (1 - term_3) [(1 - l) boot_3 + l R_3] = 4 + 0.5 * 8 = 8     (weight 0: row 2 ends its episode)
    R_1 = r_2 + g (1 - term_2) [...] = 3 + 0 = 3                             (row 2 terminal)
    R_0 = r_1 + g [(1 - l) boot_1 + l R_1] = 2 + 0.5 (0.5 * 6 + 0.5 * 3) = 4.25"""
    reward = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    is_first = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    is_terminal = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    boot = torch.tensor([[5.0, 6.0, 7.0, 8.0]])
    ret, weight = replay_returns(reward, is_first, is_terminal, boot, 0.5, 0.5)
    torch.testing.assert_close(ret, torch.tensor([[4.25, 3.0, 8.0, 8.0]]))
    torch.testing.assert_close(weight, torch.tensor([[1.0, 1.0, 0.0, 1.0]]))
    # The same rows with the episode truncated at row 2 instead (not terminal): R_1 bootstraps from row 2,
    # whose own return would run into the next episode: R_1 = r_2 + g boot_2 = 3 + 0.5 * 7 = 6.5,
    # R_0 = r_1 + g [(1 - l) boot_1 + l R_1] = 2 + 0.5 (3 + 3.25) = 5.125.
    ret, weight = replay_returns(reward, is_first, torch.zeros(1, 4), boot, 0.5, 0.5)
    torch.testing.assert_close(ret[:, :2], torch.tensor([[5.125, 6.5]]))
    torch.testing.assert_close(weight, torch.tensor([[1.0, 1.0, 0.0, 1.0]]))


def test_repval_trains_the_critic_on_replayed_states():
    torch.manual_seed(0)
    wm = WorldModel("rssm", BACKBONES["rssm"][1](), NetsConfig(), ObsSpec(pixels=False, obs_dim=3, action_dim=2),
                    LossConfig(repval=0.3))
    agent = Agent(wm, AgentConfig())
    g = torch.Generator().manual_seed(1)
    batch = {"obs": torch.randn(2, 6, 3, generator=g), "action": torch.rand(2, 6, 2, generator=g) * 2 - 1,
             "reward": torch.randn(2, 6, generator=g), "is_first": torch.zeros(2, 6), "is_terminal": torch.zeros(2, 6)}
    m, _ = update(agent, agent.optimizers(), batch)
    assert m["loss/repval"] > 0
    # the replay loss is zero-initialised logits against targets: exactly 2 log K at the first update
    torch.testing.assert_close(m["loss/repval"], torch.tensor(2 * math.log(255)), rtol=1e-4, atol=1e-4)


# --- world-model losses ---------------------------------------------------------------------------

@pytest.fixture(params=sorted(BACKBONES))
def backbone(request):
    return request.param


def test_dyn_trains_the_prior_and_rep_the_posterior(backbone):
    """At an episode's first step (later priors also see earlier posterior samples, through their
    straight-through gradients, as they should) dyn = KL[sg(q) || p] reaches only the prior and
    rep = KL[q || sg(p)] only the posterior."""
    torch.manual_seed(0)
    core = BACKBONES[backbone][0](BACKBONES[backbone][1](size="xs"), 16, 2)
    g = torch.Generator().manual_seed(0)
    first = torch.ones(2, 1)
    _, _, kl = core.observe(core.initial(2), torch.randn(2, 1, 16, generator=g), torch.randn(2, 1, 2, generator=g), first)
    prior, post = list(core.prior_net.parameters()), list(core.post_net.parameters())

    def grads(loss, params):
        return [g for g in torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) if g is not None]

    assert all(g.abs().sum() == 0 for g in grads(kl["dyn"].sum(), post))
    assert any(g.abs().sum() > 0 for g in grads(kl["dyn"].sum(), prior))
    assert all(g.abs().sum() == 0 for g in grads(kl["rep"].sum(), prior))
    assert any(g.abs().sum() > 0 for g in grads(kl["rep"].sum(), post))


def test_free_bits_cut_the_gradient_below_one_nat():
    torch.manual_seed(0)
    wm = WorldModel("rssm", BACKBONES["rssm"][1](), NetsConfig(), ObsSpec(pixels=False, obs_dim=3, action_dim=2))
    kl = torch.tensor([[0.5, 0.9, 1.5, 3.0]], requires_grad=True)
    real = wm.core.observe

    def fixed_kl(state, embed, action, is_first, noise=None):
        states, feat, _ = real(state, embed, action, is_first, noise)
        return states, feat, {"dyn": kl, "rep": kl}

    wm.core.observe = fixed_kl
    total, terms, *_ = wm.loss(torch.randn(1, 4, 3), torch.zeros(1, 4, 2), torch.zeros(1, 4), torch.zeros(1, 4), torch.zeros(1, 4))
    torch.testing.assert_close(terms["dyn"], torch.tensor((1.0 + 1.0 + 1.5 + 3.0) / 4))
    (grad,) = torch.autograd.grad(terms["dyn"], kl)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, 0.25, 0.25]]))


# --- slow critic, actor distribution, env actions, optimiser ---------------------------------------

def test_slow_critic_is_the_configured_lerp_after_one_step():
    torch.manual_seed(0)
    wm = WorldModel("rssm", BACKBONES["rssm"][1](), NetsConfig(), ObsSpec(pixels=False, obs_dim=3, action_dim=2))
    agent = Agent(wm, AgentConfig(slow_critic_mix=0.25))
    slow_before = [p.clone() for p in agent.slow_critic.parameters()]
    g = torch.Generator().manual_seed(1)
    batch = {"obs": torch.randn(2, 6, 3, generator=g), "action": torch.rand(2, 6, 2, generator=g) * 2 - 1,
             "reward": torch.randn(2, 6, generator=g), "is_first": torch.zeros(2, 6), "is_terminal": torch.zeros(2, 6)}
    update(agent, agent.optimizers(), batch)
    for s0, s1, fast in zip(slow_before, agent.slow_critic.parameters(), agent.critic.parameters()):
        torch.testing.assert_close(s1, s0 + 0.25 * (fast - s0))
    assert any(not torch.equal(s0, s1) for s0, s1 in zip(slow_before, agent.slow_critic.parameters()))


def test_actor_std_bounds():
    cfg = AgentConfig(min_std=0.1, max_std=1.0)
    actor = Actor(4, 3, False, 8, 1, cfg)
    with torch.no_grad():
        actor.net[-1].weight.zero_()
        actor.net[-1].bias.zero_()
    std = actor.dist(torch.randn(5, 4)).base_dist.stddev
    torch.testing.assert_close(std, torch.full((5, 3), 0.1 + 0.9 * torch.sigmoid(torch.tensor(2.0)).item()))
    with torch.no_grad():
        actor.net[-1].bias[3:].fill_(-50.0)
    assert torch.allclose(actor.dist(torch.randn(5, 4)).base_dist.stddev, torch.tensor(0.1))
    with torch.no_grad():
        actor.net[-1].bias[3:].fill_(50.0)
    assert torch.allclose(actor.dist(torch.randn(5, 4)).base_dist.stddev, torch.tensor(1.0))


def test_actor_output_scale():
    torch.manual_seed(0)
    big = Actor(4, 2, False, 8, 1, AgentConfig())
    torch.manual_seed(0)
    small = Actor(4, 2, False, 8, 1, AgentConfig(outscale=0.01))
    torch.testing.assert_close(small.net[-1].weight, 0.01 * big.net[-1].weight)


def test_policy_env_action_bounds():
    wm = WorldModel("rssm", BACKBONES["rssm"][1](), NetsConfig(), ObsSpec(pixels=False, obs_dim=3, action_dim=2))
    policy = DreamerPolicy(Agent(wm, AgentConfig()), torch.tensor([-2.0, 0.0]), torch.tensor([2.0, 10.0]))
    a = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.0], [3.0, -7.0]])
    torch.testing.assert_close(policy.to_env(a), torch.tensor([[-2.0, 0.0], [2.0, 10.0], [0.0, 5.0], [2.0, 0.0]]))


def test_dynamics_read_actions_bounded():
    a = torch.tensor([[0.5, -3.0]], requires_grad=True)
    x = action_input(a)
    torch.testing.assert_close(x, torch.tensor([[0.5, -1.0]]))
    (g,) = torch.autograd.grad(x.sum(), a)
    torch.testing.assert_close(g, torch.tensor([[1.0, 1 / 3]]))  # the divisor is held constant


def test_laprop_against_the_formulas():
    """Scalar steps worked from the formulas in plain floats. First step by hand: p = 1, g = 0.5 is
    clipped to agc max(1e-3, |p|) = 0.3, the bias-corrected RMS is then 0.3 (u = 1) and so is the
    bias-corrected momentum of u: p moves by lr / warmup = 0.025."""
    lr, b1, b2, eps, agc, warmup = 0.1, 0.9, 0.999, 1e-20, 0.3, 4
    grads = [0.5, 0.5, -0.01, 2.0, 0.3]
    p = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    opt = LaProp([p], lr=lr, betas=(b1, b2), eps=eps, agc=agc, warmup=warmup)
    x, nu, mu, got, want = 1.0, 0.0, 0.0, [], []
    for t, g in enumerate(grads, 1):
        p.grad = torch.tensor([g], dtype=torch.float64)
        opt.step()
        got.append(p.item())
        g = g / max(1.0, abs(g) / (agc * max(1e-3, abs(x))))
        nu = b2 * nu + (1 - b2) * g * g
        u = g / (math.sqrt(nu / (1 - b2 ** t)) + eps)
        mu = b1 * mu + (1 - b1) * u
        x -= lr * min(1.0, t / warmup) * mu / (1 - b1 ** t)
        want.append(x)
    assert abs(got[0] - 0.975) < 1e-12
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-12)


def test_dv3_recipe_builds_laprop():
    wm = WorldModel("rssm", BACKBONES["rssm"][1](), NetsConfig(), ObsSpec(pixels=False, obs_dim=3, action_dim=2))
    opts = Agent(wm, AgentConfig(optimizer="laprop")).optimizers()
    assert set(opts) == {"wm", "actor", "critic"} and all(isinstance(o, LaProp) for o in opts.values())
    with pytest.raises(ValueError, match="optimizer"):
        AgentConfig(optimizer="sgd")
    assert dreamer.AgentConfig().optimizer == "adam"


# --- the fast imagination losses against their plain twin ----------------------------------------

def imagine_losses_ref(agent, starts, start_cont):
    """imagine_losses written plainly: each head on the slice of the rollout it needs, the critic run
    twice (once for the value, once on sg(feat) for its loss), the two-hot targets built in full."""
    from worldmodels.nets import symlog, two_hot

    cfg, wm = agent.cfg, agent.wm
    dynamics = dreamer.actor_grad_mode(agent) == "dynamics"
    ce = lambda head, logits, target: -(two_hot(symlog(target), head.bins) * logits.log_softmax(-1)).sum(-1)
    with torch.set_grad_enabled(dynamics):
        policy = (lambda f: agent.actor.rsample(f.detach())) if dynamics else agent.actor.sample
        feat, action = wm.core.imagine(starts, policy, cfg.horizon)
        reward = wm.reward.mean(wm.reward(feat[:, 1:]))
        cont = torch.sigmoid(wm.cont(feat[:, 1:]).squeeze(-1))
        value = agent.critic.mean(agent.critic(feat))
        ret = dreamer.lambda_return(reward, value, cfg.gamma * cont, cfg.lam)
    with torch.no_grad():
        weight = torch.cumprod(torch.cat([start_cont[:, None], cont[:, :-1]], 1), 1)
        scale, _ = agent.retnorm.propose(ret)
        adv = (ret - value[:, :-1]) / scale
        slow = agent.slow_critic.mean(agent.slow_critic(feat[:, :-1].detach()))
    dist = agent.actor.dist(feat[:, :-1].detach())
    ent = dist.entropy()
    if dynamics:
        actor_loss = -(weight * (ret / scale + cfg.entropy * ent)).mean()
    else:
        actor_loss = -(weight * (adv * dist.log_prob(action[:, :-1]) + cfg.entropy * ent)).mean()
    logits = agent.critic(feat[:, :-1].detach())
    critic_loss = (weight * (ce(agent.critic, logits, ret.detach()) + cfg.slow_critic_reg * ce(agent.critic, logits, slow))).mean()
    return {"actor": actor_loss, "critic": critic_loss}, ret.detach()


@pytest.mark.parametrize("backbone", ["rssm", "s5wm"])
@pytest.mark.parametrize("discrete", [False, True])
def test_imagine_losses_equal_their_plain_twin(backbone, discrete):
    """The same rollout (same seed) through imagine_losses and imagine_losses_ref: equal losses and
    returns, and equal gradients of each loss for its own module and for the world model (which the
    actor's dynamics gradient reaches)."""
    torch.manual_seed(0)
    wm = WorldModel(backbone, BACKBONES[backbone][1](), NetsConfig(),
                    ObsSpec(pixels=False, obs_dim=3, action_dim=2, discrete=discrete))
    agent = Agent(wm, AgentConfig(horizon=H)).double()
    N = 12
    g = torch.Generator().manual_seed(1)
    state = {k: v.clone() for k, v in wm.core.initial(N).items()}
    state["stoch"] = nn.functional.one_hot(torch.randint(state["stoch"].shape[-1], state["stoch"].shape[:-1], generator=g),
                                           state["stoch"].shape[-1]).double()
    for k in state:
        if k != "stoch":
            state[k] = torch.randn(state[k].shape, generator=g, dtype=torch.float64)
    cont = torch.ones(N, dtype=torch.float64)
    cont[0] = 0.0
    for head in (agent.critic.net, wm.reward.net):  # their outputs start at zero: give them some value
        for p in head[-1].parameters():
            nn.init.normal_(p, std=0.1)
    results = []
    for fn, start in ((imagine_losses, {k: v[:, None] for k, v in state.items()}), (imagine_losses_ref, state)):
        torch.manual_seed(5)  # imagine_losses takes (B, T, ...) states, here B = N and T = 1
        out = fn(agent, start, cont)
        losses, ret = out[0], out[-1]
        grads = {}
        for name, mods in (("actor", [agent.actor, wm]), ("critic", [agent.critic])):
            params = [p for m in mods for p in m.parameters()]
            gs = torch.autograd.grad(losses[name], params, allow_unused=True, retain_graph=True)
            grads[name] = [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]
        results.append((losses, ret, grads))
    (l1, r1, g1), (l2, r2, g2) = results
    torch.testing.assert_close(r1, r2)
    for name in ("actor", "critic"):
        torch.testing.assert_close(l1[name], l2[name])
        for a, b in zip(g1[name], g2[name]):
            torch.testing.assert_close(a, b)
