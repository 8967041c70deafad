"""Return-conditioned sequence policies trained on a dataset (`longdream train algo=decision offline=<id>`).

Tokens, per step t: the return-to-go R_t (the rewards still to come, scaled by `return_scale`), the
state s_t and the action a_t, each embedded to d_model, plus an embedding of the step index; the
sequence (R_1, s_1, a_1, R_2, s_2, a_2, ...) runs through a causal sequence core and the output at
each state token predicts that step's action (mean-squared error on actions scaled to [-1, 1], or
cross-entropy over discrete actions). Acting conditions on a target return and lowers it by each
reward received, as Decision Transformer does.

`decision.core`:
- `ssm` (Decision-SSM, as Decision S4): a stack of S5 blocks (worldmodels/s5wm.py: complex diagonal
  state space layers on the shared linear scan). It trains on whole episodes from their first step
  (padded to the batch's longest, padding masked), so the state it acts from after t steps is the one
  it was trained on; it acts recurrently, one token at a time, O(1) per step whatever the episode's
  length (a test holds the recurrent pass equal to the parallel one).
- `transformer` (Decision Transformer): a GPT-style causal Transformer over windows of `context`
  steps drawn uniformly from the dataset; it acts on the last `context` steps, O(context) per step.
- `bc` (behaviour cloning): the `ssm` network without return tokens (tokens s_t, a_t).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from agents.offline.dataset import to_unit

CORES = ("ssm", "transformer", "bc")
EPISODE_WEIGHTS = ("uniform", "length")


@dataclass(frozen=True)
class DecisionConfig:
    core: str = "ssm"  # ssm | transformer | bc (see the module docstring)
    d_model: int = 128
    layers: int = 3
    d_state: int = 64  # ssm: complex states per layer
    # ssm/bc: the S5 step sizes' initial range (log-uniform). A token enters the state scaled by about
    # dt (B_bar = (Lambda_bar - 1) / Lambda B) beside the direct path D u: with the world model's range
    # (1e-3 to 1e-1) the earlier tokens reach an output at about 1% of the token itself at
    # initialisation, 2-3% with this one. Both ranges are measured in the README's offline tables.
    dt_min: float = 1e-2
    dt_max: float = 1.0
    heads: int = 1  # transformer
    context: int = 20  # transformer: steps per window (Decision Transformer's K)
    batch_size: int = 64  # transformer: windows per update; ssm/bc: as many steps per update, in whole episodes
    # ssm/bc: how whole episodes are drawn. `length` (the default): in proportion to the episode's
    # length, as Decision Transformer's own sampler draws the trajectory of each window, so a long
    # episode's steps (its first one included) weigh more, as the Transformer's windows weigh a long
    # episode's first step once per window that covers it. `uniform`: each episode equally likely, so
    # every step of the data weighs the same (an episode's first step once per episode).
    episode_weight: str = "length"
    updates: int = 10_000
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup: int = 1_000  # linear learning-rate warm-up (updates)
    dropout: float = 0.1
    grad_clip: float = 0.25
    return_scale: float = 1_000.0  # returns-to-go are divided by this
    target_return: float | None = None  # acting's target; None: the dataset's best episode return
    eval_every: int = 2_000  # updates between evaluations (0: only at the end)
    eval_episodes: int = 10

    def __post_init__(self):
        from agents.config import ConfigError

        if self.core not in CORES:
            raise ConfigError(f"decision.core must be one of {', '.join(CORES)}, got '{self.core}'")
        if min(self.d_model, self.layers, self.d_state, self.heads, self.context, self.batch_size) < 1 or self.updates < 0:
            raise ConfigError("decision sizes (d_model, layers, d_state, heads, context, batch_size) must be at least 1")
        if not 0 < self.dt_min <= self.dt_max:
            raise ConfigError(f"decision.dt_min and decision.dt_max must satisfy 0 < dt_min <= dt_max, got {self.dt_min:g} and {self.dt_max:g}")
        if self.episode_weight not in EPISODE_WEIGHTS:
            raise ConfigError(f"decision.episode_weight must be one of {', '.join(EPISODE_WEIGHTS)}, got '{self.episode_weight}'")
        if self.d_model % self.heads:
            raise ConfigError(f"decision.d_model ({self.d_model}) must be a multiple of decision.heads ({self.heads})")

    @property
    def episode_draw(self) -> str | None:
        """How training batches draw whole episodes (`episode_weight`); None for the Transformer, which
        trains on windows instead."""
        return None if self.core == "transformer" else self.episode_weight


class DecisionModel(nn.Module):
    def __init__(self, cfg: DecisionConfig, obs_dim: int, action_dim: int, discrete: bool, max_steps: int):
        super().__init__()
        self.cfg, self.discrete, self.action_dim, self.max_steps = cfg, discrete, action_dim, max_steps
        self.returns = cfg.core != "bc"
        self.per_step = 3 if self.returns else 2
        d = cfg.d_model
        self.embed_return = nn.Linear(1, d)
        self.embed_state = nn.Linear(obs_dim, d)
        self.embed_action = nn.Linear(action_dim, d)
        self.embed_time = nn.Embedding(max_steps + 1, d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.core == "transformer":
            layer = nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, cfg.dropout, activation="gelu", batch_first=True,
                                               norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
            self.pos = nn.Parameter(torch.zeros(self.per_step * cfg.context, d))
        else:
            from worldmodels.s5wm import S5Block, S5WMConfig

            ssm = S5WMConfig(d_model=d, d_state=cfg.d_state, layers=cfg.layers, hidden=d, stoch=1, classes=1,
                             dt_min=cfg.dt_min, dt_max=cfg.dt_max)
            self.blocks = nn.ModuleList(S5Block(d, cfg.d_state, ssm) for _ in range(cfg.layers))
        self.out_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, action_dim)

    # --- tokens ---
    def tokens(self, rtg: Tensor, obs: Tensor, action: Tensor, t: Tensor) -> Tensor:
        """(B, T) returns-to-go, (B, T, O) states, (B, T, A) actions, (B, T) step indices -> (B, k T, d)."""
        time_ = self.embed_time(t.clamp(0, self.max_steps))
        parts = [self.embed_state(obs) + time_, self.embed_action(action) + time_]
        if self.returns:
            parts.insert(0, self.embed_return(rtg[..., None]) + time_)
        x = torch.stack(parts, 2).flatten(1, 2)  # interleaved per step
        return self.drop(self.norm(x))

    def forward(self, rtg: Tensor, obs: Tensor, action: Tensor, t: Tensor) -> Tensor:
        """Action predictions (B, T, A) (scaled to [-1, 1], or logits) from each step's state token."""
        x = self.tokens(rtg, obs, action, t)
        B, N, _ = x.shape
        if self.cfg.core == "transformer":
            mask = torch.triu(torch.full((N, N), float("-inf"), device=x.device), 1)
            y = self.blocks(x + self.pos[:N], mask=mask, is_causal=True)
        else:
            reset = torch.zeros(B, N, device=x.device)
            y = x
            for blk in self.blocks:
                y, _ = blk(y, self._zero_state(blk, B, x), reset)
        y = y.view(B, N // self.per_step, self.per_step, -1)[:, :, self.per_step - 2]  # the state tokens
        return self._head(y)

    def _head(self, y: Tensor) -> Tensor:
        out = self.head(self.out_norm(y))
        return out if self.discrete else torch.tanh(out)

    @staticmethod
    def _zero_state(blk, B: int, x: Tensor) -> dict[str, Tensor]:
        return {k: x.new_zeros(B, *s) for k, s in blk.state_shapes.items()}

    def loss(self, batch: dict) -> Tensor:
        pred = self(batch["rtg"], batch["obs"], batch["action"], batch["t"])
        mask = batch["mask"]
        if self.discrete:
            nll = F.cross_entropy(pred.flatten(0, 1), batch["action"].argmax(-1).flatten(), reduction="none")
            return (nll * mask.flatten()).sum() / mask.sum()
        err = (pred - batch["action"]).pow(2).mean(-1)
        return (err * mask).sum() / mask.sum()


class RecurrentActor:
    """The ssm/bc model one token at a time: S5 steppers carry each block's state, O(1) per step."""

    def __init__(self, model: DecisionModel, batch: int = 1):
        self.model = model
        x = next(model.parameters())
        self.steppers = [blk.stepper(model._zero_state(blk, batch, x)) for blk in model.blocks]

    def _push(self, tok: Tensor) -> Tensor:
        y = tok
        for s in self.steppers:
            y = s.step(y)
        return y

    def step(self, rtg: Tensor, obs: Tensor, t: Tensor) -> Tensor:
        """Feed R_t (if the model reads returns) and s_t; returns the prediction of a_t (B, A)."""
        m = self.model
        time_ = m.embed_time(t.clamp(0, m.max_steps))
        if m.returns:
            self._push(m.drop(m.norm(m.embed_return(rtg[..., None]) + time_)))
        y = self._push(m.drop(m.norm(m.embed_state(obs) + time_)))
        return m._head(y)

    def record(self, action: Tensor, t: Tensor) -> None:
        """Feed the action taken, a_t."""
        m = self.model
        self._push(m.drop(m.norm(m.embed_action(action) + m.embed_time(t.clamp(0, m.max_steps)))))


# --- data -----------------------------------------------------------------------------------------

class Episodes:
    """A dataset's episodes as padded tensors: obs (N, L, O), action (N, L, A) in [-1, 1] or one-hot,
    reward (N, L), returns-to-go (N, L) (scaled), length (N,)."""

    def __init__(self, dataset, return_scale: float):
        eps = dataset.episodes
        space = dataset.action_space
        self.discrete = dataset.discrete
        self.action_dim = int(space.n) if self.discrete else int(np.prod(space.shape))
        if not self.discrete:
            self.low, self.high = (torch.as_tensor(space.low, dtype=torch.float32), torch.as_tensor(space.high, dtype=torch.float32))
        N, L = len(eps), max(len(e) for e in eps)
        O = int(np.prod(eps[0].obs.shape[1:]))
        self.length = torch.tensor([len(e) for e in eps])
        self.obs = torch.zeros(N, L, O)
        self.action = torch.zeros(N, L, self.action_dim)
        self.reward = torch.zeros(N, L)
        for i, e in enumerate(eps):
            T = len(e)
            self.obs[i, :T] = torch.as_tensor(e.obs[:T], dtype=torch.float32).reshape(T, O)
            self.action[i, :T] = self.to_model(torch.as_tensor(e.action))
            self.reward[i, :T] = torch.as_tensor(e.reward)
        self.rtg = self.reward.flip(1).cumsum(1).flip(1) / return_scale  # zero past the end
        self.mean, self.std = self._stats()
        self.obs = (self.obs - self.mean) / self.std
        self.returns = self.reward.sum(1)

    def _stats(self) -> tuple[Tensor, Tensor]:
        mask = torch.arange(self.obs.shape[1])[None] < self.length[:, None]
        x = self.obs[mask]
        return x.mean(0), x.std(0).clamp_min(1e-6)

    def to_model(self, action: Tensor) -> Tensor:
        if self.discrete:
            return F.one_hot(action.long(), self.action_dim).float()
        return to_unit(action, self.low, self.high)

    def to_env(self, action: Tensor) -> Tensor:
        if self.discrete:
            return F.one_hot(action.argmax(-1), self.action_dim).float()
        return self.low + (action.clamp(-1, 1) + 1) / 2 * (self.high - self.low)

    def windows(self, n: int, K: int, gen: torch.Generator) -> dict:
        """n windows of K steps, every step of every episode equally likely to end one (shorter
        windows at an episode's start are left-padded, their padding masked)."""
        ends = torch.cat([torch.arange(n_) for n_ in self.length.tolist()])
        owner = torch.repeat_interleave(torch.arange(len(self.length)), self.length)
        pick = torch.randint(len(ends), (n,), generator=gen)
        ep, end = owner[pick], ends[pick]  # window covers steps end-K+1 .. end
        steps = end[:, None] - K + 1 + torch.arange(K)[None]  # (n, K)
        mask = (steps >= 0).float()
        s = steps.clamp_min(0)
        idx = ep[:, None].expand_as(s)
        return {"obs": self.obs[idx, s] * mask[..., None], "action": self.action[idx, s] * mask[..., None],
                "rtg": self.rtg[idx, s] * mask, "t": s, "mask": mask}

    def whole(self, steps: int, gen: torch.Generator, weight: str = "uniform") -> dict:
        """Whole episodes from their first step, about `steps` steps in all (at least one episode),
        padded to the longest of them. `weight`: `uniform` draws every episode alike, `length` in
        proportion to its length (see DecisionConfig.episode_weight)."""
        length = self.length.float()
        if weight == "length":  # the mean length of a draw is then sum(L^2) / sum(L)
            n = max(1, round(steps * float(length.sum()) / float((length ** 2).sum())))
            ep = torch.multinomial(length, n, replacement=True, generator=gen)
        elif weight == "uniform":
            n = max(1, round(steps / float(length.mean())))
            ep = torch.randint(len(self.length), (n,), generator=gen)
        else:
            raise ValueError(f"episode weight must be one of {', '.join(EPISODE_WEIGHTS)}, got '{weight}'")
        drawn = self.length[ep]
        L = int(drawn.max())
        t = torch.arange(L)[None].expand(n, L)
        mask = (t < drawn[:, None]).float()
        return {"obs": self.obs[ep, :L], "action": self.action[ep, :L], "rtg": self.rtg[ep, :L], "t": t, "mask": mask}


# --- acting ---------------------------------------------------------------------------------------

@torch.no_grad()
def run_episode(model: DecisionModel, data: Episodes, env, obs_key: str, target: float, time_limit: int,
                trace: dict | None = None) -> float:
    """One episode conditioned on `target` (unscaled); returns its return. `trace` (a dict) receives
    what the model saw and chose at each step: rtg, obs (normalised), action (the model's units)."""
    from torchrl.envs.utils import step_mdp

    model.eval()
    scale = model.cfg.return_scale
    td = env.reset()
    rtg, total = target / scale, 0.0
    recurrent = RecurrentActor(model) if model.cfg.core != "transformer" else None
    hist = {"obs": [], "action": [], "rtg": [], "t": []}
    K = model.cfg.context
    for t in range(time_limit):
        obs = ((td[obs_key].float().reshape(1, -1) - data.mean) / data.std)
        tt = torch.tensor([t])
        if recurrent is not None:
            a = recurrent.step(torch.tensor([rtg]), obs, tt)
        else:
            hist["obs"].append(obs[0])
            hist["rtg"].append(torch.tensor(rtg))
            hist["t"].append(tt[0])
            hist["action"].append(torch.zeros(data.action_dim))  # the slot of a_t: causal, never read for a_t
            win = {k: torch.stack(v[-K:]) for k, v in hist.items()}
            pad = K - len(win["t"])  # left-padded with zeros as the training windows are
            win = {k: torch.cat([v.new_zeros(pad, *v.shape[1:]), v])[None] for k, v in win.items()}
            a = model(win["rtg"], win["obs"], win["action"], win["t"])[:, -1]
        if data.discrete:
            a = F.one_hot(a.argmax(-1), data.action_dim).float()
        if recurrent is not None:
            recurrent.record(a, tt)
        else:
            hist["action"][-1] = a[0]
        if trace is not None:
            for k, v in (("rtg", torch.tensor(rtg)), ("obs", obs[0]), ("action", a[0])):
                trace.setdefault(k, []).append(v)
        td["action"] = data.to_env(a)[0].to(td.device if td.device is not None else "cpu")
        td = env.step(td)
        r = float(td["next", "reward"])
        if trace is not None:
            trace.setdefault("reward", []).append(torch.tensor(r))
        total += r
        rtg -= r / scale
        if bool(td["next", "done"]):
            break
        td = step_mdp(td)
    model.train()
    return total


# --- training -------------------------------------------------------------------------------------

class _NoReplay:
    def save(self, path):
        return None


def train(cfg, dcfg: DecisionConfig) -> dict:
    """Train on the dataset `cfg.train.offline`; evaluate in the dataset's env; checkpoint and resume."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from agents import checkpoint
    from agents.offline.dataset import load_for
    from agents.train import _collect_env

    t = cfg.train
    ds = load_for(cfg)
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    data = Episodes(ds, dcfg.return_scale)
    model = DecisionModel(dcfg, data.obs.shape[-1], data.action_dim, data.discrete, cfg.env.time_limit)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed_time" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed_time" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": dcfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=dcfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: min(1.0, (u + 1) / max(dcfg.warmup, 1)))
    run_dir = Path(t.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    counters = {"updates": 0, "wall_s": 0.0}
    ckpt = checkpoint.latest(run_dir)
    if ckpt is not None:
        payload = checkpoint.load(ckpt)[0]
        model.load_state_dict(payload["agent"])
        opt.load_state_dict(payload["opt"])
        sched.load_state_dict(payload["sched"])
        counters.update(payload["counters"])
        gen.set_state(payload["gen"])
        tqdm.write(f"resuming {run_dir} from {ckpt.name} at update {counters['updates']:,}")
    target = dcfg.target_return if dcfg.target_return is not None else float(data.returns.max())
    writer = SummaryWriter(run_dir / "tb")
    env = _collect_env(cfg.env, t.seed + 40_000, {})
    obs_key = ds.info.get("obs_key", "observation")

    acted = []  # one entry per acting step: the final evaluation's give its time per step

    def evaluate(n: int) -> list[float]:
        out = []
        for _ in range(n):
            trace = {}
            out.append(run_episode(model, data, env, obs_key, target, cfg.env.time_limit, trace=trace))
            acted.extend(trace["reward"])
        return out

    def save():
        checkpoint.save(run_dir, counters["updates"], {"agent": model.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "counters": dict(counters), "gen": gen.get_state()}, _NoReplay())

    clock = checkpoint.Clock(counters, t.checkpoint_every)
    params = sum(p.numel() for p in model.parameters())
    bar = tqdm(total=dcfg.updates, initial=counters["updates"], unit="upd", disable=not t.progress, desc=dcfg.core)
    curve = []
    while counters["updates"] < dcfg.updates:
        batch = (data.windows(dcfg.batch_size, dcfg.context, gen) if dcfg.episode_draw is None
                 else data.whole(dcfg.batch_size * dcfg.context, gen, dcfg.episode_draw))
        loss = model.loss(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), dcfg.grad_clip)
        opt.step()
        sched.step()
        counters["updates"] += 1
        bar.update(1)
        u = counters["updates"]
        if u % 100 == 0:
            value = loss.item()
            writer.add_scalar("loss/action", value, u)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if dcfg.eval_every and u % dcfg.eval_every == 0 and u < dcfg.updates:
            ret = float(np.mean(evaluate(dcfg.eval_episodes)))
            curve.append([u, ret])
            writer.add_scalar("eval/return", ret, u)
        clock.maybe_save(save)
    bar.close()
    clock.stop(save)
    tic = time.perf_counter()
    steps_before = len(acted)
    returns = evaluate(dcfg.eval_episodes)
    act_ms = 1000 * (time.perf_counter() - tic) / max(len(acted) - steps_before, 1)
    env.close()
    writer.add_scalar("eval/return", float(np.mean(returns)), counters["updates"])
    writer.close()
    res = {"method": {"ssm": "decision-ssm", "transformer": "decision-transformer", "bc": "bc"}[dcfg.core],
           "dataset": t.offline, "env": cfg.env.id, "seed": t.seed, "updates": counters["updates"],
           "eval_returns": returns, "eval_return": float(np.mean(returns)), "target_return": target,
           "dataset_mean_return": float(data.returns.mean()), "params": params, "wall_s": counters["wall_s"],
           "config": asdict(dcfg), "curve": curve, "normalized_score": normalized(float(np.mean(returns)), ds.info),
           "act_cost": "O(1) per step (recurrent)" if dcfg.core != "transformer" else f"O(context={dcfg.context}) per step",
           "act_ms_per_step": act_ms}
    (run_dir / "result.json").write_text(json.dumps(res, indent=1))
    res.update(run_dir=str(run_dir), checkpoint=str(checkpoint.latest(run_dir)), tensorboard=str(run_dir / "tb"))
    return res


def normalized(ret: float, info: dict) -> float | None:
    """100 (R - R_random) / (R_expert - R_random) with the dataset's own references, where it has them."""
    lo, hi = info.get("ref_random"), info.get("ref_expert")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)) or hi == lo:
        return None
    return 100 * (ret - lo) / (hi - lo)
