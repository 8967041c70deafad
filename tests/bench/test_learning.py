"""The learning benchmark's bookkeeping (no training): rows merge by their settings and the report
shows each row's overrides and eval episodes."""
import json

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
