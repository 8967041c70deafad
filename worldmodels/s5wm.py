"""S5WM: a world model whose sequence core is a stack of S5 layers (Smith et al. 2023, "Simplified
State Space Layers"), as in S5WM (Deng et al. 2023) and R2I (Samsami et al. 2024).

    u_t = MLP([z_{t-1}, a_{t-1}])                     input token
    x_t = Lambda_bar * x_{t-1} + B_bar u_t            per layer, complex diagonal (P states)
    y_t = Re(C x_t) + D u_t                           MIMO readout
    h_t = blocks(u_t)                                 LN -> S5 -> GELU -> Linear (+res), LN -> MLP (+res)
    p(z_t | h_t) prior,  q(z_t | x_obs_t) posterior from the observation alone
    feat_t = [h_t, z_t]

Lambda = -exp(log_lambda_re) + i lambda_im keeps Re(Lambda) < 0, so |Lambda_bar| = |exp(Lambda dt)| < 1
(stable); zero-order hold gives Lambda_bar = exp(Lambda dt), B_bar = (Lambda_bar - 1) / Lambda * B.
The recurrence is linear, so the training path is one `linear_scan` over T per layer, with the state
reset at `is_first` (a_t <- a_t (1 - is_first_t)); acting and imagination call the same code with T = 1
and carry the state, so both modes agree. No T x T tensors: memory is linear in T.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from worldmodels.base import Policy, State
from worldmodels.nets import categorical_kl, mlp, sample_onehot, unimix_probs
from worldmodels.ops.scan import linear_scan

SIZES = {
    "xs": dict(d_model=64, d_state=32, layers=2, hidden=64, stoch=8, classes=8),
    "s": dict(d_model=512, d_state=256, layers=4, hidden=512, stoch=32, classes=32),
    "m": dict(d_model=768, d_state=384, layers=6, hidden=768, stoch=32, classes=32),
}


@dataclass(frozen=True)
class S5WMConfig:
    size: str = "xs"
    d_model: int | None = None  # width of the S5 blocks (H)
    d_state: int | None = None  # complex states per layer (P)
    layers: int | None = None  # S5 blocks
    hidden: int | None = None  # width of the input, prior and posterior MLPs
    stoch: int | None = None
    classes: int | None = None
    unimix: float = 0.01
    dt_min: float = 1e-3
    dt_max: float = 1e-1

    def __post_init__(self):
        for key, value in SIZES[self.size].items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)


class S5Layer(nn.Module):
    """MIMO diagonal SSM over (B, T, H) with complex state (B, P)."""

    def __init__(self, H: int, P: int, dt_min: float, dt_max: float):
        super().__init__()
        # S4D-Lin initialisation: Lambda_n = -1/2 + i pi n
        self.log_lambda_re = nn.Parameter(torch.full((P,), math.log(0.5)))
        self.lambda_im = nn.Parameter(math.pi * torch.arange(P, dtype=torch.float32))
        self.log_dt = nn.Parameter(torch.empty(P).uniform_(math.log(dt_min), math.log(dt_max)))
        self.B = nn.Parameter(torch.randn(P, H, 2) / math.sqrt(2 * H))  # (P, H) complex as (re, im)
        self.C = nn.Parameter(torch.randn(H, P, 2) / math.sqrt(P))  # (H, P) complex
        self.D = nn.Parameter(torch.randn(H))

    def discrete(self) -> tuple[Tensor, Tensor]:
        lam = torch.complex(-self.log_lambda_re.exp(), self.lambda_im)  # (P,)
        lam_bar = torch.exp(lam * self.log_dt.exp())  # (P,)
        B_bar = ((lam_bar - 1) / lam)[:, None] * torch.view_as_complex(self.B)  # (P, H)
        return lam_bar, B_bar

    def forward(self, u: Tensor, x0: Tensor, reset: Tensor) -> tuple[Tensor, Tensor]:
        B, T, H = u.shape
        lam_bar, B_bar = self.discrete()
        cdt = torch.complex128 if u.dtype == torch.float64 else torch.complex64
        bu = u.to(cdt) @ B_bar.to(cdt).T  # (B, T, P)
        a = lam_bar.to(cdt).expand(B, T, -1)  # (B, T, P)
        xs = linear_scan(a, bu, h0=x0.to(cdt), reset=reset)  # (B, T, P)
        y = (xs @ torch.view_as_complex(self.C).to(cdt).T).real + self.D * u  # (B, T, H)
        return y.to(u.dtype), xs


class S5Block(nn.Module):
    def __init__(self, H: int, P: int, cfg: S5WMConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(H), nn.LayerNorm(H)
        self.ssm = S5Layer(H, P, cfg.dt_min, cfg.dt_max)
        self.out = nn.Linear(H, H)
        self.mlp = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H))

    def forward(self, u: Tensor, x0: Tensor, reset: Tensor) -> tuple[Tensor, Tensor]:
        y, xs = self.ssm(self.norm1(u), x0, reset)
        u = u + self.out(nn.functional.gelu(y))
        return u + self.mlp(self.norm2(u)), xs


class S5WM(nn.Module):
    def __init__(self, cfg: S5WMConfig, embed_dim: int, action_dim: int):
        super().__init__()
        self.cfg = cfg
        S, K, H = cfg.stoch, cfg.classes, cfg.d_model
        self.feat_size = H + S * K
        self.inp = mlp(S * K + action_dim, cfg.hidden, 1, H)
        self.blocks = nn.ModuleList(S5Block(H, cfg.d_state, cfg) for _ in range(cfg.layers))
        self.prior_net = mlp(H, cfg.hidden, 1, S * K)
        self.post_net = mlp(embed_dim, cfg.hidden, 1, S * K)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        # the complex SSM states travel as real (re, im) pairs so that collectors can carry them
        return {"ssm": (c.layers, c.d_state, 2), "stoch": (c.stoch, c.classes), "h": (c.d_model,)}

    def initial(self, batch_size: int) -> State:
        p = next(self.parameters())
        return {k: torch.zeros(batch_size, *s, device=p.device, dtype=p.dtype) for k, s in self.state_shapes().items()}

    def _logits(self, net: nn.Module, x: Tensor) -> Tensor:
        return net(x).reshape(*x.shape[:-1], self.cfg.stoch, self.cfg.classes)

    def _core(self, state: State, z_prev: Tensor, action: Tensor, reset: Tensor) -> tuple[Tensor, Tensor]:
        """Sequence model over (B, T): h (B, T, H) and SSM states (B, T, L, P, 2)."""
        u = self.inp(torch.cat([z_prev.flatten(-2), action], -1))  # (B, T, H)
        ssm = torch.view_as_complex(state["ssm"].to(torch.float64 if u.dtype == torch.float64 else torch.float32).contiguous())
        states = []
        for i, block in enumerate(self.blocks):
            u, xs = block(u, ssm[:, i], reset)
            states.append(torch.view_as_real(xs).to(u.dtype))  # (B, T, P, 2)
        return u, torch.stack(states, 2)

    def observe(self, state, embed, action, is_first, noise=None):
        B, T = embed.shape[:2]
        first = is_first.to(embed.dtype)  # (B, T)
        post = self._logits(self.post_net, embed)  # (B, T, S, K)
        probs = unimix_probs(post, self.cfg.unimix)
        z = sample_onehot(probs, None if noise is None else noise["stoch"])  # (B, T, S, K)
        # the token at t reads z_{t-1} and a_{t-1}; both are zero where an episode starts
        z_prev = torch.cat([state["stoch"][:, None], z[:, :-1]], 1) * (1 - first)[..., None, None]
        h, ssm = self._core(state, z_prev, action * (1 - first)[..., None], first)
        prior = self._logits(self.prior_net, h)
        post_lp, prior_lp = probs.log(), unimix_probs(prior, self.cfg.unimix).log()
        losses = {"dyn": categorical_kl(post_lp.detach(), prior_lp), "rep": categorical_kl(post_lp, prior_lp.detach())}
        states = {"ssm": ssm, "stoch": z, "h": h}
        return states, self.feat(states), losses

    def feat(self, state: State) -> Tensor:
        return torch.cat([state["h"], state["stoch"].flatten(-2)], -1)

    def imagine(self, state: State, policy: Policy, horizon: int):
        feats = [self.feat(state)]
        actions = [policy(feats[0])]
        N = feats[0].shape[0]
        no_reset = torch.zeros(N, 1, device=feats[0].device, dtype=feats[0].dtype)
        for _ in range(horizon):
            h, ssm = self._core(state, state["stoch"][:, None], actions[-1][:, None], no_reset)
            prior = self._logits(self.prior_net, h[:, 0])
            state = {"ssm": ssm[:, 0], "stoch": sample_onehot(unimix_probs(prior, self.cfg.unimix)), "h": h[:, 0]}
            feats.append(self.feat(state))
            actions.append(policy(feats[-1]))
        return torch.stack(feats, 1), torch.stack(actions, 1)
