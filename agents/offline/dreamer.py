"""The Dreamer agent learnt from a dataset alone: `longdream train offline=<dataset id> [agent.penalty=1]`.

The dataset's episodes go into the run's replay as the collector would have written them (the action
into each observation in the actor's units, the reward on arrival, is_first / is_terminal), so the
world model, actor and critic train with exactly the online losses, on uniformly drawn windows. No
environment step is taken except by the evaluations. The replay's stored model states start at zero
and are refreshed by the training passes as online (replay context); `offline_updates` counts the
learner steps, and `eval_every` / `log_every` count updates here instead of env steps.

Against model exploitation (the actor steering imagination where the data never went), `agent.penalty`
> 0 trains an ensemble of one-step latent predictors and lowers each imagined reward by the penalty
times their disagreement (agents/dreamer.Ensemble), as MOPO and MOReL penalise model uncertainty;
`agent.bc` > 0 adds to the actor's loss its distance to the dataset's actions at their posterior states
(agents/dreamer.behaviour_loss), as TD3+BC keeps the policy near the data.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tensordict import TensorDict

from agents.offline.dataset import to_unit


def episode_frames(ep, obs_key: str, to_model, state_shapes: dict) -> TensorDict:
    """One dataset episode (T steps) as a collector batch (T,): what `Replay.add` takes."""
    T = len(ep)
    obs = torch.as_tensor(ep.obs)
    act = to_model(torch.as_tensor(ep.action))  # (T, A): a_t, taken at obs_t
    prev = torch.cat([torch.zeros_like(act[:1]), act[:-1]])  # the action into obs_t
    done = torch.as_tensor(ep.terminated | ep.truncated)
    done[-1] = True
    zeros = {f"state_{k}": torch.zeros(T, *s) for k, s in state_shapes.items()}
    first = torch.zeros(T, 1, dtype=torch.bool)
    first[0] = True
    return TensorDict({
        obs_key: obs[:-1], "is_init": first, "prev_action": prev, **zeros,
        "next": {obs_key: obs[1:], "reward": torch.as_tensor(ep.reward).float()[:, None], "done": done[:, None],
                 "terminated": torch.as_tensor(ep.terminated)[:, None], "prev_action": act, **zeros},
    }, [T])


def model_actions(policy, action_space):
    """Env actions -> the actor's units: one-hot for discrete spaces, [-1, 1] for boxes."""
    if policy.agent.wm.spec.discrete:
        n = policy.agent.wm.spec.action_dim
        return lambda a: torch.nn.functional.one_hot(a.long().reshape(-1), n).float()
    low, high = policy.low.cpu(), policy.high.cpu()
    return lambda a: to_unit(a, low, high)


def fill(replay, dataset, policy) -> int:
    from agents.config import ConfigError

    obs_key = dataset.info.get("obs_key", policy.obs_keys[0])
    if [obs_key] != list(policy.obs_keys):
        raise ConfigError(f"dataset '{dataset.name}' holds '{obs_key}' observations but the agent reads {policy.obs_keys}; "
                          "use the env config the dataset was made with")
    to_model = model_actions(policy, dataset.action_space)
    shapes = policy.agent.wm.core.state_shapes() if replay.context else {}
    return sum(replay.add(episode_frames(ep, obs_key, to_model, shapes)) for ep in dataset.episodes)


def train_offline(cfg, run_dir: Path) -> dict:
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    from agents import checkpoint
    from agents.dreamer import update
    from agents.offline.dataset import load_for
    from agents.offline.decision import normalized
    from agents.replay import Replay
    from agents.train import build_agent, check_resumable, evaluate, restore, save_state, start_run_dir

    t = cfg.train
    ds = load_for(cfg)
    device = t.device
    agent, policy, shapes = build_agent(cfg, device)
    opts = agent.optimizers()
    rows = sum(len(ep) + 1 for ep in ds.episodes)
    replay = Replay(max(rows, t.seq_len), t.batch_size, t.seq_len, run_dir / "replay", policy.obs_keys, 1,
                    state_shapes=agent.wm.core.state_shapes(), context=t.replay_context, every=t.replay_context_every)
    counters = {"updates": 0, "last_log": 0, "last_eval": 0, "nonfinite": 0, "wall_s": 0.0}
    ckpt = checkpoint.latest(run_dir) if run_dir.exists() else None
    if ckpt is not None:
        check_resumable(run_dir, cfg)
        restore(ckpt, agent, opts, counters, replay)
        tqdm.write(f"resuming {run_dir} from {ckpt.name} at update {counters['updates']:,}")
    else:
        start_run_dir(run_dir, cfg)
        fill(replay, ds, policy)
    writer = SummaryWriter(run_dir / "tb", purge_step=counters["updates"] or None)
    results = {}
    if ckpt is None:
        results["eval_return_before"] = float(np.mean(evaluate(cfg, policy, shapes, t.eval_episodes, t.seed + 10_000)))

    def save():
        save_state(run_dir, counters["updates"], agent, opts, counters, replay)

    metrics, curve = defaultdict(list), []
    clock = checkpoint.Clock(counters, t.checkpoint_every)
    bar = tqdm(total=t.offline_updates, initial=counters["updates"], unit="upd", disable=not t.progress, desc="offline")
    while counters["updates"] < t.offline_updates:
        batch = replay.sample(device)
        m, states = update(agent, opts, batch)
        if states is not None:
            replay.refresh(batch, states)
        counters["updates"] += 1
        counters["nonfinite"] += int(m["train/nonfinite"])
        for k, v in m.items():
            metrics[k].append(float(v))
        bar.update(1)
        u = counters["updates"]
        if u - counters["last_log"] >= t.log_every:
            counters["last_log"] = u
            for k, v in metrics.items():
                writer.add_scalar(k, float(np.mean(v)), u)
            metrics.clear()
        if t.eval_every and u - counters["last_eval"] >= t.eval_every and u < t.offline_updates:
            counters["last_eval"] = u
            ret = float(np.mean(evaluate(cfg, policy, shapes, t.eval_episodes, t.seed + u)))
            curve.append([u, ret])
            writer.add_scalar("eval/return", ret, u)
        clock.maybe_save(save)
    bar.close()
    clock.stop(save)
    returns = evaluate(cfg, policy, shapes, t.eval_episodes, t.seed + 20_000, video=run_dir / "videos" / f"eval-{counters['updates']}")
    writer.add_scalar("eval/return", float(np.mean(returns)), counters["updates"])
    writer.close()
    results.update(method="dreamer-offline" + ("-penalty" if agent.ensemble is not None else "") + ("-bc" if cfg.agent.bc > 0 else ""), dataset=t.offline,
                   env=cfg.env.id, seed=t.seed, updates=counters["updates"], env_steps=0, eval_returns_after=returns,
                   eval_return_after=float(np.mean(returns)), dataset_mean_return=float(ds.info.get("mean_return", np.nan)),
                   normalized_score=normalized(float(np.mean(returns)), ds.info), penalty=cfg.agent.penalty, bc=cfg.agent.bc,
                   params=sum(p.numel() for p in agent.parameters()), wall_s=counters["wall_s"], curve=curve,
                   videos=str(run_dir / "videos"), checkpoint=str(checkpoint.latest(run_dir)), tensorboard=str(run_dir / "tb"))
    (run_dir / "result.json").write_text(json.dumps(results, indent=1))
    return results
