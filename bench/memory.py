"""`longdream bench memory` (also `longdream probe suite=bsuite_memory`): online memory RL. The agent
trains on BSuite memory_len for each backbone and memory length; the success rate is the share of
eval episodes with a positive return, reported against the memory length (R2I's evaluation: DreamerV3
collapses after about 20-30 steps of memory, R2I holds about 90).

    longdream bench memory [backbones=rssm,s5wm] [sweep_lengths=[10,30,100]] [sweep_steps=50000]
                           [sweep_episodes=100] [sweep_extra=[preset=...]] [seed=0] [out=...]

Settings come from configs/probe.yaml (`sweep_*`). Training windows are `seq_len` long whatever the
memory length, unless `sweep_cover=true`: with replay context (the default) a window starts from the
model state stored with its first row, so the cue seen at an episode's start reaches its end through
the stored states, but no gradient crosses a window's start, so nothing teaches the model to keep the
cue unless one window holds both the cue and the reward it decides. `sweep_cover=true` makes every
window span two episodes (seq_len = 2(L + 1) rounded up to 16) at about the same tokens per update
(batch_size = max(2, batch_size x seq_len / that), or `sweep_cover_batch` windows: more whole episodes per
update); its runs are named `<backbone>-len<L>-seed<s>-cover` (`-cover-b<windows>`).
Results accumulate in bsuite_memory.json / .md (a run replaces the row of the same backbone, length,
seed, steps and overrides) beside success.png. `report_only=true` writes them from the runs already
finished and trains nothing.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

from agents.parallel import run_parallel
from bench.report import RESULTS, commit, machine, markdown, write


def main(argv: list[str]) -> dict:
    from agents.config import ConfigError, compose, load_config
    from agents.probe import split_args
    from agents.probe.protocol import build
    from worldmodels.model import BACKBONES

    if importlib.util.find_spec("bsuite") is None:
        raise ConfigError("the BSuite memory sweep needs the bsuite package: pip install 'longdream[memory]'")
    opts, rest = split_args([a for a in argv if not a.startswith("suite=")])
    out_given = any(a.startswith(("out=", "run_dir=")) for a in argv)
    raw = compose([o for o in rest if o.split("=", 1)[0] not in ("task", "world_model")], "probe")
    probe = build(raw)[0]
    backbones = opts["backbones"].split(",") if opts.get("backbones") else list(BACKBONES)
    for b in backbones:
        if b not in BACKBONES:
            raise ConfigError(f"unknown backbone '{b}' in backbones (choose from {', '.join(BACKBONES)})")
    runs = Path(probe.out) / "bsuite_memory"
    folder = runs if out_given else RESULTS
    extra = [str(o) for o in probe.sweep_extra]
    rows: list[dict | None] = []
    jobs, slots, missing = [], [], []
    base = load_config([*extra, "env=bsuite_memory_len"])[0].train
    for b in backbones:
        for L in probe.sweep_lengths:
            cover = ""
            if probe.sweep_cover:
                cover = f"-cover-b{probe.sweep_cover_batch}" if probe.sweep_cover_batch else "-cover"
            run = runs / f"{b}-len{L}-seed{probe.seed}{cover}"
            window = cover_window(L, base.batch_size, base.seq_len, probe.sweep_cover_batch) if probe.sweep_cover else []
            # the same number of training episodes at every length, or the same env steps
            steps = probe.sweep_train_episodes * (L + 1) if probe.sweep_train_episodes else probe.sweep_steps
            scale = [f"loss.reward={L + 1}"] if probe.sweep_reward_by_length else []
            progress = probe.progress and probe.workers == 1  # side by side: one bar over the runs instead
            settings = ["env=bsuite_memory_len", f"env.kwargs.memory_length={L}", f"world_model={b}", f"size={raw.size.name}",
                        f"steps={steps}", f"seed={probe.seed}", f"device={probe.device}", f"run_dir={run}",
                        f"eval_episodes={probe.sweep_episodes}", "eval_every=0", f"progress={progress}", *extra, *window, *scale]
            cfg, overrides = load_config(settings)
            if probe.sweep_updates_per_episode:  # the same updates per episode at every length: the ratio falls with L
                t = cfg.train
                ratio = probe.sweep_updates_per_episode * t.batch_size * t.seq_len / (L + 1)
                settings = settings + [f"train_ratio={ratio:g}"]
                cfg, overrides = load_config(settings)
            done = run / "result.json"
            if done.exists() and _same_run(json.loads(done.read_text()).get("overrides"), overrides):  # a sweep resumes
                rows.append(json.loads(done.read_text()))
                print(f"[memory] bsuite memory_len={L} {b}: done before, result reused", flush=True)
                continue
            if probe.report_only:  # report what has finished, train nothing
                missing.append(f"{b} memory_len={L}")
                continue
            row = {"backbone": b, "memory_length": int(L), "seed": probe.seed, "episodes": probe.sweep_episodes,
                   "steps": steps, "extra": " ".join(extra), "reward_by_length": probe.sweep_reward_by_length,
                   "cover": probe.sweep_cover, "cover_batch": probe.sweep_cover_batch if probe.sweep_cover else 0,
                   "updates_per_episode": probe.sweep_updates_per_episode}
            jobs.append((settings, row, probe.device))
            slots.append(len(rows))
            rows.append(None)
    for slot, row in zip(slots, run_parallel(_train_one, jobs, probe.workers, "bsuite sweep", probe.progress)):
        rows[slot] = row
    if missing:
        print("[memory] report_only: not finished yet, left out: " + ", ".join(missing), flush=True)
    if probe.report_only and not rows:
        raise ConfigError(f"report_only: no finished sweep run under {runs} (run the sweep first)")
    rows = merge(folder / "bsuite_memory.json", rows)
    data = {"runs": rows}
    table = report(rows)
    folder.mkdir(parents=True, exist_ok=True)
    if plot(rows, folder / "bsuite_memory_success.png"):
        table += "\n\n![success against memory length](bsuite_memory_success.png)"
    write("bsuite_memory", data, table, str(folder) if out_given else None)
    return data


def _train_one(job: tuple[list[str], dict, str]) -> dict:
    """One sweep run: train the agent, evaluate, save result.json in its run directory (a picklable job
    for a worker process). Returns its row."""
    from agents.config import load_config
    from agents.train import build_agent, train

    settings, row, device = job
    cfg, overrides = load_config(settings)
    tic = time.time()
    res = train(cfg)
    agent = build_agent(cfg, "cpu")[0]
    success = float(np.mean(np.asarray(res["eval_returns_after"]) > 0))
    row = {**row, "success": success, "env_steps": res["env_steps"], "updates": res["updates"],
           "wall_s": round(time.time() - tic, 1), "seq_len": cfg.train.seq_len, "batch_size": cfg.train.batch_size,
           "replay_context": cfg.train.replay_context, "dims": dataclasses.asdict(cfg.core),
           "nets": dataclasses.asdict(cfg.nets), "agent": dataclasses.asdict(cfg.agent),
           "loss": dataclasses.asdict(cfg.loss), "threads": torch.get_num_threads(),
           "params": sum(p.numel() for p in agent.parameters()), "overrides": overrides,
           "machine": machine(device), "date": time.strftime("%Y-%m-%d"), "commit": commit()}
    (Path(cfg.train.run_dir) / "result.json").write_text(json.dumps(row, indent=1))
    print(f"[memory] bsuite memory_len={row['memory_length']} {row['backbone']}: success {success:.2f} "
          f"({row['wall_s'] / 60:.1f} min)", flush=True)
    return row


def _same_run(stored: list[str] | None, overrides: list[str]) -> bool:
    """The same settings, whatever the progress bar's."""
    def keep(o):
        return [x for x in o or [] if not x.startswith("progress=")]
    return stored is not None and keep(stored) == keep(overrides)


