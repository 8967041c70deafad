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
4. Write metrics.json, the trained weights (world_model.pt), TensorBoard scalars and an imagination video (truth | model | error) per run;
   a suite writes a markdown table (backbones x tasks) and PNG plots of generation error against the
   imagination step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tensordict import TensorDict
from torch import Tensor
from tqdm import tqdm

from agents.config import ConfigError, _build, build_model
from agents.machine import commit, machine
from agents.probe.data import TaskConfig, dataset, make_task_env, split_of
from worldmodels.base import index_state
from worldmodels.model import LossConfig, ObsSpec, WorldModel
from worldmodels.nets import NetsConfig


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
    eval_every: int
    progress: bool
    report_only: bool
    workers: int
    sweep_lengths: list
    sweep_steps: int
    sweep_train_episodes: int
    sweep_updates_per_episode: float
    sweep_reward_by_length: bool
    sweep_episodes: int
    sweep_cover: bool
    sweep_cover_batch: int
    sweep_extra: list


def build(raw) -> tuple[ProbeConfig, TaskConfig, str, object, NetsConfig, LossConfig]:
    from omegaconf import OmegaConf

    top = {k: v for k, v in raw.items() if k not in ("world_model", "size", "task", "loss")}
    probe = _build(ProbeConfig, OmegaConf.create(top), "")
    task = _build(TaskConfig, raw.task, "task")
    if probe.updates < 0 or probe.batch_size < 1 or probe.eval_batch < 1:
        raise ConfigError("updates must be >= 0, batch_size >= 1 and eval_batch >= 1")
    if probe.workers < 1:
        raise ConfigError(f"workers must be at least 1, got {probe.workers}")
    if probe.sweep_cover_batch and not probe.sweep_cover:
        raise ConfigError("sweep_cover_batch sets the windows of sweep_cover: add sweep_cover=true (or drop sweep_cover_batch)")
    if task.train_episodes < 1 or task.test_episodes < 1:
        raise ConfigError("task.train_episodes and task.test_episodes must be >= 1")
    name, core, nets = build_model(raw)
    return probe, task, name, core, nets, _build(LossConfig, raw.loss, "loss")


KEYS = ("obs", "action", "reward", "is_first", "is_terminal")
CURVE_KEYS = ("gen_mse", "recon_mse", "reward_acc_imagine", "reward_acc_posterior")  # logged along training


def _batch(data: TensorDict, idx: Tensor, dev: torch.device) -> dict[str, Tensor]:
    return {k: data[k][idx].to(dev) for k in KEYS}


def train_offline(wm: WorldModel, data: TensorDict, probe: ProbeConfig, writer, dev: torch.device,
                  check=None) -> tuple[float, list[dict]]:
    """Offline world-model updates on random whole sequences of `data`. Every `probe.eval_every` updates
    `check()` (an evaluation on held-out episodes) runs and its metrics join the returned learning curve;
    its time is not counted in the training seconds returned."""
    opt = torch.optim.Adam(wm.parameters(), lr=probe.lr, eps=1e-8)
    g = torch.Generator().manual_seed(probe.seed)
    sums: dict[str, float] = {}
    curve: list[dict] = []
    spent = 0.0  # seconds spent in check(), taken out of the training time
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
        if check is not None and probe.eval_every and (u + 1) % probe.eval_every == 0 and u + 1 < probe.updates:
            t0 = time.time()
            wm.eval()
            with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):  # training's RNG stream stays as without checks
                point = {"updates": u + 1, **check()}
            wm.train()
            curve.append(point)
            for k in CURVE_KEYS:
                writer.add_scalar(f"probe/{k}", point[k], u + 1)
            spent += time.time() - t0
    return time.time() - tic - spent, curve


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
    return feat, wm.imagine_actions(index_state(states, -1), b["action"][:, C:C + Q])  # action t leads into frame t


@torch.no_grad()
def evaluate(wm: WorldModel, data: TensorDict, C: int, Q: int, probe: ProbeConfig, dev: torch.device):
    """Metrics over the test split, and the frames (truth, model) of the first `videos` episodes."""
    gen, recon = [], []
    hits = {"observe": [0, 0], "imagine": [0, 0], "posterior": [0, 0]}  # [right, counted] at reward events
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
        # the same query steps seen through the posterior (observing every frame): a model that predicts
        # rewards here but not while imagining holds the memory but cannot carry it through its prior
        N = b["obs"].shape[0]
        post = wm.core.observe(wm.core.initial(N), wm.encoder(b["obs"][:, :T]), b["action"][:, :T], b["is_first"][:, :T])[1]
        right = (wm.reward.mean(wm.reward(post[:, C:T])) - b["reward"][:, C:T]).abs() < 0.5
        hits["posterior"][0] += int(right[event[:, C:T]].sum())
        hits["posterior"][1] += int(event[:, C:T].sum())
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
        "reward_acc_posterior": acc(hits["posterior"]),
        "reward_events_imagine": hits["imagine"][1],
        "reward_acc_observe_all_steps": acc(step_hits["observe"]), "reward_acc_imagine_all_steps": acc(step_hits["imagine"]),
    }
    return metrics, video


