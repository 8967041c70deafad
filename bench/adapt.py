"""`longdream bench adapt`: trained agents deployed on shifted dynamics, every mode of `longdream adapt`
per run and shift, with one results file and one table.

    longdream bench adapt runs=<run_dir>,<run_dir> [shifts=m:1.5,l:1.5,m:0.5,l:0.5]
                          [modes=frozen,context,gradient,retrain] [ac=true] [episodes=10] [updates=50]
                          [wm_updates=0] [rollback=true] [imagination=0] [lr=1] [explore=false] [eval=0] [last=5]
                          [seed=0] [suite=pendulum] [work=runs/adapt] [out=<folder>] [rerun=false]
                          [merge_from=a.json,b.json]

`runs` are training run directories (their backbone, seed and env come from their config). `seed`
seeds the deployment (the shifted env's initial states and the adaptation's draws) and is the same for
every run, so that all runs meet the same episodes (paired comparisons across modes and backbones); a
`retrain` trains with its run's own seed plus it, so runs of two training seeds get two retrains. A shift is
`param:scale`, several parameters of one shift joined with `+` (`mass:0.3+damping:0.3`). Each
(run, shift, mode) is one `longdream adapt` of `episodes` episodes (its own references: the trained
agent on the unshifted env, a random policy on the shift) and one row of
bench/results/adapt_<suite>.json / .md, written as soon as it is measured; a later invocation skips the
rows that are there (`rerun=true` measures them again). `gradient` runs with `ac=` (true: world model
and actor-critic steps; false: the world model alone) and is reported as `gradient+ac` or `gradient`;
`wm_updates` world-model steps before each episode's `updates` (reported where not 0), `rollback=false`
keeps every episode's steps (reported as "no rollback"), `imagination=H` imagines H steps in its
actor-critic updates (reported where not 0: the run's own horizon); `lr` scales its learning rates (reported where
it is not 1). `explore=true` samples the deployment's
actions as training's collection does instead of acting greedily (reported as "explore"; not for retrain).

A row's `recovered_fraction` is (return - random) / (in-distribution - random) averaged over the last
`last` episodes of the budget, or with `eval=N` over N evaluation episodes after it (the same starts for
every mode and run; reported as "eval N"); for `retrain` (a new agent trained on the shift for the same env steps)
it is the new agent's eval return after training. `recovered_first` is the first episode's, before any
adaptation could act. `merge_from=` trains nothing: it folds results files written elsewhere with
`out=` (runs made side by side) into this one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bench.report import RESULTS, machine, markdown, parse, portable, write

DEFAULTS = {"runs": "", "shifts": "m:1.5,l:1.5,m:0.5,l:0.5", "modes": "frozen,context,gradient,retrain", "ac": True,
            "episodes": 10, "updates": 50, "wm_updates": 0, "rollback": True, "imagination": 0, "lr": 1.0, "explore": False, "eval": 0, "last": 5, "suite": "pendulum", "work": "runs/adapt", "out": "", "rerun": False,
            "merge_from": "", "device": "cpu", "seed": 0}
# the options that shape only a gradient mode, at the values every other mode's row holds (and that a
# row written before the option existed stands for): one table for a row's identity, its key and the call
GRADIENT_OPTIONS = {"updates": 0, "wm_updates": 0, "rollback": True, "imagination": 0, "lr": 1.0}
TARGET = 0.8  # recovered fraction to reach within the budget (the adaptation issue's Pendulum target)


def parse_shift(text: str) -> dict[str, float]:
    """`m:1.5+l:0.5` -> {"m": 1.5, "l": 0.5}; a one-line error for anything else."""
    from agents.config import ConfigError

    shift = {}
    for part in text.split("+"):
        name, sep, scale = part.partition(":")
        try:
            shift[name.strip()] = float(scale)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError(f"a shift is param:scale (several joined with +), e.g. m:1.5 or mass:0.3+damping:0.3; got '{text}'")
    return shift


def tag(shift: dict) -> str:
    return "+".join(f"{k}x{v:g}" for k, v in sorted(shift.items()))


def training(env) -> str:
    """How a run was trained with respect to the dynamics: at the env's own values, at a fixed shift,
    across a range per episode (domain randomisation), or across a range in trials of k episodes."""
    text = tag(env.shift) or "default"
    if env.shift_range:
        text = " ".join(f"{k} {lo:g}-{hi:g}" for k, (lo, hi) in sorted(env.shift_range.items()))
        text = f"range {text}" + (f", trials of {env.trial}" if env.trial > 1 else "")
    return text


def label(mode: str, ac: bool) -> str:
    return "gradient+ac" if mode == "gradient" and ac else mode


def shown(row: dict) -> str:
    """A row's mode as the tables and plots name it: gradient modes run with other than the default
    number of updates per episode or a scaled learning rate say so, and rows measured on evaluation
    episodes after the budget say how many, so that they do not pool with the default's rows."""
    text = row["mode"]
    if row["mode"].startswith("gradient"):
        g = {k: row.get(k, v) for k, v in GRADIENT_OPTIONS.items()}
        text += f", {g['updates']} updates" if g["updates"] != DEFAULTS["updates"] else ""
        text += f", +{g['wm_updates']} model updates" if g["wm_updates"] else ""
        text += f", imagination {g['imagination']}" if g["imagination"] else ""
        text += ", no rollback" if not g["rollback"] else ""
        text += f", lr x{g['lr']:g}" if g["lr"] != 1.0 else ""
    if row.get("explore", False):
        text += ", explore"
    if row.get("eval", 0):
        text += f", eval {row['eval']}"
    return text


