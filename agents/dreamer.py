"""Actor-critic learning in imagination, after DreamerV3 (Hafner et al. 2023, sec. 3 and appendix).

From every posterior state of a replayed batch, the world model's prior is rolled forward H steps
under the actor. Lambda-returns (eq. 7) computed by a reverse linear scan are the critic's two-hot
target and, normalised by the EMA of their 5th-95th percentile range (eq. 8), the actor's
REINFORCE signal:

    L_actor  = -sum_t w_t [ sg((R_t - v_t) / max(1, S)) log pi(a_t | sg(s_t)) + eta H[pi(.|sg(s_t))] ]
    L_critic = -sum_t w_t [ log p_v(sg(R_t) | s_t) + log p_v(sg(v_slow(s_t)) | s_t) ]

w_t is the imagined probability of still being in the episode (cumulative continuation). Continuous
actions are scored at the raw sample a_t; they are clipped only where they reach the env, and the
dynamics read a_t / max(1, |a_t|) (worldmodels/nets.py, `action_input`).

For continuous actions the actor can instead follow the gradient of the return through the learned
dynamics (`actor_grad: dynamics`, DreamerV1/V2 and the first DreamerV3 release):

    L_actor  = -sum_t w_t [ R_t / max(1, S) + eta H[pi(.|sg(s_t))] ]

with reparameterised actions and straight-through latents, so every imagined step passes the
derivative of the return to the action that caused it, and only through the dynamics: the actor
reads sg(s_t), as in DreamerV3, so no gradient runs back through its own Jacobians along the
rollout. `auto` (the default) takes dynamics for continuous actions and REINFORCE for discrete ones.

Replay value loss (`loss.repval`, DreamerV3's current recipe): the critic also regresses, on the
replayed posterior states, lambda-returns of the real rewards and terminals bootstrapped from the
imagination returns of those same states (`replay_returns`), with the slow-critic regulariser.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents import distributed
from agents.optim import LaProp
from agents.returns import lambda_return
from worldmodels.base import imagine_all
from worldmodels.model import WorldModel
from worldmodels.nets import TwoHot, full, mlp, sample_index, shared_input, unimix_probs


@dataclass(frozen=True)
class AgentConfig:
    horizon: int = 15  # imagination steps
    gamma: float = 1 - 1 / 333  # discount per agent step
    lam: float = 0.95  # lambda of the lambda-return
    entropy: float = 3e-4  # eta, the actor's entropy bonus
    slow_critic_mix: float = 0.02  # EMA rate of the slow critic
    slow_critic_reg: float = 1.0  # weight of the slow-critic regulariser
    retnorm_decay: float = 0.99  # EMA decay of the return percentile range
    retnorm_low: float = 0.05
    retnorm_high: float = 0.95
    unimix: float = 0.01  # uniform mix of discrete actions
    min_std: float = 0.1
    max_std: float = 1.0
    wm_lr: float = 1e-4
    actor_lr: float = 3e-5
    critic_lr: float = 3e-5
    wm_clip: float = 1000.0  # gradient-norm clip (adam)
    ac_clip: float = 100.0
    actor_grad: str = "auto"  # auto | reinforce | dynamics (continuous actions only)
    optimizer: str = "adam"  # adam (per module, wm_lr / actor_lr / critic_lr, norm clips) | laprop (agents/optim.py)
    lr: float = 4e-5  # laprop: one learning rate for every module
    agc: float = 0.3  # laprop: adaptive gradient clipping, relative to the weights' norm
    warmup: int = 1000  # laprop: updates over which the learning rate ramps up linearly
    outscale: float = 1.0  # scale of the actor's initial output layer (DreamerV3's current recipe: 0.01)
    eval_sample: bool = False  # evaluate with sampled actions (current recipe) instead of the mode
    precision: str = "fp32"  # fp32 | bf16: the update's forward passes under bfloat16 autocast (weights,
    #                          optimiser state, distributions and losses stay float32, as in DreamerV3)
    penalty: float = 0.0  # > 0: imagined rewards minus penalty x the disagreement of an ensemble of one-step
    #                       latent predictors (MOPO/MOReL-style, against model exploitation offline)
    ensemble: int = 5  # members of that ensemble
    bc: float = 0.0  # > 0: the actor's loss plus bc x its distance to the replayed actions at their posterior
    #                  states (behaviour regularisation, TD3+BC-style, against model exploitation offline)
    cuda_graph: bool = False  # CUDA only: the whole update captured in one CUDA graph and replayed every step
    #                           (agents/cudagraph.py; Adam, one process, fixed batch shapes)

    def __post_init__(self):
        if self.actor_grad not in ("auto", "reinforce", "dynamics"):
            raise ValueError(f"agent.actor_grad must be auto, reinforce or dynamics, got '{self.actor_grad}'")
        if self.optimizer not in ("adam", "laprop"):
            raise ValueError(f"agent.optimizer must be adam or laprop, got '{self.optimizer}'")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"agent.precision must be fp32 or bf16, got '{self.precision}'")
        if self.penalty < 0 or self.ensemble < 2:
            raise ValueError("agent.penalty must be >= 0 and agent.ensemble >= 2 (a disagreement needs two members)")
        if self.bc < 0:
            raise ValueError(f"agent.bc must be >= 0, got {self.bc:g}")


class OneHot:
    """A one-hot categorical over probs (..., K), as torch's OneHotCategorical scores it (log_prob,
    entropy), drawn by `sample_index`. Not torch's own: its Categorical inside checks its arguments
    whatever validate_args says, reading values back to the host at every imagined step."""

    def __init__(self, probs: Tensor):
        self.probs = probs / probs.sum(-1, keepdim=True)

    def _logp(self) -> Tensor:
        return self.probs.clamp_min(torch.finfo(self.probs.dtype).tiny).log()

    def sample(self) -> Tensor:
        return F.one_hot(sample_index(self.probs), self.probs.shape[-1]).to(self.probs.dtype)

    def log_prob(self, value: Tensor) -> Tensor:
        return (value * self._logp()).sum(-1)

    def entropy(self) -> Tensor:
        return -(self.probs * self._logp()).sum(-1)


class Actor(nn.Module):
    """Categorical with unimix for discrete actions (one-hot), bounded normal for continuous ones."""

    def __init__(self, feat: int, action_dim: int, discrete: bool, units: int, layers: int, cfg: AgentConfig):
        super().__init__()
        self.discrete, self.cfg, self.action_dim = discrete, cfg, action_dim
        self.net = mlp(feat, units, layers, action_dim if discrete else 2 * action_dim)
        with torch.no_grad():  # a small output layer starts every state near the same, broad policy
            self.net[-1].weight.mul_(cfg.outscale)
            self.net[-1].bias.mul_(cfg.outscale)

    def dist(self, feat: Tensor) -> torch.distributions.Distribution:
        out = full(self.net(feat))  # the distribution's maths in float32, also under bf16 autocast
        if self.discrete:
            probs = unimix_probs(out, self.cfg.unimix)
            return OneHot(probs)
        mean, std = out.chunk(2, -1)
        std = self.cfg.min_std + (self.cfg.max_std - self.cfg.min_std) * torch.sigmoid(std + 2.0)
        # no argument validation: its checks read values back to the host at every imagined step (and
        # a CUDA graph cannot hold them); the parameters are valid by construction
        return torch.distributions.Independent(torch.distributions.Normal(torch.tanh(mean), std, validate_args=False), 1,
                                               validate_args=False)

    def sample(self, feat: Tensor) -> Tensor:
        """A sample as the distribution gives it: continuous ones are not clipped here (the env and the
        dynamics bound them), so that REINFORCE scores the action that was actually drawn. Continuous
        ones are drawn as mean + std * N(0, 1) with no gradient: torch's Normal.sample (torch.normal)
        reads the std back to the host to check it, which a CUDA graph cannot hold."""
        d = self.dist(feat)
        if self.discrete:
            return d.sample()
        with torch.no_grad():
            return d.rsample()

    def rsample(self, feat: Tensor) -> Tensor:
        """A reparameterised sample (continuous actions), unclipped like `sample`."""
        return self.dist(feat).rsample()

    def mode(self, feat: Tensor) -> Tensor:
        d = self.dist(feat)
        if self.discrete:
            return F.one_hot(d.probs.argmax(-1), self.action_dim).to(feat.dtype)
        return d.base_dist.mean


class ReturnNorm(nn.Module):
    """S = EMA of (P95 - P5) of the lambda-returns; advantages are divided by max(1, S)."""

    def __init__(self, cfg: AgentConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def propose(self, returns: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The scale after seeing `returns`, and the EMA state to `commit` once the step is taken
        (a skipped, non-finite step must not move it)."""
        flat = distributed.gather(returns.detach().flatten().float())  # every rank's returns under data parallelism
        low = torch.quantile(flat, self.cfg.retnorm_low)
        high = torch.quantile(flat, self.cfg.retnorm_high)
        d = self.cfg.retnorm_decay
        # the first step takes the percentiles as they are (chosen on the device: no read-back)
        low = torch.where(self.initialised, d * self.low + (1 - d) * low, low)
        high = torch.where(self.initialised, d * self.high + (1 - d) * high, high)
        return torch.clamp(high - low, min=1.0), (low, high)

    def commit(self, state: tuple[Tensor, Tensor]) -> None:
        self.low.copy_(state[0])
        self.high.copy_(state[1])
        self.initialised.fill_(True)


