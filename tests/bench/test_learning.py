"""The learning benchmark's bookkeeping (no training): rows merge by their settings and the report
shows each row's overrides and eval episodes."""
import json

import pytest

from bench import learning


def row(backbone, seed, ret, extra=""):
    return {"backbone": backbone, "seed": seed, "env_steps": 20000, "updates": 10, "eval_return_mean": ret,
            "eval_return_std": 1.0, "eval_return_before": -1000.0, "wall_s": 60.0, "env": "pendulum",
            "steps": 20000, "preset": "pendulum_cpu", "extra": extra}


def test_merge_from_folds_results_files(tmp_path):
    out = tmp_path / "main"
    out.mkdir()
    (out / "learning_pendulum.json").write_text(json.dumps(
        {"args": {"episodes": 10}, "runs": [row("rssm", 0, -150.0), row("s5wm", 0, -900.0)]}))
    side = tmp_path / "side.json"  # a run made elsewhere: S5WM again with other latents, 5 eval episodes
    side.write_text(json.dumps({"args": {"episodes": 5}, "runs": [row("s5wm", 0, -500.0, "world_model.stoch=32")]}))
    again = tmp_path / "again.json"  # the same settings as an existing row replace it
    again.write_text(json.dumps({"args": {"episodes": 10}, "runs": [row("rssm", 0, -120.0)]}))
    data = learning.main([f"merge_from={side},{again}", f"out={out}"])
    runs = {(r["backbone"], r["extra"]): r for r in data["runs"]}
    assert len(data["runs"]) == 3
    assert runs[("rssm", "")]["eval_return_mean"] == -120.0
    assert runs[("s5wm", "world_model.stoch=32")]["episodes"] == 5
    text = (out / "learning_pendulum.md").read_text()
    assert "world_model.stoch=32" in text and "-500.0" in text and "-900.0" in text


def test_results_files_hold_no_local_paths(tmp_path):
    """Paths in results are made relative to the results folder or cut to their last component, and the
    committed results files hold none."""
    from bench.report import RESULTS, portable, write

    data = {"overrides": ["run_dir=/home/u/runs/learning-pendulum-rssm-seed0", "seed=0"],
            "merge_from": "/a/b/learning_pendulum.json,/c/learning_pendulum.json", "video": str(tmp_path / "t/v.gif"),
            "params": "0.27M/0.04M/0.05M"}
    got = json.loads(write("x", portable(data, tmp_path), "", str(tmp_path)).joinpath("x.json").read_text())
    assert got["overrides"] == ["run_dir=learning-pendulum-rssm-seed0", "seed=0"]
    assert got["merge_from"] == "learning_pendulum.json,learning_pendulum.json"
    assert got["video"] == "t/v.gif" and got["params"] == "0.27M/0.04M/0.05M"
    for f in RESULTS.glob("*.json"):
        assert portable(json.loads(f.read_text())) == json.loads(f.read_text()), f"{f.name} holds a local path"


@pytest.mark.slow
def test_several_tasks_resume_and_curves(tmp_path, capsys):
    """Two tasks in one invocation: a row each with its eval curve, a PNG per task, one results file;
    a second invocation finds both rows and trains nothing."""
    extra = ("prefill=64 batch_size=2 seq_len=8 train_ratio=16 collect_every=8 log_every=64 eval_every=100 "
             "eval_episodes=1 checkpoint_every=100000 env.time_limit=50")
    argv = ["tasks=pendulum,cartpole", "suite=toy", "backbones=rssm", "steps=200", "preset=quickstart", f"extra={extra}",
            "episodes=1", f"out={tmp_path}"]
    data = learning.main(argv)
    runs = data["runs"]
    assert [(r["env"], r["backbone"]) for r in runs] == [("pendulum", "rssm"), ("cartpole", "rssm")]
    assert all(len(r["curve"]) >= 2 and r["curve"][-1][0] >= 100 for r in runs)
    for r in runs:  # each evaluation's wall time since the run started, in the order they were logged
        seconds = [p[2] for p in r["curve"]]
        assert seconds == sorted(seconds) and 0 <= seconds[0] and seconds[-1] <= r["wall_s"]
    for task in ("pendulum", "cartpole"):
        assert (tmp_path / f"learning_toy_{task}.png").exists()
    assert "## pendulum" in (tmp_path / "learning_toy.md").read_text()
    capsys.readouterr()
    again = learning.main(argv)
    assert capsys.readouterr().out.count("in the results already") == 2
    assert [r["eval_return_mean"] for r in again["runs"]] == [r["eval_return_mean"] for r in runs]


