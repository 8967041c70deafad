"""What the state-space cores (S4WM, S5WM, Mamba) share: a stack of state-space blocks as the sequence core.

    u_t = MLP([z_{t-1}, a_{t-1}])                     input token
    h_t = blocks(u_t)                                 each block carries its own recurrent state
    p(z_t | h_t) prior,  q(z_t | x_t) posterior from the observation alone
    feat_t = [h_t, z_t, s_t]                          s_t: the last block's SSM state, projected

Every block's recurrence is linear in its state, x_t = a_t * x_{t-1} + b_t, so the training path is
one `linear_scan` over T per state-space layer, with the state reset at `is_first`
(a_t <- a_t (1 - is_first_t)); acting and imagination run T = 1 and carry the state, and the tests
hold both modes equal. Nothing is T x T: memory is linear in T.

The actor and critic read feat, which includes the SSM state s_t as R2I does: h_t is a function of
the inputs seen through the state, s_t is the state itself.

A backbone file defines its block and a config; `SSMCore` does the rest. A block describes its own
state: `state_shapes`, {entry: shape} of the real tensors it carries per layer (complex states travel
as real (re, im) pairs, so that TorchRL collectors can carry them), and has
`forward(u (B, T, H), x0 {entry: (B, *shape)}, reset (B, T)) -> (u, {entry: (B, T, *shape)})` and
`state_readout() -> (entry, module)`: which of its entries the features read, and a module from it
(..., *shape) to (..., H). The core's state holds each entry for all L blocks, (B, L, *shape), beside
"stoch" and "h".

Imagination steps each block one token at a time through a stepper (`BlockStepper`: the block's
forward on T = 1). A block may give a faster one, `stepper(x0, horizon)`, for a rollout of `horizon`
steps: one that keeps its state in its own form between steps (complex, not (re, im) pairs) and makes
its discretisation once, or (S4) one that carries no state at all. A stepper has `step(u) -> output`
and either `readout_entry()`, the entry the features read, or `read(readout)`, what the readout module
gives on it; the tests hold every such stepper equal to `BlockStepper`.

Likewise a block may give its own training pass, `sequence(u, x0, reset, readout) -> (u, states, read)`,
which `observe` runs where gradients are on and T > 1: `read` is `readout` (the features' module, or
None) applied to the block's readout entry, carrying the gradient, and the states may come without
one (S4: outputs and readout by convolutions, states by a scan under no_grad). Nothing downstream
differentiates through observe's states: imagination starts from them detached and the replay
context stores them detached. The tests hold `sequence` equal to `forward` in values and gradients.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from worldmodels.base import Policy, State
from worldmodels.nets import action_input, categorical_kl, full, mlp, sample_onehot, token_in, unimix_probs


def complex_dtype(x: Tensor) -> torch.dtype:
    return torch.complex128 if x.dtype == torch.float64 else torch.complex64


def as_complex(x: Tensor) -> Tensor:
    """Real (re, im) pairs (..., 2) as one complex tensor (...): complex128 from float64, else complex64."""
    return torch.view_as_complex(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous())


def as_real(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A complex tensor (...) as real (re, im) pairs (..., 2) of `dtype`."""
    return torch.view_as_real(x).to(dtype)


def init_log_dt(n: int, dt_min: float, dt_max: float) -> Tensor:
    """Log step sizes spread log-uniformly over [dt_min, dt_max] (S4D / S5 initialisation)."""
    return torch.empty(n).uniform_(math.log(dt_min), math.log(dt_max))


class BlockStepper:
    """One block's recurrence one token at a time, from its state x0 {entry: (B, *shape)}: the block's
    own forward on T = 1 with no reset. `step` takes the block's input (B, H) and returns its output,
    carrying the state; `readout_entry` is the entry the features read, (B, *shape)."""

    def __init__(self, block: nn.Module, x0: State, readout_key: str):
        self.block, self.x, self.key = block, x0, readout_key

    def step(self, u: Tensor) -> Tensor:
        no_reset = torch.zeros(u.shape[0], 1, device=u.device, dtype=u.dtype)
        u, xs = self.block(u[:, None], self.x, no_reset)
        self.x = {k: v[:, 0] for k, v in xs.items()}
        return u[:, 0]

    def readout_entry(self) -> Tensor:
        return self.x[self.key]


