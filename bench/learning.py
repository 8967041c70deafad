"""`longdream bench learning`: train on Pendulum-v1 from state for a fixed env-step budget and report
the mean eval return over 10 episodes, with wall time and machine. Target: >= -300 after 20K env
steps (DreamerV3-class agents get there).

    longdream bench learning [backbones=rssm,s5wm] [steps=20000] [seeds=0] [device=cpu]
                             [preset=pendulum_cpu] [extra="k=v k=v"]

The default preset (configs/preset/pendulum_cpu.yaml) sizes the updates for a CPU; `preset=none`
gives the DreamerV3 defaults of configs/train.yaml (B16 x T64, train ratio 512).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from bench.report import machine, markdown, parse, write

DEFAULTS = {"backbones": "", "steps": 20000, "seeds": "0", "device": "cpu", "env": "pendulum",
            "preset": "pendulum_cpu", "episodes": 10, "extra": "", "out": "", "keep": False}
TARGET = -300.0


def main(argv: list[str]) -> dict:
    from agents.cli import load_config
    from agents.train import build_agent, evaluate, train

    from worldmodels.model import BACKBONES

    a = parse(argv, DEFAULTS)
    rows = []
    for backbone in a["backbones"].split(",") if a["backbones"] else list(BACKBONES):
        for seed in [int(s) for s in a["seeds"].split(",")]:
            run = Path("runs") / "bench" / f"learning-{a['env']}-{backbone}-seed{seed}"
            shutil.rmtree(run, ignore_errors=True)
            overrides = [f"preset={a['preset']}", f"env={a['env']}", f"world_model={backbone}", f"steps={a['steps']}", f"seed={seed}",
                         f"device={a['device']}", f"run_dir={run}", "progress=false", *a["extra"].split()]
            cfg, _ = load_config(overrides)
            tic = time.time()
            res = train(cfg)
            wall = time.time() - tic
            returns = [res["eval_return_after"]]
            if a["episodes"] > 1:  # the loop's final eval uses eval_episodes; report exactly `episodes`
                from agents import checkpoint

                agent, policy, shapes = build_agent(cfg, cfg.train.device)
                agent.load_state_dict(checkpoint.load(checkpoint.latest(run))["agent"])
                returns = evaluate(cfg, policy, shapes, a["episodes"], seed + 40_000)
            rows.append({"backbone": backbone, "seed": seed, "env_steps": res["env_steps"], "updates": res["updates"],
                         "eval_return_mean": float(np.mean(returns)), "eval_return_std": float(np.std(returns)),
                         "eval_return_before": res.get("eval_return_before"), "wall_s": round(wall, 1),
                         "overrides": overrides})
            if not a["keep"]:
                shutil.rmtree(run, ignore_errors=True)
    table = (f"{a['env']}, {a['steps']} env steps, mean eval return over {a['episodes']} episodes "
             f"(target >= {TARGET:.0f}), {machine(a['device'])}\n\n")
    table += markdown(["backbone", "seed", "eval return", "before", "updates", "wall time", "target met"],
                      [[r["backbone"], r["seed"], f"{r['eval_return_mean']:.1f} +- {r['eval_return_std']:.1f}",
                        f"{r['eval_return_before']:.1f}" if r["eval_return_before"] is not None else "",
                        r["updates"], f"{r['wall_s'] / 60:.1f} min", "yes" if r["eval_return_mean"] >= TARGET else "no"]
                       for r in rows])
    data = {"machine": machine(a["device"]), "args": a, "target": TARGET, "runs": rows}
    write(f"learning_{a['env']}", data, table, a["out"] or None)
    return data
