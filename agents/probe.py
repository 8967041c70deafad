"""The memory-probe protocol (after S4WM, Deng et al. 2023): offline world-model evaluation.

1. Generate (and cache) episodes of a memory task under its scripted policy: a train and a held-out
   test split with disjoint seeds, each episode cut to C + Q steps.
2. Train the world model (shared encoder, decoder and heads around the chosen backbone) offline on
   the train split with the usual world-model loss.
3. On the test split, observe the first C steps (posterior), then imagine the next Q steps from the
   prior under the recorded actions, and compare with the truth:
   - generation MSE per imagined step: squared error summed over the 3 x 64 x 64 pixels in [0, 1]
     (the units of S4WM's tables), and its mean over the Q steps;
   - reconstruction MSE over the C observed steps (same units);
   - reward-prediction accuracy during observation and during imagination: a prediction is right when
     it is within 0.5 of the true reward; counted at the reward events (steps with a non-zero reward,
     and each sequence's last step, where a task such as Distracting Memory pays 1 or 0).
4. Write metrics.json, TensorBoard scalars and an imagination video (truth | model | error) per run;
   a suite writes a markdown table (backbones x tasks) and PNG plots of generation error against the
   imagination step.
"""
from __future__ import annotations

import dataclasses

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor
from tqdm import tqdm

from agents.config import ConfigError, _build, compose
from worldmodels.base import index_state
from worldmodels.model import BACKBONES, LossConfig, ObsSpec, WorldModel
from worldmodels.nets import NetsConfig

DATA_VERSION = 1  # bump when the episode layout changes: cached datasets are keyed by it


@dataclass(frozen=True)
class TaskConfig:
    name: str
    id: str  # gymnasium id (registered by `import envs`)
    kwargs: dict
    context: int | None  # C observed steps (None: the task's probe_split)
    query: int | None  # Q imagined steps
    train_episodes: int
    test_episodes: int


@dataclass(frozen=True)
class ProbeConfig:
    suite: str | None
    backbones: str | None
    seed: int
    device: str
    out: str
    updates: int
    batch_size: int
    lr: float
    eval_batch: int
    videos: int
    log_every: int
    progress: bool
    sweep_lengths: list
    sweep_steps: int
    sweep_episodes: int
    sweep_extra: list


def build(raw) -> tuple[ProbeConfig, TaskConfig, str, object, NetsConfig, LossConfig]:
    from omegaconf import OmegaConf

    top = {k: v for k, v in raw.items() if k not in ("world_model", "size", "task", "loss")}
    probe = _build(ProbeConfig, OmegaConf.create(top), "")
    task = _build(TaskConfig, raw.task, "task")
    if probe.updates < 0 or probe.batch_size < 1 or probe.eval_batch < 1:
        raise ConfigError("updates must be >= 0, batch_size >= 1 and eval_batch >= 1")
    if task.train_episodes < 1 or task.test_episodes < 1:
        raise ConfigError("task.train_episodes and task.test_episodes must be >= 1")
    wm = OmegaConf.to_container(raw.world_model, resolve=True)
    name = wm.pop("name")
    if name not in BACKBONES:
        raise ConfigError(f"unknown world_model '{name}' (choose one of {', '.join(BACKBONES)})")
    nets = _build(NetsConfig, raw.size, "size")
    core = _build(BACKBONES[name][1], {**wm, "size": nets.name}, "world_model")
    return probe, task, name, core, nets, _build(LossConfig, raw.loss, "loss")


# ----------------------------------------------------------------------------------------- data


def _make_task_env(task: TaskConfig):
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
    """Scripted episodes cut to `length` steps, as sequence rows: obs x_t (uint8, 3 x 64 x 64), the
    action that led to it (one-hot, zeros at the start), the reward on arrival, is_first, is_terminal.
    An episode that ends before `length` steps is replaced by the next seed's."""
    env = _make_task_env(task)
    A = env.action_space.n
    obs = torch.zeros(episodes, length, 3, 64, 64, dtype=torch.uint8)
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
    data = generate(task, n, seed, length, progress)
    data.memmap_(path)
    (path / "done").write_text(key)
    return data


