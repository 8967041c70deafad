"""Offline learning: Minari datasets (agents/offline/dataset.py) and return-conditioned sequence
policies (agents/offline/decision.py)."""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("minari")
pytest.importorskip("h5py")

from agents.config import ConfigError  # noqa: E402
from agents.offline import dataset as D  # noqa: E402
from agents.offline.decision import DecisionConfig, DecisionModel, Episodes, RecurrentActor  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_replay import fake_frames  # noqa: E402


def spaces(discrete: bool, obs_dim=3):
    import gymnasium as gym

    obs = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    act = gym.spaces.Discrete(4) if discrete else gym.spaces.Box(-2.0, 2.0, (2,), np.float32)
    return obs, act


def random_episodes(discrete: bool, n=5, seed=0, lengths=None):
    rng = np.random.default_rng(seed)
    eps = []
    for i in range(n if lengths is None else len(lengths)):
        T = int(rng.integers(3, 12)) if lengths is None else lengths[i]
        term = np.zeros(T, bool)
        term[-1] = i % 2 == 0
        action = rng.integers(0, 4, T) if discrete else rng.uniform(-2, 2, (T, 2)).astype(np.float32)
        eps.append(D.Episode(obs=rng.normal(size=(T + 1, 3)).astype(np.float32), action=action,
                             reward=rng.normal(size=T).astype(np.float32), terminated=term,
                             truncated=~term & (np.arange(T) == T - 1)))
    return eps


@pytest.mark.parametrize("discrete", [False, True])
def test_dataset_round_trip(tmp_path, discrete):
    """Written episodes read back the same through Minari's API, and the HDF5 file holds them in
    Minari's layout: every observation, action, reward and flag, and the episode boundaries."""
    eps = random_episodes(discrete)
    name = "test/toy/medium-v0"
    info = {"kind": "policy", "env": "Toy-v0", "checkpoint_step": 1234, "ref_random": -10.0, "ref_expert": 10.0}
    D.write(name, eps, *spaces(discrete), info, root=tmp_path / "ds")
    ds = D.load(name, tmp_path / "ds")
    assert len(ds.episodes) == len(eps) and ds.discrete == discrete
    assert ds.info["checkpoint_step"] == 1234 and ds.info["mean_return"] == pytest.approx(np.mean([e.ret for e in eps]))
    for a, b in zip(ds.episodes, eps):
        np.testing.assert_array_equal(a.obs, b.obs)
        np.testing.assert_array_equal(a.action, b.action)
        np.testing.assert_array_equal(a.reward, b.reward)
        np.testing.assert_array_equal(a.terminated, b.terminated)
        np.testing.assert_array_equal(a.truncated, b.truncated)

    # the files themselves, read by TensorDict's HDF5 reader (what TorchRL's Minari loader reads):
    # one group per episode with Minari's keys. (TorchRL 0.14.1's loader itself returns zeros: it fills
    # a TensorDict and then keeps `memmap_like` of it, which has the shapes but not the data.)
    from tensordict import PersistentTensorDict

    h5 = PersistentTensorDict.from_h5(str(tmp_path / "ds" / name / "data" / "main_data.hdf5")).to_tensordict()
    assert sorted(h5.keys()) == [f"episode_{i}" for i in range(len(eps))]
    for i, e in enumerate(eps):
        g = h5[f"episode_{i}"]
        np.testing.assert_array_equal(g["observations"].numpy(), e.obs)
        np.testing.assert_array_equal(g["actions"].numpy(), e.action)
        np.testing.assert_array_equal(g["rewards"].numpy(), e.reward)
        np.testing.assert_array_equal(g["terminations"].numpy(), e.terminated)
        np.testing.assert_array_equal(g["truncations"].numpy(), e.truncated)


def count_env_steps(monkeypatch) -> list:
    """Every env the training code makes counts its steps into the returned list."""
    import agents.train as T

    steps, make = [], T._collect_env

    def counting(*a, **k):
        env = make(*a, **k)
        step = env.step
        env.step = lambda td: (steps.append(1), step(td))[1]
        return env

    monkeypatch.setattr(T, "_collect_env", counting)
    return steps


def stub_policy():
    return SimpleNamespace(agent=SimpleNamespace(wm=SimpleNamespace(spec=SimpleNamespace(discrete=False))),
                           to_env=lambda a: a)


