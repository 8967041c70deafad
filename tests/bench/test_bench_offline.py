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
    assert len(saved) == 6 and "| dreamer_penalty |" in (tmp_path / "out" / "offline_toy.md").read_text()
    assert len(main(args)["runs"]) == 6  # everything is in the results: nothing runs again
    elsewhere = [a for a in args if not a.startswith("out=")] + [f"out={tmp_path / 'merged'}",
                                                                 f"merge_from={tmp_path / 'out' / 'offline_toy.json'}"]
    merged = main(elsewhere)["runs"]  # folded in from another results file: nothing runs either
    assert [r["method"] for r in merged] == [r["method"] for r in rows]
    assert (tmp_path / "merged" / "offline_toy.json").exists()
