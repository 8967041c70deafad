"""Where a result was measured: the machine (GPU name, or CPU model and cores) and the code's commit.
Every benchmark row and memory-probe run records both; `portable` keeps local paths out of results files.
`keep_freed_memory` sets up glibc's allocator for the learner's large, short-lived tensors; `markdown`
is the results tables' format."""
from __future__ import annotations

import ctypes
import functools
import os
import platform
import re
import subprocess
from pathlib import Path

import torch


def machine(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores (CPU)"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the system.

    A learner update allocates and frees tensors of tens of MiB (at size xs the imagined features of
    1,024 states x 16 steps are 39 MiB). By default glibc serves every block above a threshold (at
    most 32 MiB) with a fresh mmap and unmaps it when freed, so each update faults in and zeroes the
    same amount of new pages again; a large threshold and no trimming keep those blocks in the heap.
    The process then holds its peak memory until it exits. Applies on glibc only; the environment
    variable LONGDREAM_MALLOC=default leaves the allocator alone. Returns whether it applied."""
    if os.environ.get("LONGDREAM_MALLOC", "") == "default" or platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc, not another libc under that name
    except (OSError, AttributeError):
        return False
    limit = keep_freed_memory.limit
    keep_freed_memory.applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, limit)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, limit))
    return keep_freed_memory.applied


keep_freed_memory.limit = 1 << 30  # bytes: blocks below it come from the heap, which keeps this much free
keep_freed_memory.applied = False


@functools.cache
def commit() -> str:
    """The commit of the code this process runs (with a + where the work tree had changes), or '' outside
    a checkout: read once per process, at its first call (the CLI makes it at start-up), so that a long
    run records the code it started with even when the checkout moves on while it runs."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


_ABSOLUTE = re.compile(r"(?<![\w.~])/[^\s,\"'=:]+")


def portable(obj, base: Path | None = None):
    """`obj` with every absolute path in its strings made machine-independent: relative to `base` where it
    lies under it, else its last component (results files say what ran, not where on which disk)."""
    if isinstance(obj, dict):
        return {k: portable(v, base) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v, base) for v in obj]
    if not isinstance(obj, str):
        return obj

    def short(m: re.Match) -> str:
        path = Path(m.group(0))
        if base is not None and path.is_relative_to(base.resolve()):
            return str(path.relative_to(base.resolve()))
        return path.name

    return _ABSOLUTE.sub(short, obj)


def markdown(header: list[str], rows: list[list]) -> str:
    """A markdown table: the header, then one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
