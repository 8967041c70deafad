"""S5WM: a world model whose sequence core is a stack of S5 layers (Smith et al. 2023, "Simplified
State Space Layers"), as in S5WM (Deng et al. 2023) and R2I (Samsami et al. 2024).

    u_t = MLP([z_{t-1}, a_{t-1}])                     input token
    x_t = Lambda_bar * x_{t-1} + B_bar u_t            per layer, complex diagonal (P states)
    y_t = Re(C x_t) + D u_t                           MIMO readout
    h_t = blocks(u_t)                                 LN -> S5 -> GELU -> Linear (+res), LN -> MLP (+res)
    p(z_t | h_t) prior,  q(z_t | x_obs_t) posterior from the observation alone
    feat_t = [h_t, z_t, s_t]                          s_t: last layer's state, projected (R2I)

Lambda = -exp(log_lambda_re) + i lambda_im keeps Re(Lambda) < 0, so |Lambda_bar| = |exp(Lambda dt)| < 1
(stable); zero-order hold gives Lambda_bar = exp(Lambda dt), B_bar = (Lambda_bar - 1) / Lambda * B.
The recurrence is linear, so the training path is one `linear_scan` over T per layer, with the state
reset at `is_first` (a_t <- a_t (1 - is_first_t)); acting and imagination call the same code with T = 1
and carry the state, so both modes agree. No T x T tensors: memory is linear in T. The shared
machinery (tokens, prior/posterior, modes) lives in worldmodels/ssm.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from worldmodels.ops.scan import linear_scan
from worldmodels.nets import XS_LATENT, fill_size
from worldmodels.ssm import SSMCore, as_complex, as_real, complex_dtype, init_log_dt

SIZES = {
    "xs": dict(d_model=64, d_state=32, layers=2, hidden=64, **XS_LATENT),
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
    feat_state: bool = True  # actor, critic and heads also read the last layer's SSM state (R2I)

    def __post_init__(self):
        fill_size(self, SIZES, self.size)


class S5Layer(nn.Module):
    """MIMO diagonal SSM over (B, T, H) with complex state (B, P)."""

    def __init__(self, H: int, P: int, dt_min: float, dt_max: float):
        super().__init__()
        # S4D-Lin initialisation: Lambda_n = -1/2 + i pi n
        self.log_lambda_re = nn.Parameter(torch.full((P,), math.log(0.5)))
        self.lambda_im = nn.Parameter(math.pi * torch.arange(P, dtype=torch.float32))
        self.log_dt = nn.Parameter(init_log_dt(P, dt_min, dt_max))
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
        cdt = complex_dtype(u)
        lam_bar, B_in, C_out = self.step_params(cdt)
        a = lam_bar.expand(B, T, -1)  # (B, T, P)
        xs = linear_scan(a, self._in(u, B_in), h0=x0.to(cdt), reset=reset)  # (B, T, P)
        return self._out(xs, C_out, u), xs

    def _in(self, u: Tensor, B_in: Tensor) -> Tensor:
        """B_bar u (..., P) complex from the real inputs u (..., H): one real product with the (re, im)
        pairs of B_bar, half the work of promoting u to complex."""
        with torch.autocast(u.device.type, enabled=False):  # the SSM's maths stay in full precision
            return torch.view_as_complex((u.to(B_in.dtype) @ B_in).unflatten(-1, (-1, 2)))

    def _out(self, x: Tensor, C_out: Tensor, u: Tensor) -> Tensor:
        """y = Re(C x) + D u from the states x (..., P) and the inputs u (..., H): Re(C x) = C_re x_re -
        C_im x_im, one real product with the (re, im) pairs of x."""
        with torch.autocast(u.device.type, enabled=False):
            return (torch.view_as_real(x).flatten(-2) @ C_out + self.D * u).to(u.dtype)

    def step_params(self, cdt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """Lambda_bar (P,) in the complex dtype of the state, and B_bar and C as real matrices on (re, im)
        pairs, B_in (H, 2P) and C_out (2P, H) (see `_in`, `_out`): once per forward, or once for a
        rollout of steps."""
        rdt = torch.float64 if cdt == torch.complex128 else torch.float32
        lam_bar, B_bar = self.discrete()
        B_in = torch.view_as_real(B_bar).transpose(0, 1).flatten(1)  # (H, P, 2) -> (H, 2P)
        C = torch.view_as_complex(self.C)  # (H, P)
        C_out = torch.stack([C.real, -C.imag], -1).flatten(1).T  # (2P, H)
        return lam_bar.to(cdt), B_in.to(rdt), C_out.to(rdt)

    def step(self, u: Tensor, x: Tensor, params: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """One token u (B, H) from the complex state x (B, P): `forward` on T = 1 with no reset."""
        lam_bar, B_in, C_out = params
        x = lam_bar * x + self._in(u, B_in)  # (B, P)
        return self._out(x, C_out, u), x


class S5Block(nn.Module):
    def __init__(self, H: int, P: int, cfg: S5WMConfig):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(H), nn.LayerNorm(H)
        self.ssm = S5Layer(H, P, cfg.dt_min, cfg.dt_max)
        self.out = nn.Linear(H, H)
        self.mlp = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H))
        self.state_shapes = {"ssm": (P, 2)}  # complex (P,) as (re, im)
        self.H, self.P = H, P

    def state_readout(self) -> tuple[str, nn.Module]:
        return "ssm", nn.Sequential(nn.Flatten(-2), nn.Linear(2 * self.P, self.H))

    def forward(self, u: Tensor, x0: dict[str, Tensor], reset: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        y, xs = self.ssm(self.norm1(u), as_complex(x0["ssm"]), reset)
        u = u + self.out(nn.functional.gelu(y))
        return u + self.mlp(self.norm2(u)), {"ssm": as_real(xs, u.dtype)}

    def stepper(self, x0: dict[str, Tensor], horizon: int | None = None) -> "S5Stepper":  # any number of steps
        return S5Stepper(self, x0)


class S5Stepper:
    """The block one token at a time (see worldmodels/ssm.py): the state stays complex between steps and
    the discretisation is made once."""

    def __init__(self, block: S5Block, x0: dict[str, Tensor]):
        self.block, self.x = block, as_complex(x0["ssm"])  # (B, P)
        self.params = block.ssm.step_params(self.x.dtype)

    def step(self, u: Tensor) -> Tensor:
        b = self.block
        y, self.x = b.ssm.step(b.norm1(u), self.x, self.params)
        u = u + b.out(nn.functional.gelu(y))
        return u + b.mlp(b.norm2(u))

    def readout_entry(self) -> Tensor:
        return torch.view_as_real(self.x)  # (B, P, 2), a view: the readout flattens it


class S5WM(SSMCore):
    def __init__(self, cfg: S5WMConfig, embed_dim: int, action_dim: int, action_embed: str = "joint"):
        blocks = [S5Block(cfg.d_model, cfg.d_state, cfg) for _ in range(cfg.layers)]
        super().__init__(cfg, blocks, embed_dim, action_dim, action_embed)
