"""`longdream bench adapt`: one row per (run, shift, mode) summarising `longdream adapt`, resumable,
mergeable, with one-line errors."""
import json
from pathlib import Path

import numpy as np
import pytest

from agents.cli import main
from bench.adapt import _key, parse_shift, report, work_folder

@pytest.fixture(scope="module")
def run(pendulum_run):
    return pendulum_run


def test_shift_syntax():
    assert parse_shift("m:1.5") == {"m": 1.5}
    assert parse_shift("mass:0.3+damping:0.5") == {"mass": 0.3, "damping": 0.5}


@pytest.mark.parametrize("args,msg", [
    (["runs=RUN", "shifts=m1.5"], "a shift is param:scale"),
    (["runs=RUN", "shifts=m:heavy"], "a shift is param:scale"),
    (["runs=RUN", "modes=frozen,sometimes"], "modes must be among"),
    (["shifts=m:1.5"], "bench adapt needs runs="),
    (["runs=OUT"], "is not a longdream run directory"),
])
def test_bad_input_is_one_line(run, tmp_path, capsys, args, msg):
    argv = [a.replace("RUN", str(run)).replace("OUT", str(tmp_path)) for a in args]
    assert main(["bench", "adapt", f"out={tmp_path}", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err


@pytest.mark.slow
def test_rows_summarise_each_adapt_run_and_resume(run, tmp_path):
    out, work = tmp_path / "res", tmp_path / "work"
    argv = ["bench", "adapt", f"runs={run}", "shifts=m:1.5,m:0.8+l:1.2", "modes=frozen,gradient", "episodes=3",
            "updates=2", "last=2", "seed=3", f"out={out}", f"work={work}"]
    assert main(argv) == 0
    rows = json.loads((out / "adapt_pendulum.json").read_text())["runs"]
    assert sorted((r["shift_tag"], r["mode"]) for r in rows) == [
        ("lx1.2+mx0.8", "frozen"), ("lx1.2+mx0.8", "gradient+ac"), ("mx1.5", "frozen"), ("mx1.5", "gradient+ac")]
    for r in rows:
        assert {"mode", "backbone", "shift", "seed", "env_steps", "recovered_fraction"} <= set(r)
        eps = json.loads((work_folder(work, r) / "adapt.json").read_text())["rows"]
        ref = r["reference"]
        rec = [(e["return"] - ref["random"]) / (ref["in_distribution"] - ref["random"]) for e in eps]
        assert r["recovered_fraction"] == pytest.approx(np.mean(rec[-2:]))  # the last `last` episodes
        assert r["recovered_first"] == pytest.approx(rec[0]) and r["env_steps"] == eps[-1]["env_steps"] == 120
        assert r["ac"] == (r["mode"] == "gradient+ac") and r["backbone"] == "rssm"
        assert r["seed"] == 0 and r["adapt_seed"] == 3  # the run's training seed; the deployment's own
        assert r["training"] == "default"
    assert "| Pendulum-v1 | rssm | default | mx1.5 | frozen | 1 |" in (out / "adapt_pendulum.md").read_text()
    assert (out / "adapt_pendulum_Pendulum-v1.png").stat().st_size > 0

    stamp = [r["wall_s"] for r in rows]
    assert main(argv) == 0  # a second invocation measures nothing again
    assert [r["wall_s"] for r in json.loads((out / "adapt_pendulum.json").read_text())["runs"]] == stamp

    other = tmp_path / "other"  # a side-by-side run's file folds in with merge_from
    assert main(["bench", "adapt", f"runs={run}", "shifts=l:0.5", "modes=frozen", "episodes=2", f"out={other}",
                 f"work={work}"]) == 0
    assert main(["bench", "adapt", f"merge_from={other / 'adapt_pendulum.json'}", f"out={out}"]) == 0
    merged = json.loads((out / "adapt_pendulum.json").read_text())["runs"]
    assert len(merged) == 5 and merged[-1]["shift_tag"] == "lx0.5"

    evaluated = tmp_path / "eval"  # eval=N: the fraction over N episodes after the budget, labelled apart
    assert main(["bench", "adapt", f"runs={run}", "shifts=l:0.5", "modes=frozen", "episodes=2", "eval=2", f"out={evaluated}",
                 f"work={work}"]) == 0
    r = json.loads((evaluated / "adapt_pendulum.json").read_text())["runs"][0]
    eps = json.loads((work_folder(work, r) / "adapt.json").read_text())["rows"]
    assert [e.get("eval", False) for e in eps] == [False, False, True, True] and r["eval"] == 2
    assert r["recovered_fraction"] == pytest.approx(np.mean([e["recovered_fraction"] for e in eps[2:]]))
    assert r["curve"] == [[e["env_steps"], e["recovered_fraction"], e["pred_error"]] for e in eps[:2]]
    assert "| lx0.5 | frozen, eval 2 | 1 |" in (evaluated / "adapt_pendulum.md").read_text()


def test_training_label_names_how_the_dynamics_varied():
    from types import SimpleNamespace as Env

    from bench.adapt import training

    assert training(Env(shift={}, shift_range={}, trial=1)) == "default"
    assert training(Env(shift={"m": 1.5}, shift_range={}, trial=1)) == "mx1.5"
    assert training(Env(shift={}, shift_range={"m": [0.75, 1.25]}, trial=1)) == "range m 0.75-1.25"
    assert training(Env(shift={}, shift_range={"m": [0.75, 1.25], "l": [0.5, 2]}, trial=3)) == \
        "range l 0.5-2 m 0.75-1.25, trials of 3"


def test_gradient_rows_with_other_updates_do_not_pool_with_the_default():
    def row(seed, updates, rec):
        return {"run": f"r{seed}", "env": "E", "backbone": "rssm", "shift_tag": "mx2", "mode": "gradient+ac", "updates": updates,
                "seed": seed, "recovered_fraction": rec, "recovered_first": 0.0, "env_steps": 10, "return_final": 1.0,
                "reference": {"in_distribution": 2.0, "random": 0.0}, "pred_error_first": 1.0, "pred_error_last": 1.0,
                "rolled_back": 0, "wall_s": 60, "machine": "m", "date": "d"}

    text = report([row(0, 50, 0.2), row(1, 50, 0.4), row(0, 200, 0.9)])
    assert "| E | rssm | default | mx2 | gradient+ac | 2 | 0.00 | 0.30 |" in text
    assert "| E | rssm | default | mx2 | gradient+ac, 200 updates | 1 | 0.00 | 0.90 |" in text
    assert text.index("| gradient+ac | 2 |") < text.index("| gradient+ac, 200 updates | 1 |")
    assert work_folder(Path("w"), row(0, 50, 0.2)) == Path("w/r0/gradient+ac-mx2")
    assert work_folder(Path("w"), row(0, 200, 0.2)) == Path("w/r0/gradient+ac-200updates-mx2")
    explored = {**row(1, 50, 0.7), "explore": True}  # sampled deployment actions: a row of its own
    text = report([row(0, 50, 0.2), row(1, 50, 0.4), explored])
    assert "| gradient+ac | 2 | 0.00 | 0.30 |" in text and "| gradient+ac, explore | 1 | 0.00 | 0.70 |" in text
    assert work_folder(Path("w"), explored) == Path("w/r1/gradient+ac-explore-mx2")
    fitted = {**row(1, 50, 0.6), "wm_updates": 150}  # model-only steps first: a row of its own
    text = report([row(0, 50, 0.2), row(1, 50, 0.4), fitted])
    assert "| gradient+ac | 2 | 0.00 | 0.30 |" in text and "| gradient+ac, +150 model updates | 1 | 0.00 | 0.60 |" in text
    assert work_folder(Path("w"), fitted) == Path("w/r1/gradient+ac-+150modelupdates-mx2")
    assert len({_key({**r, "episodes": 10}) for r in (row(1, 50, 0.4), fitted)}) == 2  # resumes apart too
    kept = {**row(1, 50, 0.5), "rollback": False}  # every episode's steps kept: a row of its own
    text = report([row(0, 50, 0.2), row(1, 50, 0.4), kept])
    assert "| gradient+ac | 2 | 0.00 | 0.30 |" in text and "| gradient+ac, no rollback | 1 | 0.00 | 0.50 |" in text
    assert len({_key({**r, "episodes": 10}) for r in (row(1, 50, 0.4), kept)}) == 2
    longer = {**row(1, 50, 0.5), "imagination": 45}  # a longer imagination: a row of its own
    assert "| gradient+ac, imagination 45 | 1 | 0.00 | 0.50 |" in report([row(1, 50, 0.4), longer])
    assert len({_key({**r, "episodes": 10}) for r in (row(1, 50, 0.4), longer)}) == 2
