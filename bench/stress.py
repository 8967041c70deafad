"""`longdream bench stress`: SIGKILL a training run at random moments, some inside checkpoint writes,
and resume it each time; check that every resume continues from the last checkpoint with its replay.

    longdream bench stress [kills=20] [seed=0] [capacity=600] [out=]

Per kill, before resuming, the checkpoint the resume will load is read: its counters, its replay
extent and the digests of the rows it recorded when it was written. The replay storage is reopened
as the resume will see it, and every recorded digest of a row range still stored is recomputed
(the content hash of the rows up to that checkpoint). The resumed process must then announce that
checkpoint's env step and exactly that many rows. The small default capacity makes the replay wrap,
so the rows a killed run overwrote after its checkpoint must be dropped, not trusted.
"""
from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.report import machine, markdown, parse, write

DEFAULTS = {"kills": 20, "seed": 0, "capacity": 200, "out": "", "run_dir": "runs/bench/stress"}
TRAIN = ["env=pendulum", "env.time_limit=50", "size=xs", "prefill=100", "train_ratio=16", "batch_size=4", "seq_len=8",
         "log_every=50", "eval_episodes=1", "eval_every=0", "progress=false", "collect_every=8", "steps=10000000",
         "checkpoint_every=0.5"]
RESUMED = re.compile(r"from (ckpt-\d+) at env step ([\d,]+): ([\d,]+) replay rows")


def _state(run: Path) -> dict | None:
    from agents import checkpoint
    from agents.replay import Replay

    ckpt = checkpoint.latest(run) if (run / "checkpoints").exists() else None
    if ckpt is None:
        return None
    counters = torch.load(ckpt / "agent.pt", weights_only=False)["counters"]
    rp = Replay.open(run / "replay", ckpt)  # as the resume will reopen it, without writing anything
    checked = [s for s in rp.segments if s[1] >= rp.lo[s[0]]]
    return {"checkpoint": ckpt.name, "env_steps": counters["env_steps"], "updates": counters["updates"],
            "rows": len(rp), "oldest_row": rp.lo[0], "newest_row": rp.hi[0] - 1, "segments_checked": len(checked), "rows_checked": sum(s[2] - s[1] for s in checked),
            "damaged": rp.verify()}


def main(argv: list[str]) -> dict:
    import shutil

    a = parse(argv, DEFAULTS)
    rng = random.Random(a["seed"])
    run = Path(a["run_dir"])
    shutil.rmtree(run, ignore_errors=True)
    base = [sys.executable, "-m", "agents.cli", "train", f"run_dir={run}"]
    rows, previous = [], None
    for i in range(a["kills"] + 1):
        args = base + (TRAIN + [f"replay_capacity={a['capacity']}", f"seed={a['seed']}"] if i == 0 else [])
        log = run.parent / f"stress-{i}.log"
        run.parent.mkdir(parents=True, exist_ok=True)
        for tmp in (run / "checkpoints").glob(".ckpt-*.tmp"):  # so that one found later is this process's
            shutil.rmtree(tmp)
        with open(log, "w") as f:
            proc = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and (
                not RESUMED.search(log.read_text()) if i > 0 else _newest(run) is None):
            time.sleep(0.1)  # strike once the process has resumed, or written its first checkpoint
        if i == a["kills"]:  # the last resume: let it reach a checkpoint of its own, then stop it
            deadline = time.time() + 120
            while time.time() < deadline and _newest(run) == (previous or {}).get("checkpoint"):
                time.sleep(0.2)
        else:
            wait_ckpt = i % 2 == 1  # every other kill waits for a checkpoint write and strikes inside it
            time.sleep(rng.uniform(3.0, 8.0))
            if wait_ckpt:
                deadline = time.time() + 30
                while time.time() < deadline and not list((run / "checkpoints").glob(".ckpt-*.tmp")):
                    time.sleep(0.0005)
        during = bool(list((run / "checkpoints").glob(".ckpt-*.tmp"))) if (run / "checkpoints").exists() else False
        proc.kill()
        proc.wait()
        during = during and bool(list((run / "checkpoints").glob(".ckpt-*.tmp")))
        text = log.read_text()
        if i > 0 and previous is not None:  # did this process resume from the checkpoint read before it started?
            m = RESUMED.search(text)
            ok = (m is not None and m.group(1) == previous["checkpoint"]
                  and int(m.group(2).replace(",", "")) == previous["env_steps"]
                  and int(m.group(3).replace(",", "")) == previous["rows"] and not previous["damaged"])
            rows[-1].update(resumed_ok=ok, resume_line=m.group(0) if m else text.strip().splitlines()[-1:])
        if i == a["kills"]:
            break
        state = _state(run)
        rows.append({"kill": i + 1, "during_checkpoint": during, **(state or {"checkpoint": None})})
        previous = state
        print(f"kill {i + 1}: {'inside a checkpoint write' if during else 'while training'}; last checkpoint "
              f"{state and state['checkpoint']} at env step {state and state['env_steps']}, {state and state['rows']} rows, "
              f"{state and state['rows_checked']} rows checked against their digests, damaged: {state and state['damaged']}")
    resumed = [r for r in rows if "resumed_ok" in r]
    summary = {"kills": len(rows), "during_checkpoint": sum(r["during_checkpoint"] for r in rows),
               "resumes_ok": sum(r["resumed_ok"] for r in resumed), "resumes": len(resumed),
               "wrapped": any(r.get("oldest_row", 0) > 0 for r in rows),
               "machine": machine(), "date": time.strftime("%Y-%m-%d"), "capacity": a["capacity"], "seed": a["seed"],
               "settings": TRAIN}
    table = (f"{summary['resumes_ok']}/{summary['resumes']} resumes continued from the last checkpoint with its replay intact "
             f"({summary['kills']} SIGKILLs, {summary['during_checkpoint']} inside a checkpoint write; replay capacity "
             f"{a['capacity']} rows, {'wrapped' if summary['wrapped'] else 'never wrapped'}; {summary['machine']}, "
             f"{summary['date']})\n\n")
    table += markdown(["kill", "inside checkpoint write", "resumed from", "env step", "updates", "replay rows",
                       "logical rows held", "rows checked by digest", "damaged", "resume ok"],
                      [[r["kill"], "yes" if r["during_checkpoint"] else "no", r["checkpoint"], r.get("env_steps"),
                        r.get("updates"), r.get("rows"), f"{r.get('oldest_row')}-{r.get('newest_row')}",
                        r.get("rows_checked"), r.get("damaged") or "-",
                        "yes" if r.get("resumed_ok") else "no"] for r in rows])
    data = {"summary": summary, "kills": rows}
    write("stress_resume", data, table, a["out"] or None)
    return data


def _newest(run: Path) -> str | None:
    pointer = run / "checkpoints" / "latest"
    return pointer.read_text().strip() if pointer.exists() else None
