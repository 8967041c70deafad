"""Shared plumbing for benchmarks: key=value arguments, machine description, JSON + markdown out."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from agents.machine import commit, keep_freed_memory, machine, markdown, portable  # noqa: F401  (re-exported for the benchmarks)

RESULTS = Path(__file__).resolve().parent / "results"


def parse(argv: list[str], defaults: dict) -> dict:
    """key=value strings over typed defaults; an unknown key is an error naming it."""
    from agents.config import ConfigError

    out = dict(defaults)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in defaults:
            raise ConfigError(f"unknown benchmark option '{key}' (valid: {', '.join(sorted(defaults))})")
        kind = type(defaults[key])
        out[key] = value.lower() in ("1", "true", "yes") if kind is bool else (value if defaults[key] is None else kind(value))
    return out


def write(name: str, data: dict, table: str, out: str | None = None) -> Path:
    folder = Path(out) if out else RESULTS
    folder.mkdir(parents=True, exist_ok=True)
    data = portable({"benchmark": name, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, **data})
    (folder / f"{name}.json").write_text(json.dumps(data, indent=1))
    (folder / f"{name}.md").write_text(table + "\n")
    print(table)
    print(f"\nwritten: {folder / (name + '.json')}, {folder / (name + '.md')}")
    return folder


def run_comparator(script: str, args: list[str]) -> list[dict]:
    """Run an external timing script that prints `RESULT {json}` lines; return the parsed rows."""
    # the comparator runs with this process's torch threads (`threads=`) and, where the CLI set up
    # glibc's allocator to keep freed memory (agents.machine.keep_freed_memory), the same settings
    # through glibc's environment variables, so that the ratio is fair
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    if keep_freed_memory.applied:
        env.update(MALLOC_MMAP_THRESHOLD_=str(keep_freed_memory.limit), MALLOC_TRIM_THRESHOLD_=str(keep_freed_memory.limit))
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not rows:
        raise RuntimeError(f"comparator {script} gave no result: {proc.stderr.strip().splitlines()[-1:]}")
    return rows
