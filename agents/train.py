"""The training loop: collect -> store -> update on the train ratio -> log / eval / checkpoint.

One function, `train(cfg)`, read top to bottom. Counting: `env_steps` are environment frames (agent
steps x action repeat) and are what `steps`, `prefill`, `eval_every` and `log_every` count;
`train_ratio` is replayed agent steps (batch_size x seq_len per update) per collected agent step.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from gymnasium.error import DependencyNotInstalled
from omegaconf import OmegaConf
from tqdm import tqdm

from agents import checkpoint, distributed
from agents.collect import CollectorError, make_collector
from agents.config import Config, ConfigError, compose, config_mismatch
from agents.cudagraph import GraphedUpdate
from agents.dreamer import Agent, update
from agents.policy import EVAL, EXPLORE, RANDOM, DreamerPolicy
from agents.replay import Replay
from agents.runlock import RunLock, os_error
from agents.video import add_gif, open_loop_grid, save_video
from envs.make import make_env
from torchrl.data import Unbounded
from torchrl.envs import EnvBase, TensorDictPrimer
from worldmodels.model import ObsSpec, WorldModel


def _collect_env(env_cfg, seed: int, primer_shapes: dict, render: bool = False):
    """Env plus the primer that carries the policy's recurrent state (module level: picklable)."""
    env = make_env(env_cfg, seed, render=render)
    env.append_transform(TensorDictPrimer({k: Unbounded(s) for k, s in primer_shapes.items()}, default_value=0.0))
    return env


def obs_spec(env: EnvBase) -> ObsSpec:
    """What the world model needs to know about an env's observations and actions."""
    spec = env.observation_spec
    action = env.action_spec
    discrete = action.domain == "discrete"
    image = tuple(spec["pixels"].shape[-3:][i] for i in (1, 2, 0)) if "pixels" in spec.keys() else (64, 64, 3)  # (H, W, C)
    obs_dim = spec["observation"].shape[-1] if "observation" in spec.keys() else 0
    return ObsSpec(pixels="pixels" in spec.keys(), obs_dim=obs_dim, action_dim=action.shape[-1], discrete=discrete,
                   image=image)


def build_agent(cfg: Config, device: str) -> tuple[Agent, DreamerPolicy, dict]:
    env = make_env(cfg.env, cfg.train.seed)
    spec = obs_spec(env)
    if spec.discrete:
        low = high = torch.zeros(spec.action_dim)
    else:
        low, high = env.action_spec.space.low.float(), env.action_spec.space.high.float()
    env.close()
    agent = Agent(WorldModel(cfg.backbone, cfg.core, cfg.nets, spec, cfg.loss), cfg.agent).to(device)
    policy = DreamerPolicy(agent, low, high).to(device)
    shapes = {f"state_{k}": s for k, s in agent.wm.core.state_shapes().items()}
    shapes["prev_action"] = (spec.action_dim,)
    return agent, policy, shapes


@torch.no_grad()
def evaluate(cfg: Config, policy: DreamerPolicy, shapes: dict, episodes: int, seed: int,
             video: Path | None = None) -> list[float]:
    """Run `episodes` greedy episodes; optionally save the first one as a video (skipped, with a warning,
    where the env cannot render here: a missing renderer must not stop a run)."""
    try:
        env = _collect_env(cfg.env, seed, shapes, render=video is not None and not cfg.env.pixels)
    except (ImportError, DependencyNotInstalled) as e:  # e.g. no pygame for the classic-control envs
        if video is None or cfg.env.pixels:
            raise
        _warn_once(f"eval videos off: the env cannot render here ({str(e).splitlines()[0]})")
        video, env = None, _collect_env(cfg.env, seed, shapes, render=False)
    old_mode = int(policy.mode)
    policy.mode.fill_(EVAL)
    returns = []
    for i in range(episodes):
        td = env.rollout(cfg.env.time_limit, policy=policy, break_when_any_done=True)
        returns.append(float(td["next", "reward"].sum()))
        if video is not None and i == 0 and "pixels" in td.keys():
            frames = td["pixels"].permute(0, 2, 3, 1).cpu().numpy()  # (T, H, W, 3)
            save_video(video, frames)
    policy.mode.fill_(old_mode)
    env.close()
    return returns


@functools.cache
def _warn_once(message: str) -> None:
    tqdm.write(f"warning: {message}")


def shard_dir(run_dir: Path, group: distributed.Group) -> Path:
    """Where a data-parallel rank keeps its lock, replay shard and checkpoints: the run directory itself
    for rank 0 (and a single process), run_dir/ranks/<r> for the others."""
    return run_dir if group.main else run_dir / "ranks" / str(group.rank)


