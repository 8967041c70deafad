"""S4WM (Deng, Park, Ahn, "Facing Off World Model Backbones", NeurIPS 2023): the RSSM's GRU replaced
by a stack of S4 blocks.

    u_t = MLP([z_{t-1}, a_{t-1}])                     input token (H channels)
    block: u <- u + Linear(GELU(S4(LN(u))))           twice, then u <- u + MLP(LN(u))
    S4 (per channel h, N complex states, SISO):
        x_t^h = Lambda_bar^h * x_{t-1}^h + B_bar^h u_t^h
        y_t^h = 2 Re(C^h . x_t^h) + D^h u_t^h
    p(z_t | h_t) prior,  q(z_t | x_t) posterior from the observation alone
    feat_t = [h_t, z_t, s_t]                          s_t: last block's state, projected

Diagonal state with the S4D-Lin initialisation (Gu et al. 2022, the diagonal HiPPO approximation):
Lambda_n = -1/2 + i pi n, one step size per channel, B = 1, C random. The parameterisation
Lambda = -exp(log_re) + i im keeps Re(Lambda) < 0, so |Lambda_bar| = exp(Re(Lambda) dt) < 1 whatever
the weights become; zero-order hold gives Lambda_bar = exp(Lambda dt), B_bar = (Lambda_bar - 1) / Lambda B.
Training computes what needs gradients, each layer's output and the features' readout of the last
layer's state, as S4's causal convolutions (`S4Block.sequence`): a readout Re(G . x_t) of a state x_t
is the free response of the state the window starts from plus a convolution of the layer's inputs,

    Re(G . x_t) = Re(G . Lambda_bar^(t+1) x_0) + sum_{k<=t} K_{t-k} v_k,   K_j = Re(G . Lambda_bar^j B_bar),

made with FFTs over T, once per episode segment of the window (a reset at is_first starts a new one:
the sum then runs from the reset and the free response is dropped). The states themselves, which
only imagination's start (detached) and the replay context need, come from `linear_scan` over
(B, T, H * N) without gradient: the scan's backward over H x N complex states per step was a fifth
of the S4WM update at size s, and the products feeding it another fifth. `forward` (the scan with
gradients through the states) is the slow twin, and what stepping one token uses; the tests hold
the two equal in values and gradients.
Where S5 mixes channels through its state (MIMO, P states shared by all H channels), S4 keeps H
independent SISO systems of N states each and mixes channels in the Linear after each layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from worldmodels.ops.scan import linear_scan
from worldmodels.nets import XS_LATENT, fill_size
from worldmodels.ssm import BlockStepper, SSMCore, as_complex, as_real, complex_dtype, init_log_dt

# Core parameters at xs: 0.15M (RSSM 0.14M, S5WM 0.18M); at s: 5.8M (RSSM 3.9M, S5WM 10.0M): not matched.
SIZES = {
    "xs": {"d_model": 64, "d_state": 16, "layers": 1, "hidden": 64, **XS_LATENT},
    "s": {"d_model": 512, "d_state": 32, "layers": 2, "hidden": 512, "stoch": 32, "classes": 32},
    "m": {"d_model": 768, "d_state": 32, "layers": 3, "hidden": 768, "stoch": 32, "classes": 32},
}


@dataclass(frozen=True)
class S4WMConfig:
    size: str = "xs"
    d_model: int | None = None  # channels of the S4 blocks (H)
    d_state: int | None = None  # complex states per channel (N)
    layers: int | None = None  # S4 blocks (each holds two S4 layers)
    hidden: int | None = None  # width of the input, prior and posterior MLPs
    stoch: int | None = None
    classes: int | None = None
    unimix: float = 0.01
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    feat_state: bool = True  # actor, critic and heads also read the last block's SSM state (R2I)

    def __post_init__(self):
        fill_size(self, SIZES, self.size)


class S4Layer(nn.Module):
    """H independent diagonal SISO SSMs over (B, T, H), complex state (B, H, N)."""

    def __init__(self, H: int, N: int, dt_min: float, dt_max: float):
        super().__init__()
        self.N = N
        # S4D-Lin: Lambda_n = -1/2 + i pi n, the same spectrum for every channel, its own step size
        self.log_lambda_re = nn.Parameter(torch.full((H, N), math.log(0.5)))
        self.lambda_im = nn.Parameter(math.pi * torch.arange(N, dtype=torch.float32).expand(H, N).clone())
        self.log_dt = nn.Parameter(init_log_dt(H, dt_min, dt_max))
        self.C = nn.Parameter(torch.randn(H, N, 2) * math.sqrt(0.5))  # complex, variance 1
        self.D = nn.Parameter(torch.randn(H))

    def discrete(self) -> tuple[Tensor, Tensor]:
        lam = torch.complex(-self.log_lambda_re.exp(), self.lambda_im)  # (H, N)
        lam_bar = torch.exp(lam * self.log_dt.exp()[:, None])
        return lam_bar, (lam_bar - 1) / lam  # B = 1

    def forward(self, u: Tensor, x0: Tensor, reset: Tensor) -> tuple[Tensor, Tensor]:
        cdt = complex_dtype(u)
        xs = self.states(u, x0.to(cdt), reset)
        return self._out(xs, torch.view_as_complex(self.C).to(cdt), u), xs

    def _out(self, x: Tensor, C: Tensor, u: Tensor) -> Tensor:
        """y = 2 Re(C . x) + D u from the states x (..., H, N) and the inputs u (..., H)."""
        return (2 * (x * C).sum(-1).real + self.D * u).to(u.dtype)

    def powers(self, T: int, cdt: torch.dtype) -> Tensor:
        """Lambda_bar^t for t = 0..T, (T + 1, H, N): exp(t Lambda dt), exact for every t."""
        lam = torch.complex(-self.log_lambda_re.exp(), self.lambda_im) * self.log_dt.exp()[:, None]  # (H, N)
        t = torch.arange(T + 1, device=lam.device, dtype=lam.real.dtype)
        return torch.exp(t[:, None, None] * lam).to(cdt)

    def step_params(self, cdt: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
        """(Lambda_bar, B_bar, C) in the complex dtype of the state: once per forward, or once for a
        rollout of steps."""
        return (*(p.to(cdt) for p in self.discrete()), torch.view_as_complex(self.C).to(cdt))

    def responses(self, G: Tensor, x0: Tensor, T: int) -> tuple[Tensor, Tensor]:
        """For R readouts G (R, H, N) complex of this layer's state and start states x0 (B, H, N): the free
        responses Re(G . Lambda_bar^t x0) for t = 0..T, (B, R, T + 1, H), and the kernels
        K_j = Re(G . Lambda_bar^j B_bar) for j = 0..T - 1, (R, T, H). In x0's dtype, outside autocast."""
        with torch.autocast(x0.device.type, enabled=False):  # the SSM's maths stay in full precision
            cdt = x0.dtype
            GP = G.to(cdt)[:, None] * self.powers(T, cdt)  # (R, T + 1, H, N): G Lambda_bar^t
            kernel = (GP[:, :-1] * self.discrete()[1].to(cdt)).sum(-1).real  # (R, T, H)
            # Re(a b) = a_re b_re - a_im b_im: one real product with (re, -im) pairs over (N, 2) per channel
            R, B, (_, H, N) = G.shape[0], x0.shape[0], GP.shape[1:]
            GP_pairs = torch.stack([GP.real, -GP.imag], -1).permute(2, 3, 4, 0, 1).reshape(H, 2 * N, R * (T + 1))
            x0r = torch.view_as_real(x0).reshape(B, H, 2 * N).transpose(0, 1)  # a view: bmm reads it in place
            free = torch.bmm(x0r, GP_pairs).reshape(H, B, R, T + 1).permute(1, 2, 3, 0)  # (B, R, T + 1, H)
        return free, kernel

    def readouts(self, v: Tensor, x0: Tensor, segments: tuple[Tensor, Tensor], G: Tensor) -> Tensor:
        """Re(G . x_t) for R readouts G (R, H, N) of the states the layer reaches from x0 (B, H, N) complex
        under inputs v (B, T, H) in the window's episode `segments` (see `episode_segments`): (B, R, T, H),
        as free responses plus causal convolutions per segment (see the module's docstring), without
        the states."""
        B, T, H = v.shape
        free, kernel = self.responses(G, x0, T)
        masks, before_reset = segments
        with torch.autocast(v.device.type, enabled=False):
            v = v.to(kernel.dtype)
            masks = masks.to(v.dtype)[..., None]  # (B, S, T, 1)
            out = free[:, :, 1:] * before_reset[:, None, :, None].to(v.dtype)  # x0's response until a reset
            conv = causal_conv(v[:, None] * masks, kernel)  # (B, S, R, T, H)
            out = out + (conv * masks[:, :, None]).sum(1)
        return out

    def states(self, v: Tensor, x0: Tensor, reset: Tensor) -> Tensor:
        """The complex states (B, T, H, N) from x0 (B, H, N) under inputs v (B, T, H): the scan of `forward`."""
        B, T, H = v.shape
        cdt = x0.dtype
        lam_bar, B_bar = (p.to(cdt) for p in self.discrete())
        bu = v.to(cdt)[..., None] * B_bar  # (B, T, H, N)
        a = lam_bar.reshape(1, 1, H * self.N).expand(B, T, -1)
        return linear_scan(a, bu.reshape(B, T, H * self.N), h0=x0.reshape(B, H * self.N), reset=reset).reshape(B, T, H, self.N)