class Agent(nn.Module):
    def __init__(self, wm: WorldModel, cfg: AgentConfig):
        super().__init__()
        self.cfg, self.wm = cfg, wm
        spec, nets, feat = wm.spec, wm.nets, wm.core.feat_size
        self.actor = Actor(feat, spec.action_dim, spec.discrete, nets.units, nets.layers, cfg)
        self.critic = TwoHot(feat, nets.units, nets.layers, nets.bins)
        self.slow_critic = copy.deepcopy(self.critic).requires_grad_(False)
        self.retnorm = ReturnNorm(cfg)
        self.ensemble = None
        if cfg.penalty > 0:
            # drawn from a fork of the random stream: every later draw (replay windows, latent samples, actions)
            # is then the one a run without the penalty makes, so its world model learns exactly as that run's
            # does offline and the two runs differ by the penalty alone, not by a reseeding
            with torch.random.fork_rng(devices=[]):
                self.ensemble = Ensemble(feat, spec.action_dim, math.prod(wm.core.state_shapes()["stoch"]), nets.units,
                                         cfg.ensemble)

    def param_counts(self) -> dict[str, int]:
        """Parameters per part, as the results files report them (world model / actor / critic)."""
        return {name: sum(p.numel() for p in mod.parameters())
                for name, mod in (("world_model", self.wm), ("actor", self.actor), ("critic", self.critic))}

    def optimizers(self, capturable: bool = False) -> dict[str, torch.optim.Optimizer]:
        """One optimiser per module. `capturable`: Adam keeps its step count on the device, as a CUDA
        graph of the update needs (agents/cudagraph.py)."""
        c = self.cfg
        if capturable and c.optimizer != "adam":
            raise ValueError("a capturable optimiser needs agent.optimizer=adam (LaProp counts its steps on the host)")
        if c.optimizer == "laprop":
            mods = {"wm": self.wm, "actor": self.actor, "critic": self.critic}
            if self.ensemble is not None:
                mods["ensemble"] = self.ensemble
            return {k: LaProp(m.parameters(), lr=c.lr, agc=c.agc, warmup=c.warmup) for k, m in mods.items()}
        opts = {
            "wm": torch.optim.Adam(self.wm.parameters(), lr=c.wm_lr, eps=1e-8, capturable=capturable),
            "actor": torch.optim.Adam(self.actor.parameters(), lr=c.actor_lr, eps=1e-5, capturable=capturable),
            "critic": torch.optim.Adam(self.critic.parameters(), lr=c.critic_lr, eps=1e-5, capturable=capturable),
        }
        if self.ensemble is not None:
            opts["ensemble"] = torch.optim.Adam(self.ensemble.parameters(), lr=c.wm_lr, eps=1e-8, capturable=capturable)
        return opts