def work_folder(work: Path, row: dict) -> Path:
    """Where `longdream adapt` writes a row's episodes: one folder per (run, mode, updates, shift)."""
    mode = shown(row).replace(", ", "-").replace(" ", "")
    return work / row["run"] / f"{mode}-{row['shift_tag']}"


def main(argv: list[str]) -> dict:
    from agents.config import ConfigError, load_config

    a = parse(argv, DEFAULTS)
    name = f"adapt_{a['suite']}"
    folder = Path(a["out"]) if a["out"] else RESULTS
    rows = _load(folder / f"{name}.json")
    if a["merge_from"]:  # no runs: fold results files written elsewhere (out=...) into this one
        for path in a["merge_from"].split(","):
            rows = _merge(rows, _load(Path(path)))
        return _write(a, name, folder, rows)
    if not a["runs"]:
        raise ConfigError("bench adapt needs runs=<run_dir>[,<run_dir>...]: trained runs to deploy on the shifts")
    runs = {}  # run dir -> its training config
    for r in map(Path, a["runs"].split(",")):
        if not (r / "overrides.json").exists():
            raise ConfigError(f"'{r}' is not a longdream run directory (no overrides.json); pass the run_dir of a training run")
        runs[r] = load_config([f"run_dir={r}"])[0]
    shifts = [parse_shift(s) for s in a["shifts"].split(",")]
    modes = a["modes"].split(",")
    from agents.adapt import MODES

    for m in modes:
        if m not in MODES:
            raise ConfigError(f"modes must be among {', '.join(MODES)}, got '{m}'")
    done = set() if a["rerun"] else {_key(r) for r in rows}
    for run, trained in runs.items():
        for shift in shifts:
            for mode in modes:
                row = run_one(a, run, trained, shift, mode, done)
                if row is not None:
                    rows = _merge(rows, [row])
                    _write(a, name, folder, rows, quiet=True)
    return _write(a, name, folder, rows)


