"""`longdream adapt`: every mode runs on a tiny budget and writes its rows, the context mode carries the
model's state over episode starts, gradient steps fit the shifted data, and bad input is one line."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from agents.adapt import CarryState, adapt_wm, adaptation_optimizers, episode_arrays, prediction_error
from agents.cli import main

@pytest.fixture(scope="module")
def run(pendulum_run):
    return pendulum_run


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["frozen", "context", "gradient", "gradient ac=true"])
def test_each_mode_writes_a_row_per_episode(run, tmp_path, mode):
    out = tmp_path / mode.replace(" ", "_")
    mode, *more = mode.split()
    assert main(["adapt", f"run_dir={run}", "shift.m=1.5", f"mode={mode}", "episodes=2", "updates=2", "horizon=8",
                 "context=4", f"out={out}", *more]) == 0
    data = json.loads((out / "adapt.json").read_text())
    assert [r["episode"] for r in data["rows"]] == [0, 1] and [r["env_steps"] for r in data["rows"]] == [40, 80]
    for r in data["rows"]:
        assert {"mode", "backbone", "shift", "seed", "env_steps", "recovered_fraction", "pred_error"} <= set(r)
        assert r["mode"] == mode and r["shift"] == {"m": 1.5} and np.isfinite(r["pred_error"])
    assert ("rolled_back" in data["rows"][0]) == (mode == "gradient")
    assert set(data["reference"]) == {"in_distribution", "random"}
    assert (out / "adapt.png").stat().st_size > 0 and any((out / "tb").iterdir())


@pytest.mark.slow
def test_eval_rows_follow_the_budget_on_starts_of_their_own(run, tmp_path):
    """eval=N: N rows after the budget at its env steps, drawn the same however long the deployment was."""
    got = []
    for n in (1, 2):
        out = tmp_path / f"e{n}"
        assert main(["adapt", f"run_dir={run}", "shift.m=1.5", "mode=frozen", f"episodes={n}", "eval=2", "reference=false",
                     f"out={out}"]) == 0
        rows = json.loads((out / "adapt.json").read_text())["rows"]
        ev = [r for r in rows if r.get("eval")]
        assert len(rows) == n + 2 and rows[-2:] == ev and all(r["env_steps"] == rows[n - 1]["env_steps"] for r in ev)
        got.append([r["return"] for r in ev])
    assert got[0] == got[1]


@pytest.mark.slow
def test_rollback_restores_the_agent_unless_turned_off(run, tmp_path, monkeypatch):
    """With the error made to grow after every episode's steps, the default rolls each back (the agent
    after the budget is the frozen one: the same eval returns); rollback=false keeps them."""
    from agents import adapt

    errors = iter(range(1, 1000))
    monkeypatch.setattr(adapt, "prediction_error", lambda *a: float(next(errors)))

    def deploy(name, *more):
        out = tmp_path / name
        assert main(["adapt", f"run_dir={run}", "shift.m=1.5", "episodes=2", "updates=2", "eval=2", "reference=false",
                     f"out={out}", *more]) == 0
        rows = json.loads((out / "adapt.json").read_text())["rows"]
        return [r.get("rolled_back") for r in rows if not r.get("eval")], [r["return"] for r in rows if r.get("eval")]

    _, frozen = deploy("frozen", "mode=frozen")
    flags, rolled = deploy("rolled", "mode=gradient", "ac=true")
    assert flags == [True, True] and rolled == frozen
    flags, kept = deploy("kept", "mode=gradient", "ac=true", "rollback=false")
    assert flags == [False, False] and kept != frozen


@pytest.mark.slow
def test_imagination_sets_the_horizon_of_the_adaptation_updates(run, tmp_path, monkeypatch):
    """imagination=H: every actor-critic update of the adaptation imagines H steps (the run's own
    horizon without it)."""
    from agents import dreamer

    seen, imagine = [], dreamer.imagine_all
    monkeypatch.setattr(dreamer, "imagine_all", lambda core, starts, policy, h: (seen.append(h), imagine(core, starts, policy, h))[1])
    for extra in ([], ["imagination=7"]):
        seen.clear()
        assert main(["adapt", f"run_dir={run}", "shift.m=1.5", "mode=gradient", "ac=true", "episodes=1", "updates=2",
                     "reference=false", f"out={tmp_path / str(len(extra))}", *extra]) == 0
        assert seen == [7 if extra else dreamer.AgentConfig().horizon] * 2


@pytest.mark.slow
def test_explore_samples_the_deployment_and_leaves_the_eval_greedy(run, tmp_path):
    """explore=true: the deployment episodes act as training's collection does (sampled), the eval ones as
    without it (greedy, the same starts): the frozen agent's eval rows match, its deployment rows do not."""
    got = {}
    for explore in ("false", "true"):
        out = tmp_path / explore
        assert main(["adapt", f"run_dir={run}", "shift.m=1.5", "mode=frozen", "episodes=1", "eval=1", "reference=false",
                     f"explore={explore}", f"out={out}"]) == 0
        got[explore] = [r["return"] for r in json.loads((out / "adapt.json").read_text())["rows"]]
    assert got["true"][1] == got["false"][1] and got["true"][0] != got["false"][0]


