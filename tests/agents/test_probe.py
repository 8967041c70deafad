"""The memory-probe protocol: data generation and caching, metrics, and the CLI's smoke suite."""
import json

import pytest
import torch

from agents.cli import main
from agents.probe.data import TaskConfig, dataset, generate
from agents.probe.protocol import _pixel_mse, baseline_gen_mse
from worldmodels.model import BACKBONES

TASK = TaskConfig(name="distracting_memory", id="longdream/DistractingMemory-v0", kwargs={"length": 6},
                  context=None, query=None, train_episodes=3, test_episodes=2)


def test_generate_rows_and_determinism():
    a = generate(TASK, 3, seed=0, length=10)
    b = generate(TASK, 3, seed=0, length=10)
    assert a["obs"].shape == (3, 10, 3, 64, 64) and a["obs"].dtype == torch.uint8
    assert torch.equal(a["obs"], b["obs"]) and torch.equal(a["action"], b["action"])
    assert (a["is_first"][:, 0] == 1).all() and (a["is_first"][:, 1:] == 0).all()
    assert (a["action"][:, 0] == 0).all() and (a["action"][:, 1:].sum(-1) == 1).all()  # one-hot, none at start
    assert not torch.equal(a["obs"], generate(TASK, 3, seed=50, length=10)["obs"])


def test_dataset_is_cached(tmp_path):
    first = dataset(TASK, "train", 10, tmp_path, progress=False)
    again = dataset(TASK, "train", 10, tmp_path, progress=False)
    test = dataset(TASK, "test", 10, tmp_path, progress=False)
    assert torch.equal(first["obs"], again["obs"])
    assert len(list(tmp_path.iterdir())) == 2  # train and test, each written once
    assert not torch.equal(first["obs"][:2], test["obs"])  # held-out seeds


def test_dataset_cache_survives_a_partial_write_and_a_concurrent_writer(tmp_path, monkeypatch):
    """A split left half-written (no "done") is regenerated; a writer that finds the split already
    renamed into place by another process keeps that copy and leaves no temporary behind."""
    first = dataset(TASK, "train", 10, tmp_path, progress=False)
    (path,) = list(tmp_path.iterdir())
    (path / "done").unlink()  # as if the process had stopped while writing
    again = dataset(TASK, "train", 10, tmp_path, progress=False)
    assert torch.equal(first["obs"], again["obs"]) and (path / "done").exists()

    import agents.probe.data as data_mod

    real = data_mod.generate
    other = tmp_path / "other"

    def racing(*args, **kw):  # another process puts the same split in place while this one generates
        out = real(*args, **kw)
        out.clone().memmap_(other / path.name)
        (other / path.name / "done").write_text("x")
        return out

    other.mkdir()
    monkeypatch.setattr(data_mod, "generate", racing)
    got = dataset(TASK, "train", 10, other, progress=False)
    assert torch.equal(got["obs"], first["obs"])
    assert [p.name for p in other.iterdir()] == [path.name]  # no temporary left behind


def test_pixel_mse_units():
    obs = torch.randint(0, 256, (2, 3, 3, 64, 64), dtype=torch.uint8)
    perfect = obs.float() / 255 - 0.5
    assert torch.allclose(_pixel_mse(perfect, obs), torch.zeros(2, 3), atol=1e-9)
    black = torch.full_like(perfect, -0.5)
    torch.testing.assert_close(_pixel_mse(black, obs), (obs.float() / 255).pow(2).sum((-1, -2, -3)))


def test_baselines_hold_the_last_frame_and_blur_the_context():
    """Two episodes of one-pixel frames: the last observed frame held, and the mean of the observed ones,
    against the query frames (squared error summed over pixels, mean over the query steps and episodes);
    then random frames against a per-episode, per-step loop."""
    from tensordict import TensorDict

    frames = torch.tensor([[0, 255, 255, 0], [255, 255, 0, 0]], dtype=torch.uint8).view(2, 4, 1, 1, 1)
    got = baseline_gen_mse(TensorDict({"obs": frames}, batch_size=[2]), C=2, Q=2, chunk=1)
    # episode 0: last frame 1 against (1, 0) -> 0.5, mean 0.5 -> 0.25; episode 1: 1 against (0, 0) -> 1, mean 1 -> 1
    assert got == pytest.approx({"last_frame": 0.75, "context_mean": 0.625})
    obs = torch.randint(0, 256, (5, 9, 3, 4, 4), dtype=torch.uint8)
    C, Q = 4, 3
    got = baseline_gen_mse(TensorDict({"obs": obs}, batch_size=[5]), C, Q, chunk=2)
    x = obs.double() / 255
    last = sum(((x[n, C - 1] - x[n, t]) ** 2).sum() for n in range(5) for t in range(C, C + Q)) / (5 * Q)
    mean = sum(((x[n, :C].mean(0) - x[n, t]) ** 2).sum() for n in range(5) for t in range(C, C + Q)) / (5 * Q)
    assert got == pytest.approx({"last_frame": float(last), "context_mean": float(mean)}, rel=1e-5)