def test_time_to_target_is_the_first_evaluation_at_or_above_it(tmp_path):
    curve = [[0, -1200.0, 1.0], [2000, -800.0, 50.0], [4000, -300.0, 95.5], [6000, -200.0, 140.0]]
    assert learning.time_to_target(curve, -300.0) == 95.5  # reaching the target exactly counts
    assert learning.time_to_target(curve, -250.0) == 140.0
    assert learning.time_to_target(curve, -100.0) is None  # never reached
    assert learning.time_to_target(curve, None) is None  # no target for this task
    assert learning.time_to_target([[0, -100.0, 1.0]], -300.0) is None  # the evaluation before training
    assert learning.time_to_target([[2000, -100.0]], -300.0) is None  # curves written before they had times
    out = tmp_path / "r"
    out.mkdir()
    side = tmp_path / "side.json"
    side.write_text(json.dumps({"args": {"episodes": 10}, "runs": [{**row("rssm", 0, -150.0), "time_to_target_s": 95.5},
                                                                   row("s5wm", 0, -150.0)]}))
    learning.main([f"merge_from={side}", f"out={out}"])
    text = (out / "learning_pendulum.md").read_text()
    assert "time to target" in text and "| 1.6 min |" in text


def test_curve_seconds_are_the_run_own_wall_time_across_resumes(tmp_path):
    """Where the log holds eval/wall_s (the run's time, its segments added) the curve's seconds are
    those, whenever the events were written; without it they are the events' times less `start`, and
    none for a resumed run (start None) or where the run's time is unknown (nan)."""
    from torch.utils.tensorboard import SummaryWriter

    old, new = tmp_path / "old", tmp_path / "new"
    with SummaryWriter(old) as w:
        for step, ret in [(0, -1000.0), (2000, -400.0), (4000, -250.0)]:
            w.add_scalar("eval/return", ret, step)
    with SummaryWriter(new) as w:
        for step, ret, sec in [(0, -1000.0, 0.0), (2000, -400.0, float("nan")), (4000, -250.0, 7200.0)]:
            w.add_scalar("eval/return", ret, step)
            w.add_scalar("eval/wall_s", sec, step)
    assert learning.eval_curve(new, 0.0) == [[0, -1000.0, 0.0], [2000, -400.0], [4000, -250.0, 7200.0]]
    assert learning.eval_curve(new, None) == learning.eval_curve(new, 0.0)  # the run's own clock: no start needed
    assert learning.time_to_target(learning.eval_curve(new, None), -300.0) == 7200.0
    assert [len(p) for p in learning.eval_curve(old, None)] == [2, 2, 2]
    timed = learning.eval_curve(old, 0.0)
    assert [p[:2] for p in timed] == [[0, -1000.0], [2000, -400.0], [4000, -250.0]] and all(p[2] > 1e9 for p in timed)


def test_several_tasks_need_a_suite_name():
    from agents.config import ConfigError

    with pytest.raises(ConfigError, match="several tasks need a suite"):
        learning.main(["tasks=pendulum,cartpole"])


def test_kept_run_is_a_run_directory_the_other_commands_read(tmp_path, capsys):
    """keep=true leaves the run as `longdream train` does (overrides.json included), so eval, dataset
    and adapt take it as run_dir."""
    from agents.cli import main

    extra = "prefill=64 batch_size=2 seq_len=8 train_ratio=16 collect_every=8 eval_every=0 eval_episodes=1 env.time_limit=40"
    learning.main(["env=pendulum", "backbones=rssm", "steps=120", "preset=quickstart", f"extra={extra}", "episodes=1",
                   "keep=true", f"out={tmp_path}"])
    run = next(tmp_path.glob("learning-pendulum-rssm-seed0*"))
    assert "run_dir=" not in (run / "overrides.json").read_text()
    capsys.readouterr()
    assert main(["eval", f"run_dir={run}", "episodes=1"]) == 0
    assert "eval over 1 greedy episodes" in capsys.readouterr().out


def test_curves_of_other_settings_never_pool():
    """One plotted line per backbone and settings, as the summary table groups seeds: runs at another
    train ratio (overrides) or without replay context are lines of their own."""
    dims = {"stoch": 32, "classes": 16}
    rows = [{**row("rssm", s, 0.0, extra), "replay_context": ctx, "dims": dims, "curve": [[0, float(s)], [10, 1.0]]}
            for s, extra, ctx in [(0, "", True), (1, "", True), (0, "train_ratio=64", True), (0, "", False)]]
    rows.append({**row("s5wm", 0, 0.0), "replay_context": True, "dims": dims, "curve": [[0, 2.0]]})
    rows.append({**row("s5wm", 1, 0.0), "replay_context": True, "dims": dims})  # no curve: not plotted
    groups = learning.curve_groups(rows)
    assert {k: len(v) for k, v in groups.items()} == {
        "rssm": 2, "rssm, no replay context": 1, "rssm, train_ratio=64": 1, "s5wm": 1}
    assert groups["rssm"] == [[[0, 0.0], [10, 1.0]], [[0, 1.0], [10, 1.0]]]
    other = [{**r, "dims": {"stoch": 32, "classes": 32}} for r in rows[:1]]
    assert set(learning.curve_groups(rows[:1] + other)) == {"rssm, 32x16", "rssm, 32x32"}  # latents named where they differ
