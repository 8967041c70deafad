"""Replay: rows in each env's stream, uniform window starts, stored states, reopening in place."""
import math

import pytest
import torch
from tensordict import TensorDict

from agents.replay import Replay, ReplayError, context_every
from worldmodels.base import index_state
from worldmodels.model import BACKBONES, ObsSpec, WorldModel
from worldmodels.nets import NetsConfig


def fake_frames(n_envs, F, start, ep_len, t0):
    """Collector-shaped frames whose observation encodes (env, episode, step) and whose episodes
    end every `ep_len` steps, terminating on odd episodes and truncating on even ones."""
    obs, nobs, init, done, term, rew = [], [], [], [], [], []
    for e in range(n_envs):
        o, no, i, d, tm, r = [], [], [], [], [], []
        for k in range(F):
            t = t0 + k
            ep, step = t // ep_len, t % ep_len
            o.append([e, ep, step])
            no.append([e, ep, step + 1])
            i.append(step == 0)
            d.append(step == ep_len - 1)
            tm.append(step == ep_len - 1 and ep % 2 == 1)
            r.append(float(step + 1))
        obs.append(o); nobs.append(no); init.append(i); done.append(d); term.append(tm); rew.append(r)
    f = lambda x, dt=torch.float32: torch.tensor(x, dtype=dt)
    td = TensorDict({
        "observation": f(obs), "is_init": f(init, torch.bool)[..., None], "prev_action": torch.zeros(n_envs, F, 1),
        "next": {"observation": f(nobs), "reward": f(rew)[..., None], "done": f(done, torch.bool)[..., None],
                 "terminated": f(term, torch.bool)[..., None], "prev_action": torch.zeros(n_envs, F, 1)},
    }, [n_envs, F])
    return td if n_envs > 1 else td[0]


def check_windows(batch, ep_len):
    obs = batch["obs"]  # (B, T, 3): env, episode, step
    first = batch["is_first"].bool()
    for b in range(obs.shape[0]):
        for t in range(1, obs.shape[1]):
            prev, cur = obs[b, t - 1], obs[b, t]
            assert cur[0] == prev[0], "a window joined two envs"
            if prev[1] == cur[1]:
                assert cur[2] == prev[2] + 1, (prev, cur)  # contiguous in time
                assert not first[b, t]
            else:
                assert first[b, t], f"episodes joined silently: {prev.tolist()} -> {cur.tolist()}"
                assert cur[2] == 0 and cur[1] == prev[1] + 1 and prev[2] == ep_len


def test_windows_never_join_episodes(tmp_path):
    ep_len = 7
    for n_envs in (1, 3):
        rp = Replay(capacity=150 * n_envs, batch_size=32, seq_len=10, directory=tmp_path / f"r{n_envs}",
                    obs_keys="observation", n_envs=n_envs)
        for i in range(12):  # wraps the 150-row streams several times
            rp.add(fake_frames(n_envs, 20, 0, ep_len, 20 * i))
            if rp.ready():
                batch = rp.sample()
                check_windows(batch, ep_len)
                assert batch["is_first"][:, 0].all()  # no context: every window starts from the initial state


def test_rows_hold_terminal_observation_and_arrival_reward(tmp_path):
    rp = Replay(capacity=100, batch_size=1, seq_len=2, directory=tmp_path, obs_keys="observation")
    rp.add(fake_frames(1, 8, 0, 4, 0))  # two episodes of 4 steps; the second terminates
    rows = rp.rows[torch.arange(len(rp))]
    assert len(rp) == 10  # 8 steps + one final observation per episode
    assert rows["obs"][:, 2].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert rows["reward"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]  # reward on arrival at x_t
    assert rows["is_first"].tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert rows["is_terminal"].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]  # episode 1 truncates, 2 terminates


# --- uniform sampling ------------------------------------------------------------------------------