def cover_window(L: int, batch_size: int, seq_len: int, windows: int = 0) -> list[str]:
    """Overrides for windows that span two episodes of memory length L (each L + 1 steps), so that every
    window holds a whole episode: `windows` of them per update, or (0) about the tokens per update of
    batch_size x seq_len."""
    T = -(-2 * (L + 1) // 16) * 16
    return [f"batch_size={windows or max(2, batch_size * seq_len // T)}", f"seq_len={T}"]


def _parts(r: dict) -> tuple[str, ...]:
    """The row's settings beyond the defaults: its overrides, the windows where they cover the memory,
    the reward scale where it grows with L, and the training budget (episodes where it is the same at
    every L)."""
    n = r["steps"] // (r["memory_length"] + 1)
    budget = f"{n} episodes" if n * (r["memory_length"] + 1) == r["steps"] else f"{r['steps']} steps"
    return tuple(x for x in (*r["extra"].split(), "seq_len=2(L+1)" if r.get("cover") else "",
                             f"batch_size={r['cover_batch']}" if r.get("cover_batch") else "",
                             f"{r['updates_per_episode']:g} updates/episode" if r.get("updates_per_episode") else "",
                             "loss.reward=L+1" if r.get("reward_by_length") else "", budget) if x)


def _label(r: dict) -> str:
    return " ".join(_parts(r))


def _key(r: dict) -> tuple:
    return r["backbone"], r["memory_length"], r["seed"], r["steps"], _label(r), json.dumps(r.get("dims"), sort_keys=True)


def merge(path: Path, rows: list[dict]) -> list[dict]:
    if not path.exists():
        return rows
    fresh = {_key(r) for r in rows}
    return [r for r in json.loads(path.read_text()).get("runs", []) if _key(r) not in fresh] + rows


def report(rows: list[dict]) -> str:
    groups = list(dict.fromkeys((r["backbone"], _label(r)) for r in rows))
    lengths = sorted({r["memory_length"] for r in rows})
    lines = ["BSuite memory_len: success rate (eval episodes with a positive return) against memory length; "
             "mean over seeds (seeds in brackets)", "",
             markdown(["backbone", "overrides", *map(str, lengths)],
                      [[b, extra or "-", *[_cell([r["success"] for r in rows if (r["backbone"], _label(r), r["memory_length"])
                                                  == (b, extra, L)]) for L in lengths]] for b, extra in groups]),
             "", "Runs:", "",
             markdown(["backbone", "memory length", "seed", "success", "env steps", "updates", "batch", "seq_len", "replay context",
                       "params", "wall time", "machine", "date"],
                      [[r["backbone"], r["memory_length"], r["seed"], f"{r['success']:.2f}", r["env_steps"], r["updates"],
                        r.get("batch_size", "-"), r["seq_len"], "yes" if r["replay_context"] else "no", f"{r['params'] / 1e6:.2f}M",
                        f"{r['wall_s'] / 60:.1f} min", r["machine"], r["date"]] for r in rows])]
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    return f"{np.mean(values):.2f} ({len(values)})" if values else "-"


def plot(rows: list[dict], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shared = set.intersection(*(set(_parts(r)) for r in rows))  # said once, in the title
    groups = list(dict.fromkeys((r["backbone"], _label(r)) for r in rows))
    variants = list(dict.fromkeys(label for _, label in groups))
    parts = {_label(r): _parts(r) for r in rows}
    colours = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(b for b, _ in groups))}
    fig, ax = plt.subplots(figsize=(7, 4))
    for b, extra in groups:
        lengths = sorted({r["memory_length"] for r in rows if (r["backbone"], _label(r)) == (b, extra)})
        means = [np.mean([r["success"] for r in rows if (r["backbone"], _label(r), r["memory_length"]) == (b, extra, L)])
                 for L in lengths]
        own = [x for x in parts[extra] if x not in shared]
        ax.plot(lengths, means, marker="o", color=colours[b], linestyle=("-", "--", ":", "-.")[variants.index(extra) % 4],
                label=" ".join([b, *own]))
    ax.set(xscale="log", xlabel="memory length", ylabel="success rate", ylim=(0, 1.05))
    ax.set_title("BSuite memory_len\n" + " ".join(x for x in _parts(rows[0]) if x in shared), fontsize=8)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
