"""linear_scan: the Triton and chunked paths against the float64 reference, and the reference
against closed forms (the returns built on it: tests/agents/test_lambda_return.py)."""
import os

import pytest
import torch

from worldmodels.ops import scan
from worldmodels.ops.scan import linear_scan, linear_scan_ref

triton_ok = scan.triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
needs_triton = pytest.mark.skipif(not triton_ok, reason="triton not installed or not runnable here")
DEV = "cuda" if torch.cuda.is_available() else "cpu"  # where the Triton tests run: the GPU, else the interpreter


def make(B, T, D, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    cplx = dtype.is_complex
    real = torch.float32 if cplx else torch.float64
    rand = lambda *s: torch.rand(*s, generator=g, dtype=real)
    randn = lambda *s: torch.randn(*s, generator=g, dtype=real)
    a = rand(B, T, D) * 0.98
    b, h0 = randn(B, T, D), randn(B, D)
    if cplx:
        a = torch.polar(a.float(), rand(B, T, D).float() * 6.28)
        b, h0 = torch.complex(b.float(), randn(B, T, D).float()), torch.complex(h0.float(), randn(B, D).float())
    reset = (rand(B, T) < 0.15).to(real if not cplx else torch.float32)
    return [x.to(device) for x in (a, b, h0, reset)]


def run(backend, a, b, h0, reset, reverse, dtype, weights):
    a, b, h0 = (x.detach().to(dtype).requires_grad_() for x in (a, b, h0))
    h, last = linear_scan(a, b, h0, reset, reverse, return_last=True, backend=backend)
    w, wl = weights
    loss = (h * w.to(h.dtype).conj()).real.sum() + (last * wl.to(h.dtype).conj()).real.sum()
    return [h, last, *torch.autograd.grad(loss, (a, b, h0))]


def compare(device, dtype, T, reverse, tol, B=2, D=19, backend="triton"):
    a, b, h0, reset = make(B, T, D, dtype, device)
    oracle = torch.complex128 if dtype.is_complex else torch.float64
    g = torch.Generator().manual_seed(5)
    wdt = torch.float64 if not dtype.is_complex else torch.complex128
    weights = (torch.randn(B, T, D, generator=g, dtype=wdt).to(device), torch.randn(B, D, generator=g, dtype=wdt).to(device))
    fast = run(backend, a, b, h0, reset, reverse, dtype, weights)
    ref = run("ref", a, b, h0, reset, reverse, oracle, weights)
    for name, x, y in zip(["h", "last", "grad_a", "grad_b", "grad_h0"], fast, ref):
        assert x.dtype == dtype, (name, x.dtype)
        err = ((x.to(oracle) - y).abs().max() / y.abs().max().clamp(min=1e-6)).item()
        assert err < tol, f"{name}: relative error {err:.2e} (dtype {dtype}, T {T}, reverse {reverse})"


@needs_triton
@pytest.mark.parametrize("T", [1, 7, 64, 77, 300])  # 300: the few-rows default cuts time into chunks
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_fp32_matches_float64_reference(T, reverse):
    compare(DEV, torch.float32, T, reverse, 1e-5)


@needs_triton
@pytest.mark.parametrize("split", [0, 8])
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_time_chunks_and_prefetch_match_reference(split, prefetch, reverse):
    """The kernel's other launch shapes: time cut into chunks (two passes: each chunk's map, then the
    output from h0 and the maps before), and the next tile loaded while one is scanned."""
    cfg = scan.KernelConfig(block_t=4, block_d=16, warps=1, prefetch=prefetch, split=split)
    assert (scan._chunks(cfg, 2, 77, 19, torch.device("cpu"))[1] > 1) == bool(split)
    with scan.kernel_config(cfg):
        compare(DEV, torch.float32, 77, reverse, 1e-5)
        compare(DEV, torch.bfloat16, 33, reverse, 3e-2)


@needs_triton
@pytest.mark.parametrize("split", [0, 8])
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_row_walking_kernel_matches_reference(split, reverse):
    """The sweep's other kernel (KernelConfig kind "rows": each thread walks its channels step by step),
    alone and with time chunks."""
    cfg = scan.KernelConfig(kind="rows", block_d=16, warps=1, stages=2, split=split)
    assert (scan._chunks(cfg, 2, 77, 19, torch.device("cpu"))[1] > 1) == bool(split)
    with scan.kernel_config(cfg):
        compare(DEV, torch.float32, 77, reverse, 1e-5)
        compare(DEV, torch.bfloat16, 33, reverse, 3e-2)


@needs_triton
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_triton_half_precision(dtype, tol):
    compare(DEV, dtype, 33, False, tol)
    compare(DEV, dtype, 33, True, tol)


@needs_triton
@pytest.mark.parametrize("reverse", [False, True])
def test_triton_complex(reverse):
    compare(DEV, torch.complex64, 41, reverse, 1e-5)


@needs_triton
def test_triton_without_h0_or_reset_and_broadcast_a():
    a, b, _, _ = make(2, 9, 4, torch.float32, DEV)
    a = a[:1].float().expand(2, -1, -1)  # broadcast a over the batch
    fast = linear_scan(a, b.float(), backend="triton")
    torch.testing.assert_close(fast, linear_scan_ref(a, b.float()))


@pytest.mark.parametrize("T", [1, 7, 16, 17, 64, 300])  # one chunk, partial chunks, two levels of chunks
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.complex64])
def test_chunked_matches_float64_reference(T, reverse, dtype):
    compare("cpu", dtype, T, reverse, 1e-5, backend="chunked")


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_chunked_half_precision(dtype, tol):
    """Carried in float32, returned (and differentiated) in the input's dtype."""
    compare("cpu", dtype, 33, False, tol, backend="chunked")
    compare("cpu", dtype, 33, True, tol, backend="chunked")