@torch.no_grad()
def baseline_gen_mse(data: TensorDict, C: int, Q: int, chunk: int = 16) -> dict[str, float]:
    """Generation MSE, in the units of `evaluate`, of two predictors that learn nothing, on the same
    held-out query steps: the last observed frame held for all Q steps ("last_frame") and the per-pixel
    mean of the C observed frames ("context_mean", a blur of what was seen). A model whose error is at or
    above these has learnt little of the scene beyond its average."""
    sums = {"last_frame": 0.0, "context_mean": 0.0}
    n = data.shape[0]
    for start in range(0, n, chunk):
        obs = data["obs"][start:start + chunk, :C + Q].float() / 255.0
        truth = obs[:, C:]
        for name, pred in (("last_frame", obs[:, C - 1:C]), ("context_mean", obs[:, :C].mean(1, keepdim=True))):
            sums[name] += float((pred - truth).pow(2).sum((-1, -2, -3)).mean(1).sum())
    return {k: v / n for k, v in sums.items()}


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


VOLATILE = ("progress", "out", "suite", "backbones", "videos", "log_every", "eval_every", "device", "report_only",
            "workers")  # keys that do not change a result


def settings_key(raw) -> str:
    """A digest of everything that shapes a run's result (not where it is written or how it is shown)."""
    from omegaconf import OmegaConf

    values = {k: v for k, v in OmegaConf.to_container(raw, resolve=True).items()
              if k not in VOLATILE and not k.startswith("sweep_")}  # sweep_*: the online BSuite sweep's settings
    return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_dir_of(raw) -> Path:
    probe, task, backbone, _, nets, _ = build(raw)
    tag = "-".join(f"{k}{v}" for k, v in sorted(task.kwargs.items()))
    return Path(probe.out) / f"{task.name}{'-' + tag if tag else ''}" / f"{backbone}-{nets.name}-seed{probe.seed}"


def finished(raw) -> dict | None:
    """The metrics of a run with these settings that is already done, if any (suites resume)."""
    path = run_dir_of(raw) / "metrics.json"
    if path.exists():
        metrics = json.loads(path.read_text())
        if metrics.get("settings") == settings_key(raw):
            return metrics
    return None


def task_data(raw) -> tuple[int, int, int, tuple, TensorDict, TensorDict]:
    """The task's context and query lengths, action count, image shape (H, W, C) and its train and test
    episodes (generated once, then read from the cache under out/data)."""
    probe, task = build(raw)[:2]
    env = make_task_env(task)
    C, Q = split_of(task, env)
    A = env.action_space.n
    image = tuple(env.observation_space.shape)
    env.close()
    cache = Path(probe.out) / "data"
    return (C, Q, A, image, dataset(task, "train", C + Q, cache, probe.progress),
            dataset(task, "test", C + Q, cache, probe.progress))


def run_one(raw) -> dict:
    """One task x one backbone: data, offline training, evaluation, video. Returns the metrics."""
    from torch.utils.tensorboard import SummaryWriter

    from agents.video import add_gif, open_loop_grid, save_video

    probe, task, backbone, core_cfg, nets, loss = build(raw)
    started = time.time()
    dev = torch.device(probe.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible; use device=cpu")
    C, Q, A, image, train_data, test_data = task_data(raw)

    run_dir = run_dir_of(raw)
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(probe.seed)
    wm = WorldModel(backbone, core_cfg, nets, ObsSpec(pixels=True, action_dim=A, discrete=True, image=image), loss).to(dev)
    writer = SummaryWriter(str(run_dir / "tb"))
    check = lambda: evaluate(wm, test_data, C, Q, dataclasses.replace(probe, videos=0), dev)[0]  # noqa: E731
    train_s, curve = train_offline(wm, train_data, probe, writer, dev, check)
    wm.eval()
    metrics, video = evaluate(wm, test_data, C, Q, probe, dev)
    curve.append({"updates": probe.updates, **metrics})
    metrics["curve"] = [{k: p[k] for k in ("updates", *CURVE_KEYS)} for p in curve]
    metrics.update(probe_states(wm, train_data, test_data, probe, dev))
    for i, v in enumerate(metrics["gen_mse_per_step"]):
        writer.add_scalar("probe/gen_mse_per_step", v, i + 1)
    for k in (*CURVE_KEYS, "reward_acc_observe"):
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
                   params=sum(p.numel() for p in wm.parameters()), dims=dataclasses.asdict(core_cfg), run_dir=str(run_dir),
                   image=list(image), batch_size=probe.batch_size, lr=probe.lr, loss=dataclasses.asdict(loss),
                   nets=dataclasses.asdict(nets),
                   run_s=round(time.time() - started, 1), settings=settings_key(raw), threads=torch.get_num_threads(),
                   machine=machine(probe.device), date=time.strftime("%Y-%m-%d"), commit=commit())
    torch.save(wm.state_dict(), run_dir / "world_model.pt")  # the trained weights, for later diagnostics
    metrics["weights"] = "world_model.pt"
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    print(f"[probe] {task.name} {task.kwargs} {backbone}: gen MSE {metrics['gen_mse']:.1f}, "
          f"recon MSE {metrics['recon_mse']:.1f}, reward acc observe {metrics['reward_acc_observe']:.3f} / posterior "
          f"{metrics['reward_acc_posterior']:.3f} / "
          f"imagine {metrics['reward_acc_imagine']:.3f} ({train_s:.0f} s training)", flush=True)
    return metrics