# More segments than this in a window (episodes much shorter than it) and `S4Block.sequence` takes the scan
# with gradients instead: the convolutions cost one pass per segment.
MAX_SEGMENTS = 8


def episode_segments(reset: Tensor) -> tuple[Tensor, Tensor]:
    """The episode segments of a window from its resets (B, T): one mask (B, S, T) per segment present
    (a reset starts a new one), and where no reset has come yet (B, T): the start state's reach."""
    segment = torch.cumsum(reset > 0, 1)  # (B, T): 0 before the first reset, +1 at each
    present = torch.unique(segment)
    return segment[:, None] == present[None, :, None], segment == 0


def causal_conv(v: Tensor, kernel: Tensor) -> Tensor:
    """y_t = sum_{k<=t} K_{t-k} v_k per channel, for inputs v (..., T, H) and R kernels (R, T, H):
    (..., R, T, H), by FFTs of length 2T (no wrap-around)."""
    T = v.shape[-2]
    n = 2 * T
    vf = torch.fft.rfft(v, n=n, dim=-2)[..., None, :, :]  # (..., 1, n/2 + 1, H)
    kf = torch.fft.rfft(kernel, n=n, dim=-2)  # (R, n/2 + 1, H)
    return torch.fft.irfft(vf * kf, n=n, dim=-2)[..., :T, :]


