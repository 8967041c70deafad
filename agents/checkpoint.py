"""Checkpoints that survive SIGKILL: each one is written to a temporary directory, renamed into
place, and only then named by the `latest` pointer (itself replaced atomically). A killed run
resumes from the last complete checkpoint.

    run_dir/checkpoints/ckpt-<env_step>/agent.pt      weights, optimisers, counters, RNG state
    run_dir/checkpoints/ckpt-<env_step>/replay.json   what reopens the replay storage (agents/replay.py)
    run_dir/checkpoints/latest                        name of the newest complete checkpoint

The replay's rows are not copied: they live in run_dir/replay/ already, and a checkpoint flushes
them and records their extent.
"""
from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from agents.runlock import os_error


class Clock:
    """A training loop's wall time across resumes (counters["wall_s"], carried in its checkpoints, so a
    resume adds to it) and, for loops that use `maybe_save`, its checkpoint every `every` seconds."""

    def __init__(self, counters: dict, every: float):
        self.counters, self.every, self.since = counters, every, time.time()

    def count(self) -> float:
        """Adds the time since the last count to counters["wall_s"] and returns the total."""
        now = time.time()
        self.counters["wall_s"] += now - self.since
        self.since = now
        return self.counters["wall_s"]

    def maybe_save(self, save) -> None:
        if time.time() - self.since >= self.every:
            self.count()
            save()

    def stop(self, save) -> None:
        self.count()
        save()


class CheckpointError(RuntimeError):
    """A missing, corrupt or truncated checkpoint; one line that says what to do."""


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, step: int, payload: dict, replay) -> Path:
    root = Path(run_dir) / "checkpoints"
    name = f"ckpt-{step:09d}"
    tmp = root / f".{name}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        torch.save(payload, tmp / "agent.pt")
        replay.save(tmp)
        final = root / name
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / ".latest.tmp"
        pointer.write_text(name)
        os.replace(pointer, root / "latest")
    except OSError as err:  # a full disk or a read-only run_dir: the previous checkpoint is untouched
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(Path(run_dir), err) from None
    for old in [*root.glob("ckpt-*"), *root.glob(".ckpt-*.tmp")]:  # the newest complete checkpoint only
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "agent.pt").exists():
        raise CheckpointError(f"checkpoint '{path}' named by '{pointer}' is missing; delete '{pointer.parent}' to start afresh")
    return path


def load(path: Path, replay=None) -> tuple[dict, dict | None]:
    """The checkpoint's payload and, with `replay`, what reopening the replay restored."""
    try:
        payload = torch.load(path / "agent.pt", map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises several types for truncated or garbage files
        raise CheckpointError(f"checkpoint '{path}' is corrupt or truncated ({type(e).__name__}); "
                              f"delete it or start a new run_dir") from None
    if not isinstance(payload, dict) or "agent" not in payload:
        raise CheckpointError(f"checkpoint '{path}' is not a longdream checkpoint; delete it or start a new run_dir")
    restored = replay.load(path) if replay is not None else None
    return payload, restored