# ------------------------------------------------------------------------------------- training


KEYS = ("obs", "action", "reward", "is_first", "is_terminal")


def _batch(data: TensorDict, idx: Tensor, dev: torch.device) -> dict[str, Tensor]:
    return {k: data[k][idx].to(dev) for k in KEYS}


def train_offline(wm: WorldModel, data: TensorDict, probe: ProbeConfig, writer, dev: torch.device) -> float:
    opt = torch.optim.Adam(wm.parameters(), lr=probe.lr, eps=1e-8)
    g = torch.Generator().manual_seed(probe.seed)
    sums: dict[str, float] = {}
    tic = time.time()
    bar = tqdm(range(probe.updates), desc="train world model", disable=not probe.progress, dynamic_ncols=True)
    for u in bar:
        b = _batch(data, torch.randint(data.shape[0], (probe.batch_size,), generator=g), dev)
        total, terms, *_ = wm.loss(b["obs"], b["action"], b["reward"], b["is_first"], b["is_terminal"])
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(wm.parameters(), 1000.0)
        opt.step()
        for k, v in {"total": total, **terms}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        if (u + 1) % probe.log_every == 0 or u + 1 == probe.updates:
            n = probe.log_every if (u + 1) % probe.log_every == 0 else (u + 1) % probe.log_every
            for k, v in sums.items():
                writer.add_scalar(f"loss/{k}", v / n, u + 1)
            bar.set_postfix(loss=f"{sums['total'] / n:.1f}", refresh=False)
            sums.clear()
    return time.time() - tic


# ----------------------------------------------------------------------------------- evaluation


def _pixel_mse(pred: Tensor, obs: Tensor) -> Tensor:
    """Squared error summed over pixels in [0, 1]: pred is the decoder output (centred), obs uint8."""
    return ((pred + 0.5).clamp(0, 1) - obs.float() / 255.0).pow(2).sum((-1, -2, -3))


def _decode(wm: WorldModel, feat: Tensor, chunk: int = 64) -> Tensor:
    return torch.cat([wm.decoder(feat[:, t:t + chunk]) for t in range(0, feat.shape[1], chunk)], 1)


@torch.no_grad()
def imagine_from_context(wm: WorldModel, b: dict[str, Tensor], C: int, Q: int) -> tuple[Tensor, Tensor]:
    """Posterior features over the first C steps and prior features for the next Q, imagined under
    the recorded actions: (N, C, F) and (N, Q, F)."""
    N = b["obs"].shape[0]
    states, feat, _ = wm.core.observe(wm.core.initial(N), wm.encoder(b["obs"][:, :C]), b["action"][:, :C],
                                      b["is_first"][:, :C])
    future = b["action"][:, C:C + Q]  # the action into each imagined frame
    step = iter(range(Q))

    def replay_actions(_feat: Tensor) -> Tensor:
        i = next(step, None)
        return future[:, i] if i is not None else torch.zeros_like(future[:, 0])

    img, _ = wm.core.imagine(index_state(states, -1), replay_actions, Q)
    return feat, img[:, 1:]