def test_replay_episodes_are_the_whole_episodes_of_each_stream(tmp_path):
    """From a replay: whole episodes only (not one whose start the buffer overwrote, not a running
    one), observations 0..T, the actions and rewards of steps 1..T, termination or truncation at the end."""
    from agents.replay import Replay

    ep_len = 4
    rp = Replay(capacity=1000, batch_size=1, seq_len=2, directory=tmp_path / "a", obs_keys="observation")
    rp.add(fake_frames(1, 4 * ep_len + 2, 0, ep_len, 0))  # episodes 0-3 whole (0, 2 truncate; 1, 3 terminate), 4 running
    eps = D.replay_episodes(rp, stub_policy(), time_limit=100)
    assert len(eps) == 4
    for k, ep in enumerate(eps):
        assert ep.obs[:, 1].tolist() == [k] * (ep_len + 1) and ep.obs[:, 2].tolist() == list(range(ep_len + 1))
        assert ep.reward.tolist() == [1, 2, 3, 4] and ep.action.shape == (ep_len, 1)
        assert ep.terminated.tolist() == [False] * 3 + [k % 2 == 1]
        assert ep.truncated.tolist() == [False] * 3 + [k % 2 == 0]

    rp = Replay(capacity=1000, batch_size=1, seq_len=2, directory=tmp_path / "b", obs_keys="observation")
    rp.add(fake_frames(1, 3 * ep_len, 0, ep_len, 0))  # the last episode truncated with nothing after it yet
    assert len(D.replay_episodes(rp, stub_policy(), time_limit=100)) == 2  # may be running: left out
    assert len(D.replay_episodes(rp, stub_policy(), time_limit=ep_len)) == 3  # at the time limit: whole

    rp = Replay(capacity=12, batch_size=1, seq_len=2, directory=tmp_path / "c", obs_keys="observation")
    for k in range(4):  # 20 rows into 12: the oldest kept episode's start is gone
        rp.add(fake_frames(1, ep_len, 0, ep_len, k * ep_len))
    eps = D.replay_episodes(rp, stub_policy(), time_limit=ep_len)
    assert [int(e.obs[0, 1]) for e in eps] == [2, 3]


def test_dataset_under_a_relative_root(tmp_path, monkeypatch):
    """root= relative to the working directory (Minari alone would look for the data under it twice)."""
    monkeypatch.chdir(tmp_path)
    D.write("test/toy/rel-v0", random_episodes(False), *spaces(False), {"kind": "random", "env": "Toy-v0"}, root="sets")
    assert len(D.load("test/toy/rel-v0", "sets").episodes) == len(random_episodes(False))
    assert (tmp_path / "sets" / "test" / "toy" / "rel-v0" / "longdream.json").exists()


