"""`longdream bench offline`: every offline learner on every dataset, per seed, scored by the normalized
score 100 (R - R_random) / (R_expert - R_random) with each dataset's own references.

    longdream bench offline datasets=<id>,<id> [root=<dir>] [methods=dreamer,dreamer_penalty,dreamer_bc,ssm,transformer,bc]
                            [seeds=0,1] [updates=3000] [decision_updates=2000] [extra="preset=pendulum_cpu"]
                            [suite=<name>] [out=<dir>] [runs=<dir>] [merge_from=<a.json>,<b.json>]

Methods: `dreamer` (train offline=<id>), `dreamer_penalty` (the same with agent.penalty=<penalty>),
`dreamer_bc` (the same with agent.bc=<bc>, the actor kept near the dataset's actions), and
the return-conditioned sequence policies of `train algo=decision`: `ssm` (Decision-SSM), `transformer`
(Decision Transformer) and `bc` (behaviour cloning). `extra` holds the overrides every run gets (the
env settings the datasets were made with, e.g. preset=pendulum_cpu). The datasets are made beforehand
with `longdream dataset` (their reference scores `ref_random=` / `ref_expert=` give the normalized
score; without them the score column is empty).

Results: bench/results/offline_<suite>.json (one row per run: method, env, dataset, seed,
normalized_score, eval return, the dataset's mean return, params, updates, wall time, machine, date,
overrides) and .md (normalized score per dataset and method, mean over seeds, and the mean over the
datasets; the weighted methods are named with their weight, `dreamer_penalty 10`, so rows of two weights
in one file stay apart). A benchmark resumes: a run whose row is in the results file is skipped, and a stopped run
continues from its checkpoint (run directories under `runs=`, default runs/bench_offline, named by
dataset, method with its weight, and seed).
`merge_from=` folds results files written elsewhere with `out=` (benchmarks run side by side) into this
one before running what is still missing.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import RESULTS, commit, machine, markdown, parse, write

DEFAULTS = {"datasets": "", "root": "", "methods": "dreamer,dreamer_penalty,dreamer_bc,ssm,transformer,bc", "seeds": "0,1",
            "updates": 3000, "decision_updates": 2000, "penalty": 1.0, "bc": 1.0, "extra": "", "suite": "", "out": "",
            "runs": "runs/bench_offline", "eval_episodes": 10, "merge_from": ""}


def _dreamer(*own: str):
    return lambda a: [f"offline_updates={a['updates']}", *(o.format(**a) for o in own)]


def _decision(core: str):
    return lambda a: ["algo=decision", f"decision.core={core}", f"decision.updates={a['decision_updates']}",
                      f"decision.eval_episodes={a['eval_episodes']}"]


# the methods whose own setting is a weight: named with it, in run directories and in the report
WEIGHTS = {"dreamer_penalty": "agent.penalty", "dreamer_bc": "agent.bc"}

# each method's own overrides, from the benchmark's arguments
METHODS = {"dreamer": _dreamer(), "dreamer_penalty": _dreamer(WEIGHTS["dreamer_penalty"] + "={penalty:g}"),
           "dreamer_bc": _dreamer(WEIGHTS["dreamer_bc"] + "={bc:g}"), "ssm": _decision("ssm"), "transformer": _decision("transformer"),
           "bc": _decision("bc")}


def label(method: str, ov: list[str]) -> str:
    """The method as the report names it: with its weight where it has one (`dreamer_penalty 10`), so that
    rows of two weights in one results file are never averaged together."""
    key = WEIGHTS.get(method)
    weight = next((o.split("=", 1)[1] for o in ov if key and o.startswith(key + "=")), None)
    return method if weight is None else f"{method} {weight}"


def overrides(a: dict, method: str, dataset: str, seed: int, run_dir: Path) -> list[str]:
    base = [*a["extra"].split(), f"offline={dataset}", f"seed={seed}", f"run_dir={run_dir}", "progress=false",
            f"eval_episodes={a['eval_episodes']}"] + ([f"offline_root={a['root']}"] if a["root"] else [])
    return base + METHODS[method](a)


def _key(ov: list[str]) -> list[str]:
    """A run's settings without where it ran (results files keep no machine paths)."""
    return [o for o in ov if not o.startswith(("run_dir=", "offline_root="))]


