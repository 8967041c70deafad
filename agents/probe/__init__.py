"""`longdream probe`: the memory-probe protocol of S4WM (Deng, Park, Ahn 2023), offline world-model
evaluation on memory tasks.

    data.py      task configs, scripted episodes and their cache
    protocol.py  offline training, context-then-imagination metrics, the frozen-state probe, one run
    suites.py    named task lists run for every backbone
    report.py    tables and plots of a suite

The online counterpart (training the agent on BSuite memory_len per backbone and memory length) is a
benchmark: bench/memory.py (`longdream probe suite=bsuite_memory` or `longdream bench memory`).
"""
from __future__ import annotations

from agents.config import ConfigError, compose


def split_args(overrides: list[str]) -> tuple[dict, list[str]]:
    """`suite=` and `backbones=a,b` (a comma list would be a sweep to Hydra) apart from the Hydra
    overrides; `run_dir=` names the output folder as `out=` does."""
    opts = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if o.startswith(("suite=", "backbones="))}
    rest = [("out=" + o.split("=", 1)[1]) if o.startswith("run_dir=") else o
            for o in overrides if not o.startswith(("suite=", "backbones="))]
    return opts, rest


def main(overrides: list[str]) -> dict:
    from agents.probe.protocol import run_one
    from agents.probe.suites import run_suite

    opts, rest = split_args(overrides)
    if opts.get("suite"):
        backbones = opts["backbones"].split(",") if opts.get("backbones") else None
        return run_suite(opts["suite"], rest, backbones)
    if opts.get("backbones"):
        raise ConfigError("backbones= is for suites; pick one backbone with world_model=<name>")
    return {"runs": [run_one(compose(rest, "probe"))]}
