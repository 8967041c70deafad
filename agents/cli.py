"""`longdream train | eval | adapt | dataset | probe | bench | envs` - the command line.

    longdream train [key=value ...]          train (an existing run_dir resumes)
    longdream eval run_dir=<path> [episodes=<n>] [sample=true] [record=<f>.json]   evaluate a saved agent, write a video
    longdream adapt run_dir=<path> shift.<p>=<scale> [mode=frozen|context|gradient|retrain]
                                             deploy a saved agent on shifted dynamics (agents/adapt.py)
    longdream dataset kind=replay|policy|random (run_dir=<run> | env=<env>)
                                             write a Minari dataset from a run (agents/offline/dataset.py)
    longdream probe [key=value ...]          memory-probe protocol: task=<name> world_model=<name>, or
                                             suite=memory|memory_cpu|smoke; suite=bsuite_memory: online memory RL
    longdream bench <name> [key=value ...]   benchmarks: update, learning, scan, worldmodel, gpu, checkpoint, stress, memory,
                                             collect, offline, adapt
    longdream envs                           list environment ids

Every command takes `threads=N`: torch's intra-op threads (default: the cores this process may use).
Processes side by side on one machine should share its cores between them (threads=1 each on 2
cores): more threads than cores in all makes every process many times slower.

Errors a user can fix (bad keys, unknown envs, corrupt checkpoints) print one line and exit 2.
"""
from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

USAGE = __doc__.split("\n\n")[1]
BENCHES = ("update", "learning", "scan", "worldmodel", "gpu", "stress", "checkpoint", "memory", "collect", "offline", "adapt", "memory_offline")


def cmd_train(args: list[str]) -> int:
    from agents.config import load_config, save_overrides
    from agents.train import train

    from agents.runlock import os_error

    cfg, overrides = load_config(args)
    run_dir = Path(cfg.train.run_dir)
    try:
        save_overrides(run_dir, overrides)
    except OSError as err:
        raise os_error(run_dir, err) from None
    if cfg.train.algo == "decision":
        from agents.offline.decision import train as train_decision

        res = train_decision(cfg, cfg.decision)
        score = res["normalized_score"]
        print(f"\ntrained {res['method']} on {res['dataset']}: {res['updates']} updates in {res['wall_s']:.0f} s, "
              f"{res['params'] / 1e6:.2f}M params")
        print(f"eval return {res['eval_return']:.1f} (target {res['target_return']:.1f}, dataset mean "
              f"{res['dataset_mean_return']:.1f})" + (f", normalized score {score:.1f}" if score is not None else ""))
        print(f"logs:       tensorboard --logdir {res['tensorboard']}")
        print(f"checkpoint: {res['checkpoint']}")
        return 0
    res = train(cfg)
    if res.get("rank"):  # a data-parallel rank other than 0: rank 0 reports
        return 0
    before = res.get("eval_return_before")
    if cfg.train.offline:
        score = res["normalized_score"]
        print(f"\ntrained offline on {res['dataset']} (dataset mean return {res['dataset_mean_return']:.1f}): "
              f"{res['updates']} updates, no env steps but evaluation, in {res['wall_s']:.0f} s"
              + (f"; normalized score {score:.1f}" if score is not None else ""))
    else:
        wall = (f"{res['wall_s']:.0f} s" if not math.isnan(res["wall_s"]) else  # resumed from a checkpoint without it
                f"{res['wall_s_segment']:.0f} s since the resume (the run's earlier time was not recorded)")
        print(f"\ntrained {res['env_steps']} env steps, {res['updates']} updates in {wall}")
    if before is not None:
        print(f"eval return: before {before:.1f} -> after {res['eval_return_after']:.1f}")
    else:
        print(f"eval return after: {res['eval_return_after']:.1f}")
    print(f"logs:       tensorboard --logdir {res['tensorboard']}")
    print(f"videos:     {res['videos']}")
    print(f"checkpoint: {res['checkpoint']}")
    return 0