def test_chunked_gradient_for_real_decay_and_complex_input():
    """A real a meeting a complex b (a real decay on a complex state) gets a real gradient, the real
    part of autograd's, as the loop gives it."""
    a, b, h0, reset = make(2, 40, 3, torch.complex64)
    a = a.abs().detach()
    grads = []
    for backend in ("chunked", "ref"):
        x = [t.clone().requires_grad_() for t in (a, b, h0)]
        h = linear_scan(*x, reset=reset, backend=backend)
        grads.append(torch.autograd.grad((h * h.conj()).real.sum(), x))
    for fast, ref in zip(*grads):
        assert fast.dtype == ref.dtype
        torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_chunked_takes_zero_decay_and_float64():
    a, b, h0, reset = make(3, 50, 4, torch.float64)
    a[:, 10] = 0.0  # a_t = 0 wipes the state, as a reset does
    for rev in (False, True):
        torch.testing.assert_close(scan.linear_scan_chunked(a, b, h0, reset, rev, chunk=4),
                                   linear_scan_ref(a, b, h0, reset, rev))


def test_auto_picks_the_chunked_scan_for_long_cpu_sequences(monkeypatch):
    calls = []
    monkeypatch.setattr(scan, "linear_scan_chunked", lambda *x, **k: calls.append("chunked"))
    monkeypatch.setattr(scan, "linear_scan_ref", lambda *x, **k: calls.append("ref"))
    linear_scan(torch.ones(1, scan.CHUNKED_MIN_T, 2), torch.ones(1, scan.CHUNKED_MIN_T, 2))
    linear_scan(torch.ones(1, 1, 2), torch.ones(1, 1, 2))
    assert calls == ["chunked", "ref"]


def test_reference_closed_forms():
    B, T, D = 2, 11, 3
    b = torch.randn(B, T, D, dtype=torch.float64)
    torch.testing.assert_close(linear_scan_ref(torch.ones_like(b), b), b.cumsum(1))  # a = 1: cumulative sum
    torch.testing.assert_close(linear_scan_ref(torch.ones_like(b), b, reverse=True), b.flip(1).cumsum(1).flip(1))
    c = 0.7  # constant a, constant b = 1: geometric sum
    h = linear_scan_ref(torch.full_like(b, c), torch.ones_like(b))
    t = torch.arange(1, T + 1, dtype=torch.float64)
    torch.testing.assert_close(h[0, :, 0], (1 - c**t) / (1 - c))
    h0 = torch.ones(B, D, dtype=torch.float64)  # h_t = c^t h0 with b = 0
    h = linear_scan_ref(torch.full_like(b, c), torch.zeros_like(b), h0=h0)
    torch.testing.assert_close(h[0, :, 0], c**t)


def test_reset_restarts_the_recurrence():
    b = torch.ones(1, 6, 1)
    reset = torch.tensor([[0.0, 0, 1, 0, 0, 0]])
    h = linear_scan_ref(torch.ones_like(b), b, h0=torch.full((1, 1), 10.0), reset=reset)
    assert h[0, :, 0].tolist() == [11, 12, 1, 2, 3, 4]


def test_forcing_triton_where_it_cannot_run_is_a_clear_error(monkeypatch):
    x = torch.zeros(1, 3, 2)
    monkeypatch.setattr(scan, "triton", None)
    with pytest.raises(RuntimeError, match="needs the triton package"):
        linear_scan(x, x, backend="triton")
    with pytest.raises(ValueError, match="unknown scan backend"):
        linear_scan(x, x, backend="fast")


