"""Offline learning: datasets in Minari's format (dataset.py) and learners that read them."""
from __future__ import annotations

import time


class Clock:
    """A training loop's time across resumes (counters["wall_s"], carried in its checkpoints) and its
    checkpoint every `every` seconds."""

    def __init__(self, counters: dict, every: float):
        self.counters, self.every, self.since = counters, every, time.time()

    def _count(self) -> None:
        now = time.time()
        self.counters["wall_s"] += now - self.since
        self.since = now

    def maybe_save(self, save) -> None:
        if time.time() - self.since >= self.every:
            self._count()
            save()

    def stop(self, save) -> None:
        self._count()
        save()
