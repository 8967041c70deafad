"""Independent runs of a suite side by side: `workers` processes that share the CPU threads.

Processes that each take every core slow each other down many times over (thread
oversubscription); one process per core, each with one thread, keeps every core busy without it. Each job is a whole run that saves its own result, so a suite stopped part-way
resumes from what finished.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from multiprocessing import get_context

from tqdm import tqdm


def _init_worker(threads: int) -> None:
    import torch

    from agents.machine import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()


def threads_per_worker(workers: int, threads: int) -> int:
    """The torch threads each of `workers` processes gets out of `threads` (at least one)."""
    return max(1, threads // workers)


def run_parallel(fn: Callable, jobs: Sequence, workers: int, desc: str = "runs", progress: bool = True) -> list:
    """`fn(job)` for every job, in order with one worker and in `workers` spawned processes otherwise,
    each with its share of this process's torch threads. Returns the results in job order. The first
    job that fails stops the ones not yet started and its exception is raised here; jobs running at
    that moment finish first (their results are saved by `fn`, so a rerun resumes)."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    import torch

    n = min(workers, len(jobs))
    threads = threads_per_worker(n, torch.get_num_threads())
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the children's OpenMP pool is sized at their torch import
    try:
        with ProcessPoolExecutor(n, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(threads,)) as pool:
            futures = [pool.submit(fn, job) for job in jobs]
            with tqdm(total=len(jobs), desc=f"{desc} ({n} processes x {threads} thread{'s' * (threads > 1)})",
                      disable=not progress) as bar:
                pending = set(futures)
                while pending:
                    done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                    bar.update(len(done))
                    failed = [f for f in done if f.exception() is not None]
                    if failed:
                        for f in pending:
                            f.cancel()
                        raise failed[0].exception()
            return [f.result() for f in futures]
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