@needs_triton
def test_cpu_tensors_without_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("the check is for CPU tensors")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        linear_scan(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2), backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2), (torch.complex64, 1e-5)])
@pytest.mark.parametrize("reverse", [False, True])
def test_cuda_matches_reference(dtype, tol, reverse):
    """On the GPU: what the interpreter cannot check (rounding order, real parallel execution)."""
    compare("cuda", dtype, 1000, reverse, tol, B=4, D=256)
    compare("cuda", dtype, 64, reverse, tol, B=64, D=512)
    if not dtype.is_complex:  # the other launch shapes of the real kernel: time chunks, prefetch, wide tiles
        for cfg in (scan.KernelConfig(split=8, prefetch=True), scan.KernelConfig(block_t=128, block_d=64, warps=8, split=4),
                    scan.KernelConfig(kind="rows", block_d=128, warps=1, stages=8, split=8)):
            with scan.kernel_config(cfg):
                compare("cuda", dtype, 1000, reverse, tol, B=4, D=256)
                compare("cuda", dtype, 3000, reverse, tol, B=1, D=37)


def _aot(*args):
    """worldmodels.ops.aot in a process of its own: kernels made under the interpreter cannot be compiled."""
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "worldmodels.ops.aot", *args], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parents[2], timeout=1200)


@pytest.mark.skipif(scan.triton is None, reason="triton not installed")
def test_kernels_compile_ahead_of_time_for_sm90(tmp_path, monkeypatch):
    """Each kernel, dtype, h0 and direction at the smallest and largest time tile, to a cubin for sm_90
    (a fresh Triton cache, so that nothing is reused); the full sweep is the slow test below."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    out = _aot("--arch", "90", "--quick")
    assert out.returncode == 0, out.stderr[-2000:]
    from worldmodels.ops.aot import variants

    assert f"sm_90: {len(list(variants(quick=True)))} kernel variants compiled" in out.stdout
    out = _aot("--arch", "90", "--candidates")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"sm_90: {len(list(variants(candidates=True)))} kernel variants compiled" in out.stdout


@pytest.mark.slow
@pytest.mark.skipif(scan.triton is None, reason="triton not installed")
def test_every_kernel_variant_compiles_for_sm80_and_sm90(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    out = _aot("--arch", "80,90")
    assert out.returncode == 0, out.stderr[-2000:]
    n = len(list(scan.kernel_variants()))
    assert f"sm_80: {n} kernel variants compiled" in out.stdout and f"sm_90: {n} kernel variants compiled" in out.stdout


def test_launch_tiles_are_the_compiled_ones():
    """The time tile `_launch` picks for any T is one of those the ahead-of-time compile covers."""
    if scan.triton is None:
        pytest.skip("triton not installed")
    compiled = {(c["MODE"], c["BLOCK_T"], c["PREFETCH"], o["num_warps"])
                for _, k, _, c, o in scan.kernel_variants() if k is scan._scan_kernel}
    for T in [1, 2, 3, 7, 8, 33, 64, 65, 1000, 100000]:
        for B, D in [(1, 1), (1, 256), (64, 512)]:
            cfg = scan.default_config(B, D, torch.device("cpu"))
            assert cfg is (scan.FEW_ROWS_CONFIG if B * -(-D // 32) < 4 else scan.DEFAULT_CONFIG)  # 4 "multiprocessors" off CUDA
            bt, chunks, _ = scan._chunks(cfg, B, T, D, torch.device("cpu"))
            assert bt == min(cfg.block_t, scan.triton.next_power_of_2(T))
            modes = [scan.SINGLE] if chunks == 1 else [scan.AGGREGATE, scan.FINISH]
            assert all((m, bt, cfg.prefetch, cfg.warps) in compiled for m in modes), (T, B, D, bt, chunks)


@needs_triton
def test_bench_scan_sweep_times_the_configs_it_is_given(tmp_path):
    """`bench scan sweep=true configs=...` (through the interpreter off CUDA): every shape gets the
    default's row and one per config given, all checked against the default's output."""
    if torch.cuda.is_available():
        pytest.skip("on a GPU the sweep runs the full shapes; this checks its bookkeeping")
    from bench import scan as bench_scan

    data = bench_scan.main(["sweep=true", "device=cpu", "repeats=1", f"out={tmp_path}", "configs=rows/16/1/2/4,16/16/1/1/0"])
    shapes = {tuple(r["shape"]) for r in data["rows"]}
    assert len(shapes) == 2 and len(data["rows"]) == 3 * len(shapes)
    assert sum(r["default"] for r in data["rows"]) == len(shapes)
    assert {r["kind"] for r in data["rows"]} == {"tile", "rows"}
    assert (tmp_path / "scan_sweep_cpu.md").read_text().count("| default |") == len(shapes)
