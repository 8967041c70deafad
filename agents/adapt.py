"""`longdream adapt`: deploy a trained agent where the dynamics changed, and measure how it copes.

    longdream adapt run_dir=<trained run> shift.<p>=<scale> [mode=frozen|context|gradient|retrain]
                    [episodes=10] [updates=50] [wm_updates=0] [rollback=true] [ac=false] [imagination=0] [lr=1]
                    [explore=false] [eval=0] [horizon=16] [context=8] [seed=0] [out=<folder>]

`shift.<p>` scales a physical parameter as `env.shift` does (envs/shift.py). Every episode is one
row: its return, and the world model's open-loop prediction error on it (windows of the episode:
observe `context` steps from a fresh state, imagine `horizon` under the true actions; mean squared
error of the decoded observation over the imagined steps), measured before any update it triggers.
Modes:
- frozen: the agent as trained; its state restarts with every episode;
- context: the model's state runs on across episodes (an episode start is not a reset), so what it
  has seen of the new dynamics stays in its memory; no gradient step;
- gradient: after each episode, `updates` world-model steps on windows of the episodes seen so far
  (the run's batch size and sequence length), rolled back where the error on the latest episode grew
  (`rollback=false` keeps them whatever the error did);
  with `ac=true` each step is the whole learner update (world model, then actor and critic in
  imagination from the windows' states, as training does), so the policy adapts too, and a rollback
  restores all of it; `wm_updates` world-model steps come before them (the model fits the new data
  first, then the actor-critic learns in it); `lr` scales every learning rate of these steps (the
  run's own at 1); `imagination=H` imagines H steps in the actor-critic's updates instead of the
  run's own horizon (0), so that less of the return rests on a critic trained on the old dynamics;
- retrain: the reference, a new agent trained from scratch on the shifted env with the run's settings
  and seed (plus `seed`) for the env steps of `episodes` full episodes; its rows are its training
  episodes (no prediction error) and a last one, the eval return after training.
The deployment episodes act greedily (the eval policy) unless `explore=true`: then they sample
from the actor as training's collection does, so the steps on the new data see more of it; `eval`
episodes are greedy either way.
Env steps count env frames (agent steps x action repeat), as training does. `eval=N` adds N rows
marked `eval` after the budget: the agent as the budget left it (no more updates; in context mode its
state runs on) on N episodes of the shifted env drawn from their own seed, the same for every mode,
so that modes are compared on the same N starts rather than on the last few deployment episodes;
a retrain's eval is then N episodes too.
With `reference=true` (the default) it first measures the trained agent on the unshifted env and a
random policy on the shifted one, and each row's `recovered_fraction` is (return - random) /
(in-distribution return - random). Writes adapt.json / adapt.md, adapt.png (return and error against
env steps) and TensorBoard scalars (tb/) under `out` (default: <run_dir>/adapt/<mode>-<shift>).
"""
from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

DEFAULTS = {"run_dir": "", "mode": "frozen", "episodes": 10, "updates": 50, "wm_updates": 0, "rollback": True, "imagination": 0, "ac": False, "lr": 1.0, "explore": False, "eval": 0, "horizon": 16, "context": 8,
            "seed": 0, "out": "", "reference": True, "device": "cpu"}
MODES = ("frozen", "context", "gradient", "retrain")


