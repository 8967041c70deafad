"""Linear-recurrence scan h_t = a_t * h_{t-1} + b_t over (B, T, D), and the returns built on it.

`linear_scan` is the one API the backbones and the agent call. Three paths sit behind it:

- `linear_scan_triton`: Triton kernels. Each program owns BLOCK_D channels of one batch row and walks
  time in tiles of BLOCK_T steps: a tile of (a, b) is loaded once, scanned in registers with
  `tl.associative_scan` under the combine (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2), composed with
  the carried state, stored, and the tile's last state becomes the carry. Every element is read and
  written once (12 bytes per fp32 element forward). Where fewer programs than multiprocessors would
  run (few batch rows and channels, long T), time is also cut into chunks: a first pass writes each
  chunk's map h -> P h + S, a second starts each chunk from h0 composed with the maps before it (the
  inputs are read twice, every multiprocessor works). `KernelConfig` holds the launch (tile sizes,
  warps, prefetch of the next tile, chunking); `kernel_config(cfg)` overrides the defaults (benchmarks,
  tests). The backward is the same scan run the other way
  over the shifted a (dL/dh_t = g_t + a_{t+1} dL/dh_{t+1}), then dL/da_t = g_t h_{t-1}, dL/db_t = g_t.
  Used for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1 (tests only: slow).
- `linear_scan_chunked`: the same combine in plain PyTorch, blocked: doubling steps inside chunks of
  16 steps, then a scan over the chunk ends. log2(16) + T/16 tensor-level steps instead of T, so on a
  CPU it is what runs for sequences of 32 steps and more (autograd differentiates it).
- `linear_scan_ref`: a plain PyTorch loop with the same signature, the test oracle, and the path for
  short sequences off CUDA (acting and imagination run T = 1).

The switch: `backend="auto" | "triton" | "chunked" | "ref"` (or the env var LONGDREAM_SCAN_BACKEND);
"auto" picks Triton for CUDA tensors when triton is installed, else chunked for T >= 32, else the
loop. Forcing Triton where it cannot run is an error that says why. Limits: Triton takes no float64
(the PyTorch paths carry it in double); the interpreter cannot catch races or GPU rounding order, so
the GPU tests (marked `gpu`) repeat the comparisons on CUDA.

- dtypes: float32, bfloat16, float16 (carried in float32, returned in the input dtype), complex64.
- `reset` (B, T) restarts the recurrence where it is 1, in the associative form a_t <- a_t * (1 - r_t)
  (so h_t = b_t there and h0 is ignored).
- `reverse=True` runs h_t = a_t * h_{t+1} + b_t from the end; h0 is then the state after the end.
- `return_last=True` also returns the final state (B, D) (for reverse: the state at t = 0).

The agent's lambda-returns (agents/returns.py) are one reverse scan.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: the reference path runs everywhere
    triton = None


def _prepare(a: Tensor, b: Tensor, h0: Tensor | None, reset: Tensor | None):
    assert b.dim() == 3, f"b must be (B, T, D), got {tuple(b.shape)}"
    a = a.expand_as(b)
    if reset is not None:
        assert reset.shape == b.shape[:2], (reset.shape, b.shape)
        a = a * (1 - reset.to(a.real.dtype if a.is_complex() else a.dtype))[..., None]
    if h0 is not None:
        assert h0.shape == (b.shape[0], b.shape[2]), (h0.shape, b.shape)
    return a, b


def _carry_dtype(a: Tensor, b: Tensor) -> torch.dtype:
    """float32 or complex64; double precision stays double (the test oracle)."""
    cplx = a.is_complex() or b.is_complex()
    if a.dtype in (torch.float64, torch.complex128) or b.dtype in (torch.float64, torch.complex128):
        return torch.complex128 if cplx else torch.float64
    return torch.complex64 if cplx else torch.float32


def linear_scan_ref(a: Tensor, b: Tensor, h0: Tensor | None = None, reset: Tensor | None = None,
                    reverse: bool = False, return_last: bool = False):
    """Reference: a loop over time, carried in float32 (or complex64); float64 inputs stay in double."""
    a, b = _prepare(a, b, h0, reset)
    out_dtype = b.dtype
    carry = _carry_dtype(a, b)
    a, b = a.to(carry), b.to(carry)
    B, T, D = b.shape
    h = torch.zeros(B, D, dtype=b.dtype, device=b.device) if h0 is None else h0.to(b.dtype)
    steps = range(T - 1, -1, -1) if reverse else range(T)
    hs = [None] * T
    for t in steps:
        h = a[:, t] * h + b[:, t]  # (B, D)
        hs[t] = h
    out = torch.stack(hs, 1).to(out_dtype)  # (B, T, D)
    return (out, h.to(out_dtype)) if return_last else out


def linear_scan_chunked(a: Tensor, b: Tensor, h0: Tensor | None = None, reset: Tensor | None = None,
                        reverse: bool = False, return_last: bool = False, chunk: int = 16):
    """A blocked parallel scan in plain PyTorch, the fast path where Triton does not run (the CPU).

    Time is cut into chunks of `chunk` steps. Within every chunk at once, log2(chunk) doubling steps
    (Hillis-Steele) compose the affine maps h -> a_t h + b_t, so that (A_t, H_t) = (a_t ... a_0,
    the state at t from a zero state at the chunk's start); the states at the chunk ends then run
    through the same scan one level up (T / chunk steps), and every step adds A_t times the state
    its chunk started from. Only products and sums: no division, so a_t = 0 (resets) is fine. The
    result equals `linear_scan_ref` up to the order of floating-point additions, with log2(chunk) +
    T / chunk Python-level steps instead of T, which is what costs on a CPU. Same contract.

    The gradient is not autograd's trace of the doubling steps (whose slices and concatenations cost
    more than the scan itself: a zero-filled buffer per slice) but the adjoint recurrence, one more
    chunked scan run the other way, as the Triton path does (`_scan_backward`).
    """
    a, b = _prepare(a, b, h0, reset)
    h, last = _ChunkedScan.apply(a, b, h0, reverse, chunk)
    return (h, last) if return_last else h


def _chunked(a: Tensor, b: Tensor, h0: Tensor | None, reverse: bool, chunk: int) -> tuple[Tensor, Tensor]:
    """The chunked scan on (B, T, D) inputs of one carry dtype, without autograd: (h, last). In reverse
    the same steps run mirrored (the maps compose towards the chunk's first step, the padding goes in
    front), so no input or output is flipped."""
    B, T, D = b.shape
    C = max(1, min(chunk, T))
    n = -(-T // C)
    pad = n * C - T
    if pad:  # identity maps (a = 1, b = 0) after the last step the scan takes: no step sees them
        ones, zeros = a.new_ones(B, pad, D), b.new_zeros(B, pad, D)
        a, b = (torch.cat([ones, a], 1), torch.cat([zeros, b], 1)) if reverse else (torch.cat([a, ones], 1), torch.cat([b, zeros], 1))
    # own buffers (a is often a broadcast view), updated in place: each right-hand side is computed
    # whole before it is written, so the overlapping slices read the previous step's values
    A = a.reshape(B, n, C, D).clone(memory_format=torch.contiguous_format)
    H = b.reshape(B, n, C, D).clone(memory_format=torch.contiguous_format)
    k = 1
    while k < C:  # after this: A_t = prod of a over the chunk up to t, H_t = the state from zero
        if reverse:  # (from t to the chunk's end)
            H[:, :, :-k] += A[:, :, :-k] * H[:, :, k:]
            A[:, :, :-k] = A[:, :, :-k] * A[:, :, k:]
        else:
            H[:, :, k:] += A[:, :, k:] * H[:, :, :-k]
            A[:, :, k:] = A[:, :, k:] * A[:, :, :-k]
        k *= 2
    start = torch.zeros(B, D, dtype=b.dtype, device=b.device) if h0 is None else h0
    if n > 1:  # the state each chunk starts from: the scan over the chunks' end maps, one level up
        if reverse:  # a chunk starts from the state at the next chunk's first step
            ends, _ = _chunked(A[:, 1:, 0], H[:, 1:, 0], start, True, chunk)  # (B, n-1, D)
            start = torch.cat([ends, start[:, None]], 1)  # (B, n, D)
        else:
            ends, _ = _chunked(A[:, :-1, -1], H[:, :-1, -1], start, False, chunk)
            start = torch.cat([start[:, None], ends], 1)
    else:
        start = start[:, None]
    h = (H + A * start[:, :, None]).reshape(B, n * C, D)
    h = h[:, pad:] if reverse else h[:, :T]
    return h, h[:, 0 if reverse else -1]


def _scan_backward(scan, a: Tensor, h: Tensor, h0: Tensor | None, reverse: bool, grad_h: Tensor | None,
                   grad_last: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """Gradients of h = scan(a, x, h0) from those of h and of the last state. The adjoint runs the
    same recurrence the other way over the shifted a: dL/dh_t = g_t + a_{t+1} dL/dh_{t+1}; then
    dL/da_t = dL/dh_t h_{t-1}, dL/dx_t = dL/dh_t, dL/dh0 = a_0 dL/dh_0 (conjugated where complex, as
    autograd's convention is). `scan(a, x, reverse)` returns (h, last) without autograd."""
    B, T, D = h.shape
    g_out = grad_h.clone() if grad_h is not None else torch.zeros_like(h)
    if grad_last is not None:
        g_out[:, 0 if reverse else T - 1] += grad_last
    conj = torch.conj if h.is_complex() else (lambda t: t)
    zero = torch.zeros_like(a[:, :1])
    # dL/dh_t collects from the step that reads h_t: t+1 forward, t-1 in reverse
    a_next = torch.cat([a[:, 1:], zero], 1) if not reverse else torch.cat([zero, a[:, :-1]], 1)
    a_next = conj(a_next).to(g_out.dtype).contiguous()
    g, _ = scan(a_next, g_out.contiguous(), not reverse)
    start = h0 if h0 is not None else torch.zeros_like(h[:, 0])
    h_prev = torch.cat([start[:, None], h[:, :-1]], 1) if not reverse else torch.cat([h[:, 1:], start[:, None]], 1)
    grad_a = g * conj(h_prev)
    edge = 0 if not reverse else T - 1
    grad_h0 = conj(a[:, edge]) * g[:, edge] if h0 is not None else None
    return grad_a, g, grad_h0


def _grad_as(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    """A gradient in its input's dtype; a real input that met complex arithmetic takes the real part."""
    if grad is None or like is None:
        return None
    if grad.is_complex() and not like.is_complex():
        grad = grad.real
    return grad.to(like.dtype)


class _ChunkedScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, reverse, chunk):
        carry = _carry_dtype(a, b)
        ac, bc = a.to(carry), b.to(carry)
        h0c = h0.to(carry) if h0 is not None else None
        h, last = _chunked(ac, bc, h0c, reverse, chunk)
        ctx.save_for_backward(ac, h, h0c)
        ctx.reverse, ctx.chunk = reverse, chunk
        ctx.like = (a.new_empty(()), b.new_empty(()), h0.new_empty(()) if h0 is not None else None)
        return h.to(b.dtype), last.to(b.dtype)

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        a, h, h0 = ctx.saved_tensors
        chunk = ctx.chunk
        grads = _scan_backward(lambda a_, x, rev: _chunked(a_, x, None, rev, chunk), a, h, h0, ctx.reverse,
                               grad_h.to(h.dtype) if grad_h is not None else None,
                               grad_last.to(h.dtype) if grad_last is not None else None)
        return (*(_grad_as(g, like) for g, like in zip(grads, ctx.like)), None, None)


# ----------------------------------------------------------------------------- Triton kernels
if triton is not None:

    @triton.jit
    def _combine(a1, b1, a2, b2):
        return a1 * a2, a2 * b1 + b2

    @triton.jit
    def _combine_complex(ar1, ai1, br1, bi1, ar2, ai2, br2, bi2):
        # (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2) in complex arithmetic on (re, im) pairs
        return (ar1 * ar2 - ai1 * ai2, ar1 * ai2 + ai1 * ar2,
                ar2 * br1 - ai2 * bi1 + br2, ar2 * bi1 + ai2 * br1 + bi2)

    @triton.jit
    def _pick_row(x, row, BLOCK_T: tl.constexpr):
        rows = tl.arange(0, BLOCK_T)[:, None]
        return tl.sum(tl.where(rows == row, x, 0.0), axis=0)  # (BLOCK_D,)

    @triton.jit
    def _tile(base, tile, lo, hi, D, offs_d, mask_d, BLOCK_T: tl.constexpr):
        """Offsets and mask of time tile `tile` (rows tile * BLOCK_T ...) of one batch row's channels,
        rows outside [lo, hi) masked."""
        offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
        mask = (offs_t[:, None] >= lo) & (offs_t[:, None] < hi) & mask_d[None, :]
        return base + offs_t[:, None] * D + offs_d[None, :], mask

    @triton.jit
    def _chunk_start(H0, AGG, pid_b, pid_c, n_chunks, D, offs_d, mask_d, HAS_H0: tl.constexpr,
                     REVERSE: tl.constexpr, MODE: tl.constexpr, BLOCK_D: tl.constexpr):
        """The state a program's chunk starts from: zero in the aggregate pass (MODE 1), else h0 (or
        zero), and in the finishing pass (MODE 2) composed with the maps of the chunks before."""
        h = tl.zeros([BLOCK_D], dtype=tl.float32)
        if HAS_H0 and MODE != 1:
            h = tl.load(H0 + pid_b * D + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if MODE == 2:
            agg = AGG + pid_b.to(tl.int64) * n_chunks * 2 * D + offs_d
            n_before = n_chunks - 1 - pid_c if REVERSE else pid_c
            for j in range(n_before):
                c = n_chunks - 1 - j if REVERSE else j
                pa = tl.load(agg + 2 * c * D, mask=mask_d, other=1.0)
                ps = tl.load(agg + (2 * c + 1) * D, mask=mask_d, other=0.0)
                h = pa * h + ps
        return h

    @triton.jit
    def _scan_kernel(A, X, H0, OUT, LAST, AGG, T, D, TILES_PER_CHUNK, HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
                     MODE: tl.constexpr, PREFETCH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # grid (B, D / BLOCK_D, chunks): a program scans BLOCK_D channels of one batch row over one chunk
        # of TILES_PER_CHUNK time tiles. MODE 0: one chunk, the whole sequence. MODE 1: write the chunk's
        # map h -> P h + S (P = product of its a, S = its state from zero) to AGG (B, chunks, 2, D), no
        # output. MODE 2: start from h0 composed with the maps of the chunks before, write the output.
        pid_b, pid_d, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_chunks = tl.num_programs(2)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        mask_d = offs_d < D
        h = _chunk_start(H0, AGG, pid_b, pid_c, n_chunks, D, offs_d, mask_d, HAS_H0, REVERSE, MODE, BLOCK_D)
        p = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
        base = pid_b.to(tl.int64) * T * D
        first = pid_c * TILES_PER_CHUNK
        count = tl.minimum(TILES_PER_CHUNK, tl.cdiv(T, BLOCK_T) - first)
        lo, hi = first * BLOCK_T, tl.minimum(T, (first + count) * BLOCK_T)  # the chunk's time steps
        start = first + count - 1 if REVERSE else first
        step = -1 if REVERSE else 1
        if PREFETCH:  # the next tile's loads are in flight while this one is scanned
            ptr, mask = _tile(base, start, lo, hi, D, offs_d, mask_d, BLOCK_T)
            a_next = tl.load(A + ptr, mask=mask, other=1.0)
            x_next = tl.load(X + ptr, mask=mask, other=0.0)
        for i in range(count):
            if PREFETCH:
                a, x, cur, cur_mask = a_next.to(tl.float32), x_next.to(tl.float32), ptr, mask
                ptr, mask = _tile(base, start + step * (i + 1), lo, hi, D, offs_d, mask_d, BLOCK_T)
                a_next = tl.load(A + ptr, mask=mask, other=1.0)
                x_next = tl.load(X + ptr, mask=mask, other=0.0)
            else:
                cur, cur_mask = _tile(base, start + step * i, lo, hi, D, offs_d, mask_d, BLOCK_T)
                # padding is the identity (a=1, b=0), so it neither moves nor breaks the carry
                a = tl.load(A + cur, mask=cur_mask, other=1.0).to(tl.float32)
                x = tl.load(X + cur, mask=cur_mask, other=0.0).to(tl.float32)
            a_cum, x_cum = tl.associative_scan((a, x), axis=0, combine_fn=_combine, reverse=REVERSE)
            hs = a_cum * h[None, :] + x_cum  # (BLOCK_T, BLOCK_D)
            if MODE != 1:
                tl.store(OUT + cur, hs.to(OUT.dtype.element_ty), mask=cur_mask)
            else:
                p = p * _pick_row(a_cum, 0 if REVERSE else BLOCK_T - 1, BLOCK_T)
            h = _pick_row(hs, 0 if REVERSE else BLOCK_T - 1, BLOCK_T)
        if MODE == 1:
            agg = AGG + (pid_b.to(tl.int64) * n_chunks + pid_c) * 2 * D + offs_d
            tl.store(agg, p, mask=mask_d)
            tl.store(agg + D, h, mask=mask_d)
        elif pid_c == (0 if REVERSE else n_chunks - 1):  # the chunk that holds the sequence's end
            tl.store(LAST + pid_b * D + offs_d, h.to(LAST.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _scan_rows_kernel(A, X, H0, OUT, LAST, AGG, T, D, STEPS_PER_CHUNK, HAS_H0: tl.constexpr,
                          REVERSE: tl.constexpr, MODE: tl.constexpr, STAGES: tl.constexpr, BLOCK_D: tl.constexpr):
        # `_scan_kernel`'s grid and modes, with no tile scan: each thread walks its channels one time step
        # at a time (h = a h + x in registers), the loop software-pipelined STAGES steps deep so that
        # loads run ahead of the recurrence. A candidate for `bench scan sweep=true` (KernelConfig kind
        # "rows"); chunks are runs of STEPS_PER_CHUNK steps.
        pid_b, pid_d, pid_c = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        n_chunks = tl.num_programs(2)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        h = _chunk_start(H0, AGG, pid_b, pid_c, n_chunks, D, offs_d, mask_d, HAS_H0, REVERSE, MODE, BLOCK_D)
        p = tl.full([BLOCK_D], 1.0, dtype=tl.float32)
        base = pid_b.to(tl.int64) * T * D
        first = pid_c * STEPS_PER_CHUNK
        count = tl.minimum(STEPS_PER_CHUNK, T - first)
        for i in tl.range(0, count, num_stages=STAGES):
            t = first + count - 1 - i if REVERSE else first + i
            ptr = base + t * D + offs_d
            a = tl.load(A + ptr, mask=mask_d, other=1.0).to(tl.float32)
            x = tl.load(X + ptr, mask=mask_d, other=0.0).to(tl.float32)
            h = a * h + x
            if MODE != 1:
                tl.store(OUT + ptr, h.to(OUT.dtype.element_ty), mask=mask_d)
            else:
                p = p * a
        if MODE == 1:
            agg = AGG + (pid_b.to(tl.int64) * n_chunks + pid_c) * 2 * D + offs_d
            tl.store(agg, p, mask=mask_d)
            tl.store(agg + D, h, mask=mask_d)
        elif pid_c == (0 if REVERSE else n_chunks - 1):
            tl.store(LAST + pid_b * D + offs_d, h.to(LAST.dtype.element_ty), mask=mask_d)

    @triton.jit
    def _scan_complex_kernel(A, X, H0, OUT, LAST, T, D, HAS_H0: tl.constexpr, REVERSE: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        # complex64 tensors viewed as float32 (..., D, 2): re at 2d, im at 2d + 1
        pid_b, pid_d = tl.program_id(0), tl.program_id(1)
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        if HAS_H0:
            hr = tl.load(H0 + pid_b * 2 * D + 2 * offs_d, mask=mask_d, other=0.0)
            hi = tl.load(H0 + pid_b * 2 * D + 2 * offs_d + 1, mask=mask_d, other=0.0)
        else:
            hr = tl.zeros([BLOCK_D], dtype=tl.float32)
            hi = tl.zeros([BLOCK_D], dtype=tl.float32)
        base = pid_b.to(tl.int64) * T * 2 * D
        n_tiles = tl.cdiv(T, BLOCK_T)
        for i in range(n_tiles):
            tile = n_tiles - 1 - i if REVERSE else i
            offs_t = tile * BLOCK_T + tl.arange(0, BLOCK_T)
            mask = (offs_t[:, None] < T) & mask_d[None, :]
            ptr = base + offs_t[:, None] * 2 * D + 2 * offs_d[None, :]
            ar = tl.load(A + ptr, mask=mask, other=1.0)
            ai = tl.load(A + ptr + 1, mask=mask, other=0.0)
            xr = tl.load(X + ptr, mask=mask, other=0.0)
            xi = tl.load(X + ptr + 1, mask=mask, other=0.0)
            ar, ai, xr, xi = tl.associative_scan((ar, ai, xr, xi), axis=0, combine_fn=_combine_complex,
                                                 reverse=REVERSE)
            outr = ar * hr[None, :] - ai * hi[None, :] + xr
            outi = ar * hi[None, :] + ai * hr[None, :] + xi
            tl.store(OUT + ptr, outr, mask=mask)
            tl.store(OUT + ptr + 1, outi, mask=mask)
            row = 0 if REVERSE else BLOCK_T - 1
            hr = _pick_row(outr, row, BLOCK_T)
            hi = _pick_row(outi, row, BLOCK_T)
        tl.store(LAST + pid_b * 2 * D + 2 * offs_d, hr, mask=mask_d)
        tl.store(LAST + pid_b * 2 * D + 2 * offs_d + 1, hi, mask=mask_d)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """How `_launch` tiles the real scan: BLOCK_T time steps by BLOCK_D channels per tile, `warps` warps
    per program, `prefetch` the next tile while scanning this one, and `split`: when fewer than
    split x (the GPU's multiprocessors) programs would run (few batch rows and channels, long T), time
    is cut into chunks scanned in two passes (each chunk's map P h + S, then the output from h0 and the
    maps of the chunks before), which reads the inputs twice but keeps every multiprocessor busy.
    0 never splits. `kind="rows"` runs `_scan_rows_kernel` instead (no tile scan: each thread walks
    its channels step by step, `stages` steps of loads in flight; block_t and prefetch unused), a
    candidate the defaults do not use. `bench scan sweep=true` times a grid of these on the GPU."""
    block_t: int = 64
    block_d: int = 32
    warps: int = 4
    prefetch: bool = False
    split: int = 0
    kind: str = "tile"
    stages: int = 4


# The defaults, from `bench scan sweep=true` on an H200 (bench/results/scan_sweep_cuda.md). Where at least
# one program per multiprocessor runs, 64-step tiles without prefetch (no other config was faster beyond
# the timing noise). Where fewer would run (few batch rows and channels, long T), 128-step tiles with the
# next one prefetched and time cut into chunks until 8 programs per multiprocessor run: 0.106 against
# 0.483 ms at (B, D, T) = (1, 256, 16384), 0.169 against 0.210 ms at (4, 1024, 4096).
DEFAULT_CONFIG = KernelConfig(block_t=64, block_d=32, warps=4, prefetch=False, split=0)
FEW_ROWS_CONFIG = KernelConfig(block_t=128, block_d=32, warps=4, prefetch=True, split=8)
_override: KernelConfig | None = None


@contextlib.contextmanager
def kernel_config(cfg: KernelConfig):
    """Launch the real Triton scan with `cfg` inside the block (benchmarks and tests)."""
    global _override
    old, _override = _override, cfg
    try:
        yield
    finally:
        _override = old


BLOCK_D = 32  # channels per program of the complex kernel
MAX_BLOCK_T = 64  # its time steps per tile: a power of two up to this, the smallest that holds T
REAL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}  # what the real kernel takes
SINGLE, AGGREGATE, FINISH = 0, 1, 2  # the real kernel's modes


def _block_t(T: int, cap: int) -> int:
    return min(cap, 1 << max(T - 1, 0).bit_length())


@functools.lru_cache(maxsize=None)
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _chunks(cfg: KernelConfig, B: int, T: int, D: int, device: torch.device) -> tuple[int, int, int]:
    """(time tile, chunks, tiles per chunk) for a (B, T, D) scan under `cfg`."""
    bt = 1 if cfg.kind == "rows" else _block_t(T, cfg.block_t)  # rows: chunks count steps
    n_tiles = -(-T // bt)
    rows = B * -(-D // cfg.block_d)
    want = cfg.split * _multiprocessors(device)
    chunks = min(n_tiles, -(-want // rows)) if cfg.split and rows < want else 1
    per_chunk = -(-n_tiles // chunks)
    return bt, -(-n_tiles // per_chunk), per_chunk


def default_config(B: int, D: int, device: torch.device) -> KernelConfig:
    """The launch config for a (B, T, D) scan: FEW_ROWS_CONFIG where fewer programs than multiprocessors
    would run without time chunks, else DEFAULT_CONFIG."""
    rows = B * -(-D // DEFAULT_CONFIG.block_d)
    return FEW_ROWS_CONFIG if rows < _multiprocessors(device) else DEFAULT_CONFIG


def kernel_variants():
    """Every (name, kernel, signature, constexprs, options) that `_launch` can run under the default
    configs, in the form `triton.compiler.ASTSource` takes: the tests compile each ahead of time for real
    GPUs, which catches what the CPU interpreter cannot (types, layouts, register limits)."""
    for cfg in (DEFAULT_CONFIG, FEW_ROWS_CONFIG):
        blocks = [1 << i for i in range(cfg.block_t.bit_length())]  # 1, 2, ..., cfg.block_t
        for dt in REAL_DTYPES.values():
            sig = {**{n: f"*{dt}" for n in ("A", "X", "H0", "OUT", "LAST")}, "AGG": "*fp32", "T": "i32", "D": "i32",
                   "TILES_PER_CHUNK": "i32",
                   **{c: "constexpr" for c in ("HAS_H0", "REVERSE", "MODE", "PREFETCH", "BLOCK_T", "BLOCK_D")}}
            for reverse in (False, True):
                modes = [(SINGLE, bt, h0) for bt in blocks for h0 in (False, True)]
                if cfg.split:  # chunks only where there are several tiles: at the full tile
                    modes += [(AGGREGATE, cfg.block_t, False), (FINISH, cfg.block_t, False), (FINISH, cfg.block_t, True)]
                for mode, bt, has_h0 in modes:
                    const = {"HAS_H0": has_h0, "REVERSE": reverse, "MODE": mode, "PREFETCH": cfg.prefetch, "BLOCK_T": bt,
                             "BLOCK_D": cfg.block_d}
                    name = (f"_scan_kernel[{dt}, mode={mode}, h0={has_h0}, reverse={reverse}, BLOCK_T={bt}, "
                            f"prefetch={cfg.prefetch}, warps={cfg.warps}]")
                    yield name, _scan_kernel, sig, const, {"num_warps": cfg.warps}
    sig = {**{n: "*fp32" for n in ("A", "X", "H0", "OUT", "LAST")}, "T": "i32", "D": "i32",
           **{c: "constexpr" for c in ("HAS_H0", "REVERSE", "BLOCK_T", "BLOCK_D")}}
    for has_h0 in (False, True):  # complex64 travels as float32 (re, im) pairs
        for reverse in (False, True):
            for bt in [1 << i for i in range(MAX_BLOCK_T.bit_length())]:
                const = {"HAS_H0": has_h0, "REVERSE": reverse, "BLOCK_T": bt, "BLOCK_D": BLOCK_D}
                name = f"_scan_complex_kernel[fp32, h0={has_h0}, reverse={reverse}, BLOCK_T={bt}]"
                yield name, _scan_complex_kernel, sig, const, {"num_warps": 4}


def candidate_variants():
    """The row-walking kernel (`KernelConfig(kind="rows")`, not a default) in the same form as
    `kernel_variants`, for the ahead-of-time compile check: fp32 and bf16, every mode, both
    directions, a few pipeline depths."""
    for dt in ("fp32", "bf16"):
        sig = {**{n: f"*{dt}" for n in ("A", "X", "H0", "OUT", "LAST")}, "AGG": "*fp32", "T": "i32", "D": "i32",
               "STEPS_PER_CHUNK": "i32", **{c: "constexpr" for c in ("HAS_H0", "REVERSE", "MODE", "STAGES", "BLOCK_D")}}
        for mode in (SINGLE, AGGREGATE, FINISH):
            for reverse in (False, True):
                for stages in (2, 8):
                    const = {"HAS_H0": mode != AGGREGATE, "REVERSE": reverse, "MODE": mode, "STAGES": stages, "BLOCK_D": 128}
                    yield (f"_scan_rows_kernel[{dt}, mode={mode}, reverse={reverse}, STAGES={stages}]", _scan_rows_kernel,
                           sig, const, {"num_warps": 1})


def _launch(a: Tensor, x: Tensor, h0: Tensor | None, reverse: bool) -> tuple[Tensor, Tensor]:
    """Run the kernel on contiguous (B, T, D) inputs of one dtype; returns (h, last)."""
    B, T, D = x.shape
    out = torch.empty_like(x)
    last = torch.empty(B, D, dtype=x.dtype, device=x.device)
    if x.is_complex():
        view = lambda t: torch.view_as_real(t.resolve_conj())
        _scan_complex_kernel[(B, triton.cdiv(D, BLOCK_D))](
            view(a), view(x), view(h0) if h0 is not None else view(last), view(out), view(last), T, D,
            HAS_H0=h0 is not None, REVERSE=reverse, BLOCK_T=_block_t(T, MAX_BLOCK_T), BLOCK_D=BLOCK_D)
        return out, last
    cfg = _override or default_config(B, D, x.device)
    bt, chunks, per_chunk = _chunks(cfg, B, T, D, x.device)
    grid = (B, triton.cdiv(D, cfg.block_d), chunks)
    if cfg.kind == "rows":
        kernel, opts = _scan_rows_kernel, dict(STAGES=cfg.stages)
    else:
        kernel, opts = _scan_kernel, dict(PREFETCH=cfg.prefetch, BLOCK_T=bt)
    opts.update(REVERSE=reverse, BLOCK_D=cfg.block_d, num_warps=cfg.warps)
    h0_arg = h0 if h0 is not None else last
    if chunks == 1:
        kernel[grid](a, x, h0_arg, out, last, last, T, D, per_chunk, HAS_H0=h0 is not None, MODE=SINGLE, **opts)
        return out, last
    agg = torch.empty(B, chunks, 2, D, dtype=torch.float32, device=x.device)
    kernel[grid](a, x, h0_arg, out, last, agg, T, D, per_chunk, HAS_H0=False, MODE=AGGREGATE, **opts)
    kernel[grid](a, x, h0_arg, out, last, agg, T, D, per_chunk, HAS_H0=h0 is not None, MODE=FINISH, **opts)
    return out, last


class _TritonScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, x, h0, reverse):
        a, x = a.contiguous(), x.contiguous()
        h0c = h0.contiguous().to(x.dtype) if h0 is not None else None
        h, last = _launch(a.to(x.dtype) if not x.is_complex() else a.to(torch.complex64), x, h0c, reverse)
        ctx.save_for_backward(a, h, h0c)
        ctx.reverse, ctx.has_h0 = reverse, h0 is not None
        return h, last

    @staticmethod
    def backward(ctx, grad_h, grad_last):
        a, h, h0 = ctx.saved_tensors
        grad_a, grad_x, grad_h0 = _scan_backward(lambda a_, x, rev: _launch(a_, x, None, rev), a, h, h0, ctx.reverse,
                                                 grad_h, grad_last)
        return grad_a, grad_x, grad_h0 if ctx.has_h0 else None, None


def linear_scan_triton(a: Tensor, b: Tensor, h0: Tensor | None = None, reset: Tensor | None = None,
                       reverse: bool = False, return_last: bool = False):
    """Triton path (CUDA, or the CPU interpreter); same contract as `linear_scan_ref`."""
    _check_triton(b)
    a, b = _prepare(a, b, h0, reset)
    if b.is_complex() or a.is_complex():
        a, b = a.to(torch.complex64), b.to(torch.complex64)
        h0 = h0.to(torch.complex64) if h0 is not None else None
    elif a.dtype != b.dtype:
        a = a.to(b.dtype)
    h, last = _TritonScan.apply(a, b, h0, reverse)
    return (h, last) if return_last else h


def _check_triton(x: Tensor) -> None:
    if triton is None:
        raise RuntimeError("scan backend 'triton' needs the triton package (pip install triton); use backend='ref'")
    if not x.is_complex() and x.dtype not in REAL_DTYPES:
        raise RuntimeError(f"scan backend 'triton' takes float32, float16, bfloat16 or complex64, not {x.dtype}; "
                           "use backend='ref'")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("scan backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "import, for the CPU interpreter); use backend='ref' on the CPU")


CHUNKED_MIN_T = 32  # "auto" off CUDA: sequences at least this long take the chunked scan


def linear_scan(a: Tensor, b: Tensor, h0: Tensor | None = None, reset: Tensor | None = None,
                reverse: bool = False, return_last: bool = False, backend: str | None = None):
    """h_t = a_t * h_{t-1} + b_t over (B, T, D); see the module docstring."""
    backend = backend or os.environ.get("LONGDREAM_SCAN_BACKEND", "auto")
    if backend == "auto":
        if triton is not None and b.is_cuda and b.dtype != torch.float64:
            backend = "triton"
        else:  # the loop is cheaper for a few steps (acting, imagination); see bench/results/scan_cpu.md
            backend = "chunked" if b.shape[1] >= CHUNKED_MIN_T else "ref"
    if backend == "triton":
        return linear_scan_triton(a, b, h0, reset, reverse, return_last)
    if backend == "chunked":
        return linear_scan_chunked(a, b, h0, reset, reverse, return_last)
    if backend != "ref":
        raise ValueError(f"unknown scan backend '{backend}' (choose auto, triton, chunked or ref)")
    return linear_scan_ref(a, b, h0, reset, reverse, return_last)