def causal_conv_ref(v: Tensor, kernel: Tensor) -> Tensor:
    """causal_conv's twin: the sum written out, lag by lag."""
    T = v.shape[-2]
    out = torch.zeros(*v.shape[:-2], kernel.shape[0], T, v.shape[-1], dtype=v.dtype, device=v.device)
    for j in range(T):  # lag j: K_j v_{t-j} for t >= j
        out[..., :, j:, :] += kernel[:, j, None, :] * v[..., None, : T - j, :]
    return out


class ChannelReadout(nn.Module):
    """A second per-channel readout of the last S4 layer's state: (..., 2, H, N, 2) -> (..., H). A dense
    projection of all H * N states would be larger than the rest of the model."""

    def __init__(self, H: int, N: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(H, N, 2) / math.sqrt(2 * N))

    def forward(self, state: Tensor) -> Tensor:
        return (state[..., -1, :, :, :] * self.weight).sum((-2, -1))

    def complex_weight(self) -> Tensor:
        """G (H, N) with Re(G . x) what `forward` reads from the complex state x: w_re Re x + w_im Im x."""
        return torch.complex(self.weight[..., 0], -self.weight[..., 1])


class S4Block(nn.Module):
    """LN -> S4 -> GELU -> Linear (+ residual), twice, then LN -> MLP (+ residual). The block's state
    holds both S4 layers: (2, H, N)."""

    def __init__(self, cfg: S4WMConfig):
        super().__init__()
        H, N = cfg.d_model, cfg.d_state
        self.norms = nn.ModuleList(nn.LayerNorm(H) for _ in range(2))
        self.ssms = nn.ModuleList(S4Layer(H, N, cfg.dt_min, cfg.dt_max) for _ in range(2))
        self.outs = nn.ModuleList(nn.Linear(H, H) for _ in range(2))
        self.norm_mlp = nn.LayerNorm(H)
        self.mlp = nn.Sequential(nn.Linear(H, 2 * H), nn.GELU(), nn.Linear(2 * H, H))
        self.state_shapes = {"ssm": (2, H, N, 2)}  # complex (2, H, N) as (re, im)
        self.H, self.N = H, N

    def state_readout(self) -> tuple[str, nn.Module]:
        return "ssm", ChannelReadout(self.H, self.N)

    def forward(self, u: Tensor, x0: dict[str, Tensor], reset: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        x0c, states = as_complex(x0["ssm"]), []
        for i in range(2):
            y, xs = self.ssms[i](self.norms[i](u), x0c[:, i], reset)
            u = u + self.outs[i](nn.functional.gelu(y))
            states.append(xs)
        return u + self.mlp(self.norm_mlp(u)), {"ssm": as_real(torch.stack(states, 2), u.dtype)}  # (B, T, 2, H, N, 2)

    def sequence(self, u: Tensor, x0: dict[str, Tensor], reset: Tensor, readout: nn.Module | None = None
                 ) -> tuple[Tensor, dict[str, Tensor], Tensor | None]:
        """The training pass over (B, T): like `forward`, but the outputs and `readout` (the block's
        ChannelReadout, or None) on the last layer's states, (B, T, H), come from convolutions, and the
        states from a scan without gradient (see the module's docstring). Windows of more than
        MAX_SEGMENTS episode segments take `forward`, states detached the same."""
        segments = episode_segments(reset)  # shared by both layers
        if segments[0].shape[1] > MAX_SEGMENTS:
            u, states = self.forward(u, x0, reset)
            read = readout(states["ssm"]) if readout is not None else None
            return u, {k: v.detach() for k, v in states.items()}, read
        x0c, states, read = as_complex(x0["ssm"]), [], None
        for i in range(2):
            ssm, v = self.ssms[i], self.norms[i](u)
            G = 2 * torch.view_as_complex(ssm.C)[None]
            if i == 1 and readout is not None:
                G = torch.cat([G, readout.complex_weight()[None]])
            r = ssm.readouts(v, x0c[:, i], segments, G)  # (B, R, T, H)
            y = (r[:, 0] + ssm.D * v).to(u.dtype)
            if i == 1 and readout is not None:
                read = r[:, 1].to(u.dtype)
            u = u + self.outs[i](nn.functional.gelu(y))
            with torch.no_grad():
                states.append(ssm.states(v, x0c[:, i], reset))
        return u + self.mlp(self.norm_mlp(u)), {"ssm": as_real(torch.stack(states, 2), u.dtype)}, read

    def stepper(self, x0: dict[str, Tensor], horizon: int | None = None) -> "S4Rollout | BlockStepper":
        """A rollout of `horizon` steps without the states (S4Rollout); the generic stepper where the
        number of steps is not known."""
        return BlockStepper(self, x0, "ssm") if horizon is None else S4Rollout(self, x0, horizon)


class S4Rollout:
    """The block over a rollout of known length, without carrying its states (see worldmodels/ssm.py).

    Each S4 layer is linear and time-invariant, so any real linear readout of its state after t steps,
    Re(G . x_t) with G (H, N) complex, splits into the start state's free response and a causal
    convolution of the layer's inputs v_1..v_t:

        Re(G . x_t) = Re(G . Lambda_bar^t x_0) + sum_{k=1..t} K_{t-k} v_k,   K_j = Re(G . Lambda_bar^j B_bar)

    The layer's output uses G = 2C (and adds D v_t); the features' state readout (ChannelReadout,
    w_re Re x + w_im Im x) uses G = w_re - i w_im on the last layer. The free responses of every step
    are one product with the start states, made once; a step then costs a dot over its past inputs (H
    real numbers per lag) where carrying the state costs several passes over H x N complex numbers.
    BlockStepper, the block's forward on T = 1, is its twin: the tests hold them equal."""

    def __init__(self, block: S4Block, x0: dict[str, Tensor], horizon: int):
        self.block, self.horizon, self.t = block, horizon, 0
        self.x0 = as_complex(x0["ssm"])  # (B, 2, H, N)
        self.inputs: list[list[Tensor]] = [[], []]  # each layer's inputs, latest first
        # per layer: output free response (B, horizon + 1, H) and kernel (horizon, H)
        self.kernels = [self._responses(i, 2 * torch.view_as_complex(ssm.C), ssm.D) for i, ssm in enumerate(block.ssms)]
        self.read_kernels = None  # made at the first `read`, from the readout's weights

    def _responses(self, i: int, G: Tensor, D: Tensor | None) -> tuple[Tensor, Tensor]:
        """Free responses Re(G . Lambda_bar^t x_0) for t = 0..horizon, (B, horizon + 1, H), and the
        kernel K_j = Re(G . Lambda_bar^j B_bar) for j = 0..horizon - 1 (+ D at lag 0), (horizon, H), of
        layer i."""
        free, kernel = self.block.ssms[i].responses(G[None], self.x0[:, i], self.horizon)
        free, kernel = free[:, 0], kernel[0]
        if D is not None:
            kernel = torch.cat([kernel[:1] + D.to(kernel.dtype), kernel[1:]])
        return free, kernel

    def _convolve(self, i: int, free: Tensor, kernel: Tensor) -> Tensor:
        """Free response at step t plus sum_j K_j v_{t-j} over layer i's inputs so far."""
        v = torch.stack(self.inputs[i], 1).to(kernel.dtype)  # (B, t, H), lag 0 first
        return free[:, self.t] + (v * kernel[: v.shape[1]]).sum(1)

    def step(self, u: Tensor) -> Tensor:
        if self.t == self.horizon:
            raise RuntimeError(f"S4Rollout made for {self.horizon} steps was asked for one more")
        b = self.block
        self.t += 1
        for i in range(2):
            self.inputs[i].insert(0, b.norms[i](u))
            y = self._convolve(i, *self.kernels[i]).to(u.dtype)
            u = u + b.outs[i](nn.functional.gelu(y))
        return u + b.mlp(b.norm_mlp(u))

    def read(self, readout: nn.Module) -> Tensor:
        """What `readout` (the block's ChannelReadout) gives on the last layer's state now, (B, H)."""
        if self.read_kernels is None:
            self.read_kernels = self._responses(1, readout.complex_weight(), None)
        if self.t == 0:
            return self.read_kernels[0][:, 0]
        return self._convolve(1, *self.read_kernels)


class S4WM(SSMCore):
    def __init__(self, cfg: S4WMConfig, embed_dim: int, action_dim: int, action_embed: str = "joint"):
        super().__init__(cfg, [S4Block(cfg) for _ in range(cfg.layers)], embed_dim, action_dim, action_embed)
