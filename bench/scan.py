"""`longdream bench scan`: linear-scan and lambda-return throughput.

Shapes (B, D, T) = (16, 1024, 1024), (4, 1024, 4096), (1, 256, 16384), (64, 512, 64) (tensors laid out
(B, T, D)); lambda-returns at (batch x time) = (16384 x 16), (1024 x 333), (64 x 4096). Median time
over CUDA events, effective bandwidth (12 bytes per fp32 element forward, 32 forward+backward; half
that per element for bf16) and its ratio to the device's copy bandwidth measured in the same run.
Comparators in the same run: the PyTorch loop (`linear_scan_ref`), accelerated-scan (optional `bench`
extra; layout (B, C, T), power-of-two T; `accel=scalar` its Triton kernels, the default, `accel=warp` its
CUDA ones, which nvcc builds at import for minutes, `accel=none` neither) and TorchRL's
`vec_td_lambda_return_estimate`.

On a CPU it times the chunked PyTorch scan (the CPU's fast path) against the loop at reduced shapes
and says so: GPU figures need a GPU.
"""
from __future__ import annotations

import importlib
import statistics
import time

import torch

from bench.report import machine, markdown, parse, write

SCAN_SHAPES = [(16, 1024, 1024), (4, 1024, 4096), (1, 256, 16384), (64, 512, 64)]
RETURN_SHAPES = [(16384, 16), (1024, 333), (64, 4096)]
DEFAULTS = {"device": "cuda" if torch.cuda.is_available() else "cpu", "repeats": 50, "loop_repeats": 3, "out": "",
            "accel": "scalar", "sweep": False, "graph": True,
            "configs": ""}
SWEEP = {"block_t": (16, 32, 64, 128), "block_d": (32, 64), "warps": (1, 2, 4, 8), "prefetch": (False, True)}
SWEEP_ROWS = {"block_d": (32, 128, 256), "warps": (1, 2), "stages": (4, 8, 16)}  # the row-walking kernel
SWEEP_SPLITS = (2, 4, 8, 16)


def timeit(fn, repeats: int, device: str, graph: bool = False, inner: int = 10) -> float:
    """Median milliseconds of fn() (after one warm-up call). `graph` (CUDA): `inner` calls captured in
    one CUDA graph and replayed, so the figure is GPU time, not the Python and launch overhead of a
    small kernel; where capture fails (a call that syncs) it times the calls as they are."""
    fn()
    once = fn
    if graph and device == "cuda":
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(inner):
                    fn()
            once = g.replay
        except Exception:  # noqa: BLE001 - not capturable: time it eagerly
            torch.cuda.synchronize()
            inner = 1
    else:
        inner = 1
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / inner)
        else:
            t = time.perf_counter()
            once()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device: str, repeats: int) -> float:
    """Bytes read + written per second by a large device-to-device copy (TB/s)."""
    n = 1 << 28 if device == "cuda" else 1 << 24
    x, y = torch.empty(n, device=device), torch.empty(n, device=device)
    ms = timeit(lambda: y.copy_(x), repeats, device)
    return 2 * 4 * n / (ms * 1e-3) / 1e12