def assert_uniform(rp, n=40_000, tenths=10):
    """The share of sampled window starts in each tenth of every env's stored steps matches the share
    of valid starts there, within 5 standard errors of a binomial share (a false alarm has odds of
    about 1e-6 per tenth), and starts fall on every offset within a collector batch of 16."""
    g = torch.Generator().manual_seed(0)
    env, start = rp.draw(n, g)
    all_env, all_start = rp.starts()
    lo, hi = torch.tensor(rp.lo), torch.tensor(rp.hi)

    def tenth(e, s):
        return e * tenths + ((s - lo[e]) * tenths // (hi[e] - lo[e]))

    bins = rp.n_envs * tenths
    observed = torch.bincount(tenth(env, start), minlength=bins).double() / n
    expected = torch.bincount(tenth(all_env, all_start), minlength=bins).double() / all_start.numel()
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((observed - expected).abs() <= 5 * sigma + 1e-12).all(), (observed, expected)
    offsets = torch.bincount(start % 16, minlength=16).double() / n
    assert (offsets > 0.5 / 16).all(), offsets


def test_sampling_uniform_after_wrap(tmp_path):
    rp = Replay(capacity=1000, batch_size=16, seq_len=16, directory=tmp_path, obs_keys="observation")
    for i in range(160):  # 2,560 frames (+ terminal rows) into 1,000 rows: wrapped twice
        rp.add(fake_frames(1, 16, 0, 37, 16 * i))
    assert rp.hi[0] - rp.lo[0] == 1000 and rp.hi[0] > 2000
    assert_uniform(rp)


def test_sampling_uniform_after_resume(tmp_path):
    rp = Replay(capacity=1000, batch_size=16, seq_len=16, directory=tmp_path / "replay", obs_keys="observation")
    for i in range(50):
        rp.add(fake_frames(1, 16, 0, 37, 16 * i))
    rp.save(tmp_path / "ckpt")
    rp2 = Replay(capacity=1000, batch_size=16, seq_len=16, directory=tmp_path / "replay", obs_keys="observation")
    rp2.load(tmp_path / "ckpt")
    for i in range(20):  # the resumed run appends 320 frames to the same stream
        rp2.add(fake_frames(1, 16, 0, 37, 16 * (50 + i)))
    assert rp2.hi[0] - rp2.lo[0] == 1000
    assert_uniform(rp2)


def test_sampling_uniform_with_several_envs(tmp_path):
    rp = Replay(capacity=3 * 500, batch_size=16, seq_len=16, directory=tmp_path, obs_keys="observation", n_envs=3)
    for i in range(40):
        rp.add(fake_frames(3, 16, 0, 23, 16 * i))
    assert_uniform(rp)
    _, start = rp.draw(4000, torch.Generator().manual_seed(1))
    assert len(set((start % 16).tolist())) == 16  # windows cross collector batches


# --- reopening in place ----------------------------------------------------------------------------

def test_save_and_load_reopen_rows_in_place(tmp_path):
    rp = Replay(capacity=50, batch_size=4, seq_len=5, directory=tmp_path / "a", obs_keys="observation")
    for i in range(4):
        rp.add(fake_frames(1, 20, 0, 6, 20 * i))  # 80+ rows into 50: wrapped
    before = rp.rows[rp._slots(torch.zeros(50, dtype=torch.long), torch.arange(rp.lo[0], rp.hi[0]))]
    meta = rp.save(tmp_path / "ckpt")
    assert not list((tmp_path / "ckpt").glob("*.memmap")), "a checkpoint must not copy rows"
    rp2 = Replay(capacity=50, batch_size=4, seq_len=5, directory=tmp_path / "a", obs_keys="observation")
    restored = rp2.load(tmp_path / "ckpt")
    assert restored["rows"] == 50 and restored["dropped"] == 0 and (rp2.lo, rp2.hi) == (meta["lo"], meta["hi"])
    after = rp2.rows[rp2._slots(torch.zeros(50, dtype=torch.long), torch.arange(rp2.lo[0], rp2.hi[0]))]
    torch.testing.assert_close(after["obs"], before["obs"])
    assert rp2.verify() == []
    rp2.add(fake_frames(1, 20, 0, 6, 80))
    check_windows(rp2.sample(), 6)


def test_resume_drops_rows_a_killed_run_overwrote(tmp_path):
    """After the checkpoint, a run writes more rows into its wrapped buffer and is killed: the resume
    keeps the checkpoint's streams and drops exactly the rows those writes replaced."""
    rp = Replay(capacity=50, batch_size=4, seq_len=5, directory=tmp_path / "a", obs_keys="observation")
    for i in range(3):
        rp.add(fake_frames(1, 20, 0, 6, 20 * i))
    rp.save(tmp_path / "ckpt")
    lo, hi = rp.lo[0], rp.hi[0]
    rp.add(fake_frames(1, 10, 0, 6, 60))  # the killed run's last rows (11 with a terminal row)
    rp2 = Replay(capacity=50, batch_size=4, seq_len=5, directory=tmp_path / "a", obs_keys="observation")
    restored = rp2.load(tmp_path / "ckpt")
    written = rp.hi[0] - hi
    assert rp2.hi[0] == hi and rp2.lo[0] == lo + written and restored["dropped"] == written
    assert rp2.verify() == []  # every surviving row is the checkpoint's


def test_damaged_rows_are_detected(tmp_path):
    rp = Replay(capacity=100, batch_size=4, seq_len=5, directory=tmp_path / "a", obs_keys="observation")
    rp.add(fake_frames(1, 30, 0, 6, 0))
    rp.save(tmp_path / "ckpt")
    rp.rows["reward"][3] = 99.0  # corrupt a stored row behind the checkpoint's back
    with pytest.raises(ReplayError, match="damaged"):
        Replay(capacity=100, batch_size=4, seq_len=5, directory=tmp_path / "a", obs_keys="observation").load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "replay.json").write_text("{not json")
    with pytest.raises(ReplayError, match="corrupt"):
        Replay(capacity=100, batch_size=4, seq_len=5, directory=tmp_path / "a", obs_keys="observation").load(tmp_path / "ckpt")


