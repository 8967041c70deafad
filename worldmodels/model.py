"""The world model: shared encoder, decoder, reward and continue heads around a swappable sequence
core. Losses follow DreamerV3: prediction (decoder, symexp two-hot reward, Bernoulli continue) plus
KL balancing with free bits, L = pred + dyn * max(free, KL[sg(q)||p]) + rep * max(free, KL[q||sg(p)]).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodels.base import State, index_state
from worldmodels.nets import (ConvDecoder, ConvEncoder, MultiDecoder, MultiEncoder, NetsConfig, TwoHot, VectorDecoder,
                              VectorEncoder, full, mlp)
from worldmodels.mamba import MambaConfig, MambaWM
from worldmodels.rssm import RSSM, RSSMConfig
from worldmodels.s4wm import S4WM, S4WMConfig
from worldmodels.s5wm import S5WM, S5WMConfig
from worldmodels.transformer import TSSM, TransformerConfig


def _one_or_many(parts: dict[str, nn.Module], many):
    """A single observation part keeps its module as it is (plain tensors in and out, as before);
    several are combined (observations then come as {key: tensor})."""
    return next(iter(parts.values())) if len(parts) == 1 else many(parts)


# The one place a backbone is picked by name: {name: (core class, its config dataclass)}.
BACKBONES = {
    "mamba": (MambaWM, MambaConfig),
    "rssm": (RSSM, RSSMConfig),
    "s4wm": (S4WM, S4WMConfig),
    "s5wm": (S5WM, S5WMConfig),
    "transformer": (TSSM, TransformerConfig),
}


@dataclass(frozen=True)
class LossConfig:
    dec: float = 1.0
    reward: float = 1.0
    cont: float = 1.0
    dyn: float = 0.5
    rep: float = 0.1
    free_bits: float = 1.0  # nats below which the KL terms give no gradient
    repval: float = 0.0  # replay value loss of the critic (agents/dreamer.py; the current recipe: 0.3)


@dataclass(frozen=True)
class ObsSpec:
    """What the encoder reads: uint8 pixels `image` = (H, W, C) where `pixels`, a vector of `obs_dim`
    entries where obs_dim > 0, or both (then observations are {"pixels": ..., "observation": ...})."""

    pixels: bool
    obs_dim: int = 0
    action_dim: int = 1
    discrete: bool = False
    image: tuple[int, int, int] = (64, 64, 3)

    @property
    def keys(self) -> list[str]:
        """The env's observation keys the model reads: "pixels" and/or "observation"."""
        return (["pixels"] if self.pixels else []) + (["observation"] if self.obs_dim else [])


