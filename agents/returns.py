"""Lambda-returns (DreamerV3 eq. 7) on the linear scan: one reverse scan over the imagined steps."""
from __future__ import annotations

from torch import Tensor

from worldmodels.ops.scan import linear_scan


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
