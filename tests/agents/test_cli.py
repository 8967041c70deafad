"""End-to-end: the real CLI on tiny settings (xs size, a few hundred steps)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from agents.cli import main
from agents.replay import Replay
from worldmodels.model import BACKBONES

FAST = ["size=xs", "prefill=100", "train_ratio=16", "batch_size=4", "seq_len=8", "log_every=50",
        "eval_episodes=1", "eval_every=0", "progress=false", "collect_every=8"]

EXPECTED_SCALARS = {
    "loss/dec", "loss/reward", "loss/cont", "loss/dyn", "loss/rep", "loss/actor", "loss/critic",
    "train/kl", "train/actor_entropy", "train/return_scale", "train/grad_norm_wm", "train/grad_norm_actor",
    "train/nonfinite_updates", "episode/return", "episode/length", "eval/return", "eval/wall_s", "fps/env", "fps/train",
}


def tags(run_dir):
    ea = EventAccumulator(str(Path(run_dir) / "tb"), size_guidance={"images": 0, "scalars": 0})
    ea.Reload()
    return ea


@pytest.fixture(scope="module")
def vector_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "pendulum"
    code = main(["train", "env=pendulum", "env.time_limit=50", "steps=300", f"run_dir={run}", *FAST])
    assert code == 0
    return run


@pytest.mark.slow
def test_train_vector_smoke(vector_run):
    ea = tags(vector_run)
    missing = EXPECTED_SCALARS - set(ea.Tags()["scalars"])
    assert not missing, missing
    assert "config/text_summary" in ea.Tags()["tensors"]
    ckpt = (vector_run / "checkpoints" / "latest").read_text()
    payload = torch.load(vector_run / "checkpoints" / ckpt / "agent.pt", weights_only=False)
    assert payload["counters"]["env_steps"] >= 300 and payload["counters"]["updates"] > 0
    assert (vector_run / "config.yaml").exists()


@pytest.mark.slow
def test_train_dmc_pixels_smoke(tmp_path):
    run = tmp_path / "pix"
    code = main(["train", "env=dmc/cartpole_swingup_pixels", "env.time_limit=20", "steps=120", "video_every=60",
                 f"run_dir={run}", *FAST])
    assert code == 0
    ea = tags(run)
    assert "report/open_loop" in ea.Tags()["images"]
    assert {"loss/dec", "eval/return", "episode/return"} <= set(ea.Tags()["scalars"])
    assert list((run / "videos").glob("open_loop-*.gif")) and list((run / "videos").glob("eval-*.gif"))
    assert (run / "checkpoints" / "latest").exists()


@pytest.mark.slow
def test_eval_cli_writes_video(vector_run, capsys):
    assert main(["eval", f"run_dir={vector_run}", "episodes=2"]) == 0
    out = capsys.readouterr().out
    assert "eval over 2 greedy episodes" in out
    assert list((vector_run / "videos").glob("eval-cli-*.gif"))
    assert main(["eval", f"run_dir={vector_run}", "episodes=1", "sample=true"]) == 0
    assert "eval over 1 sampled episodes" in capsys.readouterr().out
    err = one_line_error(capsys, ["eval", f"run_dir={vector_run}", "sample=yes"])
    assert "sample=yes" in err and "sample=true" in err


@pytest.mark.slow
def test_eval_cli_records_a_row_per_evaluation(vector_run, tmp_path, capsys):
    rec = tmp_path / "results" / "eval_x.json"
    assert main(["eval", f"run_dir={vector_run}", "episodes=2", f"record={rec}"]) == 0
    assert main(["eval", f"run_dir={vector_run}", "episodes=1", "sample=true", f"record={rec}"]) == 0
    assert main(["eval", f"run_dir={vector_run}", "episodes=2", f"record={rec}"]) == 0  # the same evaluation: replaced
    out = capsys.readouterr().out
    rows = json.loads(rec.read_text())["rows"]
    assert sorted((r["kind"], r["episodes"]) for r in rows) == [("greedy", 2), ("sampled", 1)]
    greedy = next(r for r in rows if r["kind"] == "greedy")
    assert len(greedy["returns"]) == 2 and greedy["mean"] == pytest.approx(sum(greedy["returns"]) / 2)
    assert f"mean {greedy['mean']:.1f}" in out  # the row holds what the command printed
    assert greedy["run"] == vector_run.name and greedy["checkpoint_env_steps"] > 0 and greedy["params"]["actor"] > 0
    assert not any(o.startswith(("run_dir=", "progress=")) for o in greedy["overrides"])
    md = rec.with_suffix(".md").read_text()
    assert md.count("| greedy |") == 1 and md.count("| sampled |") == 1
    err = one_line_error(capsys, ["eval", f"run_dir={vector_run}", "record=out.csv"])
    assert "record=out.csv" in err and ".json" in err
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    err = one_line_error(capsys, ["eval", f"run_dir={vector_run}", "episodes=1", f"record={bad}"])
    assert "not an eval record" in err


@pytest.mark.slow
def test_kill_and_resume_continues_with_replay(tmp_path, capsys):
    run = tmp_path / "killed"
    args = [sys.executable, "-m", "agents.cli", "train", "env=pendulum", "env.time_limit=50", "steps=100000",
            "checkpoint_every=1", f"run_dir={run}", *FAST]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = run / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline:
        if pointer.exists():
            payload = torch.load(run / "checkpoints" / pointer.read_text() / "agent.pt", weights_only=False)
            if payload["counters"]["updates"] > 0:
                break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = run / "checkpoints" / pointer.read_text()
    saved = torch.load(ckpt / "agent.pt", weights_only=False)["counters"]
    meta = Replay.read_meta(ckpt)
    assert saved["updates"] > 0 and meta["hi"][0] > 0 and saved["wall_s"] > 0
    # the run's wall time adds up over its segments: mark the stopped one's as 1000 s
    payload = torch.load(ckpt / "agent.pt", weights_only=False)
    payload["counters"]["wall_s"] = 1000.0
    torch.save(payload, ckpt / "agent.pt")
    target = saved["env_steps"] + 64
    tic = time.time()
    assert main(["train", f"run_dir={run}", f"steps={target}", "progress=false"]) == 0
    segment = time.time() - tic
    assert f"at env step {saved['env_steps']:,}: {meta['hi'][0]:,} replay rows" in capsys.readouterr().out
    final = torch.load(run / "checkpoints" / pointer.read_text() / "agent.pt", weights_only=False)["counters"]
    assert target <= final["env_steps"] < target + 16
    assert final["updates"] > saved["updates"]
    assert 1000.0 < final["wall_s"] < 1000.0 + segment
    last_eval = tags(run).Scalars("eval/wall_s")[-1]  # the final eval's time is the run's, both segments
    assert last_eval.step == final["env_steps"] and 1000.0 < last_eval.value < 1000.0 + segment
    new = Replay.read_meta(run / "checkpoints" / pointer.read_text())
    assert new["hi"][0] >= meta["hi"][0] + 32  # the old replay stream came back and grew (64 env steps, repeat 1)
    # every row the checkpoint recorded is still there, unchanged
    rp = Replay.open(run / "replay", run / "checkpoints" / pointer.read_text())
    assert rp.verify() == [] and rp.lo[0] == 0
    # a checkpoint written before runs counted their time: the total is unknown, and said so
    ckpt = run / "checkpoints" / pointer.read_text()
    payload = torch.load(ckpt / "agent.pt", weights_only=False)
    del payload["counters"]["wall_s"]
    torch.save(payload, ckpt / "agent.pt")
    capsys.readouterr()
    assert main(["train", f"run_dir={run}", f"steps={final['env_steps'] + 32}", "progress=false"]) == 0
    assert "s since the resume (the run's earlier time was not recorded)" in capsys.readouterr().out


def one_line_error(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("longdream: error:") and "\n" not in err, err
    return err


def test_bad_env_id(capsys, tmp_path):
    err = one_line_error(capsys, ["train", "env.id=NoSuchEnv-v0", f"run_dir={tmp_path}/a"])
    assert "NoSuchEnv-v0" in err and "longdream envs" in err
    err = one_line_error(capsys, ["train", "env.id=dmc:walker-fly", f"run_dir={tmp_path}/b"])
    assert "walker-fly" in err


def test_bad_config_key(capsys):
    assert "'learning_rate'" in one_line_error(capsys, ["train", "learning_rate=3"])
    assert "'agent.horizn'" in one_line_error(capsys, ["train", "agent.horizn=3"])
    assert "pendulum" in one_line_error(capsys, ["train", "env=pendulm"])
    assert "action_embed must be one of joint, separate" in one_line_error(capsys, ["train", "size.action_embed=sum"])


def test_threads_option(capsys, monkeypatch):
    """`threads=N` sets torch's threads for any command and does not reach the command's own keys."""
    from agents.cli import set_threads

    before = torch.get_num_threads()
    try:
        assert set_threads(["env=pendulum", "threads=1", "steps=3"]) == ["env=pendulum", "steps=3"]
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
        set_threads([])  # default: the cores this process may use
        assert torch.get_num_threads() == 3
        torch.set_num_threads(1)
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        set_threads([])  # the environment's own setting stands
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    for bad in ("0", "two"):
        assert "threads" in one_line_error(capsys, ["train", f"threads={bad}"])


@pytest.mark.slow
def test_resume_with_other_config_is_an_error(vector_run, capsys):
    err = one_line_error(capsys, ["train", f"run_dir={vector_run}", "agent.horizon=5"])
    assert "agent.horizon" in err


@pytest.mark.slow
def test_corrupt_checkpoint_is_an_error(vector_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "corrupt"
    shutil.copytree(vector_run, run)
    agent_pt = run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "agent.pt"
    data = agent_pt.read_bytes()
    agent_pt.write_bytes(data[: len(data) // 3])
    err = one_line_error(capsys, ["train", f"run_dir={run}", "steps=400"])
    assert "corrupt or truncated" in err


@pytest.mark.slow
def test_train_with_two_env_processes(tmp_path):
    run = tmp_path / "multi"
    code = main(["train", "env=cartpole", "envs=2", "steps=200", f"run_dir={run}", *FAST])
    assert code == 0
    meta = Replay.read_meta(run / "checkpoints" / (run / "checkpoints" / "latest").read_text())
    assert len(meta["hi"]) == 2 and min(meta["hi"]) >= 100  # both processes' frames reached their streams


@pytest.mark.slow
@pytest.mark.parametrize("backbone", sorted(set(BACKBONES) - {"rssm"}))
def test_train_smoke_every_backbone(tmp_path, backbone):
    run = tmp_path / backbone
    assert main(["train", "env=cartpole", f"world_model={backbone}", "steps=150", f"run_dir={run}", *FAST]) == 0
    assert "loss/dyn" in tags(run).Tags()["scalars"]


@pytest.mark.slow
def test_train_recipe_dv3_smoke(tmp_path):
    """DreamerV3's current recipe end to end: LaProp, the replay value loss, sampled evaluation."""
    run = tmp_path / "dv3"
    assert main(["train", "env=cartpole", "recipe=dv3", "steps=150", f"run_dir={run}", *FAST]) == 0
    assert "loss/repval" in tags(run).Tags()["scalars"]
    saved = (run / "config.yaml").read_text()
    assert "optimizer: laprop" in saved and "repval: 0.3" in saved


