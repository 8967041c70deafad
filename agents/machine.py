"""Where a result was measured: the machine (GPU name, or CPU model and cores) and the code's commit.
Every benchmark row and memory-probe run records both."""
from __future__ import annotations

import functools
import os
import platform
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
