"""Replayed sequences never join two episodes (or two envs) without an is_first at the seam."""
import torch
from tensordict import TensorDict

from agents.replay import Replay


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


def check_windows(batch):
    obs = batch["obs"]  # (B, T, 3): env, episode, step
    first = batch["is_first"].bool()
    for b in range(obs.shape[0]):
        for t in range(1, obs.shape[1]):
            prev, cur = obs[b, t - 1], obs[b, t]
            same_ep = prev[0] == cur[0] and prev[1] == cur[1]
            if same_ep:
                assert cur[2] == prev[2] + 1, (prev, cur)  # contiguous in time
                assert not first[b, t]
            else:
                assert first[b, t], f"episodes joined silently: {prev.tolist()} -> {cur.tolist()}"
                assert cur[0] == prev[0] and cur[2] == 0 and prev[2] == batch["ep_len"]


def test_windows_never_join_episodes(tmp_path):
    ep_len = 7
    for n_envs in (1, 3):
        rp = Replay(capacity=150, batch_size=32, seq_len=10, directory=tmp_path / f"r{n_envs}", obs_key="observation", n_envs=n_envs)
        for i in range(12):  # wraps the 150-row buffer several times
            rp.add(fake_frames(n_envs, 20, 0, ep_len, 20 * i))
            if rp.ready():
                batch = rp.sample()
                batch["ep_len"] = ep_len
                check_windows(batch)
                assert batch["is_first"][:, 0].all()


def test_rows_hold_terminal_observation_and_arrival_reward(tmp_path):
    rp = Replay(capacity=100, batch_size=1, seq_len=2, directory=tmp_path, obs_key="observation")
    rp.add(fake_frames(1, 8, 0, 4, 0))  # two episodes of 4 steps; the second terminates
    rows = rp.rb.storage.get(torch.arange(len(rp)))
    assert len(rp) == 10  # 8 steps + one final observation per episode
    steps = rows["obs"][:, 2].tolist()
    assert steps == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]
    assert rows["reward"].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]  # reward on arrival at x_t
    assert rows["is_first"].tolist() == [1, 0, 0, 0, 0, 1, 0, 0, 0, 0]
    assert rows["is_terminal"].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1]  # episode 1 truncates, 2 terminates


def test_save_and_load_keep_rows_in_order(tmp_path):
    rp = Replay(capacity=50, batch_size=4, seq_len=5, directory=tmp_path / "a", obs_key="observation")
    for i in range(4):
        rp.add(fake_frames(1, 20, 0, 6, 20 * i))  # 80+ rows into 50: wrapped
    rows = rp.rb.storage.get(torch.cat([torch.arange(rp.cursor, 50), torch.arange(rp.cursor)]))
    rp.save(tmp_path / "ckpt")
    rp2 = Replay(capacity=50, batch_size=4, seq_len=5, directory=tmp_path / "a", obs_key="observation")
    rp2.load(tmp_path / "ckpt")
    assert len(rp2) == 50 and rp2.cursor == 0
    torch.testing.assert_close(rp2.rb.storage.get(torch.arange(50))["obs"], rows["obs"])
    rp2.add(fake_frames(1, 20, 0, 6, 80))
    batch = rp2.sample()
    batch["ep_len"] = 6
    check_windows(batch)