class Ensemble(nn.Module):
    """K one-step predictors of the next latent z_{t+1} (its class probabilities) from sg(feat_t) and
    a_t, each an MLP from its own initialisation, trained on replayed transitions. Where they disagree
    (the std over members, averaged over the latent's entries), the world model's imagination has left
    the data: the offline agent's imagined reward is lowered there (agent.penalty)."""

    def __init__(self, feat: int, action_dim: int, out: int, units: int, members: int):
        super().__init__()
        self.members = nn.ModuleList(nn.Sequential(nn.Linear(feat + action_dim, units), nn.LayerNorm(units), nn.SiLU(),
                                                   nn.Linear(units, units), nn.LayerNorm(units), nn.SiLU(),
                                                   nn.Linear(units, out)) for _ in range(members))

    def outputs(self, feat: Tensor, action: Tensor) -> list[Tensor]:
        x = torch.cat([feat, action], -1)
        return [m(x) for m in self.members]  # K x (..., out)

    def forward(self, feat: Tensor, action: Tensor) -> Tensor:
        return torch.stack(self.outputs(feat, action))  # (K, ..., out)

    def loss(self, feat: Tensor, action: Tensor, target: Tensor) -> Tensor:
        return (self(feat, action) - target).pow(2).sum(-1).mean()

    @torch.no_grad()  # the penalty is a stop-gradient quantity
    def disagreement(self, feat: Tensor, action: Tensor) -> Tensor:
        """The members' std (unbiased, as torch.std) averaged over the latent's entries: (...). Written
        out member by member, in place: torch's std over the leading dim of the stacked (K, N, H, out)
        outputs is several times slower on the CPU than the whole ensemble's forward pass."""
        outs = self.outputs(feat, action)
        mean = torch.zeros_like(outs[0])
        for o in outs:
            mean.add_(o)
        mean.div_(len(outs))
        var = torch.zeros_like(mean)
        for o in outs:
            o.sub_(mean)
            var.addcmul_(o, o)
        return var.div_(len(outs) - 1).sqrt_().mean(-1)