class Echo:
    """A stand-in policy whose next state is its input state plus one."""
    state_keys = ["h"]

    def __call__(self, td):
        td["next", "prev_action"] = td["prev_action"] + 1
        td["next", "state_h"] = td["state_h"] + 1
        return td


def test_context_mode_carries_the_state_over_an_episode_start():
    carry = CarryState(Echo())
    step = lambda first, h: TensorDict({"is_init": torch.tensor([first]), "prev_action": torch.zeros(1),  # noqa: E731
                                        "state_h": torch.full((1,), h)}, [])
    carry(step(True, 0.0))  # the first episode starts from the primer's zeros
    td = carry(step(False, 1.0))
    assert td["next", "state_h"].item() == 2.0
    td = carry(step(True, 0.0))  # a new episode: the last state stands in for the zeros, no reset
    assert not td["is_init"].any() and td["state_h"].item() == 2.0 and td["next", "state_h"].item() == 3.0


@pytest.mark.slow
def test_gradient_steps_lower_the_error_on_the_shifted_data(run):
    from agents import checkpoint
    from agents.config import load_config
    from agents.train import _collect_env, build_agent

    cfg, _ = load_config([f"run_dir={run}"])
    agent, policy, shapes = build_agent(cfg, "cpu")
    agent.load_state_dict(checkpoint.load(checkpoint.latest(run))[0]["agent"])
    env_cfg = type(cfg.env)(**{**cfg.env.__dict__, "shift": {"m": 2.0, "l": 1.5}})
    env = _collect_env(env_cfg, 0, shapes)
    torch.manual_seed(0)
    eps = [episode_arrays(env.rollout(40, policy=policy, break_when_any_done=True), "observation") for _ in range(3)]

    def error():  # the imagined latents are sampled: the same draws before and after
        torch.manual_seed(1)
        return np.mean([prediction_error(agent.wm, ep, 4, 8) for ep in eps])

    before = error()
    adapt_wm(agent, {"wm": torch.optim.Adam(agent.wm.parameters(), 1e-3)}, eps, 100, 8, 8, np.random.default_rng(0))
    after = error()
    assert after < 0.8 * before, (before, after)


def _deployed(run, episodes=2):
    """The run's trained agent and `episodes` short episodes of it on a heavier pendulum."""
    from agents import checkpoint
    from agents.config import load_config
    from agents.train import _collect_env, build_agent

    cfg, _ = load_config([f"run_dir={run}"])
    agent, policy, shapes = build_agent(cfg, "cpu")
    agent.load_state_dict(checkpoint.load(checkpoint.latest(run))[0]["agent"])
    env = _collect_env(type(cfg.env)(**{**cfg.env.__dict__, "shift": {"m": 2.0}}), 0, shapes)
    return agent, [episode_arrays(env.rollout(40, policy=policy, break_when_any_done=True), "observation")
                   for _ in range(episodes)]