@torch.no_grad()
def evaluate(wm: WorldModel, data: TensorDict, C: int, Q: int, probe: ProbeConfig, dev: torch.device):
    """Metrics over the test split, and the frames (truth, model) of the first `videos` episodes."""
    gen, recon = [], []
    hits = {"observe": [0, 0], "imagine": [0, 0]}  # [right, counted] at reward events
    step_hits = {"observe": [0, 0], "imagine": [0, 0]}  # over every step
    video = None
    for start in range(0, data.shape[0], probe.eval_batch):
        b = _batch(data, torch.arange(start, min(start + probe.eval_batch, data.shape[0])), dev)
        feat, img = imagine_from_context(wm, b, C, Q)
        pred_obs, pred_img = _decode(wm, feat), _decode(wm, img)
        recon.append(_pixel_mse(pred_obs, b["obs"][:, :C]).cpu())
        gen.append(_pixel_mse(pred_img, b["obs"][:, C:C + Q]).cpu())
        T = C + Q
        event = b["reward"].abs() > 1e-6
        event[:, T - 1] = True
        for phase, f, sl in (("observe", feat, slice(0, C)), ("imagine", img, slice(C, T))):
            right = (wm.reward.mean(wm.reward(f)) - b["reward"][:, sl]).abs() < 0.5
            hits[phase][0] += int(right[event[:, sl]].sum())
            hits[phase][1] += int(event[:, sl].sum())
            step_hits[phase][0] += int(right.sum())
            step_hits[phase][1] += right.numel()
        if video is None and probe.videos:
            n = min(probe.videos, b["obs"].shape[0])
            model = wm.decoder.mean(torch.cat([pred_obs[:n], pred_img[:n]], 1))
            video = (b["obs"][:n, :T].cpu(), model.cpu())
    gen_t, recon_t = torch.cat(gen), torch.cat(recon)  # (N, Q), (N, C)
    acc = lambda h: h[0] / h[1] if h[1] else float("nan")  # noqa: E731
    metrics = {
        "gen_mse": float(gen_t.mean()), "gen_mse_per_step": gen_t.mean(0).tolist(),
        "recon_mse": float(recon_t.mean()),
        "reward_acc_observe": acc(hits["observe"]), "reward_acc_imagine": acc(hits["imagine"]),
        "reward_events_imagine": hits["imagine"][1],
        "reward_acc_observe_all_steps": acc(step_hits["observe"]), "reward_acc_imagine_all_steps": acc(step_hits["imagine"]),
    }
    return metrics, video


@torch.no_grad()
def _features(wm: WorldModel, data: TensorDict, dev: torch.device, chunk: int) -> Tensor:
    """Posterior features over whole episodes, (N, T, F) on the CPU."""
    out = []
    for start in range(0, data.shape[0], chunk):
        b = _batch(data, torch.arange(start, min(start + chunk, data.shape[0])), dev)
        N = b["obs"].shape[0]
        out.append(wm.core.observe(wm.core.initial(N), wm.encoder(b["obs"]), b["action"], b["is_first"])[1].cpu())
    return torch.cat(out)


def probe_states(wm: WorldModel, train: TensorDict, test: TensorDict, probe: ProbeConfig, dev: torch.device,
                 steps: int = 2000) -> dict[str, float]:
    """R2I's probing: an MLP trained on the frozen world model's features to read out what the task
    reports in info["probe"]. Binary targets (e.g. the maze's wall layout) give a per-cell accuracy,
    others (object positions) a mean squared error, both on the held-out episodes."""
    if "probe" not in train.keys():
        return {}
    f_train, f_test = _features(wm, train, dev, probe.eval_batch), _features(wm, test, dev, probe.eval_batch)
    g = torch.Generator().manual_seed(probe.seed)
    out = {}
    for name in train["probe"].keys():
        y_train, y_test = train["probe", name], test["probe", name]
        binary = bool(((y_train == 0) | (y_train == 1)).all())
        dims = int(np.prod(y_train.shape[2:]))
        net = torch.nn.Sequential(torch.nn.Linear(f_train.shape[-1], 512), torch.nn.LayerNorm(512), torch.nn.SiLU(),
                                  torch.nn.Linear(512, dims)).to(dev)
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        x_all, y_all = f_train.flatten(0, 1), y_train.flatten(0, 1).reshape(-1, dims)
        for _ in range(steps):
            idx = torch.randint(x_all.shape[0], (256,), generator=g)
            pred, y = net(x_all[idx].to(dev)), y_all[idx].to(dev)
            loss = F.binary_cross_entropy_with_logits(pred, y) if binary else (pred - y).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        with torch.no_grad():
            pred = torch.cat([net(x.to(dev)).cpu() for x in f_test.flatten(0, 1).split(4096)])
            y = y_test.flatten(0, 1).reshape(-1, dims)
            if binary:
                out[f"probe_{name}_acc"] = float(((pred > 0) == (y > 0.5)).float().mean())
            else:
                out[f"probe_{name}_mse"] = float((pred - y).pow(2).sum(-1).mean())
    return out


# ------------------------------------------------------------------------------------------ runs


