"""`longdream bench update`: time one full learner update (world model over B x T, imagination
from every posterior state for H=15, actor and critic losses, backward, optimiser steps, slow
critic) on a random, well-formed batch shaped like dm-control walker (24-dim obs, 6-dim action).

Sizes: the presets (xs, s) and two matched to TorchRL's DreamerV3 walker preset in width (hidden 64,
32x4 latents, units 64) and in parameter count: `p025` (~0.25M, deter 128) and `p064` (~0.64M,
deter 320; TorchRL's block GRU reaches its count with deter 512), RSSM only: for another
`backbone=` the default list drops them and asking for them is an error. With
`comparator=<path to a TorchRL DreamerV3 timing script>` that script runs in the same session and
the table gives the ratio (a script named *sheeprl* is sheeprl's DreamerV3, with `comparator_sizes=p064,S`;
its actor learns through the dynamics, as ours by default): TorchRL's recipe trains the actor by REINFORCE, so `actor_grad=reinforce`
does the same work (the default, dynamics gradients for these continuous actions, adds a backward
pass through the 15 imagined steps). `comparator_modes=` passes the script's modes (e.g.
`eager,cudagraph,compile_cudagraph`; default: the script's own). On CUDA, float32 products run at
`matmul_precision=` (default "high", TF32, as the comparator's default), set for both sides. `precision=bf16` runs the forward passes under bfloat16 autocast
(agent.precision). `compile_step=true` adds, for each backbone with a compilable imagination step
(Mamba: MambaConfig.compile_step), a row with it compiled beside the eager one. `graph=true` (CUDA)
adds, per backbone and size, a row with the whole update captured in one CUDA graph and replayed
(agents/cudagraph.py, `agent.cuda_graph`), beside the eager one. `backbone=all` (or a comma-separated list) times every backbone in the
same run, each at its own xs and s dims; the rows give the resolved dims and counts. At xs the agents'
counts are close (0.36M to 0.43M); `interleave=true` builds every case first and
times them in turn, one update each per round (A B C, A B C, ...), so that the machine's drift reaches all
alike, and gives each backbone's time over the RSSM's round by round (median and range; its own results
file, update_<device>_interleaved). At s the counts are not close (core parameters: RSSM 3.9M, S4WM 5.8M, S5WM
10.0M, Mamba 9.7M, TSSM 15.0M), so an s row compares presets, not matched models. `match=true` adds, for each other backbone and size, an
RSSM whose state width (deter, a multiple of 8; its other dims the size's) gives the parameter count nearest
that backbone's, and takes that backbone's ratio against it (its own results file, update_<device>_matched
or _interleaved_matched). `interleave=true` keeps every case's agent, and the heap its updates grew, for
the whole run. At s with match=true (nine agents of 10-21M parameters) one process went past 24 GiB on
the development CPU both interleaved and one case at a time (which case, or the kept heap of several, is
not established): there, try one backbone per process (`backbone=<b> sizes=s match=true`).
"""
from __future__ import annotations

import dataclasses
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.report import machine, markdown, parse, run_comparator, write

PRESETS = {
    "xs": ({}, {}),
    "s": ({"size": "s"}, {"name": "s"}),
    "p025": ({"deter": 128, "hidden": 64, "stoch": 32, "classes": 4}, {"units": 64, "layers": 2}),
    "p064": ({"deter": 320, "hidden": 64, "stoch": 32, "classes": 4}, {"units": 64, "layers": 2}),
}
# (ours, the comparator's) at about the same parameter count: TorchRL's sizes, and sheeprl's (its timing
# script's p064 and its own dreamer_v3_S preset)
MATCHED = {("p064", "size1m"), ("s", "size12m"), ("p064", "p064"), ("s", "S")}
DEFAULTS = {"device": "cpu", "sizes": "xs,s,p025,p064", "repeats": 5, "warmup": 2, "batch": 16, "seq": 64,
            "backbone": "rssm", "comparator": "", "comparator_sizes": "size1m,size12m", "out": "",
            "context": False, "actor_grad": "auto", "precision": "fp32", "compile_step": False,
            "comparator_modes": "", "matmul_precision": "high", "graph": False, "interleave": False,
            "match": False}