@pytest.mark.slow
def test_smoke_suite_writes_table_plots_and_videos(tmp_path):
    assert main(["probe", "suite=smoke", f"out={tmp_path}", "progress=false"]) == 0
    report = (tmp_path / "report_smoke.md").read_text()
    for name in BACKBONES:
        assert f"| {name} |" in report
    assert "Generation MSE" in report and "Reward-prediction accuracy" in report
    assert "| *last observed frame, held* |" in report and "| *mean of the observed frames* |" in report
    baselines = json.loads((tmp_path / "report_smoke.json").read_text())["baselines"]
    assert len(baselines) == 4 and all(v["last_frame"] >= 0 and v["context_mean"] >= 0 for v in baselines.values())
    plots = sorted(tmp_path.glob("gen_mse_*_smoke.png"))
    assert len(plots) == 4
    runs = json.loads((tmp_path / "report_smoke.json").read_text())["runs"]
    assert len(runs) == 4 * len(BACKBONES)
    for r in runs:
        assert len(r["gen_mse_per_step"]) == r["query"] and r["gen_mse"] >= 0
        assert 0 <= r["reward_acc_imagine"] <= 1
        assert (tmp_path / r["video"]).exists() or __import__("pathlib").Path(r["video"]).exists()
        weights = torch.load(tmp_path / r["run_dir"] / r["weights"], weights_only=True)
        assert sum(v.numel() for v in weights.values()) >= r["params"]  # the trained world model: parameters and buffers
    # report_only: the finished runs are reported, a missing one is listed, nothing is trained
    (tmp_path / r["run_dir"] / "metrics.json").unlink()
    assert main(["probe", "suite=smoke", f"out={tmp_path}", "report_only=true", "progress=false"]) == 0
    report = (tmp_path / "report_smoke.md").read_text()
    assert "Not finished yet** (1 runs" in report and f"world_model={r['backbone']}" in report
    assert not (tmp_path / r["run_dir"] / "metrics.json").exists()


