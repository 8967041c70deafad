"""`longdream bench learning`: train on Pendulum-v1 from state for a fixed env-step budget and report
the mean eval return over 10 episodes, with wall time and machine. Target: >= -300 after 20K env
steps (DreamerV3-class agents get there).

    longdream bench learning [backbones=rssm,s5wm] [steps=20000] [seeds=0] [device=cpu]
                             [preset=pendulum_cpu] [extra="k=v k=v"]

The default preset (configs/preset/pendulum_cpu.yaml) sizes the updates for a CPU; `preset=none`
gives the DreamerV3 defaults of configs/train.yaml (B16 x T64, train ratio 512).

Results accumulate: a run replaces the row of the same (env, backbone, seed, steps, preset, extra)
in the existing results file and keeps the others (`merge=false` starts afresh), so seeds measured
on different days add up. Each row records its own machine, date, eval episodes and torch threads;
the summary averages over seeds. `merge_from=a.json,b.json` trains nothing: it folds results files
written elsewhere with `out=` (runs made side by side) into this one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import RESULTS, commit, machine, markdown, parse, write

DEFAULTS = {"backbones": "", "steps": 20000, "seeds": "0", "device": "cpu", "env": "pendulum",
            "preset": "pendulum_cpu", "episodes": 10, "extra": "", "out": "", "keep": False, "merge": True,
            "merge_from": ""}
TARGETS = {"pendulum": -300.0, "pendulum_dict": -300.0}  # eval return to reach after 20K env steps, where an issue set one


def main(argv: list[str]) -> dict:
    from agents.config import load_config
    from agents.train import build_agent, evaluate, train

    from worldmodels.model import BACKBONES

    a = parse(argv, DEFAULTS)
    if a["merge_from"]:  # no training: fold results files written elsewhere (out=...) into this one
        rows = [r for path in a["merge_from"].split(",") for r in _rows(json.loads(Path(path).read_text()))]
        rows = merge(Path(a["out"]) if a["out"] else RESULTS, f"learning_{a['env']}", rows)
        data = {"args": a, "target": TARGETS.get(a["env"]), "runs": rows}
        write(f"learning_{a['env']}", data, report(rows, a["episodes"]), a["out"] or None)
        return data
    rows = []
    for backbone in a["backbones"].split(",") if a["backbones"] else list(BACKBONES):
        for seed in [int(s) for s in a["seeds"].split(",")]:
            # runs with other settings get their own directory, so that they can run side by side
            tag = "-" + hashlib.sha1(f"{a['preset']} {a['extra']}".encode()).hexdigest()[:6] if a["extra"] else ""
            run = Path(a["out"] or "runs/bench") / f"learning-{a['env']}-{backbone}-seed{seed}{tag}"
            shutil.rmtree(run, ignore_errors=True)
            overrides = [f"preset={a['preset']}", f"env={a['env']}", f"world_model={backbone}", f"steps={a['steps']}", f"seed={seed}",
                         f"device={a['device']}", f"run_dir={run}", "progress=false", *a["extra"].split()]
            cfg, _ = load_config(overrides)
            tic = time.time()
            res = train(cfg)
            wall = time.time() - tic
            returns = [res["eval_return_after"]]
            from agents import checkpoint

            agent, policy, shapes = build_agent(cfg, cfg.train.device)
            if a["episodes"] > 1:  # the loop's final eval uses eval_episodes; report exactly `episodes`
                agent.load_state_dict(checkpoint.load(checkpoint.latest(run))[0]["agent"])
                returns = evaluate(cfg, policy, shapes, a["episodes"], seed + 40_000)
            params = {"world_model": sum(p.numel() for p in agent.wm.parameters()),
                      "actor": sum(p.numel() for p in agent.actor.parameters()),
                      "critic": sum(p.numel() for p in agent.critic.parameters())}
            rows.append({"backbone": backbone, "seed": seed, "env_steps": res["env_steps"], "updates": res["updates"],
                         "eval_return_mean": float(np.mean(returns)), "eval_return_std": float(np.std(returns)),
                         "eval_return_before": res.get("eval_return_before"), "wall_s": round(wall, 1), "episodes": len(returns),
                         "threads": torch.get_num_threads(), "params": params, "dims": dataclasses.asdict(cfg.core),
                         "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size,
                         "replay_context": cfg.train.replay_context, "commit": commit(),
                         "nets": dataclasses.asdict(cfg.nets), "agent": dataclasses.asdict(cfg.agent),
                         "loss": dataclasses.asdict(cfg.loss),
                         "env": a["env"], "steps": a["steps"], "preset": a["preset"], "extra": a["extra"],
                         "machine": machine(a["device"]), "date": time.strftime("%Y-%m-%d"), "overrides": overrides})
            if not a["keep"]:
                shutil.rmtree(run, ignore_errors=True)
    if a["merge"]:
        rows = merge(Path(a["out"]) if a["out"] else RESULTS, f"learning_{a['env']}", rows)
    data = {"args": a, "target": TARGETS.get(a["env"]), "runs": rows}
    write(f"learning_{a['env']}", data, report(rows, a["episodes"]), a["out"] or None)
    return data


def _key(row: dict) -> tuple:
    """Rows of different models (dims) or settings never replace one another."""
    return (row["env"], row["backbone"], row["seed"], row["steps"], row["preset"], row["extra"], row["replay_context"],
            json.dumps(row.get("dims"), sort_keys=True))


def _latent(row: dict) -> str:
    d = row.get("dims")
    return f"{d['stoch']}x{d['classes']}" if d else "-"


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


def report(rows: list[dict], episodes: int) -> str:
    target = TARGETS.get(rows[0]["env"]) if rows else None
    met = lambda m: "-" if target is None else "yes" if m >= target else "no"  # noqa: E731
    rows = sorted(rows, key=lambda r: (r["backbone"], _latent(r), r["replay_context"], r["extra"], r["seed"]))
    envs = sorted({r["env"] for r in rows})
    text = (f"{', '.join(envs)}, mean eval return over each row's eval episodes after its env steps "
            + (f"(target >= {target:.0f})" if target is not None else "(no target set)") + "\n\n")
    text += markdown(["backbone", "latent", "replay context", "overrides", "seed", "env steps", "eval return", "episodes", "before", "updates",
                      "wall time", "threads", "target met", "params (wm/actor/critic)", "machine", "date"],
                     [[r["backbone"], _latent(r), "yes" if r["replay_context"] else "no", r["extra"] or "-", r["seed"], r["env_steps"], f"{r['eval_return_mean']:.1f} +- {r['eval_return_std']:.1f}",
                       r.get("episodes", episodes),
                       f"{r['eval_return_before']:.1f}" if r["eval_return_before"] is not None else "",
                       r["updates"], f"{r['wall_s'] / 60:.1f} min", r.get("threads", "-"), met(r["eval_return_mean"]),
                       "/".join(f"{v / 1e6:.2f}M" for v in r["params"].values()) if "params" in r else "-",
                       r.get("machine", ""), r.get("date", "")] for r in rows])
    summary = []
    group = lambda r: (r["backbone"], _latent(r), r["replay_context"], r["extra"])  # noqa: E731
    for b, latent, ctx, extra in dict.fromkeys(group(r) for r in rows):
        means = [r["eval_return_mean"] for r in rows if group(r) == (b, latent, ctx, extra)]
        summary.append([b, latent, "yes" if ctx else "no", extra or "-", len(means), f"{np.mean(means):.1f}", f"{min(means):.1f}",
                        f"{max(means):.1f}", f"{sum(m >= target for m in means)}/{len(means)}" if target is not None else "-"])
    text += "\n\nPer backbone, latent, replay context and overrides, over seeds:\n\n" + markdown(
        ["backbone", "latent", "replay context", "overrides", "seeds", "mean eval return", "worst seed", "best seed", "seeds meeting target"], summary)
    return text