def build(size: str, a: dict, backbone: str, deter: int | None = None, compiled: bool = False):
    """The agent of one case on a["device"] and its resolved core config; `deter` resizes an RSSM's state."""
    from agents.dreamer import Agent, AgentConfig
    from worldmodels.model import BACKBONES, ObsSpec, WorldModel
    from worldmodels.nets import NetsConfig

    core_over, net_over = PRESETS[size]
    cfg_cls = BACKBONES[backbone][1]
    core_cfg = cfg_cls(**{"size": "xs", **core_over}) if backbone == "rssm" else cfg_cls(size=core_over.get("size", "xs"))
    if deter is not None:
        core_cfg = dataclasses.replace(core_cfg, deter=deter)
    if compiled:
        core_cfg = dataclasses.replace(core_cfg, compile_step=True)
    nets = NetsConfig(**{"name": "xs", **net_over})
    torch.manual_seed(0)
    wm = WorldModel(backbone, core_cfg, nets, ObsSpec(pixels=False, obs_dim=24, action_dim=6))
    agent = Agent(wm, AgentConfig(actor_grad=a["actor_grad"], precision=a["precision"])).to(torch.device(a["device"]))
    return agent, core_cfg


def n_params(agent) -> int:
    return sum(p.numel() for p in agent.parameters() if p.requires_grad)


@functools.cache
def _rssm_params(size: str, actor_grad: str, precision: str, deter: int) -> int:
    """The agent parameter count of an RSSM of `deter` at a size, built once per run for every search."""
    return n_params(build(size, {"device": "cpu", "actor_grad": actor_grad, "precision": precision}, "rssm", deter)[0])


def matched_deter(size: str, a: dict, target: int) -> int:
    """The RSSM state width (a multiple of 8, the size's other dims kept) whose agent's parameter count is
    closest to `target`: a binary search, the count growing with the width."""

    def params(d: int) -> int:
        return _rssm_params(size, a["actor_grad"], a["precision"], 8 * d)

    lo, hi = 1, 1024  # in units of 8
    while lo < hi:  # the smallest width reaching the target
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if params(mid) < target else (lo, mid)
    best = min((d for d in (lo - 1, lo) if d >= 1), key=lambda d: abs(params(d) - target))
    return 8 * best


