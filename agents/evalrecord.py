"""`longdream eval ... record=<results>.json`: keep an evaluation as a row of a results file.

A re-evaluation of a saved agent (more episodes than the run's own final eval, or sampled against
greedy actions) is a measurement like any benchmark's: the row says which run and checkpoint, how
many episodes of which kind, the returns, the run's overrides, resolved dims and parameter counts, and
where and when it was measured. A row with the same run, checkpoint, episodes and kind is replaced;
the markdown table is rewritten beside the JSON on every call.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from agents.machine import commit, machine, markdown, portable

# overrides every run carries that say nothing about the setting
_PLUMBING = ("progress=", "device=", "seed=", "run_dir=")


def _key(row: dict) -> tuple:
    return row["run"], row["checkpoint_env_steps"], row["episodes"], row["kind"]


def rows_of(path: Path) -> list[dict]:
    """The rows recorded in `path` so far (none if it does not exist); a one-line error if it is not a record."""
    from agents.config import ConfigError

    if not path.exists():
        return []
    try:
        rows = json.loads(path.read_text())["rows"]
        if not isinstance(rows, list):
            raise TypeError
        return rows
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise ConfigError(f"'{path}' is not an eval record (no 'rows' list); name a new file or one "
                          "written by `longdream eval record=`") from None


def record(path: Path, run_dir: Path, cfg, ckpt: Path, kind: str, returns, eval_seed: int, agent) -> Path:
    """Add (or replace) this evaluation's row in `path` and rewrite `path`'s .md; returns `path`."""
    rows = rows_of(path)
    overrides = json.loads((run_dir / "overrides.json").read_text())
    returns = [float(r) for r in returns]
    row = {"run": run_dir.name, "env": cfg.env.id, "backbone": cfg.backbone, "seed": cfg.train.seed,
           "overrides": [o for o in overrides if not o.startswith(_PLUMBING)],
           "checkpoint_env_steps": int(ckpt.name.rsplit("-", 1)[-1]), "episodes": len(returns), "kind": kind,
           "mean": float(np.mean(returns)), "std": float(np.std(returns)), "min": min(returns),
           "max": max(returns), "returns": returns, "eval_seed": eval_seed,
           "dims": dataclasses.asdict(cfg.core), "nets": {"units": cfg.nets.units, "layers": cfg.nets.layers},
           "threads": torch.get_num_threads(), "machine": machine(cfg.train.device),
           "date": time.strftime("%Y-%m-%d"), "commit": commit(), "params": agent.param_counts()}
    rows = [r for r in rows if _key(r) != _key(row)] + [portable(row)]
    rows.sort(key=lambda r: (r["env"], r["backbone"], " ".join(r["overrides"]), r["seed"], r["kind"], r["episodes"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": path.stem, "rows": rows}, indent=1))
    path.with_suffix(".md").write_text(table(rows) + "\n")
    return path


def table(rows: list[dict]) -> str:
    head = ("Evaluations of saved agents (`longdream eval record=`): mean +- std of the episode returns "
            "at the checkpoint's env steps, greedy (the actor's mode) or sampled actions\n\n")
    return head + markdown(
        ["env", "backbone", "overrides", "seed", "checkpoint env steps", "kind", "episodes", "return", "min", "max",
         "params (wm/actor/critic)", "machine", "date", "commit"],
        [[r["env"], r["backbone"], " ".join(r["overrides"]) or "-", r["seed"], r["checkpoint_env_steps"], r["kind"],
          r["episodes"], f"{r['mean']:.1f} +- {r['std']:.1f}", f"{r['min']:.1f}", f"{r['max']:.1f}",
          "/".join(f"{v / 1e6:.2f}M" for v in r["params"].values()),
          r["machine"], r["date"], r["commit"]] for r in rows])