def run_one(a: dict, run: Path, trained, shift: dict, mode: str, done: set) -> dict | None:
    """One `longdream adapt` of a run (`trained`: its config) on a shift in a mode, summarised as a row;
    None where the results already hold it."""
    from agents.adapt import main as adapt

    # what tells this row apart from the others (its `_key`), as the row will hold it
    ident = {"run": run.name, "shift_tag": tag(shift), "mode": label(mode, a["ac"]), "episodes": a["episodes"],
             **{k: type(v)(a[k]) if mode == "gradient" else v for k, v in GRADIENT_OPTIONS.items()},
             "eval": a["eval"], "explore": bool(a["explore"]) and mode != "retrain"}
    if _key(ident) in done:
        print(f"[adapt] {run.name} {tag(shift)} {ident['mode']}: in the results already (rerun=true measures it again)", flush=True)
        return None
    out = work_folder(Path(a["work"]), ident)
    tic = time.time()
    data = adapt([f"run_dir={run}", f"seed={a['seed']}", f"mode={mode}", f"episodes={a['episodes']}",
                  *(f"{k}={a[k]}" for k in GRADIENT_OPTIONS), f"ac={a['ac']}", f"explore={ident['explore']}",
                  f"eval={a['eval']}", f"out={out}", f"device={a['device']}", *(f"shift.{k}={v}" for k, v in shift.items())])
    eps = data["rows"]
    final = [r for r in eps if r.get("eval")] or eps[-a["last"]:]
    # the deployment's own episodes; a retrain's curve ends at its eval after training, as it always has
    trace = eps if mode == "retrain" else [r for r in eps if not r.get("eval")]
    return {"run": run.name, "env": data["env"], "backbone": data["backbone"], "training": training(trained.env), "seed": trained.train.seed,
            "adapt_seed": data["seed"],
            "shift": shift,
            **ident, "ac": bool(a["ac"]) and mode == "gradient", "last": len(final), "env_steps": eps[-1]["env_steps"],
            "reference": data["reference"],
            "recovered_fraction": float(np.mean([r["recovered_fraction"] for r in final])),
            "recovered_first": float(eps[0]["recovered_fraction"]),
            "return_final": float(np.mean([r["return"] for r in final])),
            "pred_error_first": eps[0]["pred_error"], "pred_error_last": trace[-1]["pred_error"],
            "rolled_back": sum(bool(r.get("rolled_back")) for r in eps),
            "curve": [[r["env_steps"], r["recovered_fraction"], r["pred_error"]] for r in trace],
            "checkpoint": data["checkpoint"], "wall_s": round(time.time() - tic, 1), "machine": machine(a["device"]),
            "date": time.strftime("%Y-%m-%d"), "commit": data["commit"]}


def _key(row: dict) -> tuple:
    return (row["run"], row["shift_tag"], row["mode"], row["episodes"], *(row.get(k, v) for k, v in GRADIENT_OPTIONS.items()),
            row.get("eval", 0), row.get("explore", False))


def _load(path: Path) -> list[dict]:
    return json.loads(path.read_text()).get("runs", []) if path.exists() else []


def _merge(rows: list[dict], fresh: list[dict]) -> list[dict]:
    keys = {_key(r) for r in fresh}
    return [r for r in rows if _key(r) not in keys] + fresh


def _write(a: dict, name: str, folder: Path, rows: list[dict], quiet: bool = False) -> dict:
    data = {"args": {k: v for k, v in a.items() if k not in ("runs", "merge_from", "work", "out")}, "target": TARGET, "runs": rows}
    if quiet:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{name}.json").write_text(json.dumps(portable(data), indent=1))
        return data
    table = report(rows)
    for env in sorted({r["env"] for r in rows}):
        png = f"{name}_{env.replace(':', '_').replace('/', '_')}.png"
        if plot([r for r in rows if r["env"] == env], folder / png, env):
            table += f"\n\n![{env}: recovered fraction against env steps]({png})"
    write(name, data, table, a["out"] or None)
    return data


ORDER = {"frozen": 0, "context": 1, "gradient": 2, "gradient+ac": 3, "retrain": 4}


def order(mode: str) -> tuple:
    """Modes in the order of ORDER, a gradient mode with other updates after its default."""
    return ORDER.get(mode.split(",")[0], 9), mode