def prepare(size: str, a: dict, backbone: str | None = None, compiled: bool = False, graph: bool = False,
            deter: int | None = None):
    """One (backbone, size, variant) set up and warmed up: (step, row) where step() times one update in
    ms and row holds the resolved dims and counts (`finish` adds the times). `deter` resizes an RSSM's
    state (a row matched to another backbone's parameter count)."""
    from agents.cudagraph import GraphedUpdate
    from agents.dreamer import update

    backbone = backbone or a["backbone"]
    agent, core_cfg = build(size, a, backbone, deter, compiled)
    dev = torch.device(a["device"])
    opts = agent.optimizers(capturable=graph)
    step = GraphedUpdate(agent, opts, warmup=max(1, a["warmup"])) if graph else (lambda b: update(agent, opts, b))
    B, T = a["batch"], a["seq"]
    g = torch.Generator().manual_seed(0)
    is_first = torch.zeros(B, T)
    is_first[:, 0] = 1
    is_first[: B // 2, T // 2] = 1  # half the rows cross an episode start, as in the comparator
    batch = {"obs": torch.randn(B, T, 24, generator=g), "action": torch.rand(B, T, 6, generator=g) * 2 - 1,
             "reward": torch.rand(B, T, generator=g), "is_first": is_first, "is_terminal": torch.zeros(B, T)}
    batch = {k: v.to(dev) for k, v in batch.items()}
    if a["context"]:  # windows start from stored states; large states burn in from the anchor before them
        from agents.replay import context_every

        wm = agent.wm
        k = context_every(wm.core.state_shapes(), T)
        batch["start"] = {n: v.to(dev) for n, v in wm.core.initial(B).items()}
        batch["burn"] = None
        if k > 1:
            S, K = wm.core.state_shapes()["stoch"]
            P = k - 1  # the longest burn-in a batch can need
            batch["burn"] = {"obs": batch["obs"][:, :P], "action": batch["action"][:, :P], "is_first": torch.zeros(B, P, device=dev),
                             "z": torch.randint(K, (B, P, S), generator=g).to(dev),
                             "length": torch.randint(k, (B,), generator=g).to(dev)}
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(max(1, a["warmup"]) + 1 if graph else a["warmup"]):  # graph: eager warm-up, then the capture
        step(batch)
    last = {}

    def timed() -> float:
        sync()
        t = time.perf_counter()
        last["m"], _ = step(batch)
        sync()
        return (time.perf_counter() - t) * 1e3

    def check() -> None:
        assert last["m"]["train/nonfinite"] == 0, "non-finite loss in the benchmark batch"

    timed.check = check
    params = n_params(agent)
    return timed, {"backbone": backbone, "size": size, "compiled_step": compiled, "graph": graph, "params": params,
                   "dims": dataclasses.asdict(core_cfg)}


def finish(row: dict, times: list[float], B: int, T: int) -> dict:
    return {**row, "median_ms": round(statistics.median(times), 1), "min_ms": round(min(times), 1), "n": len(times),
            "transitions_per_s": round(B * T * 1e3 / statistics.median(times), 1)}


def _prepare_case(case: tuple, a: dict):
    """prepare() for one case (backbone, size, compiled, graph, deter, matches); a matched RSSM's row says
    which backbone it is sized to."""
    b, size, compiled, graph, deter, matches = case
    step, row = prepare(size, a, b, compiled, graph, deter)
    return step, ({**row, "matches": matches} if matches else row)


def time_update(case: tuple, a: dict) -> dict:
    """One row: `repeats` updates of one case after its warm-up."""
    step, row = _prepare_case(case, a)
    times = [step() for _ in range(a["repeats"])]
    step.check()
    return finish(row, times, a["batch"], a["seq"])


def _reference(rows: list[dict], row: dict) -> int | None:
    """The index of the RSSM row a row is compared with: the one matched to its backbone where the run has
    one, else the plain RSSM of its size (eager, not compiled or graphed)."""
    plain = [i for i, r in enumerate(rows) if r["backbone"] == "rssm" and r["size"] == row["size"]
             and not r["compiled_step"] and not r.get("graph")]
    matched = [i for i in plain if rows[i].get("matches") == row["backbone"]]
    unmatched = [i for i in plain if not rows[i].get("matches")]
    return (matched or unmatched or [None])[0]


def time_interleaved(cases: list[tuple], a: dict) -> list[dict]:
    """The rows of several cases timed in turn (A B C, A B C, ...), so that a machine's drift reaches every
    case alike. Each non-RSSM row also gets `rssm_ratio`: the median over rounds of its time over its
    reference RSSM's (`_reference`) in the same round, and that ratio's range."""
    steps = [_prepare_case(c, a) for c in cases]
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(a["repeats"]):
        for (step, _), ts in zip(steps, times):
            ts.append(step())
    rows = []
    for (step, row), ts in zip(steps, times):
        step.check()
        rows.append(finish(row, ts, a["batch"], a["seq"]))
    for row, ts in zip(rows, times):
        ref = _reference(rows, row)
        if ref is not None and row["backbone"] != "rssm":
            pair = [x / y for x, y in zip(ts, times[ref])]
            row["rssm_ratio"] = {"median": round(statistics.median(pair), 3), "min": round(min(pair), 3),
                                 "max": round(max(pair), 3)}
    return rows


def _variant(r: dict) -> str:
    return " (CUDA graph)" if r.get("graph") else " (compiled step)" if r["compiled_step"] else ""


def _against(r: dict) -> str:
    """How a ratio names the time of the RSSM row it is taken against."""
    return f"the time of the RSSM matched to {r['matches']} (deter {r['dims']['deter']})" if r.get("matches") else "the RSSM's time"


def render(data: dict) -> str:
    """The markdown table of a results dict (as written to update_<device>*.json)."""
    a, rows, comp = data["args"], data["longdream"], data["comparator"]
    plain = [r for r in rows if not r["compiled_step"] and not r.get("graph")]
    eager = {(r["backbone"], r["size"]): r["median_ms"] for r in plain}

    def faster(ours: float, theirs: float, what: str) -> str:
        ratio = theirs / ours
        return f"{ratio:.2f}x faster than {what}" if ratio >= 1 else f"{1 / ratio:.2f}x slower than {what}"

    def ratios(r: dict) -> str:
        ref = None if r["backbone"] == "rssm" or _variant(r) else _reference(rows, r)
        out = [] if ref is None else [f"{r['median_ms'] / rows[ref]['median_ms']:.2f}x {_against(rows[ref])}"]
        if out and "rssm_ratio" in r:  # interleaved: the median of the rounds' ratios and their range
            q = r["rssm_ratio"]
            out = [f"{q['median']:.2f}x {_against(rows[ref])} (round by round, {q['min']:.2f}-{q['max']:.2f})"]
        if _variant(r) and (r["backbone"], r["size"]) in eager:
            out.append(faster(r["median_ms"], eager[r["backbone"], r["size"]], "eager"))
        return "; ".join(out)

    table_rows = [[f"longdream {r['backbone']} {r['size']}{_variant(r)}"
                   + (f" (deter {r['dims']['deter']}, matched to {r['matches']})" if r.get("matches") else ""), f"{r['params'] / 1e6:.2f}M", r["median_ms"],
                   r["transitions_per_s"], ratios(r)] for r in rows]
    for c in comp:
        counts = c.get("params", {})
        params = counts.get("optimized_total", counts.get("total")) if isinstance(counts, dict) else counts
        name = c.get("system", "TorchRL DreamerV3")
        table_rows.append([f"{name} {c['size']} ({c['mode']})",
                           f"{params / 1e6:.2f}M" if isinstance(params, (int, float)) else params,
                           c["median_ms"], c.get("transitions_per_s", ""), ""])
        for r, tr in zip(rows, table_rows):
            if (r["size"], c["size"]) in MATCHED:
                tr[4] = "; ".join(x for x in (tr[4], faster(r["median_ms"], c["median_ms"], f"{name.split()[0]} {c['size']} {c['mode']}")) if x)
    grad = {"auto": "dynamics", "dynamics": "dynamics", "reinforce": "REINFORCE"}[a["actor_grad"]]
    title = (f"One learner update, B{a['batch']} x T{a['seq']}, H15, 24-dim obs, 6-dim action, actor gradient {grad}, "
             f"{'fp32' if a['precision'] == 'fp32' else 'bf16 autocast'}"
             f"{', float32 matmul precision ' + a.get('matmul_precision', 'highest') if a['device'].startswith('cuda') else ''}, "
             f"{data['machine']}; median of {a['repeats']}")
    return title + "\n\n" + markdown(["system", "params", "median ms", "transitions/s", "ratio"], table_rows)


RSSM_ONLY = ("p025", "p064")  # widths matched to TorchRL's RSSM: no other backbone has them


def main(argv: list[str]) -> dict:
    from agents.config import ConfigError
    from worldmodels.model import BACKBONES

    a = parse(argv, DEFAULTS)
    if a["actor_grad"] not in ("auto", "dynamics", "reinforce"):
        raise ConfigError(f"actor_grad must be auto, dynamics or reinforce, got '{a['actor_grad']}'")
    if a["precision"] not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got '{a['precision']}'")
    if a["graph"] and not a["device"].startswith("cuda"):
        raise ConfigError("graph=true times the update captured in a CUDA graph: it needs device=cuda")
    backbones = list(BACKBONES) if a["backbone"] == "all" else a["backbone"].split(",")
    for b in backbones:
        if b not in BACKBONES:
            raise ConfigError(f"unknown backbone '{b}' (choose from {', '.join(BACKBONES)} or all)")
    asked = a["sizes"].split(",")
    unknown = [s for s in asked if s not in PRESETS]
    if unknown:
        raise ConfigError(f"unknown size '{unknown[0]}' (choose from {', '.join(PRESETS)})")
    if "rssm" not in backbones and "sizes=" in " ".join(argv) and set(asked) & set(RSSM_ONLY):
        raise ConfigError(f"sizes {', '.join(RSSM_ONLY)} are RSSM dims matched to TorchRL's; for backbone "
                          f"{a['backbone']} use sizes=xs,s")
    if a["device"].startswith("cuda"):  # float32 products as the comparator takes them ("high": TF32)
        torch.set_float32_matmul_precision(a["matmul_precision"])
    cases = []
    for b in backbones:
        has_step = "compile_step" in {f.name for f in dataclasses.fields(BACKBONES[b][1])}
        for size in asked:
            if size in RSSM_ONLY and b != "rssm":  # widths matched to TorchRL's RSSM: no other backbone has them
                continue
            variants = [(False, False)] + ([(True, False)] if a["compile_step"] and has_step else []) \
                + ([(False, True)] if a["graph"] else [])
            cases += [(b, size, compiled, graph, None, None) for compiled, graph in variants]
    if a["match"]:  # an RSSM sized to each other backbone's parameter count, beside it
        for b in [b for b in backbones if b != "rssm"]:
            for size in [s for s in asked if s not in RSSM_ONLY]:
                target = n_params(build(size, {**a, "device": "cpu"}, b)[0])
                deter = matched_deter(size, a, target)
                print(f"[update] {b} {size}: {target / 1e6:.3f}M params; RSSM matched at deter {deter}", file=sys.stderr)
                cases.append(("rssm", size, False, False, deter, b))
    if a["interleave"]:
        rows = time_interleaved(cases, a)
    else:
        rows = [time_update(c, a) for c in cases]
    for r in rows:
        print(f"[update] {r['backbone']} {r['size']}{_variant(r)}{' matched to ' + r['matches'] if r.get('matches') else ''}: "
              f"{r['params'] / 1e6:.2f}M params, {r['median_ms']} ms",
              file=sys.stderr)
    comp = []
    sheeprl = "sheeprl" in Path(a["comparator"]).name  # else TorchRL's timing script
    if a["comparator"]:
        system = "sheeprl DreamerV3" if sheeprl else "TorchRL DreamerV3"
        comp = run_comparator(a["comparator"], ["--device", a["device"], "--sizes", a["comparator_sizes"],
                                                "--repeats", str(a["repeats"]), "--warmup", str(a["warmup"]),
                                                "--batch", str(a["batch"]), "--seq", str(a["seq"]),
                                                "--matmul-precision", a["matmul_precision"]]
                              + (["--modes", a["comparator_modes"]] if a["comparator_modes"] else []))
        comp = [{"system": system, **c} for c in comp]
    args = {**a, "comparator": Path(a["comparator"]).name}  # the script, not where it lay
    data = {"machine": machine(a["device"]), "args": args, "longdream": rows, "comparator": comp}
    table = render(data)
    # other settings than the defaults get results files of their own, beside the default one
    suffix = ("_reinforce" if a["actor_grad"] == "reinforce" else "") + ("_bf16" if a["precision"] == "bf16" else "") \
        + ("_compiled" if a["compile_step"] else "") + ("_graph" if a["graph"] else "") \
        + ("_sheeprl" if sheeprl else "") + ("_interleaved" if a["interleave"] else "") + ("_matched" if a["match"] else "")
    write(f"update_{a['device'].split(':')[0]}{suffix}", data, table, a["out"] or None)
    return data
