"""Mamba: a world model whose sequence core is a stack of Mamba blocks (Gu and Dao 2023, "Mamba:
Linear-Time Sequence Modeling with Selective State Spaces"; the Mamba-1 selective SSM).

    u_t = MLP([z_{t-1}, a_{t-1}])                     input token (H channels)
    block: u <- u + Mixer(LN(u))                      L blocks
    Mixer (inner width D = expand * H, N states per inner channel):
        x, g = in_proj(u)                             (D,) each
        x = SiLU(conv(x))                             causal depthwise conv over the last d_conv inputs
        (dt, B_t, C_t) = x_proj(x)                    dt of rank R, B_t and C_t of N
        delta_t = softplus(dt_proj(dt) + bias)        (D,), the bias inside the softplus
        h_t = exp(delta_t A) * h_{t-1} + delta_t B_t x_t    (D, N); A = -exp(A_log)
        y_t = (<C_t, h_t> + D_skip x_t) * SiLU(g)     then out_proj to H
    p(z_t | h_t) prior,  q(z_t | x_obs_t) posterior from the observation alone
    feat_t = [h_t, z_t, s_t]                          s_t: the last block's SSM state, read out (R2I)

As in Mamba: A_log starts at log(1..N) in every channel (S4D-real), D_skip at 1, and the dt bias at
the inverse softplus of step sizes drawn log-uniformly from [dt_min, dt_max]; the input enters to first
order in delta (delta B x, not zero-order hold). A, B, C and delta depend on the input, so the
recurrence is time-varying but still linear in h: training runs it with `linear_scan` over
(B, T, D * N) per block (`selective_scan_fused`: the backward written out, recomputing the decays
instead of keeping them; `selective_scan` is its autograd twin), acting and imagination step the conv window (the last
d_conv - 1 inputs) and the SSM state one token at a time (`MambaMixer.step`, on `selective_scan_ref`).
At `is_first` both reset: the SSM state to zero and the conv window to empty (inputs from before the
episode start are masked out of the convolution). The SSM state is carried in float32. The shared
machinery (tokens, prior/posterior, modes) lives in worldmodels/ssm.py.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodels.nets import XS_LATENT, fill_size
from worldmodels.ops.scan import linear_scan
from worldmodels.ssm import SSMCore, init_log_dt

SIZES = {
    "xs": dict(d_model=64, d_state=16, layers=2, dt_rank=4, hidden=64, **XS_LATENT),
    "s": dict(d_model=512, d_state=16, layers=4, dt_rank=32, hidden=512, stoch=32, classes=32),
    "m": dict(d_model=768, d_state=16, layers=6, dt_rank=48, hidden=768, stoch=32, classes=32),
}


@dataclass(frozen=True)
class MambaConfig:
    size: str = "xs"
    d_model: int | None = None  # width of the residual stream (H)
    d_state: int | None = None  # SSM states per inner channel (N)
    layers: int | None = None  # Mamba blocks
    dt_rank: int | None = None  # rank of the step-size projection (R; Mamba: ceil(d_model / 16))
    hidden: int | None = None  # width of the input, prior and posterior MLPs
    stoch: int | None = None
    classes: int | None = None
    expand: int = 2  # inner width D = expand * d_model
    d_conv: int = 4  # width of the causal depthwise convolution
    unimix: float = 0.01
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    feat_state: bool = True  # actor, critic and heads also read the last block's SSM state (R2I)
    compile_step: bool = False  # imagination's SSM step (`ssm_step`) through torch.compile, which fuses its
    #                             chain of (N, D, d_state) elementwise operations (needs a C++ compiler on a CPU)

    def __post_init__(self):
        fill_size(self, SIZES, self.size)


def _real(x: Tensor) -> torch.dtype:
    """The dtype the scan carries: float32, float64 stays double (the test oracle)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def selective_scan(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None = None,
                   delta_bias: Tensor | None = None, h0: Tensor | None = None,
                   reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mamba's selective scan (delta through a softplus, as Mamba always calls it), as one `linear_scan`
    over the D * N states:

        delta_t = softplus(delta_t + delta_bias)              (Bt, D)
        h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t      (Bt, D, N), from h0 (zero by default)
        y_t = (<C_t, h_t> + D u_t) * SiLU(z_t)                (Bt, D)

    u, delta, z: (Bt, T, D); A: (D, N); B, C: (Bt, T, N); D, delta_bias: (D,); h0: (Bt, D, N); reset
    (Bt, T): 1 zeroes the state before step t. Returns y (Bt, T, D) in u's dtype and the states
    h (Bt, T, D, N) in float32 (float64 stays double)."""
    out, dtype = u.dtype, _real(u)
    u, delta, A, B, C, D = (x.to(dtype) for x in (u, delta, A, B, C, D))
    dt = F.softplus(delta if delta_bias is None else delta + delta_bias.to(dtype))  # (Bt, T, D)
    a = torch.exp(dt[..., None] * A)  # (Bt, T, D, N)
    b = (dt * u)[..., None] * B[:, :, None, :]  # (Bt, T, D, N)
    hs = linear_scan(a.flatten(2), b.flatten(2), h0=None if h0 is None else h0.to(dtype).flatten(1), reset=reset)
    hs = hs.unflatten(2, A.shape)  # (Bt, T, D, N)
    y = torch.einsum("btdn,btn->btd", hs, C) + D * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out), hs


def selective_scan_fused(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None = None,
                         delta_bias: Tensor | None = None, h0: Tensor | None = None,
                         reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`selective_scan` (same signature and results) with its backward written out, the path training
    takes. Autograd through `selective_scan` keeps three (Bt, T, D, N) tensors per block until the
    backward pass besides the states: exp(delta A), its reset-masked copy and the scan's own copy.
    This keeps only the inputs and the states (which are an output anyway: imagination starts from
    them and the heads read the last block's), and the backward recomputes exp(delta A) from the
    inputs and runs the adjoint recurrence as one reverse `linear_scan` (as mamba-ssm's kernels
    recompute their states in the backward pass)."""
    out, dtype = u.dtype, _real(u)
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    y, hs = _SelectiveScan.apply(*(cast(x) for x in (u, delta, A, B, C, D, z, delta_bias, h0)), reset)
    return y.to(out), hs


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, bias, h0, reset):
        a, _, dt = _decay(delta, A, bias, reset)  # (Bt, T, D, N), (Bt, T, D)
        b = (dt * u)[..., None] * B[:, :, None, :]
        hs = linear_scan(a.flatten(2), b.flatten(2), h0=None if h0 is None else h0.flatten(1)).unflatten(2, A.shape)
        del a, b
        y = torch.einsum("btdn,btn->btd", hs, C) + D * u
        if z is not None:
            y = y * F.silu(z)
        ctx.save_for_backward(u, delta, A, B, C, D, z, bias, h0, reset, hs)
        return y, hs

    @staticmethod
    def backward(ctx, gy, ghs):
        u, delta, A, B, C, D, z, bias, h0, reset, hs = ctx.saved_tensors
        a, pre, dt = _decay(delta, A, bias, reset)  # the masked decays again, (Bt, T, D, N)
        gz = None
        if z is not None:  # y = yc SiLU(z): SiLU'(z) = sigmoid(z) (1 + z (1 - sigmoid(z)))
            sz = torch.sigmoid(z)
            gz = gy * (torch.einsum("btdn,btn->btd", hs, C) + D * u) * sz * (1 + z * (1 - sz))
            gy = gy * z * sz
        # dL/dh_t: from the output and from the states themselves; the adjoint recurrence
        # g_t = G_t + a_{t+1} g_{t+1} runs backwards through the same scan
        G = gy[..., None] * C[:, :, None, :]
        if ghs is not None:
            G = G + ghs
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1)
        g = linear_scan(a_next.flatten(2), G.flatten(2), reverse=True).unflatten(2, A.shape)
        del a_next, G
        gh0 = a[:, 0] * g[:, 0] if h0 is not None else None
        start = h0[:, None] if h0 is not None else hs.new_zeros(hs[:, :1].shape)
        ga = g * torch.cat([start, hs[:, :-1]], 1)  # dL/da_t = g_t h_{t-1}
        ga *= a  # dL/d(delta_t A): exp's derivative, zero where the reset masked a
        del a
        gA = torch.einsum("btdn,btd->dn", ga, dt)
        gdt = torch.einsum("btdn,dn->btd", ga, A)
        del ga
        gbu = torch.einsum("btdn,btn->btd", g, B)  # dL/d(delta_t u_t)
        gB = torch.einsum("btdn,btd->btn", g, dt * u)
        del g
        gdt = gdt + gbu * u
        gu = gbu * dt + gy * D
        gC = torch.einsum("btd,btdn->btn", gy, hs)
        gD = (gy * u).sum((0, 1))
        gpre = gdt * torch.sigmoid(pre)  # softplus' = sigmoid
        gbias = gpre.sum((0, 1)) if bias is not None else None
        return gu, gpre, gA, gB, gC, gD, gz, gbias, gh0, None