class _NoWriter:
    """TensorBoard on rank 0 only: the other ranks' writer."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def train(cfg: Config) -> dict:
    t = cfg.train
    if t.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available; use device=cpu")
    if cfg.agent.cuda_graph and (not t.device.startswith("cuda") or cfg.agent.optimizer != "adam"):
        raise ConfigError("agent.cuda_graph=true needs device=cuda and agent.optimizer=adam; drop it otherwise")
    group = distributed.setup(t.device)  # one process unless launched by torchrun (agents/distributed.py)
    if group.world > 1 and t.device.startswith("cuda"):
        t = dataclasses.replace(t, device=f"cuda:{group.local_rank}")
        cfg = dataclasses.replace(cfg, train=t)
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    np.random.seed(t.seed + group.rank)

    run_dir = shard_dir(Path(t.run_dir), group)
    if cfg.agent.cuda_graph and (group.world > 1 or t.offline):
        raise ConfigError("agent.cuda_graph=true is for online training in one process; drop it (or torchrun, offline=)")
    if t.offline and group.world > 1:
        raise ConfigError("offline training runs in one process; launch it without torchrun")
    lock = RunLock(run_dir).acquire()  # one process per run_dir; released however this one ends
    try:
        if t.offline:  # learn from a dataset alone (agents/offline/dreamer.py)
            from agents.offline.dreamer import train_offline

            return train_offline(cfg, run_dir)
        return _train(cfg, lock, group, run_dir)
    finally:
        lock.release()
        if group.world > 1:
            distributed.teardown()


def check_resumable(run_dir: Path, cfg: Config) -> None:
    """A run resumes only with the settings it was made with (keys added since compare at their defaults)."""
    saved = OmegaConf.load(run_dir / "config.yaml")
    own = run_dir / "overrides.json"  # the run's own command line, under today's defaults
    baseline = compose(json.loads(own.read_text())) if own.exists() else None
    diff = config_mismatch(saved, cfg.raw, baseline)
    if diff:
        raise ConfigError(f"config does not match the checkpoint in {run_dir} (differs: {', '.join(diff[:5])}); "
                          f"resume with the same settings or use a new run_dir")


def restore(ckpt: Path, agent: Agent, opts: dict, counters: dict, replay: Replay) -> dict:
    """Agent, optimisers, counters, RNG and the replay as the checkpoint left them; returns what the
    replay restored."""
    payload, restored = checkpoint.load(ckpt, replay)
    agent.load_state_dict(payload["agent"])
    for k, opt in opts.items():
        opt.load_state_dict(payload["opts"][k])
    counters.update(payload["counters"])
    if "wall_s" not in payload["counters"]:  # written before runs counted their time: the time so far is unknown
        counters["wall_s"] = math.nan
    checkpoint.set_rng_state(payload["rng"])
    return restored


def save_state(run_dir: Path, step: int, agent: Agent, opts: dict, counters: dict, replay: Replay) -> None:
    payload = {"agent": agent.state_dict(), "opts": {k: o.state_dict() for k, o in opts.items()},
               "counters": dict(counters), "rng": checkpoint.rng_state()}
    checkpoint.save(run_dir, step, payload, replay)


def start_run_dir(run_dir: Path, cfg: Config) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg.raw, run_dir / "config.yaml")
    except OSError as err:
        raise os_error(run_dir, err) from None


def _train(cfg: Config, lock: RunLock, group: distributed.Group, run_dir: Path) -> dict:
    t = cfg.train
    device, world = t.device, group.world
    if lock.previous is not None:
        tqdm.write(f"run_dir {run_dir}: took over the lock of process {lock.previous}, which is no longer running")
    agent, policy, shapes = build_agent(cfg, device)
    distributed.broadcast_module(agent)  # rank 0's weights everywhere (the same seed made them already)
    if group.rank:  # each rank draws its own windows and imagination noise
        torch.manual_seed(t.seed + 7919 * group.rank)
    if cfg.agent.cuda_graph:  # the update captured in one CUDA graph (checked in `train`: CUDA, Adam, one process)
        opts = agent.optimizers(capturable=True)
        step_fn = GraphedUpdate(agent, opts)
    else:
        opts = agent.optimizers()
        step_fn = functools.partial(update, agent, opts)
    # about the rows this rank writes: one per step plus one per episode end (where the estimate falls
    # short, the replay reports a full disk as it grows)
    expected_rows = t.steps // world + t.envs * (t.collect_every + t.seq_len)
    replay = Replay(max(t.replay_capacity // world, t.envs * t.seq_len), t.batch_size, t.seq_len, run_dir / "replay", policy.obs_keys, t.envs,
                    state_shapes=agent.wm.core.state_shapes(), context=t.replay_context, every=t.replay_context_every,
                    expected_rows=expected_rows, fixed_shapes=cfg.agent.cuda_graph)
    counters = {"env_steps": 0, "agent_steps": 0, "updates": 0, "updates_due": 0.0, "episodes": 0,
                "nonfinite": 0, "last_log": 0, "last_eval": 0, "last_video": 0, "wall_s": 0.0}

    ckpt = checkpoint.latest(run_dir) if run_dir.exists() else None
    step = int(ckpt.name.split("-")[1]) if ckpt is not None else -1
    if len(set(distributed.gather(torch.tensor([step])).tolist())) > 1:  # every rank resumes from the same step
        raise ConfigError(f"the data-parallel ranks of {t.run_dir} hold checkpoints of different steps (a run stopped "
                          "while checkpointing, or another number of processes); resume with the number of processes "
                          "it ran with, or start a new run_dir")
    if ckpt is not None:
        check_resumable(run_dir, cfg)
        restored = restore(ckpt, agent, opts, counters, replay)
        states = ("no stored states (replay_context=false)" if not restored["context"] else
                  "the stored state of every row" if restored["every"] == 1 else f"stored states every {restored['every']} rows")
        dropped = f", {restored['dropped']:,} rows overwritten after the checkpoint dropped" if restored["dropped"] else ""
        tqdm.write(f"resuming {run_dir} from {ckpt.name} at env step {counters['env_steps']:,}: "
                   f"{restored['rows']:,} replay rows and {states} restored{dropped}")
    else:
        start_run_dir(run_dir, cfg)

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(run_dir / "tb", purge_step=counters["env_steps"] or None) if group.main else _NoWriter()
    writer.add_text("config", "```yaml\n" + OmegaConf.to_yaml(cfg.raw) + "\n```", counters["env_steps"])
    results = {"run_dir": str(run_dir)}
    if ckpt is None and group.main:
        results["eval_return_before"] = float(np.mean(evaluate(cfg, policy, shapes, t.eval_episodes, t.seed + 10_000)))
        writer.add_scalar("eval/return", results["eval_return_before"], 0)
        writer.add_scalar("eval/wall_s", 0.0, 0)

    def save_checkpoint():  # with the run's wall time so far, all of its segments (a resume adds to it)
        wall.count()
        save_state(run_dir, counters["env_steps"], agent, opts, counters, replay)

    make_fn = functools.partial(_collect_env, cfg.env, primer_shapes=shapes)
    policy.mode.fill_(RANDOM if counters["env_steps"] < t.prefill else EXPLORE)
    collector = make_collector(t, make_fn, policy, device, t.seed + counters["episodes"], group.rank)

    repeat, tokens = cfg.env.action_repeat, t.batch_size * t.seq_len
    metrics, recent_returns = defaultdict(list), []
    clock = {"start": time.time(), "ckpt": time.time(), "train": 0.0, "log": time.time(), "log_steps": counters["env_steps"]}
    wall = checkpoint.Clock(counters, t.checkpoint_every)
    bar = tqdm(total=t.steps, initial=min(counters["env_steps"], t.steps), unit="step",
               disable=not (t.progress and group.main), dynamic_ncols=True, desc="train")
    try:
        for data in collector if counters["env_steps"] < t.steps else []:
            # --- store ---
            replay.add(data)
            n = data.numel()  # this rank's agent steps; every rank collects as many
            counters["agent_steps"] += n * world
            counters["env_steps"] += n * repeat * world
            bar.update(n * repeat * world)
            done = data["next", "done"].reshape(-1)
            for ret, length in zip(data["next", "episode_reward"].reshape(-1)[done].tolist(),
                                   data["next", "step_count"].reshape(-1)[done].tolist()):
                counters["episodes"] += 1
                recent_returns.append(ret)
                writer.add_scalar("episode/return", ret, counters["env_steps"])
                writer.add_scalar("episode/length", length * repeat, counters["env_steps"])

            # --- update on the train ratio ---
            if counters["env_steps"] >= t.prefill and replay.ready():
                policy.mode.fill_(EXPLORE)
                counters["updates_due"] += n * t.train_ratio / tokens
                tic = time.time()
                while counters["updates_due"] >= 1:
                    batch = replay.sample(device)
                    m, states = step_fn(batch)
                    if states is not None and not m["train/nonfinite"]:
                        replay.refresh(batch, states)  # the stored states follow the model
                    counters["updates"] += 1
                    counters["updates_due"] -= 1
                    counters["nonfinite"] += int(m["train/nonfinite"])
                    for k, v in m.items():
                        metrics[k].append(float(v))
                clock["train"] += time.time() - tic
                collector.update_policy_weights_()

            # --- log / video / eval / checkpoint on their clocks ---
            step = counters["env_steps"]
            if step - counters["last_log"] >= t.log_every:
                counters["last_log"] = step
                now = time.time()
                for k, v in metrics.items():
                    writer.add_scalar(k, float(np.mean(v)), step)
                writer.add_scalar("train/nonfinite_updates", counters["nonfinite"], step)
                writer.add_scalar("train/updates", counters["updates"], step)
                writer.add_scalar("train/replay_size", len(replay), step)
                writer.add_scalar("fps/env", (step - clock["log_steps"]) / max(now - clock["log"], 1e-9), step)
                if clock["train"] > 0:
                    writer.add_scalar("fps/train", len(metrics["loss/dec"]) * tokens / clock["train"], step)
                clock.update(log=now, log_steps=step, train=0.0)
                metrics.clear()
            if agent.wm.spec.pixels and t.video_every and step - counters["last_video"] >= t.video_every and replay.ready():
                counters["last_video"] = step
                if group.main:
                    write_open_loop(agent, replay, writer, step, device)
            if t.eval_every and step - counters["last_eval"] >= t.eval_every and step < t.steps:
                counters["last_eval"] = step
                if group.main:
                    writer.add_scalar("eval/return", float(np.mean(evaluate(cfg, policy, shapes, t.eval_episodes, t.seed + step))), step)
                    writer.add_scalar("eval/wall_s", wall.count(), step)  # the run's time to this eval, all segments
            if distributed.broadcast_flags([time.time() - clock["ckpt"] >= t.checkpoint_every])[0]:  # rank 0's clock
                clock["ckpt"] = time.time()
                save_checkpoint()
            last = np.mean(recent_returns[-10:]) if recent_returns else math.nan
            bar.set_postfix(ret=f"{last:.1f}", updates=counters["updates"], refresh=False)
            if step >= t.steps:
                break
    except CollectorError:  # a collection worker died: keep what was learnt, then stop with its one-line error
        save_checkpoint()
        raise
    finally:
        collector.shutdown()
        bar.close()

    save_checkpoint()
    if not group.main:  # rank 0 evaluates and reports
        return {"rank": group.rank, "env_steps": counters["env_steps"], "updates": counters["updates"]}
    video = run_dir / "videos" / f"eval-{counters['env_steps']}"
    results["eval_returns_after"] = evaluate(cfg, policy, shapes, t.eval_episodes, t.seed + 20_000, video=video)
    results["eval_return_after"] = float(np.mean(results["eval_returns_after"]))
    writer.add_scalar("eval/return", results["eval_return_after"], counters["env_steps"])
    writer.add_scalar("eval/wall_s", wall.count(), counters["env_steps"])
    if agent.wm.spec.pixels and replay.ready():
        write_open_loop(agent, replay, writer, counters["env_steps"], device)
    writer.close()
    results.update(env_steps=counters["env_steps"], updates=counters["updates"], episodes=counters["episodes"],
                   wall_s=wall.count(), wall_s_segment=time.time() - clock["start"],
                   videos=str(run_dir / "videos"),
                   checkpoint=str(checkpoint.latest(run_dir)), tensorboard=str(run_dir / "tb"))
    return results


@torch.no_grad()
def write_open_loop(agent: Agent, replay: Replay, writer, step: int, device: str, n: int = 4, context: int = 5) -> None:
    """Observe `context` replayed frames, imagine the rest from the true actions; log truth | model | error."""
    batch = replay.sample(device)
    obs, action, is_first = batch["obs"][:n], batch["action"][:n], batch["is_first"][:n]
    start = None
    if "start" in batch:
        start = {k: v[:n] for k, v in agent.wm.context_state(batch["start"], batch["burn"]).items()}
    pred = agent.wm.open_loop(obs, action, is_first, context, start=start)  # (n, T, C, H, W) uint8
    if isinstance(pred, dict):  # observations of several parts: the video shows the image
        obs, pred = obs["pixels"], pred["pixels"]
    frames = open_loop_grid(obs, pred)
    add_gif(writer, "report/open_loop", frames, step)
    save_video(Path(writer.log_dir).parent / "videos" / f"open_loop-{step}", frames, fps=10)