def actor_grad_mode(agent: Agent) -> str:
    mode = agent.cfg.actor_grad
    if mode == "auto":
        return "reinforce" if agent.wm.spec.discrete else "dynamics"
    if mode == "dynamics" and agent.wm.spec.discrete:
        raise ValueError("agent.actor_grad=dynamics needs continuous actions; use reinforce or auto")
    return mode


def imagine_losses(agent: Agent, starts: dict[str, Tensor], start_cont: Tensor) -> tuple[dict, dict, tuple]:
    """Actor and critic losses from imagined rollouts that start at each of `starts`, the posterior
    states (B, T, ...) (N = B*T rollouts, start_cont (N,)), the metrics,
    and the return normaliser's new state (committed by the caller once the step is taken). With
    dynamics gradients the losses reach into the world model and critic; the caller must apply each
    loss to its own module's parameters only."""
    cfg, wm = agent.cfg, agent.wm
    dynamics = actor_grad_mode(agent) == "dynamics"
    # Every head reads the whole rollout (N, H+1, F) and its output is sliced: a head on feat[:, 1:]
    # or feat[:, :-1] would first copy the features, the largest tensor of the update.
    with torch.set_grad_enabled(dynamics):  # REINFORCE needs no gradient through the dynamics
        # the actor reads sg(state): dynamics gradients reach it through its actions only
        policy = (lambda f: agent.actor.rsample(f.detach())) if dynamics else agent.actor.sample
        feat, action = imagine_all(wm.core, starts, policy, cfg.horizon)  # (N, H+1, F), (N, H+1, A)
        # with dynamics gradients the reward, continuation and critic heads all read feat with gradients:
        # their first layers run as one product (the project's own heads; other modules one by one)
        shared = dynamics and type(wm.reward) is TwoHot and type(agent.critic) is TwoHot and isinstance(wm.cont, nn.Sequential)
        if shared:
            reward_out, cont_out, critic_out = shared_input(feat, [wm.reward.net, wm.cont, agent.critic.net])
            reward_logits, critic_logits = full(reward_out), full(critic_out)  # as TwoHot.forward
        else:
            reward_logits, cont_out = wm.reward(feat), wm.cont(feat)
        reward = wm.reward.mean(reward_logits)[:, 1:]  # (N, H) reward on arrival at step t+1
        cont = torch.sigmoid(full(cont_out).squeeze(-1))[:, 1:]  # (N, H)
        if agent.ensemble is not None:  # the step from t to t+1 is as uncertain as the members disagree on it
            with torch.no_grad():
                doubt = agent.ensemble.disagreement(feat[:, :-1].detach(), action[:, :-1].detach())  # (N, H)
            reward = reward - cfg.penalty * doubt
    # one critic pass serves the value (through which dynamics gradients reach the actor) and the
    # critic's own loss (which `update` applies to the critic's parameters only)
    if not shared:
        critic_logits = agent.critic(feat if dynamics else feat.detach())  # (N, H+1, K)
    with torch.set_grad_enabled(dynamics):
        value = agent.critic.mean(critic_logits if dynamics else critic_logits.detach())  # (N, H+1)
        ret = lambda_return(reward, value, cfg.gamma * cont, cfg.lam)  # (N, H)
    with torch.no_grad():
        # w_t: probability that step t is still inside the episode, seen from the start state.
        alive = torch.cat([start_cont[:, None], cont[:, :-1]], 1)  # (N, H)
        weight = torch.cumprod(alive, 1)  # (N, H)
        scale, retnorm_state = agent.retnorm.propose(ret)
        adv = (ret - value[:, :-1]) / scale  # (N, H)
        slow = agent.slow_critic.mean(agent.slow_critic(feat.detach()))[:, :-1]  # (N, H)

    dist = agent.actor.dist(feat.detach())  # (N, H+1): the last step's action is never scored
    ent = dist.entropy()[:, :-1]  # (N, H)
    if dynamics:
        actor_loss = -(weight * (ret / scale + cfg.entropy * ent)).mean()
    else:
        logp = dist.log_prob(action)[:, :-1]  # (N, H)
        actor_loss = -(weight * (adv * logp + cfg.entropy * ent)).mean()

    logp_v = critic_logits.log_softmax(-1)[:, :-1]  # (N, H, K)
    target = ret.detach()
    critic_loss = (weight * (agent.critic.nll(logp_v, target) + cfg.slow_critic_reg * agent.critic.nll(logp_v, slow))).mean()

    metrics = {
        "train/return_scale": scale, "train/imag_return": target.mean(), "train/imag_reward": reward.detach().mean(),
        **({"train/disagreement": doubt.mean()} if agent.ensemble is not None else {}),
        "train/actor_entropy": ent.mean().detach(), "train/value": value.detach().mean(),
        "train/advantage": adv.abs().mean(),
    }
    return {"actor": actor_loss, "critic": critic_loss}, metrics, retnorm_state, ret.detach()