def parse(argv: list[str]) -> tuple[dict, dict]:
    """The options and the shift {parameter: scale}; one-line errors for anything else."""
    from agents.config import ConfigError

    opts, shift = dict(DEFAULTS), {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"adapt takes key=value arguments, got '{arg}'")
        if key.startswith("shift."):
            try:
                shift[key[len("shift."):]] = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number (a scale of the parameter), got '{value}'") from None
        elif key in DEFAULTS:
            kind = type(DEFAULTS[key])
            try:
                opts[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
            except ValueError:
                raise ConfigError(f"{key} must be a {kind.__name__}, got '{value}'") from None
        else:
            raise ConfigError(f"unknown adapt option '{key}' (valid: {', '.join(sorted(DEFAULTS))}, shift.<parameter>)")
    if not opts["run_dir"]:
        raise ConfigError("usage: longdream adapt run_dir=<trained run> shift.<parameter>=<scale> [mode=frozen|context|gradient]")
    if opts["mode"] not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{opts['mode']}'")
    if not shift:
        raise ConfigError("adapt needs a shift, e.g. shift.m=1.5 (the parameters an env has: see envs/shift.py)")
    for k in ("episodes", "horizon", "context"):
        if opts[k] < 1:
            raise ConfigError(f"{k} must be at least 1, got {opts[k]}")
    for k in ("updates", "wm_updates"):
        if opts[k] < 0:
            raise ConfigError(f"{k} is a number of steps per episode (0 for none), got {opts[k]}")
    if opts["imagination"] < 0:
        raise ConfigError(f"imagination is a number of imagined steps (0: the run's own horizon), got {opts['imagination']}")
    if opts["eval"] < 0:
        raise ConfigError(f"eval is a number of episodes (0 for none), got {opts['eval']}")
    if not opts["lr"] > 0:
        raise ConfigError(f"lr scales the learning rates and must be positive, got {opts['lr']}")
    return opts, shift


class CarryState:
    """Wraps the policy so that its recurrent state runs on across episodes: at an episode start the
    state and previous action of the last step stand in for the primer's zeros, and is_init is cleared."""

    def __init__(self, policy):
        self.policy, self.carry = policy, None

    def __call__(self, td):
        if self.carry is not None and bool(td["is_init"].all()):
            td["is_init"] = torch.zeros_like(td["is_init"])
            for k, v in self.carry.items():
                td[k] = v.clone()
        td = self.policy(td)
        keys = ["prev_action"] + [f"state_{k}" for k in self.policy.state_keys]
        self.carry = {k: td["next", k].clone() for k in keys}
        return td


def episode_arrays(td, obs_key: str) -> dict:
    """One episode (T rows) in the replay's layout: obs t, the action into it, the reward and
    terminal flag of arriving at it, is_first at the start."""
    T = td.shape[0]
    reward = torch.zeros(T)
    reward[1:] = td["next", "reward"].reshape(T)[:-1].float()
    term = torch.zeros(T)
    term[1:] = td["next", "terminated"].reshape(T)[:-1].float()
    first = torch.zeros(T)
    first[0] = 1
    return {"obs": td[obs_key].float(), "action": td["prev_action"].float(), "reward": reward, "is_terminal": term,
            "is_first": first, "return": float(td["next", "reward"].sum())}


def windows(ep: dict, length: int, stride: int) -> dict | None:
    """Every window of `length` rows of an episode, `stride` apart, each starting an episode (B, length, ...)."""
    T = ep["obs"].shape[0]
    starts = list(range(0, T - length + 1, stride))
    if not starts:
        return None
    out = {k: torch.stack([ep[k][s:s + length] for s in starts]) for k in ("obs", "action", "reward", "is_terminal")}
    out["is_first"] = torch.zeros(len(starts), length)
    out["is_first"][:, 0] = 1
    return out


@torch.no_grad()
def prediction_error(wm, ep: dict, context: int, horizon: int) -> float:
    """Mean squared error of the open-loop prediction over the imagined steps. The imagined latents are
    sampled from a fixed seed (the caller's RNG untouched), so that two models compared on one episode,
    as a rollback does, see the same draws and differ only by their weights."""
    w = windows(ep, context + horizon, horizon)
    if w is None:
        return float("nan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pred = wm.open_loop(w["obs"], w["action"], w["is_first"], context)
    return float((pred[:, context:] - w["obs"][:, context:]).pow(2).mean())


def adapt_wm(agent, opts: dict, episodes: list[dict], updates: int, batch: int, seq: int, rng, wm_updates: int = 0) -> None:
    """`updates` steps on random windows of `seq` rows of the episodes seen so far, each window starting
    an episode; windows are sliced where they are drawn, not built all at once. `opts` names the
    optimisers to step: {"wm"} alone trains the world model on its loss; with "actor" and "critic" too,
    each step is the full learner update (agents.dreamer.update). `wm_updates` world-model steps come
    first, whatever `opts` holds: the model fits the new data before the actor-critic learns in it."""
    from agents.dreamer import autocast, update

    starts = [(ep, s) for ep in episodes for s in range(ep["obs"].shape[0] - seq + 1)]
    if not starts:
        return
    first = torch.zeros(batch, seq)
    first[:, 0] = 1
    for step in range(wm_updates + updates):
        pick = [starts[k] for k in rng.integers(len(starts), size=batch)]
        b = {k: torch.stack([ep[k][s:s + seq] for ep, s in pick]) for k in ("obs", "action", "reward", "is_terminal")}
        b["is_first"] = first
        if step >= wm_updates and set(opts) != {"wm"}:
            update(agent, opts, b)
            continue
        with autocast(agent):
            loss = agent.wm.loss(b["obs"], b["action"], b["reward"], b["is_first"], b["is_terminal"])[0]
        opts["wm"].zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(agent.wm.parameters(), agent.cfg.wm_clip)
        opts["wm"].step()


def adaptation_optimizers(agent, ac: bool, lr: float) -> dict:
    """Fresh optimisers for the steps on the new data: the world model's alone, or with the actor's and
    critic's (`ac`), every learning rate the run's own times `lr`, and no warmup (LaProp's warmup is for
    a model trained from scratch; this one is trained)."""
    opt = agent.optimizers()
    opt = opt if ac else {"wm": opt["wm"]}
    for o in opt.values():
        for group in o.param_groups:
            group["lr"] *= lr
            if "warmup" in group:
                group["warmup"] = 0
    return opt


def main(argv: list[str]) -> dict:
    from agents import checkpoint
    from agents.config import ConfigError, load_config
    from agents.policy import EVAL, EXPLORE, RANDOM
    from agents.train import _collect_env, build_agent

    opts, shift = parse(argv)
    run_dir = Path(opts["run_dir"])
    if not (run_dir / "overrides.json").exists():
        raise ConfigError(f"'{run_dir}' is not a longdream run directory (no overrides.json); pass the run_dir of a training run")
    cfg, _ = load_config([f"run_dir={run_dir}"])
    ckpt = checkpoint.latest(run_dir)
    if ckpt is None:
        raise checkpoint.CheckpointError(f"no checkpoint in '{run_dir}'; train first")
    # deployment is on fixed dynamics, one env episode at a time: a run trained across a range (and in
    # trials) is measured in distribution at the scales it was centred on, the env's own values
    base = dataclasses.replace(cfg.env, shift_range={}, trial=1)
    shifted = dataclasses.replace(base, shift={**cfg.env.shift, **shift})
    _collect_env(shifted, opts["seed"], {}).close()  # a shift the env does not have fails here, in one line
    agent, policy, shapes = build_agent(cfg, opts["device"])
    agent.load_state_dict(checkpoint.load(ckpt)[0]["agent"])
    if opts["imagination"]:
        agent.cfg = dataclasses.replace(agent.cfg, horizon=opts["imagination"])
    obs_key = policy.obs_keys[0]
    if len(policy.obs_keys) > 1:
        raise ConfigError("adapt measures one observation key; this run's model reads several")
    torch.manual_seed(opts["seed"])
    rng = np.random.default_rng(opts["seed"])
    tag = "-".join(f"{k}{v:g}" for k, v in sorted(shift.items()))
    out = Path(opts["out"]) if opts["out"] else run_dir / "adapt" / f"{opts['mode']}-{tag}"

    def run_episodes(env_cfg, n, mode, offset=50_000, act=policy):
        env = _collect_env(env_cfg, opts["seed"] + offset, shapes)
        policy.mode.fill_(mode)
        eps = [episode_arrays(env.rollout(cfg.env.time_limit, policy=act, break_when_any_done=True), obs_key)
               for _ in range(n)]
        env.close()
        return eps

    tic = time.time()
    ref, lengths = {}, []
    if opts["reference"]:
        n = opts["episodes"]
        for name, env_cfg, mode in (("in_distribution", base, EVAL), ("random", shifted, RANDOM)):
            eps = run_episodes(env_cfg, n, mode)
            ref[name] = float(np.mean([e["return"] for e in eps]))
            lengths += [e["obs"].shape[0] for e in eps]

    if opts["mode"] == "retrain":
        # the env steps the other modes spend: episodes x an episode's length (the env's own time limit
        # can be shorter than env.time_limit; the reference episodes show it), in frames
        length = max(lengths or [e["obs"].shape[0] for e in run_episodes(shifted, 1, RANDOM)])
        # trained with the run's own seed (offset by the deployment seed): the retrain references of two
        # training seeds are two independent trainings, not one run measured against two references
        rows = retrain(run_dir, shift, opts["episodes"] * length * cfg.env.action_repeat, out,
                       cfg.train.seed + opts["seed"], ref, opts["eval"])
        return finish(rows, ref, cfg, ckpt, opts, shift, tag, out, tic, None)
    act = CarryState(policy) if opts["mode"] == "context" else policy
    opt = None
    if opts["mode"] == "gradient":
        opt = adaptation_optimizers(agent, opts["ac"], opts["lr"])
    env = _collect_env(shifted, opts["seed"], shapes)
    policy.mode.fill_(EXPLORE if opts["explore"] else EVAL)
    rows, seen, steps = [], [], 0
    for i in range(opts["episodes"]):
        ep = episode_arrays(env.rollout(cfg.env.time_limit, policy=act, break_when_any_done=True), obs_key)
        steps += ep["obs"].shape[0] * cfg.env.action_repeat
        err = prediction_error(agent.wm, ep, opts["context"], opts["horizon"])
        row = {"episode": i, "env_steps": steps, "return": ep["return"], "pred_error": err, **recovered(ep["return"], ref)}
        seen.append(ep)
        if opt is not None and opts["updates"] + opts["wm_updates"]:
            before = copy.deepcopy(agent.state_dict()), {k: copy.deepcopy(o.state_dict()) for k, o in opt.items()}
            adapt_wm(agent, opt, seen, opts["updates"], cfg.train.batch_size, cfg.train.seq_len, rng, opts["wm_updates"])
            after = prediction_error(agent.wm, ep, opts["context"], opts["horizon"])
            row["rolled_back"] = bool(opts["rollback"] and after > err)
            if row["rolled_back"]:  # the steps made the model worse on what it just saw: undo them
                agent.load_state_dict(before[0])
                for k, o in opt.items():
                    o.load_state_dict(before[1][k])
        rows.append(row)
        print(f"[adapt] {opts['mode']} episode {i}: return {ep['return']:.1f}, prediction error {err:.4f}", flush=True)
    env.close()
    if opts["eval"]:
        torch.manual_seed(opts["seed"] + 60_000)  # the policy's draws too: the same agent meets the same episodes
        evals = run_episodes(shifted, opts["eval"], EVAL, offset=60_000, act=act)
        rows += [{"episode": len(rows) + i, "env_steps": steps, "return": ep["return"], "eval": True,
                  "pred_error": prediction_error(agent.wm, ep, opts["context"], opts["horizon"]), **recovered(ep["return"], ref)}
                 for i, ep in enumerate(evals)]
        print(f"[adapt] {opts['mode']} after the budget: eval return {np.mean([e['return'] for e in evals]):.1f} "
              f"over {len(evals)} episodes", flush=True)
    return finish(rows, ref, cfg, ckpt, opts, shift, tag, out, tic, opt)


def recovered(ret: float, ref: dict) -> dict:
    """{"recovered_fraction": (return - random) / (in-distribution - random)} where the references exist."""
    if not ref:
        return {}
    span = ref["in_distribution"] - ref["random"]
    return {"recovered_fraction": (ret - ref["random"]) / span if abs(span) > 1e-8 else float("nan")}


def retrain(run_dir: Path, shift: dict, budget: int, out: Path, seed: int, ref: dict, evals: int = 0) -> list[dict]:
    """Train a new agent with the run's settings on the shifted env for `budget` env steps; its training
    episodes (from its TensorBoard log) and its eval return after training (over `evals` episodes; the
    run's eval_episodes at 0), as rows."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from agents.config import _key, load_config
    from agents.train import train

    saved = json.loads((run_dir / "overrides.json").read_text())
    dropped = ("run_dir", "steps", "seed", "env.trial") + (("eval_episodes",) if evals else ())
    overrides = [o for o in saved if _key(o) not in dropped
                 and not _key(o).startswith("env.shift_range")] + \
        [f"run_dir={out / 'retrain'}", f"steps={budget}", f"seed={seed}"] + [f"env.shift.{k}={v}" for k, v in shift.items()] \
        + ([f"eval_episodes={evals}"] if evals else [])
    cfg, _ = load_config(overrides)
    res = train(cfg)
    ea = EventAccumulator(str(out / "retrain" / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    episodes = ea.Scalars("episode/return") if "episode/return" in ea.Tags()["scalars"] else []
    rows = [{"episode": i, "env_steps": e.step, "return": e.value, "pred_error": float("nan"), **recovered(e.value, ref)}
            for i, e in enumerate(episodes)]
    final = float(res["eval_return_after"])
    rows.append({"episode": len(rows), "env_steps": res["env_steps"], "return": final, "pred_error": float("nan"),
                 "eval": True, **recovered(final, ref)})
    return rows


def finish(rows, ref, cfg, ckpt, opts, shift, tag, out, tic, opt) -> dict:
    """The rows with the run's metadata: adapt.json / .md, the plot and TensorBoard scalars."""
    from agents.machine import commit, machine, markdown, portable

    meta = {"mode": opts["mode"], "backbone": cfg.backbone,
            "shift": shift, "seed": opts["seed"], "env": cfg.env.id, "checkpoint": ckpt.name, "reference": ref,
            "options": {k: opts[k] for k in ("episodes", "updates", "ac", "lr", "explore", "eval", "horizon", "context")}, "wall_s": round(time.time() - tic, 1),
            "machine": machine(opts["device"]), "commit": commit()}
    for r in rows:
        r.update({k: meta[k] for k in ("mode", "backbone", "shift", "seed")})
    head = (f"adapt: {meta['backbone']} on {cfg.env.id} shifted by {tag}, mode {opts['mode']}, seed {opts['seed']}"
            + (f"; in-distribution return {ref['in_distribution']:.1f}, random on the shift {ref['random']:.1f}" if ref else "") + "\n\n")
    cols = ["episode", "env steps", "return", "prediction error"] + (["recovered"] if ref else []) \
        + (["rolled back"] if opt is not None else [])
    table = head + markdown(cols, [[f"{r['episode']} (eval)" if r.get("eval") else r["episode"], r["env_steps"],
                                    f"{r['return']:.1f}", f"{r['pred_error']:.4f}",
                                    *([f"{r['recovered_fraction']:.2f}"] if ref else []),
                                    *(["yes" if r.get("rolled_back") else "no"] if opt is not None else [])] for r in rows])
    data = {**meta, "rows": rows}
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapt.json").write_text(json.dumps(portable({"date": time.strftime("%Y-%m-%d"), **data}), indent=1))
    (folder / "adapt.md").write_text(table + "\n")
    print(table)
    print(f"\nwritten: {folder / 'adapt.json'}, {folder / 'adapt.md'}")
    plot(rows, ref, folder / "adapt.png", head.split(";")[0])
    log_scalars(rows, folder / "tb")
    return data


def plot(rows: list[dict], ref: dict, path: Path, title: str) -> None:
    """Return (with the in-distribution and random references) and prediction error against env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["env_steps"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(steps, [r["return"] for r in rows], marker="o", label="shifted")
    for name, style in (("in_distribution", "--"), ("random", ":")):
        if name in ref:
            a.axhline(ref[name], ls=style, color="gray", label=name.replace("_", "-"))
    a.set(xlabel="env steps", ylabel="episode return")
    a.legend(fontsize=7)
    b.plot(steps, [r["pred_error"] for r in rows], marker="o", color="C1")
    b.set(xlabel="env steps", ylabel="open-loop prediction error")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_scalars(rows: list[dict], logdir: Path) -> None:
    """adapt/return, adapt/pred_error (and adapt/recovered_fraction) against env steps, for TensorBoard."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(logdir)) as w:
        for r in rows:
            for k in ("return", "pred_error", "recovered_fraction"):
                if k in r and np.isfinite(r[k]):
                    w.add_scalar(f"adapt/{k}", r[k], r["env_steps"])