def test_dataset_errors_are_one_line(tmp_path, capsys):
    from agents.cli import main

    with pytest.raises(ConfigError, match="no dataset 'test/none/x-v0'"):
        D.load("test/none/x-v0", tmp_path)
    with pytest.raises(ConfigError, match="not a Minari id"):
        D.load("no version", tmp_path)
    with pytest.raises(ConfigError, match="not a Minari id"):  # Minari rejects dots: refused before any rollout
        D.main(["kind=random", "env=pendulum", "episodes=1", "name=test/toy/noise0.5-v0", f"root={tmp_path}"])
    assert not (tmp_path / "test" / "toy" / "noise0.5-v0").exists()
    name = "test/toy/broken-v0"
    D.write(name, random_episodes(False), *spaces(False), {"kind": "random", "env": "Toy-v0"}, root=tmp_path)
    with pytest.raises(ConfigError, match="exists"):
        D.write(name, random_episodes(False), *spaces(False), {"kind": "random", "env": "Toy-v0"}, root=tmp_path)
    data = next((tmp_path / name / "data").glob("*.hdf5"))
    data.write_bytes(data.read_bytes()[:200])  # truncated
    with pytest.raises(ConfigError, match="cannot be read"):
        D.load(name, tmp_path)
    for argv, msg in ((["dataset"], "usage: longdream dataset"), (["dataset", "kind=policy"], "needs run_dir"),
                      (["dataset", "kind=random", "env=pendulum", "episodes=0"], "at least 1"),
                      (["dataset", "kind=random", "colour=red"], "unknown dataset option 'colour'"),
                      (["dataset", "kind=replay", f"run_dir={tmp_path}"], "not a longdream run directory"),
                      (["train", "algo=decision"], "pass offline=<dataset id>"),
                      (["train", "algo=decision", "offline=test/none/x-v0", f"offline_root={tmp_path}",
                        f"run_dir={tmp_path / 'r'}"], "no dataset 'test/none/x-v0'"),
                      (["train", "algo=decision", "offline=a/b-v0", "decision.core=lstm"], "decision.core must be one of"),
                      (["train", "algo=decision", "offline=a/b-v0", "decision.dt_min=2"], "0 < dt_min <= dt_max"),
                      (["train", "algo=decision", "offline=a/b-v0", "decision.episode_weight=return"],
                       "decision.episode_weight must be one of uniform, length")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1, err


# --- the decision models ----------------------------------------------------------------------------

def make_model(core: str, discrete=False, seed=0):
    torch.manual_seed(seed)
    cfg = DecisionConfig(core=core, d_model=32, layers=2, d_state=8, context=6, dropout=0.0)
    return DecisionModel(cfg, obs_dim=3, action_dim=4 if discrete else 2, discrete=discrete, max_steps=50).double()


@pytest.mark.parametrize("core", ["ssm", "bc"])
def test_recurrent_acting_equals_the_parallel_pass(core):
    """The ssm and bc models acting one token at a time (O(1) per step) predict the same actions as
    the parallel pass over the whole sequence."""
    model = make_model(core).eval()
    B, T = 3, 17
    g = torch.Generator().manual_seed(1)
    rtg, obs = torch.randn(B, T, generator=g).double(), torch.randn(B, T, 3, generator=g).double()
    act, t = torch.randn(B, T, 2, generator=g).double().tanh(), torch.arange(T).expand(B, T)
    with torch.no_grad():
        parallel = model(rtg, obs, act, t)
        actor = RecurrentActor(model, B)
        steps = []
        for i in range(T):
            steps.append(actor.step(rtg[:, i], obs[:, i], t[:, i]))
            actor.record(act[:, i], t[:, i])
    torch.testing.assert_close(torch.stack(steps, 1), parallel, rtol=1e-6, atol=1e-7)
    # bc reads no returns; the ssm does
    other = model(rtg + 1, obs, act, t)
    assert torch.allclose(other, parallel) == (core == "bc")


def test_step_sizes_start_in_the_configured_range():
    """decision.dt_min / dt_max set every S5 layer's initial step sizes (log-uniform in the range)."""
    for lo, hi in ((1e-3, 1e-1), (1e-2, 1.0)):
        cfg = DecisionConfig(core="ssm", d_model=16, layers=2, d_state=64, dt_min=lo, dt_max=hi)
        dt = torch.cat([blk.ssm.log_dt.exp() for blk in DecisionModel(cfg, 3, 2, False, 10).blocks])
        assert dt.min() >= lo * (1 - 1e-6) and dt.max() <= hi * (1 + 1e-6)
        assert dt.max() > hi / 2 and dt.min() < 2 * lo  # spread over the range, not one value


@pytest.mark.parametrize("core", ["ssm", "transformer"])
def test_predictions_are_causal(core):
    """The action predicted at step t depends on R_<=t, s_<=t and a_<t only."""
    model = make_model(core).eval()
    B, T, k = 2, 6, 3
    rtg, obs = torch.randn(B, T).double(), torch.randn(B, T, 3).double()
    act, t = torch.randn(B, T, 2).double(), torch.arange(T).expand(B, T)
    base = model(rtg, obs, act, t)
    act2 = act.clone()
    act2[:, k] += 1  # a_k: only steps after k may move
    obs2 = obs.clone()
    obs2[:, k] += 1  # s_k: steps k and after
    moved_a = (model(rtg, obs, act2, t) - base).abs().amax((0, 2)) > 1e-9
    moved_s = (model(rtg, obs2, act, t) - base).abs().amax((0, 2)) > 1e-9
    assert moved_a.tolist() == [i > k for i in range(T)]
    assert moved_s.tolist() == [i >= k for i in range(T)]


@pytest.mark.parametrize("core", ["ssm", "bc"])
def test_acting_in_an_env_is_the_trained_pass_over_the_episode(core):
    """An episode acted recurrently in Pendulum (returns-to-go lowered by each reward, observations
    normalised, each action fed back) is what the parallel pass over that episode predicts."""
    import dataclasses

    from agents.offline.decision import run_episode
    from agents.train import _collect_env
    from envs.make import EnvConfig

    torch.manual_seed(0)
    cfg = DecisionConfig(core=core, d_model=16, layers=2, d_state=4, dropout=0.0, return_scale=10.0)
    import gymnasium as gym

    eps = [D.Episode(obs=np.random.randn(11, 3).astype(np.float32), action=np.random.uniform(-2, 2, (10, 1)).astype(np.float32),
                     reward=np.random.randn(10).astype(np.float32), terminated=np.zeros(10, bool),
                     truncated=np.arange(10) == 9) for _ in range(3)]
    ds = D.Dataset("test/pendulum/x-v0", eps, {}, gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
                   gym.spaces.Box(-2.0, 2.0, (1,), np.float32))
    data = Episodes(ds, return_scale=10.0)
    model = DecisionModel(cfg, 3, 1, False, 50)
    env = _collect_env(dataclasses.replace(EnvConfig(), time_limit=25), 0, {})
    first = _collect_env(dataclasses.replace(EnvConfig(), time_limit=25), 0, {}).reset()["observation"]  # the same seed
    trace = {}
    total = run_episode(model, data, env, "observation", target=-50.0, time_limit=25, trace=trace)
    env.close()
    torch.testing.assert_close(trace["obs"][0], (first - data.mean) / data.std)  # normalised as in training
    tr = {k: torch.stack(v)[None].float() for k, v in trace.items()}
    T = tr["rtg"].shape[1]
    assert T == 25 and tr["rtg"][0, 0] == pytest.approx(-5.0) and float(tr["reward"].sum()) == pytest.approx(total, rel=1e-5)
    torch.testing.assert_close(tr["rtg"][0, 1:], tr["rtg"][0, :-1] - tr["reward"][0, :-1] / 10.0)
    with torch.no_grad():
        model.eval()
        parallel = model(tr["rtg"], tr["obs"], tr["action"], torch.arange(T)[None])
    torch.testing.assert_close(parallel, tr["action"], rtol=1e-4, atol=1e-5)


def toy_dataset(discrete=False):
    eps = random_episodes(discrete, n=6)
    return D.Dataset("test/toy/x-v0", eps, {}, *spaces(discrete))


def test_episodes_returns_to_go_and_masks():
    ds = toy_dataset()
    data = Episodes(ds, return_scale=10.0)
    for i, ep in enumerate(ds.episodes):
        T = len(ep)
        want = np.cumsum(ep.reward[::-1])[::-1] / 10.0  # R_t = sum of r_t .. r_T
        np.testing.assert_allclose(data.rtg[i, :T].numpy(), want, rtol=1e-5, atol=1e-6)
        assert data.rtg[i, T:].abs().sum() == 0
        back = data.to_env(data.action[i, :T])
        np.testing.assert_allclose(back.numpy(), ep.action, rtol=1e-5, atol=1e-5)  # [-1, 1] and back
    g = torch.Generator().manual_seed(0)
    w = data.windows(256, 5, g)  # left-padded: the padding comes first, then consecutive real steps
    assert w["obs"].shape == (256, 5, 3)
    assert (w["mask"].diff(dim=1) >= 0).all() and w["mask"][:, -1].all()
    real = w["mask"].bool()
    assert (w["t"].diff(dim=1)[real[:, 1:] & real[:, :-1]] == 1).all()
    assert (w["obs"][~real] == 0).all() and (w["rtg"][~real] == 0).all()
    whole = data.whole(40, g)  # whole episodes from their first step, right-padded
    assert (whole["t"][:, 0] == 0).all() and (whole["mask"].diff(dim=1) <= 0).all()
    assert set(whole["mask"].sum(1).long().tolist()) <= set(data.length.tolist())


def test_whole_episodes_drawn_uniformly_or_by_length():
    """`uniform` draws each episode alike; `length` in proportion to its length. Both hold about the
    steps asked for per batch (averaged over draws)."""
    ds = D.Dataset("test/toy/x-v0", random_episodes(False, lengths=[3, 3, 3, 3, 24]), {}, *spaces(False))
    data = Episodes(ds, return_scale=10.0)  # mean length 7.2; 17.0 for a draw in proportion to length
    L = data.length.float()
    g = torch.Generator().manual_seed(0)
    for weight, want in (("uniform", torch.full_like(L, 1 / len(L))), ("length", L / L.sum())):
        counts, steps = torch.zeros_like(L), []
        for _ in range(400):
            b = data.whole(160, g, weight)
            lengths = b["mask"].sum(1).long()
            steps.append(int(lengths.sum()))
            # which episodes were drawn: each row is one whole episode, told apart by its first observation
            first = b["obs"][:, 0]
            idx = (first[:, None] == data.obs[None, :, 0]).all(-1).float().argmax(1)
            counts += torch.bincount(idx, minlength=len(L)).float()
        torch.testing.assert_close(counts / counts.sum(), want, atol=0.02, rtol=0)
        assert abs(np.mean(steps) - 160) < 16, (weight, np.mean(steps))


@pytest.mark.parametrize("discrete", [False, True])
def test_loss_ignores_padding_and_drops_to_zero_on_a_copyable_target(discrete):
    """Padded steps do not count; the loss is the mean error over real steps (MSE, or cross-entropy)."""
    model = make_model("ssm", discrete)
    data = Episodes(toy_dataset(discrete), return_scale=10.0)
    batch = {k: v.double() if v.is_floating_point() else v for k, v in data.whole(60, torch.Generator().manual_seed(0)).items()}
    loss = model.loss(batch)
    noisy = dict(batch)
    pad = batch["mask"] == 0
    assert pad.any()
    noisy["action"] = batch["action"].masked_fill(pad[..., None], 0.7)  # after the last real step: causal, and masked
    torch.testing.assert_close(model.loss(noisy), loss)
    pred = model(batch["rtg"], batch["obs"], batch["action"], batch["t"])
    mask = batch["mask"]
    if discrete:
        nll = torch.nn.functional.cross_entropy(pred.flatten(0, 1), batch["action"].argmax(-1).flatten(), reduction="none")
        want = (nll * mask.flatten()).sum() / mask.sum()
    else:
        want = ((pred - batch["action"]).pow(2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, want)


def test_decision_training_steps_the_env_only_to_evaluate(tmp_path, monkeypatch):
    """algo=decision learns from the dataset: the only env steps are its evaluation episodes; it
    checkpoints, writes its result row and resumes from the checkpoint."""
    from agents.config import load_config
    from agents.offline.decision import train

    eps = []
    rng = np.random.default_rng(0)
    for _ in range(4):
        eps.append(D.Episode(obs=rng.normal(size=(201, 3)).astype(np.float32),
                             action=rng.uniform(-2, 2, (200, 1)).astype(np.float32),
                             reward=rng.normal(size=200).astype(np.float32), terminated=np.zeros(200, bool),
                             truncated=np.arange(200) == 199))
    import gymnasium as gym

    obs = gym.spaces.Box(-np.inf, np.inf, (3,), np.float32)
    act = gym.spaces.Box(-2.0, 2.0, (1,), np.float32)
    D.write("test/pendulum/toy-v0", eps, obs, act, {"kind": "random", "env": "Pendulum-v1", "obs_key": "observation",
                                                     "ref_random": -1000.0, "ref_expert": 0.0}, root=tmp_path)
    steps = count_env_steps(monkeypatch)
    overrides = ["env=pendulum", "algo=decision", "offline=test/pendulum/toy-v0", f"offline_root={tmp_path}",
                 f"run_dir={tmp_path / 'run'}", "progress=false", "decision.d_model=16", "decision.layers=1",
                 "decision.d_state=4", "decision.batch_size=8", "decision.context=10", "decision.eval_every=3",
                 "decision.eval_episodes=1"]
    cfg, _ = load_config(overrides + ["decision.updates=5"])
    res = train(cfg, cfg.decision)
    assert res["updates"] == 5 and len(steps) == 2 * 200  # one eval episode at update 3, one at the end
    row = json.loads((tmp_path / "run" / "result.json").read_text())
    assert row["method"] == "decision-ssm" and row["normalized_score"] == pytest.approx(100 * (row["eval_return"] + 1000) / 1000)
    cfg, _ = load_config(overrides + ["decision.updates=7"])
    assert train(cfg, cfg.decision)["updates"] == 7  # resumed: two more updates


# --- the Dreamer agent offline ----------------------------------------------------------------------

def pendulum_dataset(root, n=3, T=200, seed=0):
    import gymnasium as gym

    rng = np.random.default_rng(seed)
    eps = [D.Episode(obs=rng.normal(size=(T + 1, 3)).astype(np.float32), action=rng.uniform(-2, 2, (T, 1)).astype(np.float32),
                     reward=rng.normal(size=T).astype(np.float32), terminated=np.zeros(T, bool), truncated=np.arange(T) == T - 1)
           for _ in range(n)]
    D.write("test/pendulum/toy-v0", eps, gym.spaces.Box(-np.inf, np.inf, (3,), np.float32),
            gym.spaces.Box(-2.0, 2.0, (1,), np.float32), {"kind": "random", "env": "Pendulum-v1", "obs_key": "observation"},
            root=root)
    return eps


def test_dataset_rows_in_the_replay_are_the_online_layout(tmp_path):
    """Each episode becomes T + 1 replay rows: every observation, the action into it in the actor's
    units (none into the first), the reward on arrival, is_first at the start, is_terminal at a termination."""
    from agents.config import load_config
    from agents.offline.dreamer import fill
    from agents.replay import Replay
    from agents.train import build_agent

    eps = pendulum_dataset(tmp_path, n=2, T=6)
    eps[1].terminated[-1], eps[1].truncated[-1] = True, False
    cfg, _ = load_config(["env=pendulum", "preset=quickstart"])
    agent, policy, _ = build_agent(cfg, "cpu")
    rp = Replay(100, 1, 2, tmp_path / "replay", policy.obs_keys, context=False)
    assert fill(rp, D.Dataset("x-v0", eps, {"obs_key": "observation"}, None, None), policy) == 14
    rows = rp.rows[torch.arange(len(rp))]
    for k, ep in enumerate(eps):
        r = rows[7 * k:7 * (k + 1)]
        np.testing.assert_array_equal(r["obs"].numpy(), ep.obs)
        assert r["action"][0].abs().sum() == 0
        np.testing.assert_allclose(r["action"][1:, 0].numpy(), ep.action[:, 0] / 2, rtol=1e-6)  # [-2, 2] -> [-1, 1]
        np.testing.assert_allclose(r["reward"][1:].numpy(), ep.reward, rtol=1e-6)
        assert r["reward"][0] == 0 and r["is_first"].tolist() == [True] + [False] * 6
        assert r["is_terminal"].tolist() == [False] * 6 + [k == 1]


def test_penalty_lowers_imagined_rewards_by_the_ensembles_disagreement():
    from agents.config import load_config
    from agents.dreamer import imagine_losses
    from agents.train import build_agent

    cfg, _ = load_config(["env=pendulum", "preset=quickstart", "agent.penalty=2.5"])
    agent = build_agent(cfg, "cpu")[0]
    N = 8
    starts = {k: v[:, None] for k, v in agent.wm.core.initial(N).items()}  # (B, T, ...) with B = N, T = 1
    torch.manual_seed(0)
    _, with_penalty, *_ = imagine_losses(agent, starts, torch.ones(N))
    ensemble, agent.ensemble = agent.ensemble, None
    torch.manual_seed(0)
    _, plain, *_ = imagine_losses(agent, starts, torch.ones(N))
    agent.ensemble = ensemble
    doubt = float(with_penalty["train/disagreement"])
    assert doubt > 0
    # the penalty of the step from t to t+1 is the disagreement on (feat_t, a_t)
    seen, imagine, disagreement = {}, agent.wm.core.imagine, agent.ensemble.disagreement
    agent.wm.core.imagine = lambda *a: seen.setdefault("rollout", imagine(*a))
    agent.ensemble.disagreement = lambda f, a: seen.setdefault("asked", (f, a)) and disagreement(f, a)
    imagine_losses(agent, starts, torch.ones(N))
    (feat, action), (f, a) = seen["rollout"], seen["asked"]
    assert torch.equal(f, feat[:, :-1].detach()) and torch.equal(a, action[:, :-1].detach())
    assert float(with_penalty["train/imag_reward"]) == pytest.approx(float(plain["train/imag_reward"]) - 2.5 * doubt, rel=1e-5, abs=1e-6)


def test_ensemble_disagreement_is_the_members_std():
    """The in-place disagreement equals its obvious twin: torch's std over the stacked members."""
    from agents.dreamer import Ensemble

    torch.manual_seed(0)
    ens = Ensemble(feat=12, action_dim=3, out=20, units=16, members=4)
    feat, action = torch.randn(5, 7, 12), torch.randn(5, 7, 3)
    fast = ens.disagreement(feat, action)
    with torch.no_grad():
        slow = ens(feat, action).std(0).mean(-1)
    assert fast.shape == (5, 7) and not fast.requires_grad
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)


def test_offline_dreamer_steps_the_env_only_to_evaluate(tmp_path, monkeypatch):
    """`train offline=<dataset>`: the ensemble and the other modules learn from the dataset's rows; the
    only env steps are the evaluations (before, at eval_every updates, after); it resumes."""
    import agents.train as T
    from agents.config import load_config

    pendulum_dataset(tmp_path)
    steps = count_env_steps(monkeypatch)
    args = ["env=pendulum", "preset=quickstart", "offline=test/pendulum/toy-v0", f"offline_root={tmp_path}",
            f"run_dir={tmp_path / 'run'}", "progress=false", "eval_episodes=1", "eval_every=4", "agent.penalty=1",
            "batch_size=4", "seq_len=8"]
    cfg, _ = load_config(args + ["offline_updates=6"])
    res = T.train(cfg)
    assert res["updates"] == 6 and res["env_steps"] == 0
    assert len(steps) == 3 * 200  # evaluations before, at update 4 and after: one 200-step episode each
    assert res["method"] == "dreamer-offline-penalty"
    cfg, _ = load_config(args + ["offline_updates=8"])
    assert T.train(cfg)["updates"] == 8
    assert len(steps) == 3 * 200 + 200  # resumed: no evaluation before, one after


def test_penalty_runs_learn_the_same_world_model_as_plain_ones(tmp_path):
    """With and without the penalty, an offline run draws the same random numbers (the ensemble starts
    from a fork of the stream), so the world models learn identically and the runs differ only where
    the penalty acts: the actor and critic."""
    from agents import checkpoint
    from agents.config import load_config
    from agents.train import train

    pendulum_dataset(tmp_path)
    params = {}
    for penalty in (0, 3):
        run = tmp_path / f"run{penalty}"
        cfg, _ = load_config(["env=pendulum", "preset=quickstart", "offline=test/pendulum/toy-v0", f"offline_root={tmp_path}",
                              f"run_dir={run}", "progress=false", "eval_episodes=1", "eval_every=0", "batch_size=4",
                              "seq_len=8", "offline_updates=3", f"agent.penalty={penalty}", "seed=5"])
        train(cfg)
        params[penalty] = checkpoint.load(checkpoint.latest(run))[0]["agent"]
    plain, penalised = params[0], params[3]
    wm = [k for k in plain if k.startswith("wm.")]
    assert wm and all(torch.equal(plain[k], penalised[k]) for k in wm)
    assert any(k.startswith("ensemble.") for k in penalised) and not any(k.startswith("ensemble.") for k in plain)
    assert not all(torch.equal(plain[k], penalised[k]) for k in plain if k.startswith("actor."))  # the penalty acted


def test_behaviour_loss_compares_each_state_with_the_action_taken_there():
    """agent.bc: the actor at row t's state against the action stored with row t+1 (the action into
    it), rows whose successor starts an episode left out; its gradient moves the actor to the data."""
    from agents.config import load_config
    from agents.dreamer import behaviour_loss
    from agents.train import build_agent

    cfg, _ = load_config(["env=pendulum", "preset=quickstart", "agent.bc=1"])
    actor = build_agent(cfg, "cpu")[0].actor
    B, T, F = 2, 6, actor.net[0].in_features
    feat = torch.randn(B, T, F)
    mean = actor.dist(feat).base_dist.mean.detach()  # (B, T, 1)
    action = torch.zeros(B, T, 1)
    action[:, 1:] = mean[:, :-1]  # the action taken at row t is stored with row t+1
    is_first = torch.zeros(B, T)
    assert float(behaviour_loss(actor, feat, action, is_first)) == pytest.approx(0.0, abs=1e-12)
    assert float(behaviour_loss(actor, feat, mean, is_first)) > 1e-4  # unshifted: not the taken actions
    is_first[0, 3] = 1.0  # row 3 starts an episode: its stored action is not one taken at row 2
    moved = action.clone()
    moved[0, 3] += 5.0
    assert float(behaviour_loss(actor, feat, moved, is_first)) == pytest.approx(0.0, abs=1e-12)
    target = torch.rand(B, T, 1) * 2 - 1
    first = float(behaviour_loss(actor, feat, target, is_first))
    opt = torch.optim.SGD(actor.parameters(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        behaviour_loss(actor, feat, target, is_first).backward()
        opt.step()
    assert float(behaviour_loss(actor, feat, target, is_first)) < 0.5 * first