def run_one(raw) -> dict:
    """One task x one backbone: data, offline training, evaluation, video. Returns the metrics."""
    from torch.utils.tensorboard import SummaryWriter

    from agents.video import add_gif, open_loop_grid, save_video

    probe, task, backbone, core_cfg, nets, loss = build(raw)
    dev = torch.device(probe.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu")
    out = Path(probe.out)
    env = _make_task_env(task)
    C, Q = split_of(task, env)
    A = env.action_space.n
    env.close()
    train_data = dataset(task, "train", C + Q, out / "data", probe.progress)
    test_data = dataset(task, "test", C + Q, out / "data", probe.progress)

    tag = "-".join(f"{k}{v}" for k, v in sorted(task.kwargs.items()))
    run_dir = out / f"{task.name}{'-' + tag if tag else ''}" / f"{backbone}-{nets.name}-seed{probe.seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(probe.seed)
    wm = WorldModel(backbone, core_cfg, nets, ObsSpec(pixels=True, action_dim=A, discrete=True), loss).to(dev)
    writer = SummaryWriter(str(run_dir / "tb"))
    train_s = train_offline(wm, train_data, probe, writer, dev)
    wm.eval()
    metrics, video = evaluate(wm, test_data, C, Q, probe, dev)
    metrics.update(probe_states(wm, train_data, test_data, probe, dev))
    for i, v in enumerate(metrics["gen_mse_per_step"]):
        writer.add_scalar("probe/gen_mse_per_step", v, i + 1)
    for k in ("gen_mse", "recon_mse", "reward_acc_observe", "reward_acc_imagine"):
        writer.add_scalar(f"probe/{k}", metrics[k], probe.updates)
    if video is not None:
        frames = open_loop_grid(*video)  # (T, n*64, 3*64, 3): truth | model | error
        every = max(1, frames.shape[0] // 300)  # long horizons: keep GIFs to ~300 frames
        add_gif(writer, "probe/imagination", frames[::every], probe.updates)
        metrics["video"] = str(save_video(run_dir / "videos" / "imagination", frames[::every], fps=10))
    writer.close()
    metrics.update(task=task.name, task_id=task.id, kwargs=task.kwargs, backbone=backbone, size=nets.name,
                   seed=probe.seed, context=C, query=Q, updates=probe.updates, train_episodes=task.train_episodes,
                   test_episodes=task.test_episodes, train_s=round(train_s, 1),
                   params=sum(p.numel() for p in wm.parameters()), dims=dataclasses.asdict(core_cfg), run_dir=str(run_dir))
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"[probe] {task.name} {task.kwargs} {backbone}: gen MSE {metrics['gen_mse']:.1f}, "
          f"recon MSE {metrics['recon_mse']:.1f}, reward acc observe {metrics['reward_acc_observe']:.3f} / "
          f"imagine {metrics['reward_acc_imagine']:.3f} ({train_s:.0f} s training)", flush=True)
    return metrics


def task_label(m: dict) -> str:
    tag = ",".join(f"{k}={v}" for k, v in sorted(m["kwargs"].items()))
    return f"{m['task']}({tag})" if tag else m["task"]


# ---------------------------------------------------------------------------------------- suites

# Each entry: overrides for one task. "memory" is sized for one GPU in about an hour over four
# backbones; "smoke" runs the same code on tiny data on a CPU in a few minutes.
SUITES = {
    "memory": [
        ["task=distracting_memory", "task.kwargs.length=100"],
        ["task=distracting_memory", "task.kwargs.length=200"],
        ["task=doors_keys", "task.kwargs.keys=3"],
        ["task=doors_keys", "task.kwargs.keys=5"],
        ["task=doors_keys", "task.kwargs.keys=7"],
        ["task=rooms", "task.kwargs.rooms=4"],
        ["task=teleport", "task.kwargs.rooms=4"],
    ],
    "smoke": [
        ["task=distracting_memory", "task.kwargs.length=6", "task.train_episodes=16", "task.test_episodes=4"],
        ["task=doors_keys", "task.kwargs.keys=3", "task.context=24", "task.query=8", "task.train_episodes=8",
         "task.test_episodes=4"],
        ["task=rooms", "task.kwargs.rooms=2", "task.train_episodes=8", "task.test_episodes=4"],
        ["task=teleport", "task.kwargs.rooms=2", "task.train_episodes=8", "task.test_episodes=4"],
    ],
}
SMOKE = ["updates=6", "batch_size=4", "eval_batch=4", "videos=2", "log_every=2"]


def run_suite(suite: str, overrides: list[str], backbones: list[str] | None = None) -> dict:
    if suite not in SUITES:
        raise ConfigError(f"unknown suite '{suite}' (choose one of {', '.join(SUITES)}, bsuite_memory)")
    base = [o for o in overrides if o.split("=", 1)[0] not in ("task", "world_model")]
    raw = compose(base, "probe")
    backbones = backbones or list(BACKBONES)
    for b in backbones:
        if b not in BACKBONES:
            raise ConfigError(f"unknown backbone '{b}' in backbones (choose from {', '.join(BACKBONES)})")
    entries = [list(e) for e in SUITES[suite]]
    if suite == "memory":
        import importlib.util

        if importlib.util.find_spec("memory_maze") is not None:
            entries.append(["task=memory_maze", "task.kwargs.size=9"])
    extra = SMOKE if suite == "smoke" else []
    results = []
    for entry in entries:
        for b in backbones:
            # the suite's own settings first, so that the command line can still change them
            keys = {o.split("=", 1)[0] for o in base}
            merged = [o for o in extra + entry if o.split("=", 1)[0] not in keys] + base + [f"world_model={b}"]
            results.append(run_one(compose(merged, "probe")))
    return write_report(suite, results, Path(raw.out))


def run_memory_sweep(overrides: list[str], backbones: list[str] | None = None) -> dict:
    """Online memory RL: train the agent on BSuite memory_len for each backbone and memory length,
    and report the success rate (eval episodes with a positive return) against the length."""
    from agents.cli import load_config
    from agents.train import train

    import importlib.util

    if importlib.util.find_spec("bsuite") is None:
        raise ConfigError("suite=bsuite_memory needs the bsuite package: pip install 'longdream[memory]'")
    raw = compose([o for o in overrides if o.split("=", 1)[0] not in ("task", "world_model")], "probe")
    probe = build(raw)[0]
    backbones = backbones or list(BACKBONES)
    out = Path(probe.out) / "bsuite_memory"
    rows = []
    for b in backbones:
        for L in probe.sweep_lengths:
            run = out / f"{b}-len{L}-seed{probe.seed}"
            seq = max(64, int(L) + 2)  # a training window must span the whole episode
            cfg, _ = load_config([
                "env=bsuite_memory_len", f"env.kwargs.memory_length={L}", f"world_model={b}", f"size={raw.size.name}",
                f"steps={probe.sweep_steps}", f"seed={probe.seed}", f"device={probe.device}", f"run_dir={run}",
                f"seq_len={seq}", f"eval_episodes={probe.sweep_episodes}", "eval_every=0", f"progress={probe.progress}",
                *[str(o) for o in probe.sweep_extra]])
            res = train(cfg)
            success = float(np.mean(np.asarray(res["eval_returns_after"]) > 0))
            rows.append({"backbone": b, "memory_length": int(L), "success": success, "env_steps": res["env_steps"],
                         "wall_s": round(res["wall_s"], 1), "run_dir": str(run)})
            print(f"[probe] bsuite memory_len={L} {b}: success {success:.2f}", flush=True)
    lengths = [int(L) for L in probe.sweep_lengths]
    lines = ["# BSuite memory_len: success rate against memory length", "",
             f"{probe.sweep_steps} env steps per run, {probe.sweep_episodes} eval episodes, size {raw.size.name}, "
             f"seed {probe.seed}", "", "| backbone | " + " | ".join(str(L) for L in lengths) + " |",
             "|---" * (len(lengths) + 1) + "|"]
    for b in backbones:
        cells = {r["memory_length"]: r["success"] for r in rows if r["backbone"] == b}
        lines.append(f"| {b} | " + " | ".join(f"{cells[L]:.2f}" for L in lengths) + " |")
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.md"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        for b in backbones:
            ax.plot(lengths, [next(r["success"] for r in rows if r["backbone"] == b and r["memory_length"] == L)
                              for L in lengths], marker="o", label=b)
        ax.set(xscale="log", xlabel="memory length", ylabel="success rate", ylim=(0, 1.05), title="BSuite memory_len")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "success.png", dpi=110)
        plt.close(fig)
        lines += ["", "![success](success.png)"]
    except ImportError:
        pass
    report.write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps({"runs": rows}, indent=1))
    print(f"report: {report}")
    return {"report": str(report), "runs": rows}


