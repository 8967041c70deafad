"""`longdream bench gpu`: the GPU benchmarks in one command and one report. It runs, in one process
and one session, `bench scan` (the Triton scan against the copy bandwidth, the loop, accelerated-scan
and TorchRL's lambda-return), `bench update backbone=all` at xs and s, eager and captured in a CUDA
graph, the RSSM at p064 and s with REINFORCE beside TorchRL's DreamerV3 (its modes
`comparator_modes=`, default eager and cudagraph) when `comparator=` names its timing script, and
`bench worldmodel` (train step against L up to 4096, imagination), then writes gpu_<device>.json /
.md: their tables with the machine, the commit and each part's wall time. Sized to take under 10
minutes on one GPU.

    longdream bench gpu [comparator=<torchrl_dv3_update.py>] [comparator_modes=eager,cudagraph] [sweep=true] [out=<folder>]

`sweep=true` first runs `bench scan sweep=true` (the scan kernel's launch configs, both kernels).

Without CUDA it is an error; `device=cpu quick=true` runs the same chain at toy sizes (the tests).
"""
from __future__ import annotations

import importlib
import time
from pathlib import Path

import torch

from bench.report import RESULTS, commit, machine, parse, write

DEFAULTS = {"device": "cuda", "comparator": "", "out": "", "quick": False, "comparator_modes": "eager,cudagraph",
            "sweep": False}


def parts(a: dict) -> list[tuple[str, str, list[str]]]:
    """(benchmark, results file stem, its arguments) in the order they run; quick: toy sizes for a
    check of the chain. The comparator's row runs with REINFORCE, as TorchRL's recipe does."""
    dev, d = [f"device={a['device']}"], a["device"].split(":")[0]
    update = ["backbone=all", "sizes=xs,s", "repeats=10", "warmup=3", "graph=true"]
    versus = ["backbone=rssm", "sizes=p064,s", "actor_grad=reinforce", "repeats=10", "warmup=3", "graph=true",
              f"comparator_modes={a['comparator_modes']}"]
    worldmodel = ["lengths=64,256,1024,4096", "tokens=16384", "horizons=16,64,256,1024", "starts=1024", "repeats=2"]
    scan = []
    if a["quick"]:
        update = ["backbone=all", "sizes=xs", "repeats=1", "warmup=0", "batch=2", "seq=8"]
        versus = ["backbone=rssm", "sizes=xs", "actor_grad=reinforce", "repeats=1", "warmup=0", "batch=2", "seq=8"]
        worldmodel = ["lengths=8,16", "tokens=16", "horizons=4", "starts=4", "repeats=1", "recompute_max=4"]
        scan = ["repeats=1", "loop_repeats=1"]
    out = [("scan", f"scan_{d}", dev + scan), ("update", f"update_{d}", dev + update)]
    if a["sweep"]:  # the scan kernel's launch configs first (bench scan sweep=true), about two minutes on an H200
        out.insert(0, ("scan", f"scan_sweep_{d}", dev + ["sweep=true"] + (["repeats=1", "configs=16/16/1/1/0"] if a["quick"] else ["repeats=20"])))
    if a["comparator"] or a["quick"]:
        out.append(("update", f"update_{d}_reinforce", dev + versus + ([f"comparator={a['comparator']}"] if a["comparator"] else [])))
    return out + [("worldmodel", f"worldmodel_{d}", dev + worldmodel)]


def main(argv: list[str]) -> dict:
    from agents.config import ConfigError

    a = parse(argv, DEFAULTS)
    if a["device"].startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("bench gpu needs a CUDA device and none is visible here; on a CPU run the parts one by one "
                          "(bench scan, bench update, bench worldmodel) or check the chain with device=cpu quick=true")
    folder = Path(a["out"]) if a["out"] else RESULTS
    tables, data = [], {"machine": machine(a["device"]), "commit": commit(), "parts": {}}
    for name, stem, args in parts(a):
        tic = time.time()
        importlib.import_module(f"bench.{name}").main(args + [f"out={folder}"])
        wall = time.time() - tic
        data["parts"][stem] = {"benchmark": name, "args": args, "wall_s": round(wall, 1), "results": f"{stem}.json"}
        tables.append(f"## bench {name} ({wall / 60:.1f} min; {stem}.json)\n\n" + (folder / f"{stem}.md").read_text())
    total = sum(p["wall_s"] for p in data["parts"].values())
    head = f"GPU benchmarks on {data['machine']}, commit {data['commit'] or '-'}, {total / 60:.1f} min in all\n\n"
    write(f"gpu_{a['device'].split(':')[0]}", data, head + "\n".join(tables), str(folder))
    return data