def _decay(delta: Tensor, A: Tensor, bias: Tensor | None, reset: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """exp(softplus(delta + bias) A), zero where reset starts an episode (Bt, T, D, N); delta + bias, and
    its softplus (Bt, T, D)."""
    pre = delta if bias is None else delta + bias
    dt = F.softplus(pre)
    a = torch.exp(dt[..., None] * A)
    if reset is not None:
        a = a * (1 - reset.to(a.dtype))[..., None, None]
    return a, pre, dt


def ssm_step(h: Tensor, dt: Tensor, A: Tensor, x: Tensor, B: Tensor, C: Tensor, D: Tensor,
             z: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the selective SSM without reset, from h (Bt, D, N) with delta already through its
    softplus, dt (Bt, D): h' = exp(dt A) h + dt B x, y = (<C, h'> + D x) SiLU(z). Returns h' and y
    (Bt, D). Imagination's inner step (`MambaStepper`), kept free of modules so that torch.compile can
    fuse it (`compiled_ssm_step`)."""
    h = torch.exp(dt[..., None] * A) * h + (dt * x)[..., None] * B[:, None, :]
    return h, ((h * C[:, None, :]).sum(-1) + D * x) * F.silu(z)


@functools.cache
def compiled_ssm_step():
    """`ssm_step` through torch.compile (made once per process, on first use): the same maths, its
    elementwise passes over (Bt, D, N) fused forward and backward."""
    return torch.compile(ssm_step, dynamic=False)


def selective_scan_ref(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None = None,
                       delta_bias: Tensor | None = None, h0: Tensor | None = None,
                       reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """`selective_scan` as a plain loop over t, one step of the recurrence at a time: the test oracle,
    and the step that acting and imagination take (T = 1). Same signature and results."""
    out, dtype = u.dtype, _real(u)
    u, delta, A, B, C, D = (x.to(dtype) for x in (u, delta, A, B, C, D))
    Bt, T, Dn = u.shape
    h = u.new_zeros(Bt, Dn, A.shape[1]) if h0 is None else h0.to(dtype)
    ys, hs = [], []
    for t in range(T):
        dt = F.softplus(delta[:, t] if delta_bias is None else delta[:, t] + delta_bias.to(dtype))  # (Bt, D)
        if reset is not None:
            h = h * (1 - reset[:, t].to(dtype))[:, None, None]
        h = torch.exp(dt[..., None] * A) * h + (dt * u[:, t])[..., None] * B[:, t, None, :]  # (Bt, D, N)
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
        hs.append(h)
    y = torch.stack(ys, 1)
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(out), torch.stack(hs, 1)


def causal_conv(x: Tensor, window: Tensor, reset: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """Depthwise causal convolution over x (B, T, D), continuing from `window` (B, D, K-1), the K-1 inputs
    before x: out_t = sum_k weight[:, k] x_{t-K+1+k} + bias, where inputs from before the latest episode
    start at or before t (reset = 1) count as zero. Returns out (B, T, D) and the window after each step
    (B, T, D, K-1), masked the same way."""
    K = weight.shape[-1]
    seg = reset.cumsum(1)  # (B, T): episodes started within x up to t
    segs = torch.cat([seg.new_zeros(seg.shape[0], K - 1), seg], 1)  # the window's inputs precede them all
    taps = torch.cat([window.transpose(1, 2), x], 1).unfold(1, K, 1)  # (B, T, D, K): inputs t-K+1 .. t
    taps = taps * (segs.unfold(1, K, 1) == seg[..., None]).to(x.dtype)[:, :, None, :]
    return (taps * weight).sum(-1) + bias, taps[..., 1:]


class MambaMixer(nn.Module):
    """Mamba's selective SSM over (B, T, H); state {"conv": (B, D, K-1), "ssm": (B, D, N)}."""

    def __init__(self, H: int, cfg: MambaConfig):
        super().__init__()
        D, N, R, K = cfg.expand * H, cfg.d_state, cfg.dt_rank, cfg.d_conv
        self.D_inner, self.N, self.R = D, N, R
        self.in_proj = nn.Linear(H, 2 * D, bias=False)
        bound = 1 / math.sqrt(K)  # nn.Conv1d's initialisation of a depthwise conv
        self.conv_weight = nn.Parameter(torch.empty(D, K).uniform_(-bound, bound))
        self.conv_bias = nn.Parameter(torch.empty(D).uniform_(-bound, bound))
        self.x_proj = nn.Linear(D, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, D)
        nn.init.uniform_(self.dt_proj.weight, -R ** -0.5, R ** -0.5)
        with torch.no_grad():  # softplus(bias) = dt, log-uniform in [dt_min, dt_max]: bias = dt + log(1 - exp(-dt))
            dt = init_log_dt(D, cfg.dt_min, cfg.dt_max).exp().clamp(min=1e-4)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(D, 1))  # (D, N)
        self.D = nn.Parameter(torch.ones(D))
        self.out_proj = nn.Linear(D, H, bias=False)
        self.compile_step = cfg.compile_step

    def _ssm_inputs(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """delta before its bias and softplus (..., D), B and C (..., N) from the conv's output x (..., D)."""
        dt, B, C = self.x_proj(x).split([self.R, self.N, self.N], -1)
        return F.linear(dt, self.dt_proj.weight), B, C

    def forward(self, u: Tensor, x0: dict[str, Tensor], reset: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """u (B, T, H) from the state x0 -> y (B, T, H) and the state after each step (B, T, ...)."""
        if u.shape[1] == 1:
            return self.step(u, x0, reset)
        x, z = self.in_proj(u).chunk(2, -1)  # (B, T, D) each
        x, windows = causal_conv(x, x0["conv"], reset, self.conv_weight, self.conv_bias)
        x = F.silu(x)
        delta, B, C = self._ssm_inputs(x)
        y, hs = selective_scan_fused(x, delta, -self.A_log.exp(), B, C, self.D, z, self.dt_proj.bias, x0["ssm"], reset)
        return self.out_proj(y), {"conv": windows, "ssm": hs}

    def step(self, u: Tensor, x0: dict[str, Tensor], reset: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """One token (B, 1, H), as Mamba steps: the conv window shifts in the new input and the SSM state
        takes one step; where reset (B, 1) is set, both start from zero."""
        x, z = self.in_proj(u[:, 0]).chunk(2, -1)  # (B, D) each
        window = torch.cat([x0["conv"] * (1 - reset)[:, :, None], x[..., None]], -1)  # (B, D, K)
        x = F.silu((window * self.conv_weight).sum(-1) + self.conv_bias)
        delta, B, C = self._ssm_inputs(x)
        y, hs = selective_scan_ref(x[:, None], delta[:, None], -self.A_log.exp(), B[:, None], C[:, None], self.D,
                                   z[:, None], self.dt_proj.bias, x0["ssm"], reset)
        return self.out_proj(y), {"conv": window[:, None, :, 1:], "ssm": hs}


class StateReadout(nn.Module):
    """The SSM state (..., D, N) to (..., H): a weight per state within each channel, then a Linear over
    the channels (a dense map of all D * N states would outweigh the rest of the model)."""

    def __init__(self, D: int, N: int, H: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, N) / math.sqrt(N))
        self.proj = nn.Linear(D, H)

    def forward(self, state: Tensor) -> Tensor:
        return self.proj((state * self.weight).sum(-1))


class MambaBlock(nn.Module):
    """u <- u + Mixer(LN(u)), Mamba's pre-norm residual block."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.mixer = MambaMixer(cfg.d_model, cfg)
        D, N = self.mixer.D_inner, self.mixer.N
        self.state_shapes = {"conv": (D, cfg.d_conv - 1), "ssm": (D, N)}
        self.H = cfg.d_model

    def state_readout(self) -> tuple[str, nn.Module]:
        return "ssm", StateReadout(*self.state_shapes["ssm"], self.H)

    def forward(self, u: Tensor, x0: dict[str, Tensor], reset: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        y, xs = self.mixer(self.norm(u), x0, reset)
        return u + y, xs

    def stepper(self, x0: dict[str, Tensor], horizon: int | None = None) -> "MambaStepper":  # any number of steps
        return MambaStepper(self, x0)


class MambaStepper:
    """The block one token at a time (see worldmodels/ssm.py), `MambaMixer.step` without resets: the
    conv window and the SSM state carried as they are, A = -exp(A_log) made once per rollout, the SSM
    update by `ssm_step` (compiled where MambaConfig.compile_step is set)."""

    def __init__(self, block: MambaBlock, x0: dict[str, Tensor]):
        self.block, self.window, self.h = block, x0["conv"], x0["ssm"].to(_real(x0["ssm"]))  # (B, D, K-1), (B, D, N)
        self.A = -block.mixer.A_log.exp().to(self.h.dtype)  # (D, N)
        self.ssm_step = compiled_ssm_step() if block.mixer.compile_step else ssm_step

    def step(self, u: Tensor) -> Tensor:
        m = self.block.mixer
        x, z = m.in_proj(self.block.norm(u)).chunk(2, -1)  # (B, D) each
        window = torch.cat([self.window, x[..., None]], -1)  # (B, D, K)
        x = F.silu((window * m.conv_weight).sum(-1) + m.conv_bias)
        delta, B, C = m._ssm_inputs(x)
        f = self.h.dtype
        dt = F.softplus(delta + m.dt_proj.bias).to(f)  # (B, D)
        self.h, y = self.ssm_step(self.h, dt, self.A, x.to(f), B.to(f), C.to(f), m.D.to(f), z.to(f))
        self.window = window[..., 1:]
        return u + m.out_proj(y.to(u.dtype))

    def readout_entry(self) -> Tensor:
        return self.h  # (B, D, N)


class MambaWM(SSMCore):
    def __init__(self, cfg: MambaConfig, embed_dim: int, action_dim: int, action_embed: str = "joint"):
        super().__init__(cfg, [MambaBlock(cfg) for _ in range(cfg.layers)], embed_dim, action_dim, action_embed)