def report(rows: list[dict]) -> str:
    """Per env, backbone, shift and mode: the recovered fraction over seeds, then every row."""
    if not rows:
        return "no adaptation results yet"
    group = lambda r: (r["env"], r["backbone"], r.get("training", "default"), r["shift_tag"], shown(r))  # noqa: E731
    groups = sorted(dict.fromkeys(group(r) for r in rows), key=lambda g: (*g[:4], order(g[4])))
    summary = []
    for g in groups:
        rs = [r for r in rows if group(r) == g]
        rec = [r["recovered_fraction"] for r in rs]
        summary.append([*g, len(rs), f"{np.mean([r['recovered_first'] for r in rs]):.2f}", f"{np.mean(rec):.2f}",
                        f"{min(rec):.2f} .. {max(rec):.2f}", f"{sum(x >= TARGET for x in rec)}/{len(rec)}",
                        int(np.mean([r["env_steps"] for r in rs]))])
    text = ("Recovered fraction = (return - random) / (in-distribution return - random), random = a uniform policy on "
            f"the shift; 'final' is the mean over the last episodes of the budget, or where the mode says 'eval N' over N "
            f"evaluation episodes after it, the same starts for every mode (retrain: the new agent's eval after "
            f"training for the same env steps); target >= {TARGET}\n\n")
    text += markdown(["env", "backbone", "training", "shift", "mode", "seeds", "first episode", "final (mean)", "final (seeds)",
                      "seeds >= target", "env steps"], summary)
    text += "\n\nEvery run:\n\n" + markdown(
        ["run", "backbone", "training", "seed", "shift", "mode", "in-distribution", "random", "first", "final", "final return",
         "pred. error first / last", "rolled back", "wall time", "machine", "date"],
        [[r["run"], r["backbone"], r.get("training", "default"), r["seed"], r["shift_tag"], shown(r), f"{r['reference']['in_distribution']:.1f}",
          f"{r['reference']['random']:.1f}", f"{r['recovered_first']:.2f}", f"{r['recovered_fraction']:.2f}",
          f"{r['return_final']:.1f}", f"{r['pred_error_first']:.4f} / {r['pred_error_last']:.4f}", r["rolled_back"],
          f"{r['wall_s'] / 60:.1f} min", r["machine"], r["date"]]
         for r in sorted(rows, key=lambda r: (group(r)[:4], order(shown(r)), r["seed"]))])
    return text


def plot(rows: list[dict], path: Path, env: str) -> bool:
    """A grid: one row of panels per (backbone, training), one column per shift; in each panel the
    recovered fraction against env steps, one line per mode (mean over seeds at each step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shifts = sorted({r["shift_tag"] for r in rows})
    variants = sorted({(r["backbone"], r.get("training", "default")) for r in rows})
    if not shifts:
        return False
    fig, axes = plt.subplots(len(variants), len(shifts), figsize=(3.2 * len(shifts), 2.4 * len(variants) + 0.6),
                             squeeze=False, sharex=True, sharey=True)
    modes = sorted({shown(r) for r in rows}, key=order)
    for i, (b, trained) in enumerate(variants):
        for j, s in enumerate(shifts):
            ax = axes[i][j]
            for mode in modes:
                curves = [r["curve"] for r in rows
                          if (r["backbone"], r.get("training", "default"), r["shift_tag"], shown(r)) == (b, trained, s, mode)]
                if not curves:
                    continue
                n = min(len(c) for c in curves)
                vals = np.mean([[c[1] for c in cur[:n]] for cur in curves], axis=0)
                ax.plot([c[0] for c in curves[0][:n]], vals, marker="o", ms=2, color=f"C{modes.index(mode)}",
                        label=f"{mode} ({len(curves)})")
            ax.axhline(TARGET, color="gray", lw=0.8)
            ax.set_title(f"{b}, {trained}: {s}", fontsize=7)
            if i == len(variants) - 1:
                ax.set_xlabel("env steps")
            if j == 0:
                ax.set_ylabel("recovered fraction")
            if j == 0 and i == 0:
                ax.legend(fontsize=6)
    fig.suptitle(f"{env}: recovered fraction per episode (in brackets: seeds)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
