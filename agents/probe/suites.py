"""Memory-probe suites: named lists of tasks, each run for every backbone, with one report."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from agents.config import ConfigError, compose
from agents.parallel import run_parallel, threads_per_worker
from agents.probe.protocol import baseline_gen_mse, finished, run_one, task_data
from agents.probe.report import task_label, write_report
from worldmodels.model import BACKBONES

# Each entry: overrides for one task. "memory" is sized for one GPU in about an hour over four
# backbones, at S4WM's 64 x 64 observations; "memory_cpu" runs the same tasks rendered at 16 x 16
# (Distracting Memory's 5 x 5 tile view) and 32 x 32 (7 x 7 views), which keep every tile
# (envs/memory/grid.py), sized for about three hours on a 2-core CPU; "smoke" runs the same code on tiny
# data on a CPU in a few minutes.
#
# memory_cpu's settings, calibrated with the S5WM (README, "Memory"): lr 1e-3; Distracting Memory's
# reward term scaled by the hallway length W, because its one reward event per episode is averaged with
# W + 4 steps that pay nothing (DreamerV3's loss is a mean over steps): unscaled, the S5WM had not learned
# the memory after 8,000 updates at W=100; scaled, it did after 2,500 (W=100, B8) and 3,500 (W=200, B8).
# Every backbone gets the same settings. Doors Keys, Rooms and Teleport train for 1,000 updates (1,500 and
# 2,000 before): at 2,000 no backbone's imagined reward left chance on Rooms or Teleport, and Doors Keys'
# reward accuracy at 1,000 was within a few points of 1,500 (bench/results/report_memory_cpu_long.md).
CPU_DM = ["task.kwargs.obs_size=16", "lr=0.001", "eval_every=500"]
CPU_GRID = ["task.kwargs.obs_size=32", "lr=0.001", "eval_every=500"]
SUITES = {
    "memory": [
        ["task=distracting_memory", "task.kwargs.length=100"],
        ["task=distracting_memory", "task.kwargs.length=200"],
        ["task=doors_keys", "task.kwargs.keys=3"],
        ["task=doors_keys", "task.kwargs.keys=5"],
        ["task=doors_keys", "task.kwargs.keys=7"],
        ["task=rooms", "task.kwargs.rooms=4"],
        ["task=teleport", "task.kwargs.rooms=4"],
    ],
    "memory_cpu": [
        ["task=distracting_memory", "task.kwargs.length=50", *CPU_DM, "loss.reward=50", "batch_size=16", "updates=3000"],
        ["task=distracting_memory", "task.kwargs.length=100", *CPU_DM, "loss.reward=100", "batch_size=8", "updates=3000"],
        ["task=distracting_memory", "task.kwargs.length=200", *CPU_DM, "loss.reward=200", "batch_size=8", "updates=4000"],
        ["task=doors_keys", "task.kwargs.keys=3", *CPU_GRID, "batch_size=2", "updates=1000", "eval_batch=10"],
        ["task=doors_keys", "task.kwargs.keys=5", *CPU_GRID, "batch_size=2", "updates=1000", "eval_batch=10"],
        ["task=rooms", "task.kwargs.rooms=2", *CPU_GRID, "batch_size=8", "updates=1000"],
        ["task=rooms", "task.kwargs.rooms=4", *CPU_GRID, "batch_size=8", "updates=1000"],
        ["task=teleport", "task.kwargs.rooms=4", *CPU_GRID, "batch_size=8", "updates=1000"],
    ],
    "smoke": [
        ["task=distracting_memory", "task.kwargs.length=6", "task.train_episodes=16", "task.test_episodes=4"],
        ["task=doors_keys", "task.kwargs.keys=3", "task.context=24", "task.query=8", "task.train_episodes=8",
         "task.test_episodes=4"],
        ["task=rooms", "task.kwargs.rooms=2", "task.train_episodes=8", "task.test_episodes=4"],
        ["task=teleport", "task.kwargs.rooms=2", "task.train_episodes=8", "task.test_episodes=4"],
    ],
}
SMOKE = ["updates=6", "batch_size=4", "eval_batch=4", "videos=2", "log_every=2"]


def _run(overrides: list[str]) -> dict:
    """One run of a suite from its overrides (a picklable job for a worker process)."""
    return run_one(compose(overrides, "probe"))


def run_suite(suite: str, overrides: list[str], backbones: list[str] | None = None) -> dict:
    if suite not in SUITES:
        raise ConfigError(f"unknown suite '{suite}' (choose one of {', '.join(SUITES)}, bsuite_memory)")
    tic = time.time()
    base = [o for o in overrides if o.split("=", 1)[0] not in ("task", "world_model")]
    raw = compose(base, "probe")
    backbones = backbones or list(BACKBONES)
    for b in backbones:
        if b not in BACKBONES:
            raise ConfigError(f"unknown backbone '{b}' in backbones (choose from {', '.join(BACKBONES)})")
    entries = [list(e) for e in SUITES[suite]]
    if suite == "memory":
        import importlib.util

        if importlib.util.find_spec("memory_maze") is not None:
            entries.append(["task=memory_maze", "task.kwargs.size=9"])
    extra = SMOKE if suite == "smoke" else []
    results: list[dict | None] = []
    jobs, slots, missing = [], [], []
    task_runs: list[tuple[list[str], list[int]]] = []  # per task: one run's overrides, the slots of its runs
    for entry in entries:
        task_runs.append(([], []))
        for b in backbones:
            # the suite's own settings first, so that the command line can still change them
            keys = {o.split("=", 1)[0] for o in base}
            merged = [o for o in extra + entry if o.split("=", 1)[0] not in keys] + base + [f"world_model={b}"]
            done = finished(compose(merged, "probe"))  # a suite stopped part-way resumes; a run made elsewhere with out= counts
            if done is not None or not raw.report_only:
                task_runs[-1] = (task_runs[-1][0] or merged, task_runs[-1][1] + [len(results)])
            if done is not None:
                print(f"[probe] {done['task']} {done['kwargs']} {b}: done before, metrics reused", flush=True)
                results.append(done)
            elif raw.report_only:
                missing.append(f"{' '.join(entry)} world_model={b}")
            else:
                jobs.append(merged)
                slots.append(len(results))
                results.append(None)
    if jobs and raw.workers > 1:
        # each task's episodes are generated here once, not by several workers at the same time
        for first in {tuple(o for o in job if not o.startswith("world_model=")): job for job in jobs}.values():
            task_data(compose(first, "probe"))
        # one bar over the runs instead of one per worker
        jobs = [[o for o in job if not o.startswith("progress=")] + ["progress=false"] for job in jobs]
    for slot, metrics in zip(slots, run_parallel(_run, jobs, raw.workers, f"suite {suite}", raw.progress)):
        results[slot] = metrics
    workers = min(raw.workers, len(jobs)) if jobs else 1
    invocation = {"trained": len(jobs), "reused": len(results) - len(jobs), "wall_s": round(time.time() - tic, 1),
                  "workers": workers, "threads": threads_per_worker(workers, torch.get_num_threads())}
    if missing:
        print(f"[probe] report_only: {len(missing)} runs not finished yet and left out of the report:\n  " + "\n  ".join(missing))
    if not results:
        raise ConfigError(f"report_only: no finished run of suite '{suite}' under {raw.out} (run the suite first)")
    baselines = {}
    for first, task_slots in task_runs:
        if task_slots:
            m = results[task_slots[0]]
            test = task_data(compose(first, "probe"))[5]
            baselines[task_label(m)] = baseline_gen_mse(test, m["context"], m["query"])
    return write_report(suite, results, Path(raw.out), missing, invocation, baselines)