class WorldModel(nn.Module):
    def __init__(self, backbone: str, core_cfg, nets: NetsConfig, spec: ObsSpec, loss: LossConfig = LossConfig()):
        super().__init__()
        self.spec, self.loss_cfg, self.nets = spec, loss, nets
        H, W, C = spec.image
        if spec.pixels and H != W:
            raise ValueError(f"image observations must be square, got {H} x {W}")
        if not spec.keys:
            raise ValueError("the observations need an image part (pixels) or a vector part (obs_dim > 0)")
        encoders = {"pixels": lambda: ConvEncoder(nets.cnn_depth, C, H),
                    "observation": lambda: VectorEncoder(spec.obs_dim, nets.units, nets.layers)}
        self.encoder = _one_or_many({k: encoders[k]() for k in spec.keys}, MultiEncoder)
        core_cls, _ = BACKBONES[backbone]
        self.core = core_cls(core_cfg, self.encoder.out_dim, spec.action_dim, nets.action_embed)
        feat = self.core.feat_size
        decoders = {"pixels": lambda: ConvDecoder(feat, nets.cnn_depth, C, H),
                    "observation": lambda: VectorDecoder(feat, spec.obs_dim, nets.units, nets.layers)}
        self.decoder = _one_or_many({k: decoders[k]() for k in spec.keys}, MultiDecoder)
        self.reward = TwoHot(feat, nets.units, nets.layers, nets.bins)
        self.cont = mlp(feat, nets.units, nets.layers, 1)

    def loss(self, obs: Tensor, action: Tensor, reward: Tensor, is_first: Tensor, is_terminal: Tensor,
             start: State | None = None):
        """One world-model pass over a batch of sequences (B, T) from `start`, the state before each
        sequence (default: the initial state). Returns the weighted total, the per-term means, the
        posterior states (B, T, ...) and features (B, T, F)."""
        B, T = is_first.shape
        embed = self.encoder(obs)  # (B, T, E)
        states, feat, kl = self.core.observe(self.core.initial(B) if start is None else start, embed, action, is_first)
        terms = {
            "dec": self.decoder.loss(self.decoder(feat), obs),  # (B, T)
            "reward": self.reward.loss(self.reward(feat), reward),  # (B, T)
            "cont": F.binary_cross_entropy_with_logits(
                full(self.cont(feat)).squeeze(-1), 1.0 - is_terminal.float(), reduction="none"),  # (B, T)
            "dyn": kl["dyn"].clamp(min=self.loss_cfg.free_bits),
            "rep": kl["rep"].clamp(min=self.loss_cfg.free_bits),
        }
        means = {k: v.mean() for k, v in terms.items()}
        total = sum(getattr(self.loss_cfg, k) * v for k, v in means.items())  # repval belongs to the critic
        metrics = {"kl": kl["rep"].mean().detach()}
        return total, means, states, feat, metrics

    @torch.no_grad()
    def context_state(self, anchor: State, burn: dict[str, Tensor] | None) -> State:
        """The state before each replayed window (B, ...): the stored state of its anchor row, observed
        forward over the `burn["length"]` rows between anchor and window with the latents stored with
        them (burn: obs, action, is_first (B, P, ...), z (B, P, S) class indices, length (B,) <= P)."""
        if burn is None:
            return anchor
        states, _, _ = self.core.observe(anchor, self.encoder(burn["obs"]), burn["action"], burn["is_first"],
                                         noise={"stoch": burn["z"]})
        n = burn["length"]  # (B,)
        rows = torch.arange(n.shape[0], device=n.device)
        last = (n - 1).clamp(min=0)
        out = {}
        for k, v in anchor.items():
            burned = states[k][rows, last]  # (B, ...) the state after the last burn-in row
            out[k] = torch.where((n > 0).reshape(-1, *[1] * (v.dim() - 1)), burned, v)
        return out

    def imagine_actions(self, state: State, actions: Tensor) -> Tensor:
        """Prior features after each of the given actions (B, Q, A), rolled forward from `state` (B, ...):
        (B, Q, F). Imagination under recorded actions, for open-loop predictions and the memory probe."""
        Q = actions.shape[1]
        step = iter(range(Q))

        def replay(_feat: Tensor) -> Tensor:  # imagine() asks the policy at each state: hand it the next action
            i = next(step, None)
            return actions[:, i] if i is not None else torch.zeros_like(actions[:, 0])

        return self.core.imagine(state, replay, Q)[0][:, 1:]

    @torch.no_grad()
    def open_loop(self, obs: Tensor, action: Tensor, is_first: Tensor, context: int, start: State | None = None) -> Tensor:
        """Observe `context` frames from `start` (default: the initial state), then imagine the rest
        from the true actions; returns the decoded prediction (B, T, ...) in observation units (uint8
        for pixels)."""
        B, T = is_first.shape
        state = self.core.initial(B) if start is None else start
        states, feat, _ = self.core.observe(state, self.encoder(obs[:, :context]), action[:, :context], is_first[:, :context])
        if T > context:  # action[:, t] leads into frame t: the actions into the imagined frames
            feat = torch.cat([feat, self.imagine_actions(index_state(states, -1), action[:, context:])], 1)
        return self.decoder.mean(self.decoder(feat))
