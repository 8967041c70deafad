"""The world-model contract every sequence core (RSSM, Transformer, S4WM, S5WM, Mamba) honours.

A backbone turns embedded observations and the previous actions into features for the heads, and
rolls its prior forward under a policy. Encoder, decoder and heads are shared (worldmodels/model.py),
so backbones differ only here.

State is a flat dict of tensors whose leading dim is the batch: (B, ...). `observe` returns the
state after every step with a time dim, (B, T, ...), so that imagination can start from each one;
`index_state(states, -1)` takes the state after the last step.

Conventions, per step t of a sequence:
- `embed[:, t]` encodes observation x_t;
- `action[:, t]` is the action that led to x_t (a_{t-1}; zeros at an episode start);
- `is_first[:, t]` marks an episode start: the core resets its state *before* step t.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import Tensor

State = dict[str, Tensor]
Policy = Callable[[Tensor], Tensor]  # feat (N, F) -> action (N, A)


class Backbone(Protocol):
    feat_size: int  # F: width of the features the heads, actor and critic read

    def initial(self, batch_size: int) -> State:
        """The state before the first step of an episode, (B, ...) per entry."""

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-entry shape without the batch dim; the collector carries these between steps."""

    def observe(self, state: State, embed: Tensor, action: Tensor, is_first: Tensor,
                noise: State | None = None) -> tuple[State, Tensor, dict[str, Tensor]]:
        """Posterior pass over (B, T): returns states (B, T, ...), features (B, T, F) and per-step
        losses {"dyn": (B, T), "rep": (B, T)} plus any metrics. T > 1 is the training path, T = 1 the
        acting path; both must agree. `noise` fixes the latent samples: {"stoch": uniforms (B, T, S, K)}
        for tests, or class indices (B, T, S), the samples themselves (a replay burn-in)."""

    def imagine(self, state: State, policy: Policy, horizon: int) -> tuple[Tensor, Tensor]:
        """Prior rollout from `state` (N, ...): features (N, H+1, F) with the start at index 0, and
        the actions (N, H+1, A) the policy took at each of them."""


def imagine_all(core: Backbone, states: State, policy: Policy, horizon: int) -> tuple[Tensor, Tensor]:
    """Imagination from every state `observe` returned, (B, T, ...): features and actions
    (B*T, H+1, ...) in flatten_state's order. A core whose consecutive states share most of their
    content (the Transformer's sliding KV window) does this itself (its `imagine_all`, equal to
    imagining from the flattened states); the others imagine from flatten_state(states)."""
    own = getattr(core, "imagine_all", None)
    return own(states, policy, horizon) if own else core.imagine(flatten_state(states), policy, horizon)


def index_state(state: State, t: int | slice) -> State:
    return {k: v[:, t] for k, v in state.items()}


def flatten_state(state: State) -> State:
    """(B, T, ...) -> (B*T, ...)."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in state.items()}


def reset_state(state: State, initial: State, is_first: Tensor) -> State:
    """Replace the state of rows where is_first is set (B,) by the initial state."""
    out = {}
    for k, v in state.items():
        mask = is_first.reshape(-1, *[1] * (v.dim() - 1)).to(torch.bool)
        out[k] = torch.where(mask, initial[k].to(v.dtype), v)
    return out