class SSMCore(nn.Module):
    fast_steps = True  # imagination uses the blocks' own steppers where they have one (False: BlockStepper)
    fast_observe = True  # training passes use the blocks' own `sequence` where they have one (False: forward)

    def __init__(self, cfg, blocks: list[nn.Module], embed_dim: int, action_dim: int, action_embed: str = "joint"):
        super().__init__()
        self.cfg = cfg
        S, K, H = cfg.stoch, cfg.classes, cfg.d_model
        self.inp = token_in(S * K, action_dim, cfg.hidden, H, action_embed)[0]
        self.blocks = nn.ModuleList(blocks)
        self.prior_net = mlp(H, cfg.hidden, 1, S * K)
        self.post_net = mlp(embed_dim, cfg.hidden, 1, S * K)
        self.block_state = dict(self.blocks[0].state_shapes)  # {entry: shape per block}
        assert not {"stoch", "h"} & set(self.block_state), "a block's state entries may not be named stoch or h"
        # the last block's state, read out to H features and normalised, joins the features (R2I)
        self.readout_key, readout = self.blocks[-1].state_readout()
        self.state_feat = nn.Sequential(readout, nn.LayerNorm(H)) if cfg.feat_state else None
        self.feat_size = H + S * K + (H if cfg.feat_state else 0)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        c, L = self.cfg, len(self.blocks)
        return {**{k: (L, *s) for k, s in self.block_state.items()}, "stoch": (c.stoch, c.classes), "h": (c.d_model,)}

    def initial(self, batch_size: int) -> State:
        p = next(self.parameters())
        return {k: torch.zeros(batch_size, *s, device=p.device, dtype=p.dtype) for k, s in self.state_shapes().items()}

    def _logits(self, net: nn.Module, x: Tensor) -> Tensor:
        return full(net(x)).reshape(*x.shape[:-1], self.cfg.stoch, self.cfg.classes)

    def _per_block(self, state: State) -> list[State]:
        """The blocks' entries of a state (B, L, *shape) as one state {entry: (B, *shape)} per block."""
        return [{k: state[k][:, i] for k in self.block_state} for i in range(len(self.blocks))]

    def _blocks(self, x0: list[State], z_prev: Tensor, action: Tensor, reset: Tensor, read: bool = False
                ) -> tuple[Tensor, list[State], Tensor | None]:
        """Sequence model over (B, T) from one state per block: h (B, T, H), each block's states
        {entry: (B, T, *shape)}, and with `read` where the last block gave it, the readout of its state
        entry (B, T, H) (else None: read it from the states). `read` asks for the training pass: blocks
        with a `sequence` run it (their states may then come without gradient; the readout carries it)."""
        u = self.inp(torch.cat([z_prev.flatten(-2), action_input(action)], -1))  # (B, T, H)
        states, out = [], None
        # a block's own pass may size its work from the data (S4: the episode segments), which a CUDA graph
        # being captured cannot read back: there, the blocks' forward
        own = read and self.fast_observe and torch.is_grad_enabled() and u.shape[1] > 1 and not (
            u.is_cuda and torch.cuda.is_current_stream_capturing())
        for i, (block, x) in enumerate(zip(self.blocks, x0)):
            if own and hasattr(block, "sequence"):
                last = i == len(self.blocks) - 1 and self.state_feat is not None
                u, xs, out = block.sequence(u, x, reset, self.state_feat[0] if last else None)
            else:
                u, xs = block(u, x, reset)
            states.append(xs)
        return u, states, out

    def _core(self, state: State, z_prev: Tensor, action: Tensor, reset: Tensor, read: bool = False
              ) -> tuple[Tensor, State, Tensor | None]:
        """Sequence model over (B, T): h (B, T, H), the blocks' states {entry: (B, T, L, *shape)} and the
        last block's readout where the training pass gave it (see `_blocks`)."""
        u, states, out = self._blocks(self._per_block(state), z_prev, action, reset, read)
        return u, {k: torch.stack([xs[k] for xs in states], 2) for k in self.block_state}, out

    def observe(self, state, embed, action, is_first, noise=None):
        first = is_first.to(embed.dtype)  # (B, T)
        post = self._logits(self.post_net, embed)  # (B, T, S, K)
        probs = unimix_probs(post, self.cfg.unimix)
        z = sample_onehot(probs, None if noise is None else noise["stoch"])  # (B, T, S, K)
        # the token at t reads z_{t-1} and a_{t-1}; both are zero where an episode starts
        z_prev = torch.cat([state["stoch"][:, None], z[:, :-1]], 1) * (1 - first)[..., None, None]
        h, blocks, read = self._core(state, z_prev, action * (1 - first)[..., None], first, read=True)
        prior = self._logits(self.prior_net, h)
        post_lp, prior_lp = probs.log(), unimix_probs(prior, self.cfg.unimix).log()
        losses = {"dyn": categorical_kl(post_lp.detach(), prior_lp), "rep": categorical_kl(post_lp, prior_lp.detach())}
        states = {**blocks, "stoch": z, "h": h}
        return states, self.feat(states) if read is None else self._feat(h, z, read), losses

    def feat(self, state: State) -> Tensor:
        read = None
        if self.state_feat is not None:  # the last block's entry: select -1 on the block dim
            read = self.state_feat[0](state[self.readout_key].select(-len(self.block_state[self.readout_key]) - 1, -1))
        return self._feat(state["h"], state["stoch"], read)

    def _feat(self, h: Tensor, z: Tensor, read: Tensor | None) -> Tensor:
        """[h, z, LN(read)] where read is the readout of the last block's state (..., H)."""
        parts = [h, z.flatten(-2)]
        if self.state_feat is not None:
            parts.append(self.state_feat[1](read))
        return torch.cat(parts, -1)

    def _read(self, stepper) -> Tensor | None:
        """The readout of the last block's state from its stepper (None without state features)."""
        if self.state_feat is None:
            return None
        return stepper.read(self.state_feat[0]) if hasattr(stepper, "read") else self.state_feat[0](stepper.readout_entry())

    def imagine(self, state: State, policy: Policy, horizon: int):
        """Each block steps through its stepper, which carries its state between steps in whatever form
        suits it (stacking the states into the contract's (N, L, ...) layout at every step would copy
        them, and scatter gradients back)."""
        feats = [self.feat(state)]
        actions = [policy(feats[0])]
        steppers = [block.stepper(x, horizon) if self.fast_steps and hasattr(block, "stepper") else BlockStepper(block, x, self.readout_key)
                    for block, x in zip(self.blocks, self._per_block(state))]
        z = state["stoch"]
        for _ in range(horizon):
            h = self.inp(torch.cat([z.flatten(-2), action_input(actions[-1])], -1))
            for s in steppers:
                h = s.step(h)
            z = sample_onehot(unimix_probs(self._logits(self.prior_net, h), self.cfg.unimix))
            feats.append(self._feat(h, z, self._read(steppers[-1])))
            actions.append(policy(feats[-1]))
        return torch.stack(feats, 1), torch.stack(actions, 1)
