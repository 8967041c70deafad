"""`longdream bench collect`: env frames per second of collection with the agent's policy acting, for
env processes on this machine (`collector=local`, envs=N: torchrl's MultiSyncCollector) against Ray
actors (`collector=ray`, N workers, one env each: torchrl's RayCollector on a local Ray instance), on
an env where the env is the bottleneck (dm-control pixels by default).

    longdream bench collect [env=dmc/cartpole_swingup_pixels] [workers=1,2,4] [collectors=local,ray]
                            [batches=10] [warmup=2] [collect_every=50] [out=...]

Each row times `batches` batches of `collect_every` agent steps per env after `warmup` batches (the
workers' start-up is reported apart), the policy exploring with an untrained RSSM xs agent and a weight
push after every batch, as training does. Frames count env steps (agent steps x action repeat).
"""
from __future__ import annotations

import functools
import time

import torch

from bench.report import machine, markdown, parse, write

DEFAULTS = {"env": "dmc/cartpole_swingup_pixels", "workers": "1,2,4", "collectors": "local,ray", "batches": 10,
            "warmup": 2, "collect_every": 50, "out": ""}


def time_collection(opt: dict, collector: str, n: int) -> dict:
    from agents.collect import make_collector
    from agents.config import load_config
    from agents.policy import EXPLORE
    from agents.train import _collect_env, build_agent

    cfg, _ = load_config([f"env={opt['env']}", f"envs={n}", f"collector={collector}",
                          f"collect_every={opt['collect_every']}"])
    agent, policy, shapes = build_agent(cfg, "cpu")
    policy.mode.fill_(EXPLORE)
    tic = time.time()
    col = make_collector(cfg.train, functools.partial(_collect_env, cfg.env, primer_shapes=shapes), policy, "cpu", 0)
    frames, start, ready = 0, None, None
    try:
        for i, data in enumerate(col):
            if i == 0:
                ready = time.time() - tic
            if i == opt["warmup"]:
                start = time.time()
            elif i > opt["warmup"]:
                frames += data.numel() * cfg.env.action_repeat
            col.update_policy_weights_()
            if i == opt["warmup"] + opt["batches"]:
                break
    finally:
        col.shutdown()
    wall = time.time() - start
    return {"collector": collector, "workers": n, "env": cfg.env.id, "pixels": cfg.env.pixels,
            "frames": frames, "wall_s": round(wall, 2), "fps": round(frames / wall, 1),
            "first_batch_s": round(ready, 1), "params": sum(p.numel() for p in agent.parameters()),
            "threads": torch.get_num_threads()}


def main(argv: list[str]) -> dict:
    opt = parse(argv, DEFAULTS)
    rows = []
    for n in [int(w) for w in str(opt["workers"]).split(",")]:
        for collector in str(opt["collectors"]).split(","):
            rows.append(time_collection(opt, collector, n))
            print(f"[collect] {collector} x{n}: {rows[-1]['fps']:.0f} frames/s", flush=True)
    base = {r["workers"]: r["fps"] for r in rows if r["collector"] == "local"}
    table = "\n".join([
        f"Collection throughput, {rows[0]['env']} (pixels: {rows[0]['pixels']}), untrained RSSM xs policy "
        f"({rows[0]['params'] / 1e6:.2f}M params) exploring, {opt['collect_every']} agent steps per env per batch, "
        f"weights pushed after each batch; {machine('cpu')}, {time.strftime('%Y-%m-%d')}", "",
        markdown(["collector", "workers", "env frames/s", "vs local at the same N", "first batch (start-up)"],
                 [[r["collector"], r["workers"], f"{r['fps']:.0f}",
                   f"{r['fps'] / base[r['workers']]:.2f}x" if base.get(r["workers"]) else "-",
                   f"{r['first_batch_s']:.1f} s"] for r in rows])])
    data = {"machine": machine("cpu"), "options": opt, "rows": rows}
    write("collect_cpu", data, table, opt["out"] or None)
    return data
