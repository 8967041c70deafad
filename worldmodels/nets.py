"""Networks and distributions shared by every backbone (DreamerV3, Hafner et al. 2023, arXiv 2301.04104).

symlog/symexp (eq. 1), the symexp two-hot head over 255 bins (eq. 9-10), categorical latents with 1%
unimix and straight-through gradients, the CNN encoder/decoder for 64x64 pixels and the MLP encoder/
decoder for vectors. Backbones only differ in their sequence core; everything here is shared.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Shared widths per size preset. Backbone-specific dims live beside each backbone.
# The latent of every backbone at size xs: 32 categoricals of 16 classes, one size for all so that a
# comparison of backbones is not one of latent sizes (the README's Results say why this size).
XS_LATENT = {"stoch": 32, "classes": 16}

ACTION_EMBEDS = ("joint", "separate")

NET_SIZES = {
    "xs": dict(units=64, layers=1, cnn_depth=8),
    "s": dict(units=512, layers=2, cnn_depth=32),
    "m": dict(units=640, layers=3, cnn_depth=48),
}


@dataclass(frozen=True)
class NetsConfig:
    name: str = "xs"  # size preset: xs (CPU tests) | s | m
    units: int | None = None  # MLP width of encoder, decoder, heads, actor and critic
    layers: int | None = None  # hidden layers of those MLPs
    cnn_depth: int | None = None  # channels of the first conv; doubles per stage
    bins: int = 255  # two-hot bins for reward and value
    # How every sequence core reads its input [z_{t-1}, a_{t-1}]: "joint", one Linear over the
    # concatenation (DreamerV3 as released in 2023), or "separate", z and a each through their own
    # Linear -> LayerNorm -> SiLU before they meet (the current DreamerV3's dynamics input), so that the
    # action is not a few columns among the latent's hundreds (`token_in`).
    action_embed: str = "joint"

    def __post_init__(self):
        fill_size(self, NET_SIZES, self.name)
        if self.action_embed not in ACTION_EMBEDS:
            raise ValueError(f"action_embed must be one of {', '.join(ACTION_EMBEDS)}, got '{self.action_embed}'")


def fill_size(cfg, sizes: dict[str, dict], size: str) -> None:
    """Set every field of a frozen config dataclass that is None to the size preset's value: the
    one place where a size name becomes dims (each backbone's SIZES, the shared NET_SIZES)."""
    if size not in sizes:
        raise ValueError(f"unknown size '{size}'; choose one of {sorted(sizes)}")
    for key, value in sizes[size].items():
        if getattr(cfg, key) is None:
            object.__setattr__(cfg, key, value)


def full(x: Tensor) -> Tensor:
    """x in float32 where bf16 autocast (agent.precision) left it in half precision; float32 and float64
    as they are. Heads pass their outputs through it, so that distributions and losses are computed
    in full precision, as DreamerV3 does."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def symlog(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.expm1(x.abs())


def mlp(inp: int, units: int, layers: int, out: int | None = None, zero_out: bool = False) -> nn.Sequential:
    """Linear -> LayerNorm -> SiLU blocks, optionally followed by an output projection."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(inp if i == 0 else units, units, bias=False), nn.LayerNorm(units), nn.SiLU()]
    if out is not None:
        last = nn.Linear(units if layers else inp, out)
        if zero_out:  # DreamerV3 zero-initialises reward and critic outputs: predictions start at 0
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
        mods.append(last)
    return nn.Sequential(*mods)


def shared_input(x: Tensor, nets: list[nn.Sequential]) -> list[Tensor]:
    """[net(x) for net in nets] for networks (`mlp`s) that read the same x: their first Linear layers
    run as one matrix product, so x is read once forward and its gradient is one product instead of
    one per net (on the imagined features, 16,384 rows per update, 1.37x faster than three products
    at xs), then each net's remaining layers. Nets whose first layers are not all Linear, or differ in
    having a bias, run one by one."""
    firsts = [net[0] for net in nets]
    if len(nets) < 2 or not all(type(f) is nn.Linear for f in firsts) or len({f.bias is None for f in firsts}) > 1:
        return [net(x) for net in nets]
    weight = torch.cat([f.weight for f in firsts])
    bias = None if firsts[0].bias is None else torch.cat([f.bias for f in firsts])
    parts = F.linear(x, weight, bias).split([f.out_features for f in firsts], -1)
    return [net[1:](part) for net, part in zip(nets, parts)]


class TwoHot(nn.Module):
    """Symexp two-hot regression head: logits over bins placed uniformly in symlog space."""

    def __init__(self, inp: int, units: int, layers: int, bins: int = 255, low: float = -20.0, high: float = 20.0):
        super().__init__()
        self.net = mlp(inp, units, layers, bins, zero_out=True)
        self.register_buffer("bins", torch.linspace(low, high, bins))

    def forward(self, x: Tensor) -> Tensor:
        return full(self.net(x))  # (..., K) logits, in float32 also under bf16 autocast

    def mean(self, logits: Tensor) -> Tensor:
        return symexp(logits.softmax(-1) @ self.bins.to(logits.dtype))  # (...)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy against the two-hot encoding of symlog(target); returns (...)."""
        return self.nll(logits.log_softmax(-1), target)

    def nll(self, logp: Tensor, target: Tensor) -> Tensor:
        """`loss` from log-probabilities (..., K), so that several targets share one log-softmax. It
        reads the two bins each target falls between (`two_hot_nll`) instead of building the (..., K)
        encoding; `two_hot` is the reference the tests hold it to."""
        return two_hot_nll(logp, symlog(target), self.bins)


def _neighbours(x: Tensor, bins: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x clamped to the bins' range, the indices of the bins below and above it, and the weight of the
    upper one, so that (1 - w) bins[lo] + w bins[hi] = x."""
    x = x.clamp(bins[0], bins[-1])
    hi = torch.searchsorted(bins, x.detach().contiguous(), right=True).clamp(1, bins.numel() - 1)  # (...)
    lo = hi - 1
    return x, lo, hi, (x - bins[lo]) / (bins[hi] - bins[lo])


def two_hot_nll(logp: Tensor, x: Tensor, bins: Tensor) -> Tensor:
    """-sum_k two_hot(x)_k logp_k, from the two bins x falls between: (...)."""
    x, lo, hi, w_hi = _neighbours(x, bins)
    at = lambda i: logp.gather(-1, i.unsqueeze(-1)).squeeze(-1)
    return -((1 - w_hi) * at(lo) + w_hi * at(hi))


def two_hot(x: Tensor, bins: Tensor) -> Tensor:
    """Spread each value over its two neighbouring bins so that the weighted mean equals it."""
    x, lo, hi, w_hi = _neighbours(x, bins)
    out = torch.zeros(*x.shape, bins.numel(), device=x.device, dtype=x.dtype)
    out.scatter_(-1, lo.unsqueeze(-1), (1 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, hi.unsqueeze(-1), w_hi.unsqueeze(-1))
    return out  # (..., K)


class SeparateIn(nn.Module):
    """[z, a] -> [SiLU(LN(W_z z)), SiLU(LN(W_a a))], optionally projected to `out`: each input normalised
    on its own (the current DreamerV3's dynamics input), so the action's share of the token does not
    shrink with the latent's width. Takes the same concatenated input as the joint MLP."""

    def __init__(self, stoch: int, action_dim: int, hidden: int, out: int | None):
        super().__init__()
        self.action_dim = action_dim
        self.stoch = mlp(stoch, hidden, 1)
        self.action = mlp(action_dim, hidden, 1)
        self.out = nn.Linear(2 * hidden, out) if out is not None else None

    def forward(self, x: Tensor) -> Tensor:
        A = self.action_dim
        y = torch.cat([self.stoch(x[..., :-A]), self.action(x[..., -A:])], -1)  # (..., 2 hidden)
        return y if self.out is None else self.out(y)


def token_in(stoch: int, action_dim: int, hidden: int, out: int | None, action_embed: str) -> tuple[nn.Module, int]:
    """A sequence core's input module over [z_{t-1} (flattened), action_input(a_{t-1})] (see
    NetsConfig.action_embed) and its output width: `out` if given, else the hidden width it ends in."""
    if action_embed == "joint":
        return mlp(stoch + action_dim, hidden, 1, out), out or hidden
    if action_embed == "separate":
        return SeparateIn(stoch, action_dim, hidden, out), out or 2 * hidden
    raise ValueError(f"action_embed must be one of {', '.join(ACTION_EMBEDS)}, got '{action_embed}'")


def action_input(action: Tensor) -> Tensor:
    """The action as the dynamics read it: divided by max(1, |a|) with the divisor held constant
    (DreamerV3), so that an unclamped sample of the actor enters as the env executes it (clipped to
    [-1, 1]) while its gradient passes unchanged. One-hot actions pass as they are."""
    return action / action.detach().abs().clamp(min=1.0)


def unimix_probs(logits: Tensor, unimix: float) -> Tensor:
    probs = logits.softmax(-1)
    return (1 - unimix) * probs + unimix / logits.shape[-1]


def sample_index(probs: Tensor) -> Tensor:
    """Class indices drawn from probs (..., K) by inverting the CDF at one uniform per distribution:
    the number of classes whose cumulative probability lies below u. The same distribution as
    `sample_index_ref`, about 15x faster for DreamerV3's many small categoricals on a CPU."""
    cdf = probs.detach().cumsum(-1)  # (..., K)
    u = torch.rand(*probs.shape[:-1], 1, device=probs.device, dtype=cdf.dtype) * cdf[..., -1:]
    return (cdf < u).sum(-1).clamp(max=probs.shape[-1] - 1)


def sample_index_ref(probs: Tensor) -> Tensor:
    """The obviously correct twin of `sample_index`: torch.multinomial, one draw per distribution."""
    return torch.multinomial(probs.detach().reshape(-1, probs.shape[-1]), 1).reshape(probs.shape[:-1])


def sample_onehot(probs: Tensor, noise: Tensor | None = None) -> Tensor:
    """One-hot sample with straight-through gradients. `noise` fixes it: uniforms of the same shape
    (Gumbel-max), or integer class indices of shape probs.shape[:-1], the sample itself (a replayed latent)."""
    if noise is None:
        idx = sample_index(probs)
    elif not noise.is_floating_point():
        assert noise.shape == probs.shape[:-1], (noise.shape, probs.shape)
        idx = noise.long()
    else:  # Gumbel-max with given uniforms, for deterministic tests
        idx = (probs.log() - torch.log(-torch.log(noise.clamp(1e-9, 1 - 1e-9)))).argmax(-1)
    onehot = F.one_hot(idx, probs.shape[-1]).to(probs.dtype)
    return onehot + probs - probs.detach()


def categorical_kl(p_logits: Tensor, q_logits: Tensor) -> Tensor:
    """KL(p || q) for factorised categoricals given log-probabilities, summed over latents: (...)."""
    return (p_logits.exp() * (p_logits - q_logits)).sum((-1, -2))


class VectorEncoder(nn.Module):
    def __init__(self, obs_dim: int, units: int, layers: int):
        super().__init__()
        self.net = mlp(obs_dim, units, max(layers, 1))
        self.out_dim = units

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(symlog(obs))  # (..., E)


class VectorDecoder(nn.Module):
    def __init__(self, feat: int, obs_dim: int, units: int, layers: int):
        super().__init__()
        self.net = mlp(feat, units, max(layers, 1), obs_dim)

    def forward(self, feat: Tensor) -> Tensor:
        return full(self.net(feat))  # (..., O) prediction in symlog space

    def loss(self, pred: Tensor, obs: Tensor) -> Tensor:
        return (pred - symlog(obs)).pow(2).sum(-1)  # (...)

    def mean(self, pred: Tensor) -> Tensor:
        return symexp(pred)


class MultiEncoder(nn.Module):
    """Observations of several parts {key: tensor} (an image and a vector): each through its own encoder,
    the embeddings concatenated (DreamerV3's multi-input encoder)."""

    def __init__(self, encoders: dict[str, nn.Module]):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.out_dim = sum(e.out_dim for e in encoders.values())

    def forward(self, obs) -> Tensor:
        return torch.cat([enc(obs[k]) for k, enc in self.encoders.items()], -1)  # (..., E)


class MultiDecoder(nn.Module):
    """One decoder per observation part; the loss is the sum of the parts' losses (each a sum over its
    own entries, as for a single part)."""

    def __init__(self, decoders: dict[str, nn.Module]):
        super().__init__()
        self.decoders = nn.ModuleDict(decoders)

    def forward(self, feat: Tensor) -> dict[str, Tensor]:
        return {k: dec(feat) for k, dec in self.decoders.items()}

    def loss(self, pred: dict[str, Tensor], obs) -> Tensor:
        return sum(dec.loss(pred[k], obs[k]) for k, dec in self.decoders.items())  # (...)

    def mean(self, pred: dict[str, Tensor]) -> dict[str, Tensor]:
        return {k: dec.mean(pred[k]) for k, dec in self.decoders.items()}


class ChannelNorm(nn.Module):
    """LayerNorm over channels of an image tensor (N, C, H, W)."""

    def __init__(self, C: int):
        super().__init__()
        self.norm = nn.LayerNorm(C)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_stages(size: int) -> int:
    """Stride-2 stages that take a square image of `size` pixels down to 4 x 4 (64 -> 4 stages)."""
    stages = int(math.log2(size)) - 2 if size > 0 else 0
    if stages < 1 or 4 * 2**stages != size:
        raise ValueError(f"image observations must be square with a side of 8, 16, 32, 64, ... pixels, got {size}")
    return stages


class ConvEncoder(nn.Module):
    """Stride-2 convolutions from size x size down to 4 x 4 (four for 64 x 64), channels depth x (1, 2, 4,
    8, ...). Input uint8 (..., C, size, size)."""

    def __init__(self, depth: int, channels: int = 3, size: int = 64):
        super().__init__()
        mods, c = [], channels
        for i in range(conv_stages(size)):
            mods += [nn.Conv2d(c, depth * 2**i, 4, 2, 1, bias=False), ChannelNorm(depth * 2**i), nn.SiLU()]
            c = depth * 2**i
        self.net = nn.Sequential(*mods)
        self.out_dim = c * 4 * 4

    def forward(self, obs: Tensor) -> Tensor:
        lead = obs.shape[:-3]
        x = obs.reshape(-1, *obs.shape[-3:]).float() / 255.0 - 0.5  # (N, C, size, size)
        return self.net(x).reshape(*lead, self.out_dim)  # (..., E)


class ConvDecoder(nn.Module):
    """The encoder's mirror: a projection to 4 x 4 x depth 2^(stages-1), then stride-2 transposed
    convolutions up to C x size x size."""

    def __init__(self, feat: int, depth: int, channels: int = 3, size: int = 64):
        super().__init__()
        stages = conv_stages(size)
        self.top, self.size = depth * 2 ** (stages - 1), size
        self.proj = nn.Linear(feat, self.top * 4 * 4)
        mods, c = [], self.top
        for i in reversed(range(stages - 1)):
            mods += [nn.ConvTranspose2d(c, depth * 2**i, 4, 2, 1, bias=False), ChannelNorm(depth * 2**i), nn.SiLU()]
            c = depth * 2**i
        mods.append(nn.ConvTranspose2d(c, channels, 4, 2, 1))
        self.net = nn.Sequential(*mods)

    def forward(self, feat: Tensor) -> Tensor:
        lead = feat.shape[:-1]
        x = self.proj(feat.reshape(-1, feat.shape[-1])).reshape(-1, self.top, 4, 4)
        return full(self.net(x)).reshape(*lead, -1, self.size, self.size)  # (..., C, size, size), pixels centred on 0

    def loss(self, pred: Tensor, obs: Tensor) -> Tensor:
        target = obs.float() / 255.0 - 0.5
        return (pred - target).pow(2).sum((-1, -2, -3))  # (...) sum over pixels, units of S4WM's MSE

    def mean(self, pred: Tensor) -> Tensor:
        return ((pred + 0.5).clamp(0, 1) * 255).to(torch.uint8)
