"""Memory-probe reports: backbones x tasks tables in markdown and JSON, and plots of the generation
error against the imagination step."""
from __future__ import annotations

import json
import math
from pathlib import Path

from agents.machine import portable


def task_label(m: dict) -> str:
    tag = ",".join(f"{k}={v}" for k, v in sorted(m["kwargs"].items()))
    return f"{m['task']}({tag})" if tag else m["task"]


def _acc(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def _plot(path: Path, title: str, lines: dict, marker: str | None = None, **axes) -> Path:
    """One line per backbone: `lines` maps a label to (x, y)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, (x, y) in lines.items():
        ax.plot(list(x), y, marker=marker, label=label)
    ax.set(title=title, **axes)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _invocation_line(inv: dict) -> str:
    whole = "the whole suite" if not inv["reused"] else f"{inv['trained']} runs, {inv['reused']} more reused from before"
    return (f"Wall time of the invocation that trained {whole}: {inv['wall_s'] / 3600:.2f} h with {inv['workers']} "
            f"process{'es' * (inv['workers'] > 1)} x {inv['threads']} thread{'s' * (inv['threads'] > 1)}.")


BASELINES = {"last_frame": "*last observed frame, held*", "context_mean": "*mean of the observed frames*"}


def _run_key(m: dict) -> tuple:
    return m["task"], json.dumps(m["kwargs"], sort_keys=True), m["backbone"], m.get("settings"), m["train_s"]


def _whole_suite_invocation(out: Path, suite: str, results: list[dict], invocation: dict | None) -> dict | None:
    """The invocation that trained every run of this report: this one, or the one recorded by the report
    already in `out` when that report holds exactly these runs (a rerun or report_only that reused them all)."""
    if invocation and invocation["trained"] and not invocation["reused"]:
        return invocation
    try:
        before = json.loads((out / f"report_{suite}.json").read_text())
    except (OSError, ValueError):
        return None
    whole = before.get("whole_suite_invocation") or before.get("invocation")
    runs = before.get("runs", [])
    if not whole or whole.get("reused") or whole.get("trained") != len(runs):
        return None
    return whole if sorted(map(_run_key, runs)) == sorted(map(_run_key, results)) else None


def write_report(suite: str, results: list[dict], out: Path, missing: list[str] = (), invocation: dict | None = None,
                 baselines: dict | None = None) -> dict:
    """`invocation`: what the command that wrote this report ran (runs trained, reused, wall seconds, workers,
    threads per worker), so a suite run whole in one invocation states its own wall time; a later report of
    the same runs keeps that invocation's line. `baselines`: per task label, the generation MSE of the
    predictors that learn nothing (`baseline_gen_mse`), shown under the backbones."""
    tasks = list(dict.fromkeys(task_label(m) for m in results))
    backbones = list(dict.fromkeys(m["backbone"] for m in results))
    cell = {(task_label(m), m["backbone"]): m for m in results}
    baselines = baselines or {}
    whole = _whole_suite_invocation(out, suite, results, invocation)

    def table(title: str, fmt, extra: dict | None = None) -> str:
        lines = [f"**{title}**", "", "| backbone | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for b in backbones:
            lines.append(f"| {b} | " + " | ".join(fmt(cell[t, b]) if (t, b) in cell else "-" for t in tasks) + " |")
        for key, label in (extra or {}).items():
            lines.append(f"| {label} | " + " | ".join(
                f"{baselines[t][key]:.1f}" if key in baselines.get(t, {}) else "-" for t in tasks) + " |")
        return "\n".join(lines)

    r0 = results[0]
    first = {t: next(m for m in results if task_label(m) == t) for t in tasks}  # each task's settings (the same for every backbone)
    text = [f"# Memory-probe suite '{suite}'", "",
            f"Size {r0['size']}, seed {r0['seed']}; per task: context C / query Q, offline updates, batch, learning rate "
            "and reward-loss scale: " + "; ".join(
                f"{t} {m['context']}/{m['query']}, {m['updates']} updates, B{m['batch_size']}, lr {m.get('lr', '-')}, "
                f"reward x{m.get('loss', {}).get('reward', '-')}" for t, m in first.items()) + ".", "",
            table("Generation MSE (imagined steps; sum over pixels in [0, 1]; lower is better)", lambda m: f"{m['gen_mse']:.1f}",
                  BASELINES if baselines else None),
            *(["", "The rows in italics learn nothing: the last observed frame held for every imagined step, and the "
                   "per-pixel mean of the observed frames (a blur of what was seen)."] if baselines else []),
            "", table("Reconstruction MSE (observed steps)", lambda m: f"{m['recon_mse']:.1f}"),
            "", table("Reward-prediction accuracy at reward events, imagination ('-': no reward event in the imagined steps)",
                      lambda m: _acc(m["reward_acc_imagine"])),
            "", table("Reward-prediction accuracy at the query's reward events through the posterior (every frame "
                      "observed; the memory without imagination)", lambda m: _acc(m.get("reward_acc_posterior", math.nan))),
            "", table("Reward-prediction accuracy at reward events, observation ('-': no reward event in the context)",
                      lambda m: _acc(m["reward_acc_observe"])),
            ""]
    for key in sorted({k for m in results for k in m if k.startswith("probe_")}):
        what = "accuracy" if key.endswith("_acc") else "MSE"
        text += [table(f"Probe on frozen states: {key[6:].rsplit('_', 1)[0]} {what} (held-out episodes)",
                       lambda m, key=key: f"{m[key]:.3f}" if key in m else "-"), ""]
    wall = sum(m.get("run_s", m["train_s"]) for m in results)
    text += [f"**Runs** ({len(results)}, {wall / 3600:.2f} h of run time in all; processes that ran side by side "
             "overlap, so the suite's wall time is given where it was run)", "",
             *([_invocation_line(line), ""] if (line := whole or (invocation if invocation and invocation["trained"] else None))
               else []),
             "| task | backbone | dims | params | train time | run time | threads | machine | date | commit |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for m in results:
        dims = m.get("dims", {})
        width = dims.get("deter") or dims.get("d_model")
        text.append(f"| {task_label(m)} | {m['backbone']} | {width}, {dims.get('stoch')}x{dims.get('classes')} | "
                    f"{m['params'] / 1e6:.2f}M | {m['train_s'] / 60:.1f} min | "
                    f"{m.get('run_s', m['train_s']) / 60:.1f} min | {m.get('threads', '-')} | {m.get('machine', '-')} | "
                    f"{m.get('date', '-')} | {m.get('commit', '-')} |")
    text.append("")
    if missing:
        text += [f"**Not finished yet** ({len(missing)} runs; this report covers the finished ones): "
                 + "; ".join(f"`{m}`" for m in missing), ""]
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    for t in tasks:
        stem = "".join(c if c.isalnum() else "_" for c in t).strip("_") + f"_{suite}.png"
        steps = {b: cell[t, b]["gen_mse_per_step"] for b in backbones if (t, b) in cell}
        plots.append(_plot(out / f"gen_mse_{stem}", t, {b: (range(1, len(c) + 1), c) for b, c in steps.items()},
                           xlabel="imagination step", ylabel="generation MSE"))
        text.append(f"![{t}]({plots[-1].name})")
        curves = {b: cell[t, b]["curve"] for b in backbones if (t, b) in cell and cell[t, b].get("curve")}
        if curves:  # held-out checks during training (eval_every): imagination accuracy against updates
            lines = {b: ([c["updates"] for c in curve], [c["reward_acc_imagine"] for c in curve]) for b, curve in curves.items()}
            plots.append(_plot(out / f"reward_acc_{stem}", t, lines, marker="o", xlabel="updates",
                               ylabel="reward accuracy, imagination", ylim=(0, 1.05)))
            text.append(f"![{t}, learning curve]({plots[-1].name})")
    report = out / f"report_{suite}.md"
    report.write_text("\n".join(text) + "\n")
    data = {"suite": suite, "runs": results, **({"invocation": invocation} if invocation else {}),
            **({"whole_suite_invocation": whole} if whole else {}), **({"baselines": baselines} if baselines else {})}
    (out / f"report_{suite}.json").write_text(json.dumps(portable(data, out), indent=1))
    print(f"report: {report}")
    return {"report": str(report), "plots": [str(p) for p in plots], "runs": results}
