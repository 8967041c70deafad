"""`longdream bench learning`: train for a fixed env-step budget on one or several tasks, per backbone
and seed, and report the mean eval return over 10 episodes, with wall time and machine. Targets (see
TARGETS): Pendulum >= -300 after 20K env steps (DreamerV3-class agents get there), LunarLander >= 200
and dm-control proprio at DreamerV3's own scores after 100K, MuJoCo at 10x the seed table's SSM policy. Rows also give the time to the
target: the run's wall time to its first periodic evaluation (`eval_every`, `eval_episodes`) at or
above it ("-" where none reached it), its segments added where it was stopped and resumed.

    longdream bench learning [tasks=pendulum,hopper] [backbones=rssm,s5wm] [steps=20000] [seeds=0,1]
                             [suite=<name>] [device=cpu] [preset=pendulum_cpu] [extra="k=v k=v"] [keep=true]

`keep=true` keeps each run's directory (runs/bench/learning-<task>-<backbone>-seed<s>, or under `out=`)
as `longdream train` leaves one, so that `eval`, `dataset` and `adapt` take it as run_dir; by default
it is deleted once its row is written.

`tasks` are env configs (configs/env/<name>.yaml; `env=` is the one-task spelling); one run per task,
backbone and seed. The results file is bench/results/learning_<suite>.json / .md (suite: the task's
name where there is one, else `suite=`), with a PNG per task of eval return against env steps (the
runs' periodic evals: mean over seeds per backbone, the band from the worst to the best seed).

A benchmark resumes: each finished run is merged into the results file at once, a later invocation
skips the runs whose row is there (`rerun=true` measures them again), and a run that was stopped
continues from its last checkpoint; its wall time adds its segments (each counted to its last
checkpoint, so a stop loses at most `checkpoint_every` seconds of it). A run replaces the row of the same (env, backbone, seed, steps,
preset, extra, dims) and keeps the others (`merge=false` starts afresh), so seeds measured on
different days add up. Each row records its own machine, date, eval episodes and torch threads; the
summary averages over seeds. `merge_from=a.json,b.json` trains nothing: it folds results files
written elsewhere with `out=` (runs made side by side) into this one.

The default preset (configs/preset/pendulum_cpu.yaml) sizes the updates for a CPU; `preset=none`
gives the DreamerV3 defaults of configs/train.yaml (B16 x T64, train ratio 512).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import shutil
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import RESULTS, commit, machine, markdown, parse, portable, write

DEFAULTS = {"backbones": "", "steps": 20000, "seeds": "0", "device": "cpu", "env": "pendulum", "tasks": "", "suite": "",
            "preset": "pendulum_cpu", "episodes": 10, "extra": "", "out": "", "keep": False, "merge": True,
            "merge_from": "", "rerun": False}
# Eval return to reach at the end of a task's budget, where an issue set one: Pendulum after 20K env
# steps; LunarLander-v3 (the seed's Mamba-DQN: 224.7) and dm-control proprio (DreamerV3's own scores,
# mean of its seeds over the last 5% of the budget) after 100K.
# MuJoCo: 10x the final returns of the seed table's SSM policy (DHC-SSM: Hopper 15.8, Walker2d 23.4,
# HalfCheetah 95).
TARGETS = {"pendulum": -300.0, "pendulum_dict": -300.0, "lunarlander": 200.0,
           "dmc/cartpole_swingup": 528.0, "dmc/reacher_easy": 693.0, "dmc/walker_walk": 475.0,
           "hopper": 158.0, "walker2d": 234.0, "halfcheetah": 950.0}


def main(argv: list[str]) -> dict:
    from agents.config import ConfigError

    from worldmodels.model import BACKBONES

    a = parse(argv, DEFAULTS)
    tasks = a["tasks"].split(",") if a["tasks"] else [a["env"]]
    if len(tasks) > 1 and not a["suite"]:
        raise ConfigError("several tasks need a suite=<name> for their results file (learning_<name>.json)")
    name = f"learning_{_safe(a['suite'] or tasks[0])}"
    folder = Path(a["out"]) if a["out"] else RESULTS
    if a["merge_from"]:  # no training: fold results files written elsewhere (out=...) into this one
        rows = [r for path in a["merge_from"].split(",") for r in _rows(json.loads(Path(path).read_text()))]
        return _write(a, name, folder, merge(folder, name, rows), tasks)
    backbones = a["backbones"].split(",") if a["backbones"] else list(BACKBONES)
    done = {_key(r) for r in _rows(json.loads((folder / f"{name}.json").read_text()))} \
        if a["merge"] and not a["rerun"] and (folder / f"{name}.json").exists() else set()
    rows = []
    for task in tasks:
        for backbone in backbones:
            for seed in [int(s) for s in a["seeds"].split(",")]:
                row = run_one(a, task, backbone, seed, done)
                if row is None:
                    continue
                rows.append(row)
                if a["merge"]:  # each finished run lands in the results at once: a stopped benchmark keeps it
                    _write(a, name, folder, merge(folder, name, [row]), tasks, quiet=True)
    all_rows = merge(folder, name, rows) if a["merge"] else rows
    return _write(a, name, folder, all_rows, tasks)


def _safe(task: str) -> str:
    """A task's name in file names: dm-control configs are dmc/<task>."""
    return task.replace("/", "_")


