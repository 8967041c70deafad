"""RSSM after DreamerV3 (Hafner et al. 2023): a deterministic GRU path h_t and 32 categorical
latents z_t with 1% unimix and straight-through gradients.

    h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}])       deterministic state "deter"
    p(z_t | h_t)                                  prior
    q(z_t | h_t, x_t)                             posterior
    feat_t = [h_t, z_t]

The training path is a loop over T (the recurrence is nonlinear, no parallel scan exists).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodels.base import Policy, State, reset_state
from worldmodels.nets import XS_LATENT, action_input, categorical_kl, fill_size, full, mlp, sample_onehot, token_in, unimix_probs

SIZES = {
    "xs": dict(deter=64, hidden=64, **XS_LATENT),
    "s": dict(deter=512, hidden=512, stoch=32, classes=32),
    "m": dict(deter=1024, hidden=768, stoch=32, classes=32),
}


@dataclass(frozen=True)
class RSSMConfig:
    size: str = "xs"
    deter: int | None = None  # GRU state width
    hidden: int | None = None  # width of the input, prior and posterior MLPs
    stoch: int | None = None  # number of categorical latents
    classes: int | None = None  # classes per latent
    unimix: float = 0.01  # mix of the uniform into prior and posterior

    def __post_init__(self):
        fill_size(self, SIZES, self.size)


class NormGRUCell(nn.Module):
    """GRU with a LayerNorm on the gate pre-activations and update bias -1 (DreamerV3)."""

    def __init__(self, inp: int, size: int):
        super().__init__()
        self.linear = nn.Linear(inp + size, 3 * size, bias=False)
        self.norm = nn.LayerNorm(3 * size)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        reset, cand, update = self.norm(self.linear(torch.cat([x, h], -1))).chunk(3, -1)
        reset = torch.sigmoid(reset)
        cand = torch.tanh(reset * cand)
        update = torch.sigmoid(update - 1)
        return update * cand + (1 - update) * h


class RSSM(nn.Module):
    def __init__(self, cfg: RSSMConfig, embed_dim: int, action_dim: int, action_embed: str = "joint"):
        super().__init__()
        self.cfg = cfg
        S, K = cfg.stoch, cfg.classes
        self.feat_size = cfg.deter + S * K
        self.img_in, width = token_in(S * K, action_dim, cfg.hidden, None, action_embed)
        self.gru = NormGRUCell(width, cfg.deter)
        self.prior_net = mlp(cfg.deter, cfg.hidden, 1, S * K)
        self.post_net = mlp(cfg.deter + embed_dim, cfg.hidden, 1, S * K)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"deter": (self.cfg.deter,), "stoch": (self.cfg.stoch, self.cfg.classes)}

    def initial(self, batch_size: int) -> State:
        p = next(self.parameters())
        return {k: torch.zeros(batch_size, *s, device=p.device, dtype=p.dtype) for k, s in self.state_shapes().items()}

    def _logits(self, net: nn.Module, x: Tensor) -> Tensor:
        return full(net(x)).reshape(*x.shape[:-1], self.cfg.stoch, self.cfg.classes)  # (B, S, K)

    def _img_step(self, state: State, action: Tensor) -> Tensor:
        x = self.img_in(torch.cat([state["stoch"].flatten(1), action_input(action)], -1))  # (B, hidden)
        return self.gru(x, state["deter"])  # (B, deter)

    def observe(self, state, embed, action, is_first, noise=None):
        """The posterior rollout over T steps. Only what the recurrence needs runs inside the loop: the
        posterior net's projection of the embeddings runs over all T steps before it (its first layer is
        split into its deter and embed columns, W [h; e] = W_h h + W_e e), and the prior net, which nothing
        in the loop reads, over all T after it. `observe_stepwise` is the plain per-step twin."""
        B, T = embed.shape[:2]
        assert action.shape[:2] == (B, T) and is_first.shape == (B, T), (embed.shape, action.shape, is_first.shape)
        initial = self.initial(B)
        first_layer, rest = self.post_net[0], self.post_net[1:]
        w_deter, w_embed = first_layer.weight.split([self.cfg.deter, embed.shape[-1]], -1)
        from_embed = F.linear(embed, w_embed)  # (B, T, hidden): W_e e_t for every step at once
        deters, stochs, posts = [], [], []
        for t in range(T):
            first = is_first[:, t].to(embed.dtype)  # (B,)
            state = reset_state(state, initial, first)
            a = action[:, t] * (1 - first)[:, None]  # (B, A) no action leads into an episode's first step
            deter = self._img_step(state, a)
            post = full(rest(F.linear(deter, w_deter) + from_embed[:, t])).reshape(B, self.cfg.stoch, self.cfg.classes)
            probs = unimix_probs(post, self.cfg.unimix)
            stoch = sample_onehot(probs, None if noise is None else noise["stoch"][:, t])
            state = {"deter": deter, "stoch": stoch}
            deters.append(deter)
            stochs.append(stoch)
            posts.append(probs)
        states = {"deter": torch.stack(deters, 1), "stoch": torch.stack(stochs, 1)}  # (B, T, ...)
        post_lp = torch.stack(posts, 1).log()  # (B, T, S, K)
        prior_lp = unimix_probs(self._logits(self.prior_net, states["deter"]), self.cfg.unimix).log()
        return states, self.feat(states), self._kl_losses(post_lp, prior_lp)

    @staticmethod
    def _kl_losses(post_lp: Tensor, prior_lp: Tensor) -> dict[str, Tensor]:
        return {
            "dyn": categorical_kl(post_lp.detach(), prior_lp),  # (B, T) trains the prior
            "rep": categorical_kl(post_lp, prior_lp.detach()),  # (B, T) regularises the posterior
        }

    def observe_stepwise(self, state, embed, action, is_first, noise=None):
        """`observe` as DreamerV3 writes it: prior and posterior nets on each step inside the loop. The
        slow twin the tests hold `observe` to."""
        B, T = embed.shape[:2]
        initial = self.initial(B)
        deters, stochs, post_lp, prior_lp = [], [], [], []
        for t in range(T):
            first = is_first[:, t].to(embed.dtype)  # (B,)
            state = reset_state(state, initial, first)
            a = action[:, t] * (1 - first)[:, None]
            deter = self._img_step(state, a)
            prior = self._logits(self.prior_net, deter)  # (B, S, K)
            post = self._logits(self.post_net, torch.cat([deter, embed[:, t]], -1))  # (B, S, K)
            probs = unimix_probs(post, self.cfg.unimix)
            stoch = sample_onehot(probs, None if noise is None else noise["stoch"][:, t])
            state = {"deter": deter, "stoch": stoch}
            deters.append(deter)
            stochs.append(stoch)
            post_lp.append(probs.log())
            prior_lp.append(unimix_probs(prior, self.cfg.unimix).log())
        states = {"deter": torch.stack(deters, 1), "stoch": torch.stack(stochs, 1)}  # (B, T, ...)
        return states, self.feat(states), self._kl_losses(torch.stack(post_lp, 1), torch.stack(prior_lp, 1))

    def feat(self, state: State) -> Tensor:
        return torch.cat([state["deter"], state["stoch"].flatten(-2)], -1)  # (..., F)

    def imagine(self, state: State, policy: Policy, horizon: int):
        feats = [self.feat(state)]
        actions = [policy(feats[0])]
        for _ in range(horizon):
            deter = self._img_step(state, actions[-1])
            prior = self._logits(self.prior_net, deter)
            state = {"deter": deter, "stoch": sample_onehot(unimix_probs(prior, self.cfg.unimix))}
            feats.append(self.feat(state))
            actions.append(policy(feats[-1]))
        return torch.stack(feats, 1), torch.stack(actions, 1)  # (N, H+1, F), (N, H+1, A)