def test_free_space_check_counts_the_rows_the_run_will_write(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    rp = Replay(capacity=1000, batch_size=4, seq_len=5, directory=tmp_path / "a", obs_keys="observation")
    rp.add(fake_frames(1, 10, 0, 6, 0))
    row = rp.bytes_per_row()["row"]
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(0, 0, int(row * 300)))  # room for 300 rows
    with pytest.raises(ReplayError, match="the replay needs .* lower replay_capacity or steps"):
        Replay(capacity=1000, batch_size=4, seq_len=5, directory=tmp_path / "b",
               obs_keys="observation").add(fake_frames(1, 10, 0, 6, 0))  # 1,000 rows sized, 300 free
    short = Replay(capacity=1000, batch_size=4, seq_len=5, directory=tmp_path / "c", obs_keys="observation",
                   expected_rows=250)  # a short run: its 250 rows fit
    short.add(fake_frames(1, 10, 0, 6, 0))
    assert len(short) == 11  # 10 steps and the final observation of the episode that ended
    with pytest.raises(ReplayError, match="needs"):
        Replay(capacity=1000, batch_size=4, seq_len=5, directory=tmp_path / "d", obs_keys="observation",
               expected_rows=350).add(fake_frames(1, 10, 0, 6, 0))


# --- replay context: stored states -----------------------------------------------------------------

A = 2


def as_double(burn):
    return None if burn is None else {k: v.double() if v.is_floating_point() else v for k, v in burn.items()}


@torch.no_grad()
def acted_stream(wm, n_steps, ep_lens, seed=0):
    """Act like the collector's policy, one observe of T=1 per step with fixed latent samples,
    recording what it carries (root state_*, next state_*): frames (n_steps,), the rows' latent indices
    in row order (0 on the terminal rows) and the rows' observations/actions/flags."""
    core = wm.core
    g = torch.Generator().manual_seed(seed)
    S, K = core.state_shapes()["stoch"]
    obs = torch.randn(n_steps + 1, 3, generator=g, dtype=torch.float64)
    act = torch.rand(n_steps, A, generator=g, dtype=torch.float64) * 2 - 1
    frames = []
    state, prev, t_ep, ep = core.initial(1), torch.zeros(1, A, dtype=torch.float64), 0, 0
    for t in range(n_steps):
        first = t_ep == 0
        if first:
            state, prev = core.initial(1), torch.zeros(1, A, dtype=torch.float64)
        z = torch.randint(K, (1, 1, S), generator=g)
        s, _, _ = core.observe(state, wm.encoder(obs[t][None, None]), prev[:, None], torch.tensor([[float(first)]]),
                               noise={"stoch": z})
        nxt = index_state(s, 0)
        done = t_ep == ep_lens[ep % len(ep_lens)] - 1
        frames.append({"observation": obs[t].float(), "is_init": torch.tensor([first]), "prev_action": prev[0].float(),
                       **{f"state_{k}": v[0] for k, v in state.items()},
                       "next": {"observation": obs[t + 1].float(), "reward": torch.tensor([0.5]),
                                "done": torch.tensor([done]), "terminated": torch.tensor([done]),
                                "prev_action": act[t].float(), **{f"state_{k}": v[0] for k, v in nxt.items()}}})
        state, prev, t_ep = nxt, act[t][None], t_ep + 1
        if done:
            t_ep, ep = 0, ep + 1
    return TensorDict.maybe_dense_stack([TensorDict(f, []) for f in frames])