def test_config_backbone_and_core_must_agree():
    import dataclasses

    from agents.config import ConfigError, load_config
    from worldmodels.s5wm import S5WMConfig

    cfg, _ = load_config(["world_model=rssm"])
    with pytest.raises(ConfigError, match="must agree"):
        dataclasses.replace(cfg, core=S5WMConfig())
    assert dataclasses.replace(cfg, backbone="s5wm", core=S5WMConfig()).backbone == "s5wm"


@pytest.mark.slow
def test_resume_tolerates_keys_added_since_the_run_was_made(vector_run, capsys):
    """A saved config without a key the project added later resumes (the key at its default); setting
    that key to something else on resume is still a mismatch."""
    from omegaconf import OmegaConf

    from agents.config import compose, config_mismatch

    saved = OmegaConf.load(Path(vector_run) / "config.yaml")
    baseline = compose(["env=pendulum"])
    old = OmegaConf.create({k: v for k, v in OmegaConf.to_container(saved).items()})
    del old.env["grayscale"]  # as if the run predated env.grayscale
    assert config_mismatch(old, saved, baseline) == []
    changed = OmegaConf.merge(saved, {"env": {"grayscale": True}})
    assert config_mismatch(old, changed, baseline) == ["env.grayscale"]


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator")
def test_freed_large_blocks_are_reused():
    """After keep_freed_memory, repeated forward/backward passes over a large batch (blocks of 10-40
    MiB, as in a learner update) nearly stop faulting in new pages once the heap has grown to their peak;
    with glibc's default (LONGDREAM_MALLOC=default) each pass maps and zeroes its blocks afresh."""
    code = ("import resource, torch\n"
            "from agents.machine import keep_freed_memory\n"
            "applied = keep_freed_memory()\n"
            "torch.set_num_threads(1)\n"
            "net = torch.nn.Sequential(torch.nn.Linear(64, 640), torch.nn.SiLU(), torch.nn.Linear(640, 255))\n"
            "x = torch.randn(16384, 64)\n"
            "step = lambda: net(x).log_softmax(-1).mean().backward()\n"
            "for _ in range(16):\n"
            "    step()\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
            "for _ in range(4):\n"
            "    step()\n"
            "print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n")

    def faults(**env):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, **env}, cwd=Path(__file__).resolve().parents[2])
        applied, n = out.stdout.split()
        return applied == "True", int(n)

    applied, tuned = faults()
    default_applied, default = faults(LONGDREAM_MALLOC="default")
    pages = 4 * 16384 * (640 + 255) * 4 // 4096  # the activations of four passes, in 4 KiB pages
    assert applied and not default_applied
    assert tuned < 0.2 * pages and default > 0.5 * pages and tuned < default / 5, (tuned, default, pages)


def test_eval_without_a_renderer_warns_and_still_evaluates(pendulum_run, capsys, monkeypatch):
    """A machine without the env's renderer (pygame for Pendulum) loses the eval video, not the run."""
    from agents import train

    monkeypatch.setitem(sys.modules, "pygame", None)  # `import pygame` now fails, as where it is not installed
    train._warn_once.cache_clear()
    assert main(["eval", f"run_dir={pendulum_run}", "episodes=1"]) == 0
    out = capsys.readouterr()
    assert "eval videos off: the env cannot render here" in out.out + out.err
    assert "eval over 1 greedy episodes" in out.out