@pytest.mark.slow
def test_suite_workers_give_the_runs_of_one_process_in_suite_order(tmp_path):
    """workers=2: the runs split over two spawned processes (one thread each) and come back in suite
    order with the metrics one process gives at one thread; a rerun reuses them all."""
    common = ["probe", "suite=smoke", "backbones=s5wm", "threads=1", "progress=false"]
    threads = torch.get_num_threads()
    try:
        assert main([*common, f"out={tmp_path / 'one'}"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main([*common, f"out={tmp_path / 'two'}", "workers=2"]) == 0
    one, two = (json.loads((tmp_path / x / "report_smoke.json").read_text())["runs"] for x in ("one", "two"))
    assert [r["task"] for r in two] == ["distracting_memory", "doors_keys", "rooms", "teleport"]
    assert [r["task"] for r in one] == [r["task"] for r in two]
    for a, b in zip(one, two):
        assert b["threads"] == 1
        for k in ("gen_mse", "recon_mse", "reward_acc_imagine", "gen_mse_per_step"):
            assert a[k] == b[k], (a["task"], k)
    assert len({r["run_s"] for r in two}) > 1  # each run timed in its own process
    # the report states the invocation's own wall time when it trained the whole suite
    inv = json.loads((tmp_path / "two" / "report_smoke.json").read_text())["invocation"]
    assert (inv["trained"], inv["reused"], inv["workers"], inv["threads"]) == (4, 0, 2, 1)
    assert max(r["run_s"] for r in two) < inv["wall_s"] < sum(r["run_s"] for r in two) + 60
    assert "Wall time of the invocation that trained the whole suite" in (tmp_path / "two" / "report_smoke.md").read_text()
    # a rerun reuses every run and keeps the wall time of the invocation that trained them
    assert main([*common, f"out={tmp_path / 'two'}", "workers=2"]) == 0
    again = json.loads((tmp_path / "two" / "report_smoke.json").read_text())
    assert again["runs"] == two and (again["invocation"]["trained"], again["invocation"]["reused"]) == (0, 4)
    assert again["whole_suite_invocation"] == inv
    assert "Wall time of the invocation that trained the whole suite" in (tmp_path / "two" / "report_smoke.md").read_text()


def test_report_only_without_finished_runs_is_a_one_line_error(tmp_path, capsys):
    assert main(["probe", "suite=smoke", f"out={tmp_path}", "report_only=true"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no finished run" in err[0]


def test_eval_every_records_a_curve_and_leaves_training_unchanged(tmp_path):
    """Held-out checks along training give a learning curve (metrics and TensorBoard), and they run on a
    forked RNG: the trained model and its final metrics equal those of a run without checks."""
    common = ["probe", "task=distracting_memory", "task.kwargs.length=6", "task.kwargs.obs_size=16",
              "task.train_episodes=8", "task.test_episodes=4", "updates=6", "batch_size=2", "eval_batch=4", "videos=0",
              "log_every=2", "world_model=s5wm", "progress=false"]
    assert main([*common, f"out={tmp_path / 'a'}", "eval_every=2"]) == 0
    assert main([*common, f"out={tmp_path / 'b'}"]) == 0
    a, b = (json.loads(next((tmp_path / x).rglob("metrics.json")).read_text()) for x in "ab")
    assert [p["updates"] for p in a["curve"]] == [2, 4, 6] and [p["updates"] for p in b["curve"]] == [6]
    assert a["curve"][-1]["gen_mse"] == a["gen_mse"]
    for k in ("gen_mse", "recon_mse", "reward_acc_imagine", "reward_acc_posterior"):
        assert a[k] == b[k], k


@pytest.mark.parametrize("args,needle", [
    (["suite=nope"], "unknown suite"),
    (["backbones=rssm"], "backbones= is for suites"),
    (["task=nope"], "no config 'task/nope'"),
    (["task.kwargs.length=0", "updates=0"], "length"),
    (["suite=smoke", "workers=0"], "workers must be at least 1"),
    (["suite=bsuite_memory", "sweep_cover_batch=16"], "add sweep_cover=true"),
])
def test_probe_errors_are_one_line(tmp_path, capsys, args, needle):
    assert main(["probe", f"out={tmp_path}", "progress=false", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err, err


@pytest.mark.slow
def test_bsuite_memory_sweep_reports_success_per_length(tmp_path, capsys):
    """Success per backbone and length (runs side by side with workers=2, rows in sweep order); a budget
    in episodes gives env steps of episodes x (L + 1) and the reward scale L + 1; a second invocation
    (one process) reuses every finished run."""
    pytest.importorskip("bsuite")
    extra = "['prefill=64','batch_size=2','train_ratio=16','collect_every=8','log_every=64','checkpoint_every=100000']"
    argv = ["probe", "suite=bsuite_memory", "backbones=rssm,s5wm", "sweep_lengths=[1,3]", "sweep_train_episodes=40",
            "sweep_reward_by_length=true", "sweep_episodes=4", f"sweep_extra={extra}", f"out={tmp_path}", "progress=false"]
    assert main([*argv, "workers=2"]) == 0  # the four runs in two processes
    out = tmp_path / "bsuite_memory"
    runs = json.loads((out / "bsuite_memory.json").read_text())["runs"]
    assert [(r["backbone"], r["memory_length"]) for r in runs] == [("rssm", 1), ("rssm", 3), ("s5wm", 1), ("s5wm", 3)]
    for r in runs:
        L = r["memory_length"]
        assert 0.0 <= r["success"] <= 1.0 and r["replay_context"] and r["params"] > 0
        assert r["steps"] == 40 * (L + 1) and r["env_steps"] >= r["steps"] and r["loss"]["reward"] == L + 1
        assert (out / f"{r['backbone']}-len{L}-seed0" / "tb").is_dir()
    assert "loss.reward=L+1" in (out / "bsuite_memory.md").read_text()
    capsys.readouterr()
    assert main(argv) == 0
    assert capsys.readouterr().out.count("done before, result reused") == 4
    assert json.loads((out / "bsuite_memory.json").read_text())["runs"] == runs
    # report_only: a length not run yet is listed and left out, nothing trains
    capsys.readouterr()
    longer = [a if not a.startswith("sweep_lengths=") else "sweep_lengths=[1,3,5]" for a in argv]
    assert main(longer + ["report_only=true"]) == 0
    assert "not finished yet, left out: rssm memory_len=5, s5wm memory_len=5" in capsys.readouterr().out
    assert not (out / "rssm-len5-seed0").exists()


def test_cover_windows_hold_a_whole_episode_and_the_batch_asked_for():
    """Windows of 2(L + 1) steps rounded up to 16 hold a whole episode wherever they start; by default the
    tokens per update stay about batch_size x seq_len, and sweep_cover_batch sets the windows per update
    (which the row's label then names, beside the updates per episode)."""
    from bench.memory import _label, cover_window

    assert cover_window(50, 16, 16) == ["batch_size=2", "seq_len=112"]
    assert cover_window(100, 16, 64) == ["batch_size=4", "seq_len=208"]
    assert cover_window(50, 16, 16, 16) == ["batch_size=16", "seq_len=112"]
    row = {"memory_length": 50, "steps": 400 * 51, "extra": "preset=control_cpu", "cover": True, "cover_batch": 16,
           "updates_per_episode": 10, "reward_by_length": True}
    assert _label(row) == "preset=control_cpu seq_len=2(L+1) batch_size=16 10 updates/episode loss.reward=L+1 400 episodes"
    assert "batch_size" not in _label({**row, "cover_batch": 0})


def test_settings_key_follows_what_shapes_a_run():
    """A suite reuses a finished run when nothing that shapes its result changed: where it is written, how
    it is shown and the online sweep's settings do not count; the updates, the task and the losses do."""
    from agents.config import compose
    from agents.probe.protocol import settings_key

    base = settings_key(compose([], "probe"))
    for same in (["out=/elsewhere"], ["progress=false"], ["eval_every=7"], ["sweep_steps=5"], ["sweep_train_episodes=9"]):
        assert settings_key(compose(same, "probe")) == base, same
    for other in (["updates=7"], ["task.kwargs.length=50"], ["loss.reward=3"], ["world_model=rssm"], ["lr=0.1"]):
        assert settings_key(compose(other, "probe")) != base, other


def test_report_lists_tasks_in_order_plots_curves_and_keeps_paths_relative(tmp_path):
    from agents.probe.report import write_report

    def run(length, backbone):
        return {"task": "distracting_memory", "kwargs": {"length": length}, "backbone": backbone, "size": "xs",
                "seed": 0, "context": 7, "query": length - 2, "updates": 100 * length, "batch_size": 8, "lr": 1e-3,
                "loss": {"reward": length}, "gen_mse": 1.0, "recon_mse": 1.0, "gen_mse_per_step": [1.0, 2.0],
                "reward_acc_imagine": 1.0, "reward_acc_observe": float("nan"), "train_s": 60.0, "params": 1e5,
                "video": str(tmp_path / f"dm{length}" / backbone / "imagination.gif"),
                "curve": [{"updates": 50, "reward_acc_imagine": 0.5}, {"updates": 100, "reward_acc_imagine": 1.0}]}

    write_report("t", [run(50, "rssm"), run(50, "s5wm"), run(100, "rssm")], tmp_path)
    text = (tmp_path / "report_t.md").read_text()
    assert text.index("(length=50) 7/48, 5000 updates") < text.index("(length=100) 7/98, 10000 updates")
    assert len(list(tmp_path.glob("reward_acc_*_t.png"))) == 2 and len(list(tmp_path.glob("gen_mse_*_t.png"))) == 2
    runs = json.loads((tmp_path / "report_t.json").read_text())["runs"]
    assert runs[0]["video"] == "dm50/rssm/imagination.gif"


def test_report_baseline_rows_and_the_wall_time_of_the_invocation_that_trained_the_runs(tmp_path):
    from agents.probe.report import write_report

    def run(backbone, train_s=60.0):
        return {"task": "rooms", "kwargs": {"rooms": 2}, "backbone": backbone, "size": "xs", "seed": 0, "context": 4,
                "query": 4, "updates": 10, "batch_size": 8, "gen_mse": 1.0, "recon_mse": 1.0,
                "gen_mse_per_step": [1.0], "reward_acc_imagine": 1.0, "reward_acc_observe": 1.0, "train_s": train_s,
                "params": 1e5, "settings": "abc"}

    runs = [run("rssm"), run("s5wm")]
    trained = {"trained": 2, "reused": 0, "wall_s": 7200.0, "workers": 2, "threads": 1}
    write_report("t", runs, tmp_path, invocation=trained,
                 baselines={"rooms(rooms=2)": {"last_frame": 230.94, "context_mean": 118.8}})
    text = (tmp_path / "report_t.md").read_text()
    assert "| *last observed frame, held* | 230.9 |" in text and "| *mean of the observed frames* | 118.8 |" in text
    line = "Wall time of the invocation that trained the whole suite: 2.00 h with 2 processes x 1 thread."
    assert line in text
    reused = {"trained": 0, "reused": 2, "wall_s": 3.0, "workers": 1, "threads": 2}
    write_report("t", runs[::-1], tmp_path, invocation=reused)  # the same runs, reported again
    assert line in (tmp_path / "report_t.md").read_text()
    assert json.loads((tmp_path / "report_t.json").read_text())["whole_suite_invocation"] == trained
    assert "mean of the observed frames" not in (tmp_path / "report_t.md").read_text()
    write_report("t", [runs[0], run("s5wm", train_s=61.0)], tmp_path, invocation=reused)  # one run retrained since
    assert "Wall time" not in (tmp_path / "report_t.md").read_text()
    assert "whole_suite_invocation" not in json.loads((tmp_path / "report_t.json").read_text())