def behaviour_loss(actor: Actor, feat: Tensor, action: Tensor, is_first: Tensor) -> Tensor:
    """The actor's distance to the replayed actions (`agent.bc`): at the posterior state of row t
    (sg(feat), (B, T, F)) against the action taken there, which the replay stores with row t+1 (its
    action is the one into it); rows whose successor starts an episode are left out. Continuous actions:
    the squared distance of the actor's mean, per action dimension (TD3+BC); discrete ones: the negative
    log-likelihood of the taken action."""
    dist = actor.dist(feat[:, :-1].detach())
    taken = action[:, 1:]  # (B, T-1, A)
    if actor.discrete:
        err = -dist.log_prob(taken)
    else:
        err = (dist.base_dist.mean - taken).pow(2).mean(-1)
    keep = 1.0 - is_first[:, 1:].float()  # (B, T-1)
    return (err * keep).sum() / keep.sum().clamp_min(1.0)


def replay_returns(reward: Tensor, is_first: Tensor, is_terminal: Tensor, boot: Tensor, gamma: float,
                   lam: float) -> tuple[Tensor, Tensor]:
    """Lambda-returns along a replayed window (B, T) in the replay's layout (reward and is_terminal of
    row t belong to arriving at it), bootstrapped from `boot`, the imagination return of each row's
    state (DreamerV3's `repl_loss`):

        R_{T-1} = boot_{T-1}
        R_t = r_{t+1} + gamma (1 - term_{t+1}) [ (1 - lam_{t+1}) boot_{t+1} + lam_{t+1} R_{t+1} ]

    with lam_{t+1} = lam, or 0 where row t+1 ends its episode (it bootstraps, nothing after it counts).
    Row t ends its episode where row t+1 starts one; such rows get weight 0 (their return would run
    into the next episode). Returns the returns (B, T) and the weights (B, T)."""
    B, T = reward.shape
    last = torch.zeros_like(reward)
    last[:, :-1] = is_first[:, 1:].float()
    last[:, -1] = is_terminal[:, -1].float()
    live = gamma * (1 - is_terminal.float())  # (B, T) discount of the step into row t
    rets = [boot[:, -1]]
    for t in reversed(range(T - 1)):
        mix = lam * (1 - last[:, t + 1])
        rets.append(reward[:, t + 1] + live[:, t + 1] * ((1 - mix) * boot[:, t + 1] + mix * rets[-1]))
    return torch.stack(rets[::-1], 1), 1 - last