def run_one(a: dict, task: str, backbone: str, seed: int, done: set) -> dict | None:
    """Train one (task, backbone, seed), evaluate it, and return its row; None where the results
    already hold it. A run directory left by a stopped run resumes from its checkpoint."""
    from agents import checkpoint
    from agents.config import load_config, save_overrides
    from agents.train import build_agent, evaluate, train

    # runs with other settings get their own directory, so that they can run side by side
    tag = "-" + hashlib.sha1(f"{a['preset']} {a['extra']}".encode()).hexdigest()[:6] if a["extra"] else ""
    run = Path(a["out"] or "runs/bench") / f"learning-{_safe(task)}-{backbone}-seed{seed}{tag}"
    overrides = [f"preset={a['preset']}", f"env={task}", f"world_model={backbone}", f"steps={a['steps']}", f"seed={seed}",
                 f"device={a['device']}", f"run_dir={run}", "progress=false", *a["extra"].split()]
    cfg, _ = load_config(overrides)
    key = _key({"env": task, "backbone": backbone, "seed": seed, "steps": a["steps"], "preset": a["preset"],
                "extra": a["extra"], "replay_context": cfg.train.replay_context, "dims": dataclasses.asdict(cfg.core)})
    if key in done:
        print(f"[learning] {task} {backbone} seed {seed}: in the results already (rerun=true measures it again)", flush=True)
        return None
    if run.exists() and checkpoint.latest(run) is None:  # a run stopped before its first checkpoint: start afresh
        shutil.rmtree(run, ignore_errors=True)
    resumed = run.exists()
    save_overrides(run, overrides)  # as `longdream train` leaves it: eval, dataset and adapt read it (keep=true)
    tic = time.time()
    res = train(cfg)
    # a resumed run's wall time: its earlier segments (to their last checkpoint, as the checkpoint holds
    # them) and this one whole
    wall = time.time() - tic
    if math.isfinite(res["wall_s"]):  # nan: resumed from a checkpoint that did not hold the time so far
        wall += res["wall_s"] - res["wall_s_segment"]
    returns = [res["eval_return_after"]]
    agent, policy, shapes = build_agent(cfg, cfg.train.device)
    if a["episodes"] > 1:  # the loop's final eval uses eval_episodes; report exactly `episodes`
        agent.load_state_dict(checkpoint.load(checkpoint.latest(run))[0]["agent"])
        returns = evaluate(cfg, policy, shapes, a["episodes"], seed + 40_000)
    params = agent.param_counts()
    row = {"backbone": backbone, "seed": seed, "env_steps": res["env_steps"], "updates": res["updates"],
           "eval_return_mean": float(np.mean(returns)), "eval_return_std": float(np.std(returns)),
           "eval_return_before": res.get("eval_return_before"), "wall_s": round(wall, 1), "resumed": resumed, "episodes": len(returns),
           "threads": torch.get_num_threads(), "params": params, "dims": dataclasses.asdict(cfg.core),
           "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size,
           "replay_context": cfg.train.replay_context, "commit": commit(),
           "nets": dataclasses.asdict(cfg.nets), "agent": dataclasses.asdict(cfg.agent),
           "loss": dataclasses.asdict(cfg.loss), "curve": (curve := eval_curve(run / "tb", None if resumed else tic)),
           "time_to_target_s": time_to_target(curve, TARGETS.get(task)),
           "env": task, "steps": a["steps"], "preset": a["preset"], "extra": a["extra"],
           "machine": machine(a["device"]), "date": time.strftime("%Y-%m-%d"), "overrides": overrides}
    if not a["keep"]:
        shutil.rmtree(run, ignore_errors=True)
    return row