def valid(states, key):
    """A state entry with the Transformer's empty cache slots (positions before the episode start,
    masked out of attention, whatever they hold) set to zero."""
    v = states[key]
    if key in ("k", "v"):
        W = v.shape[-2]
        slot_pos = states["pos"][..., None] - W + torch.arange(W, dtype=v.dtype)  # (..., 1, W)
        v = v * (slot_pos >= 0)[..., None]
    return v


@pytest.fixture(params=sorted(BACKBONES))
def backbone(request):
    return request.param


@pytest.mark.parametrize("every,fixed", [(1, False), (4, False), (4, True)])
def test_window_from_stored_state_equals_whole_episode(tmp_path, backbone, every, fixed):
    """For every backbone: a window started from its stored state (directly, or burned in from the
    anchor before it) gives, in float64, the states of observing the whole stream from its start;
    also with burn-ins of a fixed k - 1 rows (for a CUDA graph), each window reading its own length."""
    torch.manual_seed(0)
    core_cls, cfg_cls = BACKBONES[backbone]
    wm = WorldModel(backbone, cfg_cls(size="xs"), NetsConfig(), ObsSpec(pixels=False, obs_dim=3, action_dim=A)).double()
    T, n_steps = 8, 70
    frames = acted_stream(wm, n_steps, ep_lens=[23, 31])
    z_rows = []  # the latent acting sampled at each row, 0 on terminal rows (row order as the replay writes them)
    for t in range(n_steps):
        z_rows.append(frames["next", "state_stoch"][t].argmax(-1))
        if frames["next", "done"][t]:
            z_rows.append(torch.zeros_like(z_rows[-1]))
    z_rows = torch.stack(z_rows)  # (L, S)
    rp = Replay(capacity=200, batch_size=24, seq_len=T, directory=tmp_path, obs_keys="observation",
                state_shapes=wm.core.state_shapes(), every=every, state_dtype=torch.float64, fixed_shapes=fixed)
    for i in range(0, n_steps, 10):  # collector batches of 10
        rp.add(frames[i:i + 10])
    L = rp.hi[0]
    assert L == z_rows.shape[0]
    rows = rp.rows[torch.arange(L)]
    with torch.no_grad():
        full, _, _ = wm.core.observe(wm.core.initial(1), wm.encoder(rows["obs"][None].double()), rows["action"][None].double(),
                                     rows["is_first"][None].double(), noise={"stoch": z_rows[None]})
        batch = rp.sample(generator=torch.Generator().manual_seed(3))
        assert batch["known"].all()
        if every > 1:
            assert batch["burn"] is not None and (batch["burn"]["length"] > 0).any()
            assert not fixed or batch["burn"]["obs"].shape[1] == every - 1
        start = {k: v.double() for k, v in wm.context_state(batch["start"], as_double(batch["burn"])).items()}
        _, s = batch["where"]
        l = s[:, None] + torch.arange(T)
        win, _, _ = wm.core.observe(start, wm.encoder(batch["obs"].double()), batch["action"].double(), batch["is_first"],
                                    noise={"stoch": z_rows[l]})
    assert not batch["is_first"][:, 0].all(), "some windows must start mid-episode"
    full = {k: v[0][l] for k, v in full.items()}
    for k in wm.core.state_shapes():
        torch.testing.assert_close(valid(win, k), valid(full, k), rtol=1e-5, atol=1e-5, msg=f"{backbone} {k}")
    # ...and starting those windows from zero instead is measurably wrong.
    zero, _, _ = wm.core.observe(wm.core.initial(rp.batch_size), wm.encoder(batch["obs"].double()),
                                 batch["action"].double(), batch["is_first"], noise={"stoch": z_rows[l]})
    assert any(not torch.allclose(valid(zero, k), valid(full, k)) for k in wm.core.state_shapes() if k != "stoch")