def main(argv: list[str]) -> dict:
    from agents.config import ConfigError, load_config
    from agents.offline.dataset import read_info
    from agents.offline.decision import normalized, train as train_decision
    from agents.train import train

    a = parse(argv, DEFAULTS)
    datasets = [d for d in a["datasets"].split(",") if d]
    if not datasets:
        raise ConfigError("bench offline needs datasets=<id>[,<id>...] (make them with `longdream dataset`)")
    methods = a["methods"].split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method '{unknown[0]}' (choose from {', '.join(METHODS)})")
    name = "offline_" + (a["suite"] or datasets[0].replace("/", "_"))
    folder = Path(a["out"]) if a["out"] else RESULTS
    path = folder / f"{name}.json"
    rows = json.loads(path.read_text())["runs"] if path.exists() else []
    for other in filter(None, a["merge_from"].split(",")):  # results written elsewhere (out=): folded in, newest wins
        new = json.loads(Path(other).read_text())["runs"]
        keys = {(r["method"], r["dataset"], r["seed"], tuple(_key(r["overrides"]))) for r in new}
        rows = [r for r in rows if (r["method"], r["dataset"], r["seed"], tuple(_key(r["overrides"]))) not in keys] + new
    refs = {d: read_info(d, a["root"] or None) for d in datasets}  # a missing dataset fails here, before any run
    for r in rows:  # scored with each dataset's references as they are now (a dataset remade with them scores old rows)
        if r["dataset"] in refs:
            r["normalized_score"] = normalized(r["eval_return"], refs[r["dataset"]])
    for d in datasets:
        for method in methods:
            for seed in [int(s) for s in a["seeds"].split(",")]:
                named = label(method, METHODS[method](a)).replace(" ", "")  # dreamer_penalty10: the weight in the name
                run_dir = Path(a["runs"]) / f"{d.replace('/', '_')}-{named}-seed{seed}"
                ov = overrides(a, method, d, seed, run_dir)
                if any(_key(r["overrides"]) == _key(ov) for r in rows):
                    print(f"[offline] {d} {method} seed {seed}: in the results, skipped", flush=True)
                    continue
                cfg, _ = load_config(ov)
                res = train_decision(cfg, cfg.decision) if cfg.train.algo == "decision" else train(cfg)
                ret = res.get("eval_return", res.get("eval_return_after"))
                row = {"method": method, "env": cfg.env.id, "dataset": d, "seed": seed,
                       "normalized_score": res["normalized_score"], "eval_return": ret,
                       "dataset_mean_return": res["dataset_mean_return"], "params": res["params"],
                       "updates": res["updates"], "wall_s": round(res["wall_s"], 1), "threads": torch.get_num_threads(),
                       "act_ms_per_step": res.get("act_ms_per_step"),
                       # how the Decision-SSM and BC drew whole episodes (None: windows or Dreamer); rows without
                       # this field drew uniformly unless their overrides say otherwise
                       "episode_weight": cfg.decision.episode_draw if cfg.train.algo == "decision" else None,
                       "machine": machine(cfg.train.device), "date": time.strftime("%Y-%m-%d"), "commit": commit(),
                       "overrides": ov}
                rows.append(row)
                print(f"[offline] {d} {method} seed {seed}: return {ret:.1f}"
                      + (f", normalized {row['normalized_score']:.1f}" if row["normalized_score"] is not None else "")
                      + f" ({row['wall_s'] / 60:.1f} min)", flush=True)
                write(name, {"runs": rows}, report(rows), a["out"] or None)  # each run lands at once
    write(name, {"runs": rows}, report(rows), a["out"] or None)
    return {"runs": rows, "table": report(rows)}


def report(rows: list[dict]) -> str:
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    base = {id(r): label(r["method"], r["overrides"]) for r in rows}
    budgets: dict[str, set] = {}
    for r in rows:
        budgets.setdefault(base[id(r)], set()).add(r["updates"])
    # a method run at two budgets in one file (a run continued with more updates) is two methods, named
    # with their budget: never one average of both
    name = {id(r): base[id(r)] + (f" @{r['updates']}" if len(budgets[base[id(r)]]) > 1 else "") for r in rows}
    methods = list(dict.fromkeys(name.values()))

    def cell(vals):
        vals = [v for v in vals if v is not None]
        return f"{np.mean(vals):.1f} ({len(vals)})" if vals else "-"

    def mean_score(m, d):
        vals = [r["normalized_score"] for r in rows if (name[id(r)], r["dataset"]) == (m, d) and r["normalized_score"] is not None]
        return float(np.mean(vals)) if vals else None

    score = []
    for m in methods:
        per = [mean_score(m, d) for d in datasets]
        score.append([m, *[cell([r["normalized_score"] for r in rows if (name[id(r)], r["dataset"]) == (m, d)]) for d in datasets],
                      f"{np.mean(per):.1f}" if all(v is not None for v in per) else "-"])
    ret = [[d, f"{np.mean([r['dataset_mean_return'] for r in rows if r['dataset'] == d]):.1f}",
            *[cell([r["eval_return"] for r in rows if (name[id(r)], r["dataset"]) == (m, d)]) for m in methods]]
           for d in datasets]
    return "\n".join([
        "Offline learning: normalized score 100 (R - R_random) / (R_expert - R_random) with each dataset's references, "
        "mean over seeds (seeds in brackets)", "",
        markdown(["method", *datasets, "mean"], score), "",
        "Eval return (mean over seeds) beside the dataset's own mean return:", "",
        markdown(["dataset", "dataset mean", *methods], ret), "", "Runs:", "",
        markdown(["method", "dataset", "seed", "score", "return", "params", "updates", "acting (ms/step, env included)",
                  "wall time", "machine", "date"],
                 [[name[id(r)], r["dataset"], r["seed"], "-" if r["normalized_score"] is None else f"{r['normalized_score']:.1f}",
                   f"{r['eval_return']:.1f}", f"{r['params'] / 1e6:.2f}M", r["updates"],
                   "-" if r.get("act_ms_per_step") is None else f"{r['act_ms_per_step']:.2f}", f"{r['wall_s'] / 60:.1f} min",
                   r["machine"], r["date"]] for r in rows])])