def main(argv: list[str]) -> dict:
    from agents.returns import lambda_return
    from worldmodels.ops.scan import linear_scan, linear_scan_ref

    a = parse(argv, DEFAULTS)
    if a["sweep"]:
        return sweep(a)
    dev, reps = a["device"], a["repeats"]
    gpu = dev == "cuda" and torch.cuda.is_available()
    note = "" if gpu else "CPU: the chunked PyTorch scan against the loop, reduced shapes; GPU figures need a GPU"
    shapes = SCAN_SHAPES if gpu else [(2, 64, 256), (1, 64, 1024), (8, 128, 64)]
    ret_shapes = RETURN_SHAPES if gpu else [(1024, 16), (256, 64)]
    if not gpu:
        reps = min(reps, 5)
    copy_tbs = copy_bandwidth(dev, reps)
    backend = "triton" if gpu else "chunked"
    graph = a["graph"] and gpu  # GPU time: each timed call captured in a CUDA graph (see timeit)
    accel_scan = None
    if a["accel"] not in ("scalar", "warp", "none"):
        from agents.config import ConfigError

        raise ConfigError(f"accel must be scalar, warp or none, got '{a['accel']}'")
    if gpu and a["accel"] != "none":
        try:  # scalar: its Triton kernels; warp: its CUDA kernels, built by nvcc at import (minutes)
            accel_scan = importlib.import_module(f"accelerated_scan.{a['accel']}").scan
        except ImportError:
            pass

    rows = []
    for B, D, T in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.rand(B, T, D, device=dev, generator=g) * 0.99
        y = torch.randn(B, T, D, device=dev, generator=g)
        n = B * T * D
        r = {"shape": (B, D, T)}
        r["fwd_ms"] = timeit(lambda: linear_scan(x, y, backend=backend), reps, dev, graph)
        r["fwd_tbs"] = 12 * n / (r["fwd_ms"] * 1e-3) / 1e12
        xb, yb = x.bfloat16(), y.bfloat16()
        r["bf16_fwd_ms"] = timeit(lambda: linear_scan(xb, yb, backend=backend), reps, dev, graph)
        xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
        gout = torch.randn_like(y)

        def fwd_bwd():
            torch.autograd.grad(linear_scan(xg, yg, backend=backend), (xg, yg), gout)

        r["fwdbwd_ms"] = timeit(fwd_bwd, reps, dev, graph)
        r["fwdbwd_tbs"] = 32 * n / (r["fwdbwd_ms"] * 1e-3) / 1e12
        if T <= 4096:  # the comparator: the PyTorch loop, same inputs

            def loop_fwd_bwd():
                torch.autograd.grad(linear_scan_ref(xg, yg), (xg, yg), gout)

            r["loop_ms"] = timeit(lambda: linear_scan_ref(x, y), a["loop_repeats"], dev)
            r["loop_fwdbwd_ms"] = timeit(loop_fwd_bwd, a["loop_repeats"], dev)
        if accel_scan is not None and gpu and (T & (T - 1)) == 0:
            xc, yc = x.transpose(1, 2).contiguous(), y.transpose(1, 2).contiguous()  # (B, C, T)
            r["accel_fwd_ms"] = timeit(lambda: accel_scan(xc, yc), reps, dev, graph)
        rows.append(r)

    ret_rows = []
    from torchrl.objectives.value.functional import vec_td_lambda_return_estimate

    for N, T in ret_shapes:
        g = torch.Generator(device=dev).manual_seed(1)
        rew, val = torch.randn(N, T, device=dev, generator=g), torch.randn(N, T + 1, device=dev, generator=g)
        cont = torch.full((N, T), 0.997, device=dev)
        r = {"shape": (N, T)}
        r["ours_ms"] = timeit(lambda: lambda_return(rew, val, cont, 0.95), reps, dev, graph)
        done = torch.zeros(N, T, 1, dtype=torch.bool, device=dev)
        r["torchrl_ms"] = timeit(lambda: vec_td_lambda_return_estimate(
            0.997, 0.95, val[:, 1:, None], rew[:, :, None], done=done, terminated=done), reps, dev, graph)
        ret_rows.append(r)

    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else ("-" if v is None else str(v))
    table = (f"Linear scan, {machine(dev)}; copy bandwidth {copy_tbs:.2f} TB/s (read + write); median of {reps}"
             + ("; GPU time: 10 calls per CUDA graph replay\n" if graph else "\n"))
    table += (note + "\n\n") if note else "\n"
    table += markdown(
        ["(B, D, T)", "fwd ms", "fwd TB/s", "% of copy", "bf16 fwd ms", "bf16 speed-up", "fwd+bwd ms", "fwd+bwd TB/s",
         "PyTorch loop fwd ms", "loop fwd+bwd ms", "fwd+bwd speed-up over loop", "accelerated-scan fwd ms"],
        [[r["shape"], fmt(r["fwd_ms"]), f"{r['fwd_tbs']:.3f}", f"{100 * r['fwd_tbs'] / copy_tbs:.0f}%",
          fmt(r["bf16_fwd_ms"]), f"{r['fwd_ms'] / r['bf16_fwd_ms']:.2f}x", fmt(r["fwdbwd_ms"]),
          f"{r['fwdbwd_tbs']:.3f}", fmt(r.get("loop_ms")), fmt(r.get("loop_fwdbwd_ms")),
          f"{r['loop_fwdbwd_ms'] / r['fwdbwd_ms']:.1f}x" if "loop_fwdbwd_ms" in r else "-",
          fmt(r.get("accel_fwd_ms"))] for r in rows])
    table += "\n\nLambda-returns (batch x time)\n\n" + markdown(
        ["(N, T)", "ours ms", "TorchRL vec_td_lambda_return_estimate ms", "speed-up"],
        [[r["shape"], fmt(r["ours_ms"]), fmt(r["torchrl_ms"]), f"{r['torchrl_ms'] / r['ours_ms']:.2f}x"] for r in ret_rows])
    data = {"machine": machine(dev), "note": note, "copy_tbs": copy_tbs, "backend": backend, "graph": graph, "scan": rows,
            "returns": ret_rows}
    write(f"scan_{'cuda' if gpu else 'cpu'}", data, table, a["out"] or None)
    return data