@pytest.mark.parametrize("every", [1, 4])
def test_refresh_writes_states_back(tmp_path, every):
    torch.manual_seed(0)
    wm = WorldModel("s5wm", BACKBONES["s5wm"][1](size="xs"), NetsConfig(), ObsSpec(pixels=False, obs_dim=3, action_dim=A)).double()
    rp = Replay(capacity=200, batch_size=1, seq_len=8, directory=tmp_path, obs_keys="observation",
                state_shapes=wm.core.state_shapes(), every=every, state_dtype=torch.float64)
    frames = acted_stream(wm, 60, ep_lens=[25])
    rp.add(frames)
    with torch.no_grad():
        for p in wm.parameters():  # a newer model: its states differ from what acting stored
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(0)
    for _ in range(6):  # one window at a time: overlapping windows of one batch write the same rows
        batch = rp.sample(generator=g)
        with torch.no_grad():
            start = wm.context_state(batch["start"], as_double(batch["burn"]))
            states, _, _ = wm.core.observe(start, wm.encoder(batch["obs"].double()), batch["action"].double(), batch["is_first"])
        rp.refresh(batch, states)
        env, s = batch["where"]
        written = 0
        for j in range(rp.seq_len):
            l = int(s[0]) + j + 1  # the state after window row j is stored before row l
            if l % every == 0 and l < rp.hi[0]:
                stored = rp._decode(rp.ctx[rp._anchor_slots(env, torch.tensor([l]))], "cpu")
                torch.testing.assert_close(stored["ssm"][0], states["ssm"][0, j])
                assert torch.equal(stored["stoch"][0], states["stoch"][0, j].round())
                written += 1
            if every > 1:
                z = rp.rows["z"][rp._slots(env, torch.tensor([l - 1]))][0]
                assert torch.equal(z.long(), states["stoch"][0, j].argmax(-1))
        assert written >= min(1, rp.hi[0] - int(s[0]) - rp.seq_len)


def test_lost_anchor_starts_from_zero(tmp_path):
    """A window whose anchor was overwritten (it starts within k rows of the oldest row) starts from the
    initial state and is not refreshed."""
    rp = Replay(capacity=40, batch_size=64, seq_len=8, directory=tmp_path, obs_keys="observation",
                state_shapes={"stoch": (2, 3), "h": (4,)}, every=8)
    f = fake_frames(1, 45, 0, 100, 0)  # one long episode, wrapped: lo = 5, not an anchor
    f["state_stoch"] = torch.zeros(45, 2, 3)
    f["state_h"] = torch.zeros(45, 4)
    f["next", "state_stoch"] = torch.zeros(45, 2, 3)
    f["next", "state_h"] = torch.zeros(45, 4)
    rp.add(f[:25])
    rp.add(f[25:])
    assert rp.lo[0] == 5
    batch = rp.sample(generator=torch.Generator().manual_seed(0))
    _, s = batch["where"]
    lost = s // 8 * 8 < 5
    assert lost.any() and torch.equal(~batch["known"], lost)
    assert batch["is_first"][lost, 0].all()


def test_context_every_by_state_size():
    assert context_every({"deter": (64,), "stoch": (8, 8)}, 16) == 1
    assert context_every({"k": (2, 64, 64), "v": (2, 64, 64), "stoch": (32, 16)}, 16) == 8
    assert context_every({"k": (4, 256, 512), "v": (4, 256, 512), "stoch": (32, 32)}, 16) == 16  # at most T
    assert math.log2(context_every({"x": (10_000,), "stoch": (4, 4)}, 64)).is_integer()