def _acc(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.3f}"


def write_report(suite: str, results: list[dict], out: Path) -> dict:
    tasks = list(dict.fromkeys(task_label(m) for m in results))
    backbones = list(dict.fromkeys(m["backbone"] for m in results))
    cell = {(task_label(m), m["backbone"]): m for m in results}

    def table(title: str, fmt) -> str:
        lines = [f"**{title}**", "", "| backbone | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
        for b in backbones:
            lines.append(f"| {b} | " + " | ".join(fmt(cell[t, b]) if (t, b) in cell else "-" for t in tasks) + " |")
        return "\n".join(lines)

    r0 = results[0]
    text = [f"# Memory-probe suite '{suite}'", "",
            f"Size {r0['size']}, {r0['updates']} offline updates, seed {r0['seed']}; context C / query Q per task: "
            + ", ".join(f"{task_label(m)} {m['context']}/{m['query']}" for m in results[::len(backbones)]) + ".", "",
            table("Generation MSE (imagined steps; sum over pixels in [0, 1]; lower is better)", lambda m: f"{m['gen_mse']:.1f}"),
            "", table("Reconstruction MSE (observed steps)", lambda m: f"{m['recon_mse']:.1f}"),
            "", table("Reward-prediction accuracy at reward events, imagination ('-': no reward event in the imagined steps)",
                      lambda m: _acc(m["reward_acc_imagine"])),
            "", table("Reward-prediction accuracy at reward events, observation ('-': no reward event in the context)",
                      lambda m: _acc(m["reward_acc_observe"])),
            ""]
    for key in sorted({k for m in results for k in m if k.startswith("probe_")}):
        what = "accuracy" if key.endswith("_acc") else "MSE"
        text += [table(f"Probe on frozen states: {key[6:].rsplit('_', 1)[0]} {what} (held-out episodes)",
                       lambda m, key=key: f"{m[key]:.3f}" if key in m else "-"), ""]
    out.mkdir(parents=True, exist_ok=True)
    plots = []
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        for t in tasks:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            for b in backbones:
                if (t, b) in cell:
                    curve = cell[t, b]["gen_mse_per_step"]
                    ax.plot(range(1, len(curve) + 1), curve, label=b)
            ax.set(xlabel="imagination step", ylabel="generation MSE", title=t)
            ax.legend()
            fig.tight_layout()
            name = "gen_mse_" + "".join(c if c.isalnum() else "_" for c in t).strip("_") + f"_{suite}.png"
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            plots.append(name)
            text.append(f"![{t}]({name})")
    except ImportError:
        text.append("(matplotlib is not installed: no plots)")
    report = out / f"report_{suite}.md"
    report.write_text("\n".join(text) + "\n")
    (out / f"report_{suite}.json").write_text(json.dumps({"suite": suite, "runs": results}, indent=1))
    print(f"report: {report}")
    return {"report": str(report), "plots": [str(out / p) for p in plots], "runs": results}


def main(overrides: list[str]) -> dict:
    """`suite=` and `backbones=a,b` are read here (a comma list would be a sweep to Hydra)."""
    opts = {o.split("=", 1)[0]: o.split("=", 1)[1] for o in overrides if o.startswith(("suite=", "backbones="))}
    rest = [o for o in overrides if not o.startswith(("suite=", "backbones="))]
    if opts.get("suite"):
        backbones = opts["backbones"].split(",") if opts.get("backbones") else None
        if opts["suite"] == "bsuite_memory":
            return run_memory_sweep(rest, backbones)
        return run_suite(opts["suite"], rest, backbones)
    if opts.get("backbones"):
        raise ConfigError("backbones= is for suites; pick one backbone with world_model=<name>")
    return {"runs": [run_one(compose(rest, "probe"))]}