def sweep(a: dict) -> dict:
    """`sweep=true`: the real kernel's launch configs (worldmodels.ops.scan.KernelConfig) timed on the
    forward fp32 scan at every benchmark shape, in two stages: every tile, warp count and prefetch
    without time chunks, then the three best of each shape with time chunks (`split`); or only the
    `configs=` given (block_t/block_d/warps/prefetch/split, comma-separated). Writes
    scan_sweep_<device>.json / .md: per shape the default config and the ten fastest."""
    import dataclasses
    import itertools

    from worldmodels.ops import scan

    dev, reps = a["device"], a["repeats"]
    gpu = dev == "cuda" and torch.cuda.is_available()
    shapes = SCAN_SHAPES if gpu else [(2, 32, 64), (1, 16, 256)]
    grid = [scan.KernelConfig(*c) for c in itertools.product(*SWEEP.values())] if gpu else \
        [scan.KernelConfig(block_t=16, block_d=16, warps=1, prefetch=p) for p in (False, True)]
    grid += [scan.KernelConfig(kind="rows", block_d=bd, warps=w, stages=st) for bd, w, st in
             itertools.product(*SWEEP_ROWS.values())] if gpu else [scan.KernelConfig(kind="rows", block_d=16, warps=1, stages=2)]
    splits = SWEEP_SPLITS if gpu else (2,)
    if a["configs"]:  # only these: block_t/block_d/warps/prefetch/split for the tile kernel, e.g.
        # configs=64/32/4/1/8, or rows/block_d/warps/stages/split for the row-walking one, e.g. rows/128/1/8/16
        grid = [_parse_config(c) for c in a["configs"].split(",")]
        splits = ()
    copy_tbs = copy_bandwidth(dev, reps)
    backend = "triton"
    rows = []
    for B, D, T in shapes:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.rand(B, T, D, device=dev, generator=g) * 0.99
        y = torch.randn(B, T, D, device=dev, generator=g)
        ref = scan.linear_scan(x, y, backend=backend)  # the default config: the others must agree with it
        timed = {}

        def time_cfg(cfg):
            with scan.kernel_config(cfg):
                out = scan.linear_scan(x, y, backend=backend)
                err = ((out - ref).abs().max() / ref.abs().max()).item()
                if err > 1e-4:
                    raise RuntimeError(f"scan sweep: {cfg} disagrees with the default config at {(B, D, T)} ({err:.1e})")
                ms = timeit(lambda: scan.linear_scan(x, y, backend=backend), reps, dev, a["graph"])
            timed[cfg] = ms
            return ms

        default = scan.default_config(B, D, x.device)
        default_ms = time_cfg(default)
        for cfg in grid:
            time_cfg(cfg)
        for cfg in sorted(timed, key=timed.get)[:3]:
            for split in splits:
                c = dataclasses.replace(cfg, split=split)
                if c not in timed and scan._chunks(c, B, T, D, x.device)[1] > 1:
                    time_cfg(c)
        n = B * T * D
        for cfg, ms in timed.items():
            rows.append({"shape": (B, D, T), **dataclasses.asdict(cfg), "chunks": scan._chunks(cfg, B, T, D, x.device)[1],
                         "fwd_ms": ms, "fwd_tbs": 12 * n / (ms * 1e-3) / 1e12, "default": cfg == default,
                         "vs_default": default_ms / ms})
        data = _write_sweep(rows, dev, gpu and a["graph"], copy_tbs, reps, a["out"])  # after every shape: a stopped sweep keeps them
    return data


def _write_sweep(rows: list[dict], dev: str, graph: bool, copy_tbs: float, reps: int, out: str) -> dict:
    timing = "GPU time (10 calls per CUDA graph replay)" if graph else "each call timed as it runs"
    table = (f"Linear-scan kernel configs, forward fp32, {machine(dev)}; copy bandwidth {copy_tbs:.2f} TB/s; "
             f"median of {reps}; {timing}; per shape the default and the ten fastest\n\n")
    keys = ["kind", "block_t", "block_d", "warps", "prefetch", "stages", "split", "chunks"]
    body = []
    for shape in dict.fromkeys(r["shape"] for r in rows):
        mine = sorted((r for r in rows if r["shape"] == shape), key=lambda r: r["fwd_ms"])
        for r in [x for x in mine if x["default"]] + [x for x in mine if not x["default"]][:10]:
            body.append([shape, "default" if r["default"] else "", *(r[k] for k in keys), f"{r['fwd_ms']:.3f}",
                         f"{100 * r['fwd_tbs'] / copy_tbs:.0f}%", f"{r['vs_default']:.2f}x"])
    table += markdown(["(B, D, T)", "", *keys, "fwd ms", "% of copy", "speed-up over default"], body)
    gpu = dev.startswith("cuda")
    data = {"machine": machine(dev), "copy_tbs": copy_tbs, "graph": graph, "rows": rows}
    write(f"scan_sweep_{'cuda' if gpu else 'cpu'}", data, table, out or None)
    return data


def _parse_config(text: str):
    from worldmodels.ops.scan import KernelConfig

    f = text.split("/")
    if f[0] == "rows":
        return KernelConfig(kind="rows", block_d=int(f[1]), warps=int(f[2]), stages=int(f[3]), split=int(f[4]))
    return KernelConfig(block_t=int(f[0]), block_d=int(f[1]), warps=int(f[2]), prefetch=bool(int(f[3])), split=int(f[4]))
