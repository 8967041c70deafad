"""`longdream bench memory_offline`: can a world model learn BSuite memory_len's delayed reward at all,
with reinforcement learning out of the way? Each backbone trains its world model alone (the same
losses and optimiser as in the agent) on whole episodes of a fixed policy, every window one episode
from its first step, and is tested on held-out episodes:

- reward accuracy: the sign of the reward predicted at the last step, where the reward is +1 if the
  last action matches the cue shown at the first step and -1 otherwise (chance 0.5);
- cue probes: a logistic regression from the features at the middle and at the last step to the cue,
  fitted on half of the test episodes and scored on the other half (does the state hold the cue?).

    longdream bench memory_offline [backbones=s5wm] [lengths=30,50,100] [updates=6000] [batch_size=16]
                                   [actions=random|fixed] [every=500] [seed=0] [size=xs] [out=...]

`actions=random` plays uniformly random actions (the reward is then the XOR of cue and last action);
`actions=fixed` always plays action 1 (the reward is the cue itself: memory without the XOR). A row
per (backbone, length, actions, seed) with its curve and `learnt_at`, the first evaluation at or
above `threshold`, lands in bench/results/memory_offline.json / .md (a row with the same settings is
replaced). The online sweep is `longdream probe suite=bsuite_memory` (bench/memory.py).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from bench.report import RESULTS, commit, machine, markdown, parse, write

DEFAULTS = {"backbones": "s5wm", "lengths": "30,50,100", "updates": 6000, "batch_size": 16, "actions": "random",
            "every": 500, "seed": 0, "size": "xs", "lr": 3e-4, "train_episodes": 3000, "test_episodes": 500,
            "threshold": 0.95, "out": "", "progress": True}
ENV_ID = "longdream/BSuiteMemoryLen-v0"


def main(argv: list[str]) -> dict:
    from agents.config import ConfigError
    from worldmodels.model import BACKBONES

    a = parse(argv, DEFAULTS)
    if a["actions"] not in ("random", "fixed"):
        raise ConfigError(f"actions must be random or fixed, got '{a['actions']}'")
    backbones = a["backbones"].split(",")
    if bad := [b for b in backbones if b not in BACKBONES]:
        raise ConfigError(f"unknown backbone {', '.join(bad)} (choose from {', '.join(BACKBONES)})")
    try:
        lengths = [int(x) for x in a["lengths"].split(",")]
    except ValueError:
        raise ConfigError(f"lengths must be comma-separated integers, got '{a['lengths']}'") from None
    if min(lengths) < 1 or a["updates"] < 1 or a["every"] < 1 or a["batch_size"] < 1:
        raise ConfigError("lengths, updates, every and batch_size must be >= 1")
    folder = Path(a["out"]) if a["out"] else RESULTS
    rows, data = [], {}
    for L in lengths:
        train, test = (episodes(L, n, seed, a["actions"]) for n, seed in
                       ((a["train_episodes"], 1 + 1000 * a["seed"]), (a["test_episodes"], 2 + 1000 * a["seed"])))
        for b in backbones:
            rows.append(run_one(a, b, L, train, test))
            data = _write(a, folder, merge(folder, rows))  # each finished run lands at once
    return data


def episodes(L: int, n: int, seed: int, actions: str) -> dict[str, Tensor]:
    """n whole episodes of memory length L: obs (n, L + 2, 3) from the reset on, one-hot actions (the
    action before each step; zero at the first), rewards (the reward of the step into each obs)."""
    import gymnasium

    import envs  # noqa: F401  registers the BSuite task

    env, rng = gymnasium.make(ENV_ID, memory_length=L), np.random.default_rng(seed)
    obs, act, rew = [], [], []
    for ep in range(n):
        o, _ = env.reset(seed=seed * 100_000 + ep)
        os_, as_, rs = [o], [np.zeros(2)], [0.0]
        done = False
        while not done:
            x = 1 if actions == "fixed" else int(rng.integers(2))
            o, r, term, trunc, _ = env.step(x)
            os_.append(o), as_.append(np.eye(2)[x]), rs.append(r)
            done = term or trunc
        obs.append(np.stack(os_)), act.append(np.stack(as_)), rew.append(np.array(rs))
    f = lambda x: torch.tensor(np.stack(x), dtype=torch.float32)  # noqa: E731
    return {"obs": f(obs), "action": f(act), "reward": f(rew)}


@torch.enable_grad()
def linear_probe(x: Tensor, y: Tensor, steps: int = 300) -> float:
    """Held-out accuracy of a logistic regression from x (N, F) to binary y (N,): fitted on the first
    half (standardised features), scored on the second."""
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    n = x.shape[0] // 2
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([w, b], 0.05)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x[:n] @ w + b, y[:n])
        opt.zero_grad(), loss.backward(), opt.step()
    with torch.no_grad():
        return float((((x[n:] @ w + b) > 0).float() == y[n:]).float().mean())


@torch.no_grad()
def evaluate(wm, test: dict[str, Tensor]) -> dict[str, float]:
    obs, act, rew = test["obs"], test["action"], test["reward"]
    N, T = rew.shape
    first = torch.zeros(N, T)
    first[:, 0] = 1
    _, feat, _ = wm.core.observe(wm.core.initial(N), wm.encoder(obs), act, first)
    pred = wm.reward.mean(wm.reward(feat[:, -1]))  # (N,)
    cue = (obs[:, 0, 2] > 0).float()
    return {"reward_acc": float(((pred > 0) == (rew[:, -1] > 0)).float().mean()),
            "cue_probe_mid": linear_probe(feat[:, T // 2], cue), "cue_probe_end": linear_probe(feat[:, -1], cue)}


def run_one(a: dict, backbone: str, L: int, train: dict[str, Tensor], test: dict[str, Tensor]) -> dict:
    from worldmodels.model import BACKBONES, LossConfig, ObsSpec, WorldModel
    from worldmodels.nets import NetsConfig

    torch.manual_seed(a["seed"])
    core = BACKBONES[backbone][1](size=a["size"])
    # the BSuite sweep's settings: actions embedded apart from the latent, the reward loss scaled by L + 1
    wm = WorldModel(backbone, core, NetsConfig(name=a["size"], action_embed="separate"),
                    ObsSpec(pixels=False, obs_dim=train["obs"].shape[-1], action_dim=2, discrete=True), LossConfig(reward=L + 1))
    opt = torch.optim.Adam(wm.parameters(), lr=a["lr"], eps=1e-8)
    B, (N, T) = a["batch_size"], train["reward"].shape
    first = torch.zeros(B, T)
    first[:, 0] = 1
    gen = torch.Generator().manual_seed(a["seed"])
    curve, learnt_at, tic = [], None, time.time()
    bar = tqdm(range(a["updates"] + 1), desc=f"{backbone} L={L}", disable=not a["progress"], leave=False)
    for u in bar:
        if u % a["every"] == 0 or u == a["updates"]:
            m = evaluate(wm, test)
            curve.append({"updates": u, **m})
            bar.set_postfix(acc=f"{m['reward_acc']:.2f}", probe=f"{m['cue_probe_end']:.2f}")
            if learnt_at is None and m["reward_acc"] >= a["threshold"]:
                learnt_at = u
        if u == a["updates"]:
            break
        idx = torch.randint(N, (B,), generator=gen)
        total, *_ = wm.loss(train["obs"][idx], train["action"][idx], train["reward"][idx], first, torch.zeros(B, T))
        opt.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(wm.parameters(), 1000.0)
        opt.step()
    last = curve[-1]
    print(f"[memory_offline] {backbone} L={L} actions={a['actions']}: reward accuracy {last['reward_acc']:.2f}, "
          f"cue probe {last['cue_probe_end']:.2f}, learnt at {learnt_at} ({time.time() - tic:.0f} s)", flush=True)
    return {"backbone": backbone, "memory_length": L, "actions": a["actions"], "seed": a["seed"], "batch_size": B,
            "updates": a["updates"], "lr": a["lr"], "train_episodes": N, "threshold": a["threshold"], "learnt_at": learnt_at,
            **{k: last[k] for k in ("reward_acc", "cue_probe_mid", "cue_probe_end")}, "curve": curve,
            "params": sum(p.numel() for p in wm.parameters()), "dims": dataclasses.asdict(core), "size": a["size"],
            "wall_s": round(time.time() - tic, 1), "threads": torch.get_num_threads(), "machine": machine("cpu"),
            "date": time.strftime("%Y-%m-%d"), "commit": commit()}


def _key(r: dict) -> tuple:
    return (r["backbone"], r["memory_length"], r["actions"], r["seed"], r["batch_size"], r["updates"], r["lr"], r["size"])


def merge(folder: Path, rows: list[dict]) -> list[dict]:
    path = folder / "memory_offline.json"
    old = json.loads(path.read_text())["runs"] if path.exists() else []
    fresh = {_key(r) for r in rows}
    return [r for r in old if _key(r) not in fresh] + rows


def report(rows: list[dict]) -> str:
    rows = sorted(rows, key=lambda r: (r["actions"], r["backbone"], r["memory_length"], r["seed"]))
    head = ("BSuite memory_len, world model alone on whole episodes of a fixed policy: sign accuracy of the reward "
            "predicted at the last step (chance 0.5) and linear probes of the cue from the features, on held-out "
            "episodes; `learnt at` is the first evaluation with accuracy >= the threshold\n\n")
    return head + markdown(
        ["backbone", "memory length", "actions", "seed", "batch", "lr", "updates", "learnt at", "reward accuracy",
         "cue probe (middle / last step)", "params", "wall time", "threads", "machine", "date"],
        [[r["backbone"], r["memory_length"], r["actions"], r["seed"], r["batch_size"], f"{r['lr']:g}", r["updates"],
          "-" if r["learnt_at"] is None else r["learnt_at"], f"{r['reward_acc']:.2f}",
          f"{r['cue_probe_mid']:.2f} / {r['cue_probe_end']:.2f}", f"{r['params'] / 1e6:.2f}M", f"{r['wall_s'] / 60:.1f} min",
          r["threads"], r["machine"], r["date"]] for r in rows])


def _write(a: dict, folder: Path, rows: list[dict]) -> dict:
    data = {"args": {k: v for k, v in a.items() if k != "out"}, "runs": rows}
    write("memory_offline", data, report(rows), str(folder))
    return data