def eval_curve(logdir: Path, start: float | None) -> list[list[float]]:
    """[env steps, eval return, seconds] of a run's periodic evaluations, from its TensorBoard log. The
    seconds are the run's own wall time at each evaluation, all its segments added (`eval/wall_s`); for
    a run logged before it had that, the time at which each evaluation was logged less `start`, or none
    (two-element points) where `start` is None (a resumed run, whose segments' clocks do not add)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    ea.Reload()
    tags = ea.Tags()["scalars"]
    if "eval/return" not in tags:
        return []
    if "eval/wall_s" in tags:
        seconds = {e.step: e.value for e in ea.Scalars("eval/wall_s") if math.isfinite(e.value)}
    else:
        seconds = {} if start is None else {e.step: e.wall_time - start for e in ea.Scalars("eval/return")}
    return [[e.step, e.value, round(seconds[e.step], 1)] if e.step in seconds else [e.step, e.value]
            for e in ea.Scalars("eval/return")]


def time_to_target(curve: list[list[float]], target: float | None) -> float | None:
    """Wall seconds from the run's start to its first periodic evaluation at or above `target` (the
    evaluation's own time included); None where there is no target or no evaluation reached it."""
    if target is None:
        return None
    return next((p[2] for p in curve if len(p) > 2 and p[0] > 0 and p[1] >= target), None)


def _write(a: dict, name: str, folder: Path, rows: list[dict], tasks: list[str], quiet: bool = False) -> dict:
    data = {"args": a, "target": {t: TARGETS.get(t) for t in tasks}, "runs": rows}
    if quiet:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(portable(data), indent=1))
        return data
    table = report(rows, a["episodes"])
    for task in sorted({r["env"] for r in rows}):
        png = f"{name}.png" if len(tasks) == 1 and name == f"learning_{_safe(task)}" else f"{name}_{_safe(task)}.png"
        if plot_curves([r for r in rows if r["env"] == task], folder / png, task):
            table += f"\n\n![{task}: eval return against env steps]({png})"
    write(name, data, table, a["out"] or None)
    return data


def curve_groups(rows: list[dict]) -> dict[str, list[list]]:
    """The rows with a curve, grouped as the summary table groups seeds (backbone, latent, replay context,
    overrides), under a label that names what differs: {label: [curve, ...]}. Runs made with other
    settings never pool into one line."""
    curves = [r for r in rows if r.get("curve")]
    latents = {_latent(r) for r in curves}
    out = {}
    for key in sorted(dict.fromkeys(_setting(r) for r in curves), key=lambda g: (g[0], g[1], not g[2], g[3])):
        b, latent, ctx, extra = key
        label = ", ".join([b, *([latent] if len(latents) > 1 else []), *([] if ctx else ["no replay context"]),
                           *([extra] if extra else [])])
        out[label] = [r["curve"] for r in curves if _setting(r) == key]
    return out


def plot_curves(rows: list[dict], path: Path, task: str) -> bool:
    """Eval return against env steps, one line per backbone and settings (mean over seeds at each eval
    step) and the band from the worst to the best seed; False where no row has a curve."""
    groups = curve_groups(rows)
    if not groups:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, curves in groups.items():
        runs = [dict((int(p[0]), p[1]) for p in c) for c in curves]
        steps = sorted(set.intersection(*(set(c) for c in runs)))
        if not steps:
            continue
        vals = np.array([[c[s] for s in steps] for c in runs])
        name = f"{label} ({len(runs)} seed{'s' if len(runs) > 1 else ''})"
        ax.plot(steps, vals.mean(0), marker="o", ms=3, label=textwrap.fill(name, 60))
        ax.fill_between(steps, vals.min(0), vals.max(0), alpha=0.2)
    target = TARGETS.get(task)
    if target is not None:
        ax.axhline(target, ls="--", color="gray", lw=1)
    ax.set(xlabel="env steps", ylabel="eval return", title=task)
    # below the axes: override lists make long labels that would cover the curves
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _key(row: dict) -> tuple:
    """Rows of different models (dims) or settings never replace one another."""
    return (row["env"], row["backbone"], row["seed"], row["steps"], row["preset"], row["extra"], row["replay_context"],
            json.dumps(row.get("dims"), sort_keys=True))


