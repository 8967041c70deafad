"""`longdream bench checkpoint`: what a checkpoint of the replay costs with many 64x64 pixel rows.

    longdream bench checkpoint [rows=100000] [new=1000] [dir=runs/bench/checkpoint]

Fills a replay with `rows` rows of 3x64x64 uint8 pixels (plus the RSSM's stored state at size xs),
then times, in one run on one disk:
- `copy`: what checkpoints did before, a copy of every filled row into the checkpoint directory;
- `first`: today's checkpoint when every row is new since the last one (digest + flush of all rows);
- `steady`: today's checkpoint after `new` more rows (the usual case: rows added between two
  checkpoints, `checkpoint_every` seconds apart).
Bytes are those of the files each one writes plus what /proc/self/io counts as written while it runs.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch
from tensordict import TensorDict

from bench.report import machine, markdown, parse, write

DEFAULTS = {"rows": 100_000, "new": 1000, "dir": "runs/bench/checkpoint", "out": ""}
STATE = {"deter": (64,), "stoch": (8, 8)}  # the RSSM's at size xs


def _io_written() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def frames(n: int, t0: int, pool: torch.Tensor) -> TensorDict:
    idx = torch.arange(t0, t0 + n) % pool.shape[0]
    step = torch.arange(t0, t0 + n)
    state = {f"state_{k}": torch.zeros(n, *s) for k, s in STATE.items()}
    return TensorDict({
        "pixels": pool[idx], "is_init": (step % 500 == 0)[:, None], "prev_action": torch.zeros(n, 1), **state,
        "next": {"pixels": pool[(idx + 1) % pool.shape[0]], "reward": torch.ones(n, 1), "done": (step % 500 == 499)[:, None],
                 "terminated": torch.zeros(n, 1, dtype=torch.bool), "prev_action": torch.zeros(n, 1), **state},
    }, [n])


def timed(fn) -> tuple[float, int]:
    io, tic = _io_written(), time.perf_counter()
    fn()
    return time.perf_counter() - tic, _io_written() - io


def main(argv: list[str]) -> dict:
    from agents.replay import Replay

    a = parse(argv, DEFAULTS)
    root = Path(a["dir"])
    shutil.rmtree(root, ignore_errors=True)
    rp = Replay(a["rows"] + a["new"] + 1000, 16, 64, root / "replay", "pixels", state_shapes=STATE)
    pool = torch.randint(0, 256, (512, 3, 64, 64), dtype=torch.uint8)
    t = 0
    while len(rp) < a["rows"]:
        n = min(2000, a["rows"] - len(rp))
        rp.add(frames(n, t, pool))
        t += n
    rows = len(rp)
    results = []

    def copy():  # the checkpoint of before: every filled row, in order, into the checkpoint directory
        l = torch.arange(rp.lo[0], rp.hi[0])
        rp.rows[rp._slots(torch.zeros_like(l), l)].memmap_(root / "copy" / "rows")

    for name, fn, path in (("copy", copy, root / "copy"), ("first", lambda: rp.save(root / "ckpt1"), root / "ckpt1")):
        sec, io = timed(fn)
        results.append({"mode": name, "rows": rows, "new_rows": rows, "seconds": round(sec, 3), "file_bytes": _du(path),
                        "io_write_bytes": io})
    rp.add(frames(a["new"], t, pool))
    sec, io = timed(lambda: rp.save(root / "ckpt2"))
    results.append({"mode": "steady", "rows": len(rp), "new_rows": a["new"], "seconds": round(sec, 3),
                    "file_bytes": _du(root / "ckpt2"), "io_write_bytes": io})
    base = results[0]
    for r in results:
        r["time_ratio"] = round(base["seconds"] / max(r["seconds"], 1e-9), 1)
        r["bytes_ratio"] = round(max(base["file_bytes"], base["io_write_bytes"]) / max(r["file_bytes"], r["io_write_bytes"], 1), 1)
    info = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "row_bytes": rp.bytes_per_row(), "args": a}
    table = (f"Checkpoint of a replay of {rows:,} 64x64 RGB rows ({info['machine']}, {info['date']}); ratios against "
             f"`copy`, the checkpoint of before\n\n")
    table += markdown(["mode", "rows", "rows new since last checkpoint", "seconds", "file bytes", "I/O bytes written",
                       "time ratio", "bytes ratio"],
                      [[r["mode"], f"{r['rows']:,}", f"{r['new_rows']:,}", r["seconds"], f"{r['file_bytes']:,}",
                        f"{r['io_write_bytes']:,}", f"{r['time_ratio']}x", f"{r['bytes_ratio']}x"] for r in results])
    shutil.rmtree(root, ignore_errors=True)
    data = {**info, "results": results}
    write("checkpoint_cpu", data, table, a["out"] or None)
    return data