def cmd_eval(args: list[str]) -> int:
    import numpy as np
    import torch

    from agents import checkpoint
    from agents.config import ConfigError, load_config
    from agents.train import build_agent, evaluate

    opts = dict(a.split("=", 1) for a in args if "=" in a)
    unknown = sorted(set(opts) - {"run_dir", "episodes", "device", "sample", "record"})
    if unknown or "run_dir" not in opts:
        raise ConfigError("usage: longdream eval run_dir=<path> [episodes=<n>] [device=cpu|cuda] [sample=true|false] "
                          "[record=<results>.json]" + (f" (unknown key '{unknown[0]}')" if unknown else ""))
    if "record" in opts:  # a bad name or a file that is not a record fails now, before the episodes are spent
        from agents.evalrecord import rows_of

        if not opts["record"].endswith(".json"):
            raise ConfigError(f"record={opts['record']}: name a .json file (its table is written beside it as .md)")
        rows_of(Path(opts["record"]))
    run_dir = Path(opts["run_dir"])
    if not (run_dir / "overrides.json").exists():
        raise ConfigError(f"'{run_dir}' is not a longdream run directory (no overrides.json); pass the run_dir of a training run")
    if opts.get("sample", "true") not in ("true", "false"):
        raise ConfigError(f"sample={opts['sample']}: use sample=true (sampled actions) or sample=false (the mode)")
    cfg, _ = load_config([f"run_dir={run_dir}"] + ([f"device={opts['device']}"] if "device" in opts else [])
                         # sampled actions (DreamerV3's evaluation) or the mode; by default what the run used
                         + ([f"agent.eval_sample={opts['sample']}"] if "sample" in opts else []))
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise checkpoint.CheckpointError(f"no checkpoint in '{run_dir}'; train first")
    agent, policy, shapes = build_agent(cfg, cfg.train.device)
    agent.load_state_dict(checkpoint.load(ckpt)[0]["agent"])
    episodes = int(opts.get("episodes", 10))
    kind = "sampled" if cfg.agent.eval_sample else "greedy"
    video = run_dir / "videos" / f"eval-cli-{'sampled-' if kind == 'sampled' else ''}{ckpt.name}"
    torch.manual_seed(cfg.train.seed)
    eval_seed = cfg.train.seed + 30_000
    returns = evaluate(cfg, policy, shapes, episodes, eval_seed, video=video)
    print(f"eval over {episodes} {kind} episodes: mean {np.mean(returns):.1f}, std {np.std(returns):.1f}, "
          f"min {np.min(returns):.1f}, max {np.max(returns):.1f}")
    print(f"video: {video.with_suffix('.gif')}")
    if "record" in opts:
        from agents.evalrecord import record

        path = record(Path(opts["record"]), run_dir, cfg, ckpt, kind, returns, eval_seed, agent)
        print(f"recorded: {path}, {path.with_suffix('.md')}")
    return 0


def cmd_bench(args: list[str]) -> int:
    from agents.config import ConfigError

    if not args or args[0] not in BENCHES:
        raise ConfigError(f"usage: longdream bench <name> [key=value ...] with name one of {', '.join(BENCHES)}")
    importlib.import_module(f"bench.{args[0]}").main(args[1:])
    return 0


def cmd_probe(args: list[str]) -> int:
    if "suite=bsuite_memory" in args:  # online RL rather than the offline protocol: a benchmark
        importlib.import_module("bench.memory").main(args)
        return 0
    from agents.probe import main as probe_main

    probe_main(args)
    return 0


def cmd_dataset(args: list[str]) -> int:
    from agents.offline.dataset import main as dataset_main

    dataset_main(args)
    return 0


def cmd_envs(args: list[str]) -> int:
    from envs.make import list_envs

    print(list_envs())
    return 0


def set_threads(args: list[str]) -> list[str]:
    """Apply `threads=N` (torch intra-op threads) and return the other arguments. Without it, torch
    uses the cores this process may use (its CPU affinity), not every core of the machine, unless
    OMP_NUM_THREADS is set."""
    import os

    import torch

    from agents.config import ConfigError

    given = [a.split("=", 1)[1] for a in args if a.startswith("threads=")]
    rest = [a for a in args if not a.startswith("threads=")]
    if given:
        if not given[-1].isdigit() or int(given[-1]) < 1:
            raise ConfigError(f"threads must be a whole number of at least 1, got '{given[-1]}'")
        n = int(given[-1])
    elif os.environ.get("OMP_NUM_THREADS"):  # the environment's own choice stands
        return rest
    else:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return rest


def cmd_adapt(args: list[str]) -> int:
    from agents.adapt import main as adapt_main

    adapt_main(args)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "adapt": cmd_adapt, "dataset": cmd_dataset, "probe": cmd_probe,
            "bench": cmd_bench, "envs": cmd_envs}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(USAGE, file=sys.stderr)
        return 2
    import logging

    logging.getLogger("torchrl").setLevel(logging.WARNING)
    from agents.checkpoint import CheckpointError
    from agents.collect import CollectorError
    from agents.config import ConfigError
    from agents.replay import ReplayError
    from agents.runlock import RunDirError
    from agents.machine import commit, keep_freed_memory
    from envs.make import EnvError  # importing envs first also keeps the old gym's notice out of every run

    keep_freed_memory()  # before the first large tensor: the learner's big blocks are then reused
    commit()  # results record the code this process started with, even if the checkout moves on meanwhile
    try:
        return COMMANDS[argv[0]](set_threads(argv[1:]))
    except (ConfigError, EnvError, CheckpointError, ReplayError, RunDirError, CollectorError) as e:
        print(f"longdream: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longdream: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