def replay_value_loss(agent: Agent, feat: Tensor, batch: dict, boot: Tensor) -> Tensor:
    """The critic on replayed posterior states sg(feat) (B, T, F) against `replay_returns`, plus the
    slow-critic regulariser; the last row of each window has no return of its own and is left out."""
    cfg = agent.cfg
    ret, weight = replay_returns(batch["reward"], batch["is_first"], batch["is_terminal"], boot, cfg.gamma, cfg.lam)
    feat = feat.detach()  # the heads read every row and drop the last from their outputs (no copy of feat)
    logp = agent.critic(feat).log_softmax(-1)[:, :-1]  # (B, T-1, K)
    with torch.no_grad():
        slow = agent.slow_critic.mean(agent.slow_critic(feat))[:, :-1]
    loss = agent.critic.nll(logp, ret[:, :-1]) + cfg.slow_critic_reg * agent.critic.nll(logp, slow)
    return (weight[:, :-1] * loss).mean()


def autocast(agent: Agent, cache: bool = True):
    """The context the update's forward passes run in: bfloat16 autocast with agent.precision=bf16
    (matrix products in bf16; weights, gradients' accumulation, optimiser state, the heads'
    distributions and the losses in float32), nothing otherwise. `cache=False` for a CUDA graph's
    capture (autocast's cache of cast weights must not outlive it)."""
    device = next(agent.parameters()).device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=agent.cfg.precision == "bf16", cache_enabled=cache)


def mutable_state(agent: Agent, opts: dict[str, torch.optim.Optimizer]) -> list[Tensor]:
    """Every tensor an update step writes: the trained weights, the optimisers' state, the return
    normaliser's buffers and the slow critic."""
    out = [p for p in agent.parameters()] + list(agent.retnorm.buffers())
    for opt in opts.values():
        for group in opt.param_groups:
            for p in group["params"]:
                out += [v for v in opt.state.get(p, {}).values() if isinstance(v, Tensor)]
    return out


