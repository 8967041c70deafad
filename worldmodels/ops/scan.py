"""Linear-recurrence scan h_t = a_t * h_{t-1} + b_t over (B, T, D), and the returns built on it.

`linear_scan` is the one API the backbones and the agent call. `linear_scan_ref` is a plain PyTorch
loop with the same signature: it runs everywhere and is the test oracle.

- dtypes: float32, bfloat16, float16 (carried in float32, returned in the input dtype), complex64.
- `reset` (B, T) restarts the recurrence where it is 1, in the associative form a_t <- a_t * (1 - r_t)
  (so h_t = b_t there and h0 is ignored).
- `reverse=True` runs h_t = a_t * h_{t+1} + b_t from the end; h0 is then the state after the end.
- `return_last=True` also returns the final state (B, D) (for reverse: the state at t = 0).

Lambda-returns (DreamerV3 eq. 7) and GAE are one reverse scan each.
"""
from __future__ import annotations

import torch
from torch import Tensor


def _prepare(a: Tensor, b: Tensor, h0: Tensor | None, reset: Tensor | None):
    assert b.dim() == 3, f"b must be (B, T, D), got {tuple(b.shape)}"
    a = a.expand_as(b)
    if reset is not None:
        assert reset.shape == b.shape[:2], (reset.shape, b.shape)
        a = a * (1 - reset.to(a.real.dtype if a.is_complex() else a.dtype))[..., None]
    if h0 is not None:
        assert h0.shape == (b.shape[0], b.shape[2]), (h0.shape, b.shape)
    return a, b


def linear_scan_ref(a: Tensor, b: Tensor, h0: Tensor | None = None, reset: Tensor | None = None,
                    reverse: bool = False, return_last: bool = False):
    """Reference: a loop over time, carried in float32 (or complex64)."""
    a, b = _prepare(a, b, h0, reset)
    out_dtype = b.dtype
    carry = torch.complex64 if (a.is_complex() or b.is_complex()) else torch.float32
    a, b = a.to(carry) if a.dtype != torch.float64 else a, b.to(carry) if b.dtype != torch.float64 else b
    B, T, D = b.shape
    h = torch.zeros(B, D, dtype=b.dtype, device=b.device) if h0 is None else h0.to(b.dtype)
    steps = range(T - 1, -1, -1) if reverse else range(T)
    hs = [None] * T
    for t in steps:
        h = a[:, t] * h + b[:, t]  # (B, D)
        hs[t] = h
    out = torch.stack(hs, 1).to(out_dtype)  # (B, T, D)
    return (out, h.to(out_dtype)) if return_last else out


def linear_scan(a: Tensor, b: Tensor, h0: Tensor | None = None, reset: Tensor | None = None,
                reverse: bool = False, return_last: bool = False):
    """h_t = a_t * h_{t-1} + b_t over (B, T, D); see the module docstring."""
    return linear_scan_ref(a, b, h0, reset, reverse, return_last)


def _flat_time(x: Tensor) -> tuple[Tensor, tuple]:
    """(..., T) -> (N, T, 1) and the leading shape."""
    return x.reshape(-1, x.shape[-1], 1), x.shape[:-1]


def lambda_return(reward: Tensor, value: Tensor, continuation: Tensor, lam: float) -> Tensor:
    """R_t = r_t + c_t * ((1 - lam) * v_{t+1} + lam * R_{t+1}), R_T = v_T (Dreamer's form).

    reward, continuation: (..., T) where continuation is the discount times not-terminal for the
    step t -> t+1; value: (..., T+1). Returns (..., T). One reverse scan with a_t = lam * c_t.
    """
    assert value.shape[-1] == reward.shape[-1] + 1 and continuation.shape == reward.shape, \
        (reward.shape, value.shape, continuation.shape)
    b = reward + continuation * (1 - lam) * value[..., 1:]  # (..., T)
    b3, lead = _flat_time(b)
    a3, _ = _flat_time(continuation * lam)
    h0 = value[..., -1].reshape(-1, 1)  # (N, 1)
    return linear_scan(a3, b3, h0=h0, reverse=True).reshape(*lead, -1)


def gae(reward: Tensor, value: Tensor, continuation: Tensor, lam: float) -> Tensor:
    """Generalised advantage estimation: delta_t = r_t + c_t v_{t+1} - v_t, A_t = delta_t + c_t lam A_{t+1}.
    Shapes as in `lambda_return`; returns advantages (..., T)."""
    assert value.shape[-1] == reward.shape[-1] + 1 and continuation.shape == reward.shape
    delta = reward + continuation * value[..., 1:] - value[..., :-1]
    d3, lead = _flat_time(delta)
    a3, _ = _flat_time(continuation * lam)
    return linear_scan(a3, d3, reverse=True).reshape(*lead, -1)
