"""bench offline: every method on a dataset, rows with the normalized score, resumed by skipping."""
import json

import numpy as np
import pytest

pytest.importorskip("minari")


@pytest.mark.slow
def test_bench_offline_runs_every_method_and_resumes(tmp_path):
    import gymnasium as gym

    from agents.offline import dataset as D
    from bench.offline import main

    rng = np.random.default_rng(0)
    eps = [D.Episode(obs=rng.normal(size=(201, 3)).astype(np.float32), action=rng.uniform(-2, 2, (200, 1)).astype(np.float32),
                     reward=rng.uniform(-10, 0, 200).astype(np.float32), terminated=np.zeros(200, bool),
                     truncated=np.arange(200) == 199) for _ in range(3)]
    D.write("test/pendulum/toy-v0", eps, gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
            gym.spaces.Box(-2.0, 2.0, (1,), np.float32),
            {"kind": "random", "env": "Pendulum-v1", "obs_key": "observation", "ref_random": -1500.0, "ref_expert": -150.0},
            root=tmp_path / "ds")
    args = ["datasets=test/pendulum/toy-v0", f"root={tmp_path / 'ds'}", "seeds=0", "updates=3", "decision_updates=3",
            "eval_episodes=1", f"out={tmp_path / 'out'}", f"runs={tmp_path / 'runs'}", "suite=toy",
            "extra=preset=quickstart env=pendulum batch_size=4 seq_len=8 decision.d_model=16 decision.layers=1 decision.d_state=4 "
            "decision.batch_size=4 decision.context=5 decision.eval_every=0"]
    res = main(args)
    rows = res["runs"]
    assert [r["method"] for r in rows] == ["dreamer", "dreamer_penalty", "dreamer_bc", "ssm", "transformer", "bc"]
    for r in rows:
        assert r["normalized_score"] == pytest.approx(100 * (r["eval_return"] + 1500) / 1350)
        assert r["dataset"] == "test/pendulum/toy-v0" and r["env"] == "Pendulum-v1" and r["seed"] == 0
        # whole-episode policies say how they drew episodes (length-weighted by default); the Transformer's
        # windows and Dreamer's replay have no such draw
        assert r["episode_weight"] == ("length" if r["method"] in ("ssm", "bc") else None)
    saved = json.loads((tmp_path / "out" / "offline_toy.json").read_text())["runs"]
    assert any("agent.bc=1" in r["overrides"] for r in saved if r["method"] == "dreamer_bc")
    assert (tmp_path / "runs" / "test_pendulum_toy-v0-dreamer_penalty1-seed0").is_dir()  # the weight in its name
    assert len(saved) == 6 and "| dreamer_penalty 1 |" in (tmp_path / "out" / "offline_toy.md").read_text()
    assert len(main(args)["runs"]) == 6  # everything is in the results: nothing runs again
    elsewhere = [a for a in args if not a.startswith("out=")] + [f"out={tmp_path / 'merged'}",
                                                                 f"merge_from={tmp_path / 'out' / 'offline_toy.json'}"]
    merged = main(elsewhere)["runs"]  # folded in from another results file: nothing runs either
    assert [r["method"] for r in merged] == [r["method"] for r in rows]
    assert (tmp_path / "merged" / "offline_toy.json").exists()


def _row(method, seed, score, own, updates=1):
    """A results row on dataset `d` whose score and return are `score`, with the method's own overrides."""
    return {"method": method, "dataset": "d", "seed": seed, "normalized_score": score, "eval_return": score,
            "dataset_mean_return": 0.0, "params": 1e5, "updates": updates, "wall_s": 60.0, "machine": "m", "date": "x",
            "overrides": ["offline=d", f"seed={seed}", *own]}


def test_report_keeps_two_weights_of_one_method_apart():
    """Rows of dreamer_penalty at two weights in one results file are two methods in the report, never
    one average (the bench run above checks the weight in the run directory's name)."""
    from bench.offline import WEIGHTS, label, report

    def row(method, weight, seed, score):
        key = WEIGHTS.get(method)
        return _row(method, seed, score, [f"{key}={weight}"] if key else [])

    rows = [row("dreamer", None, 0, 10.0), row("dreamer_penalty", 1, 0, 20.0), row("dreamer_penalty", 10, 0, 40.0),
            row("dreamer_penalty", 10, 1, 60.0)]
    assert [label(r["method"], r["overrides"]) for r in rows] == ["dreamer", "dreamer_penalty 1", "dreamer_penalty 10",
                                                                  "dreamer_penalty 10"]
    table = report(rows)
    assert "| dreamer_penalty 1 | 20.0 (1) | 20.0 |" in table
    assert "| dreamer_penalty 10 | 50.0 (2) | 50.0 |" in table


def test_report_keeps_two_budgets_of_one_method_apart():
    """A method continued to more updates in the same results file is reported per budget, not averaged
    with its shorter runs; a method at one budget keeps its plain name."""
    from bench.offline import report

    def row(method, updates, seed, score):
        return _row(method, seed, score, [f"offline_updates={updates}"], updates)

    rows = [row("dreamer", 1000, 0, -4.0), row("dreamer", 1000, 1, -2.0), row("dreamer", 3000, 0, 20.0),
            row("dreamer", 3000, 1, 60.0), row("ssm", 1500, 0, 70.0)]
    table = report(rows)
    assert "| dreamer @1000 | -3.0 (2) | -3.0 |" in table
    assert "| dreamer @3000 | 40.0 (2) | 40.0 |" in table
    assert "| ssm | 70.0 (1) | 70.0 |" in table