def update(agent: Agent, opts: dict[str, torch.optim.Optimizer], batch: dict,
           graphable: bool = False) -> tuple[dict[str, Tensor], dict | None]:
    """One learner step: world model, then actor and critic in imagination, then the slow critic.
    A batch with replay context ("start", and "burn" where states are stored every k rows) starts each
    window from the state stored before it. Returns the metrics and the posterior states (B, T, ...),
    for the replay to refresh; a non-finite loss skips the whole step (states None) so it never
    reaches the weights.

    `graphable=True`: the same step with no read-back to the host, so that a CUDA graph can hold it
    (agents/cudagraph.py; Adam only, one process). The optimisers step unconditionally and, where a
    loss or a gradient norm is non-finite, every tensor the step wrote (`mutable_state`) is put back
    on the device; optimiser state that the step created is put back to zeros, a fresh Adam's. The
    states come back always; metrics["train/nonfinite"] says whether the step was undone."""
    cfg = agent.cfg
    if graphable and (cfg.optimizer != "adam" or distributed.active()):
        raise ValueError("a graphable update needs agent.optimizer=adam and one process")
    with autocast(agent, cache=not graphable):
        start = agent.wm.context_state(batch["start"], batch.get("burn")) if "start" in batch else None
        total, terms, states, feat, wm_metrics = agent.wm.loss(
            batch["obs"], batch["action"], batch["reward"], batch["is_first"], batch["is_terminal"], start=start)
        starts = {k: v.detach() for k, v in states.items()}  # (B, T, ...)
        start_cont = 1.0 - batch["is_terminal"].flatten().float()  # (B*T,)
        ac_losses, ac_metrics, retnorm_state, ret = imagine_losses(agent, starts, start_cont)
        repval = agent.wm.loss_cfg.repval
        if repval:
            boot = ret[:, 0].reshape(batch["reward"].shape)  # (B, T) the imagination return from each row's state
            ac_losses["repval"] = replay_value_loss(agent, feat, batch, boot)

        if cfg.bc > 0:
            bc = behaviour_loss(agent.actor, feat, batch["action"], batch["is_first"])
            ac_losses["actor"] = ac_losses["actor"] + cfg.bc * bc
            ac_metrics["train/bc_distance"] = bc.detach()
        if agent.ensemble is not None:  # one-step predictors on replayed transitions: sg(feat_t), a_t -> z_{t+1}
            z = states["stoch"].detach().flatten(-2)  # (B, T, S x C)
            ac_losses["ensemble"] = agent.ensemble.loss(feat[:, :-1].detach(), batch["action"][:, 1:], z[:, 1:])

    losses = {"wm": total, "actor": ac_losses["actor"], "critic": ac_losses["critic"] + repval * ac_losses.get("repval", 0.0)}
    if agent.ensemble is not None:
        losses["ensemble"] = ac_losses["ensemble"]
    if not graphable and not distributed.all_true(all(torch.isfinite(v) for v in losses.values()), total.device):  # on every rank
        return {"train/nonfinite": torch.ones(())}, None

    for opt in opts.values():
        opt.zero_grad(set_to_none=True)
    clips = {"wm": (agent.wm, cfg.wm_clip), "actor": (agent.actor, cfg.ac_clip), "critic": (agent.critic, cfg.ac_clip)}
    if agent.ensemble is not None:
        clips["ensemble"] = (agent.ensemble, cfg.wm_clip)
    for name, v in losses.items():  # each loss trains its own module only (dynamics gradients reach further)
        # the actor's loss and the critic's share the critic's pass over the rollout: keep it for the latter
        v.backward(inputs=list(clips[name][0].parameters()), retain_graph=name == "actor")
    distributed.average_grads([p for mod, _ in clips.values() for p in mod.parameters()])  # data parallel: the ranks' mean
    if cfg.optimizer == "laprop":  # AGC inside the optimiser bounds each tensor's update instead
        clips = {name: (mod, float("inf")) for name, (mod, _) in clips.items()}
    norms = {name: nn.utils.clip_grad_norm_(mod.parameters(), clip) for name, (mod, clip) in clips.items()}
    if graphable:
        ok = torch.stack([torch.isfinite(v).all() for v in [*losses.values(), *norms.values()]]).all()
        kept = mutable_state(agent, opts)
        before = [t.detach().clone() for t in kept]
    elif not all(torch.isfinite(n) for n in norms.values()):
        for opt in opts.values():
            opt.zero_grad(set_to_none=True)
        return {"train/nonfinite": torch.ones(())}, None
    for opt in opts.values():
        opt.step()
    agent.retnorm.commit(retnorm_state)
    with torch.no_grad():
        for slow, fast in zip(agent.slow_critic.parameters(), agent.critic.parameters()):
            slow.lerp_(fast, cfg.slow_critic_mix)
        if graphable:  # undo the step where it was not finite
            for t, old in zip(kept, before):
                t.copy_(torch.where(ok, t, old))
            seen = {id(t) for t in kept}
            for t in mutable_state(agent, opts):
                if id(t) not in seen:  # created by this step
                    t.copy_(torch.where(ok, t, torch.zeros_like(t)))

    metrics = {f"loss/{k}": v.detach() for k, v in terms.items()}
    metrics.update({f"loss/{k}": v.detach() for k, v in ac_losses.items()})
    metrics.update({f"train/grad_norm_{k}": v for k, v in norms.items()})
    metrics.update({f"train/{k}": v for k, v in wm_metrics.items()})
    metrics.update(ac_metrics)
    metrics["train/nonfinite"] = (~ok).float() if graphable else torch.zeros(())
    return metrics, {k: v.detach() for k, v in states.items()}
