"""`longdream bench worldmodel`: per backbone, the world-model train step (encoder, core over the
sequence, heads, KL, backward, optimiser step) against sequence length L at a fixed number of tokens
per batch (R2I's method: B = tokens / L), and imagination throughput (imagined latent steps per
second) against the horizon. Memory: the bytes autograd saves for the backward of one train step
(each storage once; on any device) and, on CUDA, the step's peak allocated above what was allocated
before it. For the Transformer, imagination through its KV
cache beside re-running the window every step (horizons up to `recompute_max`).

    longdream bench worldmodel [backbones=rssm,s5wm] [lengths=64,256,1024,4096] [tokens=4096]
                               [horizons=16,64,256,1024] [starts=256] [size=xs] [device=cpu]
                               [window=256] [recompute_max=256]
"""
from __future__ import annotations

import dataclasses
import gc

import statistics
import time

import torch

from bench.report import machine, markdown, parse, write

DEFAULTS = {"backbones": "", "lengths": "64,256,1024,4096", "tokens": 4096, "horizons": "16,64,256,1024",
            "starts": 256, "size": "xs", "device": "cpu", "repeats": 3, "window": 256, "recompute_max": 256, "out": ""}


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, repeats, dev) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(dev)
        t = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def saved_for_backward(fn):
    """Run fn() and return (its result, the bytes of the tensors autograd saved for the backward
    meanwhile, each storage counted once): the activation memory of a train step on any device."""
    storages = {}

    def pack(t):
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def main(argv: list[str]) -> dict:
    from worldmodels.model import BACKBONES, ObsSpec, WorldModel
    from worldmodels.nets import NetsConfig

    a = parse(argv, DEFAULTS)
    dev = torch.device(a["device"])
    names = a["backbones"].split(",") if a["backbones"] else list(BACKBONES)
    train_rows, imag_rows = [], []
    for name in names:
        torch.manual_seed(0)
        extra = {"window": a["window"]} if name == "transformer" else {}
        wm = WorldModel(name, BACKBONES[name][1](size=a["size"], **extra), NetsConfig(name=a["size"]),
                        ObsSpec(pixels=False, obs_dim=24, action_dim=6)).to(dev)
        opt = torch.optim.Adam(wm.parameters(), 1e-4)
        for L in [int(x) for x in a["lengths"].split(",")]:
            B = max(1, a["tokens"] // L)
            batch = [torch.randn(B, L, 24, device=dev), torch.rand(B, L, 6, device=dev) * 2 - 1,
                     torch.randn(B, L, device=dev), torch.zeros(B, L, device=dev), torch.zeros(B, L, device=dev)]
            batch[3][:, 0] = 1

            def step():
                opt.zero_grad(set_to_none=True)
                wm.loss(*batch)[0].backward()
                opt.step()

            if dev.type == "cuda":  # the step's own peak: above what is allocated before it (model, batch, garbage)
                gc.collect()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            s = _timed(step, a["repeats"], dev)
            mem = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else None
            opt.zero_grad(set_to_none=True)
            loss, saved = saved_for_backward(lambda: wm.loss(*batch)[0])
            del loss
            train_rows.append({"backbone": name, "L": L, "B": B, "ms": s * 1e3, "us_per_token": s * 1e6 / (B * L), "peak_mib": mem,
                               "saved_mib": saved / 2**20,
                               "params": sum(p.numel() for p in wm.parameters()), "dims": dataclasses.asdict(wm.core.cfg)})
            print(f"[worldmodel] {name} L={L} B={B}: {s * 1e3:.1f} ms", flush=True)
        N = a["starts"]
        with torch.no_grad():  # start states with a full context (a window's worth for the Transformer)
            C = a["window"] if name == "transformer" else 4
            first = torch.zeros(N, C, device=dev)
            first[:, 0] = 1
            action = torch.rand(N, C, 6, device=dev) * 2 - 1
            states = wm.core.observe(wm.core.initial(N), wm.encoder(torch.randn(N, C, 24, device=dev)), action, first)[0]
        start = {k: v[:, -1] for k, v in states.items()}
        policy = lambda f: torch.tanh(f[:, :6])
        for H in [int(x) for x in a["horizons"].split(",")]:
            with torch.no_grad():
                s = _timed(lambda: wm.core.imagine(start, policy, H), a["repeats"], dev)
            imag_rows.append({"backbone": name, "method": "recurrent" if name != "transformer" else "kv cache",
                              "horizon": H, "starts": N, "steps_per_s": N * H / s})
            print(f"[worldmodel] {name} imagine H={H}: {N * H / s:.0f} steps/s", flush=True)
            if name == "transformer" and H <= a["recompute_max"]:
                z = states["stoch"]
                tokens = (torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], 1), action)
                with torch.no_grad():
                    s = _timed(lambda: wm.core.imagine_recompute(tokens, z[:, -1], policy, H), 1, dev)
                imag_rows.append({"backbone": name, "method": "recompute window", "horizon": H, "starts": N,
                                  "steps_per_s": N * H / s})
                print(f"[worldmodel] {name} imagine H={H} recomputing the window: {N * H / s:.0f} steps/s", flush=True)

    fmt = lambda v: "-" if v is None else f"{v:.1f}"
    table = (f"World-model train step at {a['tokens']} tokens per batch (B = tokens / L), size {a['size']}, "
             f"{machine(a['device'])}; median of {a['repeats']}\n\n")
    table += markdown(["backbone", "params", "L", "B", "ms / step", "us / token", "saved for backward MiB", "step peak MiB"],
                      [[r["backbone"], f"{r['params'] / 1e6:.2f}M", r["L"], r["B"], fmt(r["ms"]), f"{r['us_per_token']:.2f}",
                        fmt(r.get("saved_mib")), fmt(r["peak_mib"])] for r in train_rows])
    table += (f"\n\nImagination from {a['starts']} start states (Transformer window {a['window']}, started "
              "from a full window of context)\n\n") + markdown(
        ["backbone", "method", "horizon", "imagined steps / s"],
        [[r["backbone"], r["method"], r["horizon"], f"{r['steps_per_s']:.0f}"] for r in imag_rows])
    data = {"machine": machine(a["device"]), "args": a, "train": train_rows, "imagine": imag_rows}
    folder = write(f"worldmodel_{dev.type}", data, table, a["out"] or None)
    # plot: time per token against L
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name in names:
        rows = [r for r in train_rows if r["backbone"] == name]
        ax.plot([r["L"] for r in rows], [r["us_per_token"] for r in rows], marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="sequence length L", ylabel="us per token", title="world-model train step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / f"worldmodel_{dev.type}.png", dpi=120)
    plt.close(fig)
    return data