@pytest.mark.slow
@pytest.mark.parametrize("ac,updates,wm_updates", [(False, 3, 0), (True, 3, 0), (True, 0, 3)])
def test_gradient_mode_trains_the_actor_critic_only_with_ac(run, ac, updates, wm_updates):
    """ac=false steps the world model alone; ac=true runs the learner update, actor and critic included;
    model-only steps (wm_updates) leave the actor and critic as they were, their optimisers there or not."""
    agent, eps = _deployed(run)
    opts = adaptation_optimizers(agent, ac, 1.0)
    snap = {k: [p.detach().clone() for p in getattr(agent, k).parameters()] for k in ("wm", "actor", "critic")}
    adapt_wm(agent, opts, eps, updates, 4, 8, np.random.default_rng(0), wm_updates=wm_updates)
    moved = {k: any(not torch.equal(a, b) for a, b in zip(snap[k], getattr(agent, k).parameters())) for k in snap}
    assert moved == {"wm": True, "actor": ac and updates > 0, "critic": ac and updates > 0}


@pytest.mark.slow
def test_model_only_steps_come_before_the_learner_updates(run, monkeypatch):
    """wm_updates=k: k world-model steps, then `updates` full learner updates."""
    from agents import dreamer

    agent, eps = _deployed(run)
    opts = adaptation_optimizers(agent, True, 1.0)
    calls, wm_step = [], opts["wm"].step
    monkeypatch.setattr(dreamer, "update", lambda agent, opts, batch: calls.append("update"))
    monkeypatch.setattr(opts["wm"], "step", lambda *a, **k: (calls.append("wm"), wm_step(*a, **k)))
    adapt_wm(agent, opts, eps, 2, 4, 8, np.random.default_rng(0), wm_updates=3)
    assert calls == ["wm"] * 3 + ["update"] * 2


@pytest.mark.parametrize("optimizer", ["adam", "laprop"])
def test_adaptation_optimizers_scale_the_run_learning_rates_without_warmup(optimizer):
    from agents.config import load_config
    from agents.train import build_agent

    cfg, _ = load_config(["env=pendulum", "size=xs", f"agent.optimizer={optimizer}", "agent.warmup=100"])
    agent = build_agent(cfg, "cpu")[0]
    own = {k: o.param_groups[0]["lr"] for k, o in agent.optimizers().items()}
    opts = adaptation_optimizers(agent, True, 3.0)
    assert set(opts) == {"wm", "actor", "critic"} and set(adaptation_optimizers(agent, False, 3.0)) == {"wm"}
    for k, o in opts.items():
        assert all(g["lr"] == pytest.approx(3.0 * own[k]) and g.get("warmup", 0) == 0 for g in o.param_groups)


@pytest.mark.parametrize("args,msg", [
    (["shift.m=1.5"], "usage: longdream adapt run_dir="),
    (["run_dir=RUN", "shift.m=1.5", "lr=0"], "lr scales the learning rates and must be positive"),
    (["run_dir=RUN", "shift.m=1.5", "wm_updates=-1"], "wm_updates is a number of steps per episode"),
    (["run_dir=RUN", "shift.m=1.5", "imagination=-3"], "imagination is a number of imagined steps"),
    (["run_dir=RUN", "shift.m=1.5", "eval=-1"], "eval is a number of episodes"),
    (["run_dir=RUN", "mode=sometimes", "shift.m=1.5"], "mode must be one of frozen, context, gradient"),
    (["run_dir=RUN"], "adapt needs a shift"),
    (["run_dir=RUN", "shift.mass=2"], "has no parameter 'mass' to shift (it has: g, m, l)"),
    (["run_dir=RUN", "shift.m=heavy"], "shift.m must be a number"),
    (["run_dir=RUN", "speed=3", "shift.m=2"], "unknown adapt option 'speed'"),
])
def test_bad_input_is_one_line(run, capsys, args, msg):
    assert main(["adapt", *[a.replace("RUN", str(run)) for a in args]]) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and "\n" not in err


