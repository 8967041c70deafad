"""Memory-probe data: the task configs, scripted episodes and their cache (the S4WM protocol, step 1)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict
from torch import Tensor
from tqdm import tqdm

from agents.config import ConfigError

DATA_VERSION = 3  # bump when the episodes change: cached datasets are keyed by it (3: Distracting Memory's fixed end cells)


@dataclass(frozen=True)
class TaskConfig:
    name: str
    id: str  # gymnasium id (registered by `import envs`)
    kwargs: dict
    context: int | None  # C observed steps (None: the task's probe_split)
    query: int | None  # Q imagined steps
    train_episodes: int
    test_episodes: int


def make_task_env(task: TaskConfig):
    import gymnasium

    import envs  # noqa: F401  registers the memory tasks
    from envs.make import EnvError

    if task.id not in gymnasium.envs.registry:
        raise EnvError(f"unknown task id '{task.id}'; list valid ones with `longdream envs`")
    try:
        env = gymnasium.make(task.id, **task.kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"bad task.kwargs for {task.id}: {e}") from None
    if not hasattr(env.unwrapped, "scripted_action"):
        raise ConfigError(f"task '{task.id}' has no scripted data-collection policy; pick a memory-suite task")
    return env


def split_of(task: TaskConfig, env) -> tuple[int, int]:
    C, Q = env.unwrapped.probe_split
    C = task.context if task.context is not None else C
    Q = task.query if task.query is not None else Q
    if C < 1 or Q < 1:
        raise ConfigError(f"task.context and task.query must be >= 1, got {C} and {Q}")
    return C, Q


def generate(task: TaskConfig, episodes: int, seed: int, length: int, progress: bool = False) -> TensorDict:
    """Scripted episodes cut to `length` steps, as sequence rows: obs x_t (uint8, 3 x H x W), the
    action that led to it (one-hot, zeros at the start), the reward on arrival, is_first, is_terminal.
    An episode that ends before `length` steps is replaced by the next seed's."""
    env = make_task_env(task)
    A = env.action_space.n
    H, W, Cc = env.observation_space.shape
    obs = torch.zeros(episodes, length, Cc, H, W, dtype=torch.uint8)
    action = torch.zeros(episodes, length, A)
    reward = torch.zeros(episodes, length)
    is_first = torch.zeros(episodes, length)
    is_terminal = torch.zeros(episodes, length)
    is_first[:, 0] = 1
    targets: dict[str, Tensor] = {}  # probe targets the task reports in info["probe"] (Memory Maze)
    attempt, short = seed, 0
    for i in tqdm(range(episodes), desc=f"generate {task.name}", disable=not progress, leave=False):
        while True:
            o, info = env.reset(seed=attempt)
            attempt += 1
            frames, infos, ok = [o], [info.get("probe", {})], True
            for t in range(1, length):
                a = int(env.unwrapped.scripted_action())
                o, r, term, trunc, info = env.step(a)
                frames.append(o)
                infos.append(info.get("probe", {}))
                action[i, t, a], reward[i, t], is_terminal[i, t] = 1.0, float(r), float(term)
                if (term or trunc) and t < length - 1:
                    ok = False
                    break
            if ok:
                break
            action[i], reward[i], is_terminal[i] = 0, 0, 0
            short += 1
            if short > episodes + 10:
                raise ConfigError(f"{task.id} episodes end before context + query = {length} steps; "
                                  "lower task.context / task.query")
        obs[i] = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)
        for name in infos[0]:
            value = torch.as_tensor(np.stack([np.asarray(x[name]) for x in infos]))  # (T, ...)
            if name not in targets:
                targets[name] = torch.zeros(episodes, *value.shape, dtype=torch.float32)
            targets[name][i] = value.float()
    env.close()
    data = TensorDict({"obs": obs, "action": action, "reward": reward, "is_first": is_first,
                       "is_terminal": is_terminal}, [episodes])
    if targets:
        data["probe"] = TensorDict(targets, [episodes])
    return data


def dataset(task: TaskConfig, split: str, length: int, cache: Path, progress: bool) -> TensorDict:
    """The train or test split, generated once and cached as a memory-mapped TensorDict."""
    n = task.train_episodes if split == "train" else task.test_episodes
    seed = 0 if split == "train" else 1_000_000  # disjoint seeds: test episodes are never trained on
    key = json.dumps([DATA_VERSION, task.id, task.kwargs, length, n, seed], sort_keys=True)
    path = cache / f"{task.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}-{split}"
    if (path / "done").exists():
        return TensorDict.load_memmap(path)
    if path.exists() and not (path / "done").exists():  # an earlier process stopped while writing it
        shutil.rmtree(path, ignore_errors=True)
    data = generate(task, n, seed, length, progress)
    # written under a name of this process's own, then renamed whole: processes that run a suite side
    # by side (backbones=... each) may generate the same split at once, and none reads a partial one
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    data.memmap_(tmp)
    (tmp / "done").write_text(key)
    try:
        tmp.rename(path)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return TensorDict.load_memmap(path)