def _latent(row: dict) -> str:
    d = row.get("dims")
    return f"{d['stoch']}x{d['classes']}" if d else "-"


def _setting(row: dict) -> tuple:
    """What a row's seeds pool over, in the summary table and the curves: backbone, latent, replay
    context and overrides."""
    return row["backbone"], _latent(row), row["replay_context"], row["extra"]


def merge(folder: Path, name: str, rows: list[dict]) -> list[dict]:
    """Earlier rows of the results file, less those this run measured again, then this run's rows."""
    path = folder / f"{name}.json"
    if not path.exists():
        return rows
    fresh = {_key(r) for r in rows}
    return [r for r in _rows(json.loads(path.read_text())) if _key(r) not in fresh] + rows


def _rows(data: dict) -> list[dict]:
    """A results file's rows, those written before rows carried their own settings filled from its args."""
    args = data.get("args", {})
    for r in data.get("runs", []):
        for k in ("env", "steps", "preset", "extra"):
            r.setdefault(k, args.get(k, ""))
        r.setdefault("machine", data.get("machine", "")), r.setdefault("date", data.get("date", ""))
        r.setdefault("episodes", args.get("episodes", 10))
        r.setdefault("replay_context", False)  # rows measured before windows started from stored states
    return data.get("runs", [])


def _minutes(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def report(rows: list[dict], episodes: int) -> str:
    """The table and per-backbone summary of each task, one section per task where there are several."""
    envs = list(dict.fromkeys(r["env"] for r in rows))
    if len(envs) <= 1:
        return _report_task(rows, episodes)
    return "\n\n".join(f"## {e}\n\n" + _report_task([r for r in rows if r["env"] == e], episodes) for e in envs)


def _report_task(rows: list[dict], episodes: int) -> str:
    target = TARGETS.get(rows[0]["env"]) if rows else None
    met = lambda m: "-" if target is None else "yes" if m >= target else "no"  # noqa: E731
    rows = sorted(rows, key=lambda r: (r["backbone"], _latent(r), r["replay_context"], r["extra"], r["seed"]))
    envs = sorted({r["env"] for r in rows})
    text = (f"{', '.join(envs)}, mean eval return over each row's eval episodes after its env steps "
            + (f"(target >= {target:.0f})" if target is not None else "(no target set)") + "\n\n")
    text += markdown(["backbone", "latent", "replay context", "overrides", "seed", "env steps", "eval return", "episodes", "before", "updates",
                      "wall time", "time to target", "threads", "target met", "params (wm/actor/critic)", "machine", "date"],
                     [[r["backbone"], _latent(r), "yes" if r["replay_context"] else "no", r["extra"] or "-", r["seed"], r["env_steps"], f"{r['eval_return_mean']:.1f} +- {r['eval_return_std']:.1f}",
                       r.get("episodes", episodes),
                       f"{r['eval_return_before']:.1f}" if r["eval_return_before"] is not None else "",
                       r["updates"], f"{r['wall_s'] / 60:.1f} min", _minutes(r.get("time_to_target_s")), r.get("threads", "-"),
                       met(r["eval_return_mean"]),
                       "/".join(f"{v / 1e6:.2f}M" for v in r["params"].values()) if "params" in r else "-",
                       r.get("machine", ""), r.get("date", "")] for r in rows])
    summary = []
    for key in dict.fromkeys(_setting(r) for r in rows):
        b, latent, ctx, extra = key
        means = [r["eval_return_mean"] for r in rows if _setting(r) == key]
        summary.append([b, latent, "yes" if ctx else "no", extra or "-", len(means), f"{np.mean(means):.1f}", f"{min(means):.1f}",
                        f"{max(means):.1f}", f"{sum(m >= target for m in means)}/{len(means)}" if target is not None else "-"])
    text += "\n\nPer backbone, latent, replay context and overrides, over seeds:\n\n" + markdown(
        ["backbone", "latent", "replay context", "overrides", "seeds", "mean eval return", "worst seed", "best seed", "seeds meeting target"], summary)
    return text