@pytest.mark.slow
def test_retrain_reference_trains_a_new_agent_for_the_same_env_steps(run, tmp_path):
    out = tmp_path / "retrain"
    assert main(["adapt", f"run_dir={run}", "shift.m=1.5", "mode=retrain", "episodes=4", "reference=false",
                 f"out={out}"]) == 0
    rows = json.loads((out / "adapt.json").read_text())["rows"]
    assert rows[-1]["eval"] and rows[-1]["env_steps"] >= 4 * 40 and len(rows) >= 2
    assert (out / "retrain" / "checkpoints").is_dir()  # a run of its own, beside the report


def test_prediction_error_uses_the_same_draws_every_call():
    """A rollback compares two errors on one episode: they must differ by the weights only."""
    from agents.config import load_config
    from agents.train import build_agent

    cfg, _ = load_config(["env=pendulum", "size=xs"])
    agent, _, _ = build_agent(cfg, "cpu")
    T = 24
    ep = {"obs": torch.randn(T, 3), "action": torch.randn(T, 1), "reward": torch.zeros(T), "is_terminal": torch.zeros(T)}
    torch.manual_seed(5)
    state = torch.random.get_rng_state()
    first = prediction_error(agent.wm, ep, 4, 8)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random stream is untouched
    torch.manual_seed(6)  # the caller's stream moved on (as gradient steps move it): the same draws still
    assert prediction_error(agent.wm, ep, 4, 8) == first and np.isfinite(first)


@pytest.mark.slow
def test_a_run_trained_across_a_range_in_trials_deploys_on_fixed_dynamics(tmp_path):
    """Training drew the mass per trial of 2 episodes; deployment is one episode at a time on a fixed
    shift, measured against the env's own dynamics, and retrain trains on the fixed shift alone."""
    run = tmp_path / "dr"
    assert main(["train", "env=pendulum", "env.time_limit=20", "steps=160", f"run_dir={run}", "env.shift_range.m=[0.8,1.2]",
                 "env.trial=2", "size=xs", "prefill=60", "train_ratio=16", "batch_size=4", "seq_len=8",
                 "eval_episodes=1", "eval_every=0", "progress=false", "collect_every=8"]) == 0
    for mode in ("context", "retrain"):
        out = tmp_path / mode
        assert main(["adapt", f"run_dir={run}", "shift.m=1.5", f"mode={mode}", "episodes=2", f"out={out}"]) == 0
        rows = json.loads((out / "adapt.json").read_text())["rows"]
        assert rows[-1]["env_steps"] == 40  # two single episodes of 20 steps, not trials of two
    import yaml

    env = yaml.safe_load((tmp_path / "retrain" / "retrain" / "config.yaml").read_text())["env"]
    assert (env["shift"], env["shift_range"], env["trial"]) == ({"m": 1.5}, {}, 1)


def test_retrain_takes_the_run_seed_plus_the_deployment_seed(run, tmp_path, monkeypatch):
    """The retrain reference of a seed-3 run, deployed with seed=2, trains with seed 5: runs of two
    training seeds get two independent retrains, not the same one."""
    import shutil

    import agents.train

    seeded = tmp_path / "seeded"
    shutil.copytree(run, seeded, ignore=shutil.ignore_patterns("adapt"))
    overrides = json.loads((seeded / "overrides.json").read_text())
    (seeded / "overrides.json").write_text(json.dumps([o for o in overrides if not o.startswith("seed=")] + ["seed=3"]))
    seen = []

    def fake_train(cfg):
        seen.append(cfg.train.seed)
        (Path(cfg.train.run_dir) / "tb").mkdir(parents=True)  # no episodes logged
        return {"eval_return_after": 0.0, "env_steps": 160}

    monkeypatch.setattr(agents.train, "train", fake_train)
    assert main(["adapt", f"run_dir={seeded}", "shift.m=1.5", "mode=retrain", "episodes=4", "reference=false", "seed=2",
                 f"out={tmp_path / 'out'}"]) == 0
    assert seen == [5]
