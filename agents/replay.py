"""Replay: collector frames -> Dreamer rows in a TorchRL buffer -> [B, T] training sequences.

A collector frame holds (x_t, a_t, next: r_t, x_{t+1}, done). The world model wants, per row, the
observation, the action that led to it, the reward received on arriving at it and the flags
is_first / is_terminal (DreamerV3's layout). Rows are written in time order per env stream; where an
episode ends an extra row holds its last observation, so the continue head sees terminal states.

Storage is a LazyMemmapStorage in the run directory. A SliceSampler draws windows of T rows inside
one "stream" segment: a stream id is (env, session, lap of the circular buffer), so a window never
joins two envs, two runs of a resumed training, or old and overwritten data. Windows may cross
episode starts; is_first is set there (and at every window's first row), and the model resets its state on it, so episodes never join silently.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from tensordict import TensorDict, TensorDictBase
from torch import Tensor
from torchrl.data import LazyMemmapStorage, SliceSampler, TensorDictReplayBuffer


class Replay:
    def __init__(self, capacity: int, batch_size: int, seq_len: int, directory: str | Path, obs_key: str,
                 n_envs: int = 1, action_low: Tensor | None = None, action_high: Tensor | None = None):
        self.capacity, self.batch_size, self.seq_len, self.obs_key, self.n_envs = capacity, batch_size, seq_len, obs_key, n_envs
        self.directory = Path(directory)
        self.session = 0  # bumped on every resume, so new rows never share a stream id with old ones
        self.rb = self._buffer()
        self.carry_reward = torch.zeros(n_envs)  # r_{t-1} of each stream across collector batches
        self.cursor = 0  # where the next row goes (the buffer's round-robin writer agrees)
        self.laps = 0  # times this session's writes wrapped around the storage

    def _buffer(self) -> TensorDictReplayBuffer:
        live = self.directory / f"live-{self.session}"
        shutil.rmtree(live, ignore_errors=True)
        return TensorDictReplayBuffer(
            storage=LazyMemmapStorage(self.capacity, scratch_dir=live),
            sampler=SliceSampler(slice_len=self.seq_len, traj_key="stream", strict_length=True),
            batch_size=self.batch_size * self.seq_len,
        )

    def __len__(self) -> int:
        return len(self.rb)

    def add(self, frames: TensorDictBase) -> int:
        """Append a collector batch, shaped (F,) for one env or (n_envs, F). Returns rows written."""
        frames = frames.reshape(-1, frames.shape[-1]) if frames.batch_dims > 1 else frames.unsqueeze(0)
        assert frames.shape[0] == self.n_envs, (frames.shape, self.n_envs)
        total = 0
        for e in range(self.n_envs):
            rows = self._rows(frames[e], e)
            n = rows.shape[0]
            lap = self.laps + (self.cursor + torch.arange(n)) // self.capacity
            rows["stream"] = e + self.n_envs * (lap + (self.session << 32))
            self.rb.extend(rows)
            self.laps += (self.cursor + n) // self.capacity
            self.cursor = (self.cursor + n) % self.capacity
            total += n
        return total

    def _rows(self, f: TensorDictBase, e: int) -> TensorDict:
        F_ = f.shape[0]
        is_first = f["is_init"].reshape(F_)
        next_reward = f["next", "reward"].reshape(F_).float()
        reward = torch.cat([self.carry_reward[e:e + 1], next_reward[:-1]])  # (F,) reward on arrival at x_t
        reward = torch.where(is_first, torch.zeros_like(reward), reward)
        self.carry_reward[e] = next_reward[-1]
        done = f["next", "done"].reshape(F_)
        D = int(done.sum())
        # Row t goes to t + (episodes ended before t); an episode's last observation right after it.
        pos = torch.arange(F_) + torch.cumsum(done.long(), 0) - done.long()
        end_pos = pos[done] + 1
        n = F_ + D
        obs = f[self.obs_key]
        rows = TensorDict({
            "obs": torch.empty(n, *obs.shape[1:], dtype=obs.dtype),
            "action": torch.empty(n, f["prev_action"].shape[-1]),
            "reward": torch.empty(n),
            "is_first": torch.zeros(n, dtype=torch.bool),
            "is_terminal": torch.zeros(n, dtype=torch.bool),
        }, [n])
        rows["obs"][pos] = obs
        rows["action"][pos] = f["prev_action"].float()
        rows["reward"][pos] = reward
        rows["is_first"][pos] = is_first
        if D:
            rows["obs"][end_pos] = f["next", self.obs_key][done]
            rows["action"][end_pos] = f["next", "prev_action"][done].float()
            rows["reward"][end_pos] = next_reward[done]
            rows["is_terminal"][end_pos] = f["next", "terminated"].reshape(F_)[done]
        return rows

    def sample(self, device: torch.device | str = "cpu") -> dict[str, Tensor]:
        B, T = self.batch_size, self.seq_len
        s = self.rb.sample().reshape(B, T)  # strict_length: every slice has T rows
        out = {k: s[k].to(device) for k in ("obs", "action", "reward", "is_first", "is_terminal")}
        out["is_first"] = out["is_first"].clone()
        out["is_first"][:, 0] = True  # the model starts every window from its initial state
        out["is_first"] = out["is_first"].float()
        return out

    def ready(self) -> bool:
        """At least one stream segment can serve a full window."""
        return len(self.rb) >= self.seq_len * self.n_envs

    # Checkpointing writes the filled rows only, oldest first (a dump of the storage would copy its
    # whole preallocated capacity), plus the row builder's carry.
    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        n = len(self.rb)
        if n:
            order = torch.cat([torch.arange(self.cursor, n), torch.arange(0, self.cursor)]) if n == self.capacity else torch.arange(n)
            self.rb.storage.get(order).memmap_(path / "rows")
        torch.save({"carry_reward": self.carry_reward, "session": self.session, "rows": n}, path / "meta.pt")

    def load(self, path: Path) -> None:
        meta = torch.load(path / "meta.pt")
        self.session = meta["session"] + 1
        self.rb = self._buffer()
        for stale in self.directory.glob("live-*"):  # storages of earlier (maybe killed) sessions
            if stale.name != f"live-{self.session}":
                shutil.rmtree(stale, ignore_errors=True)
        self.cursor, self.laps = 0, 0
        if meta["rows"]:
            rows = TensorDict.load_memmap(path / "rows")
            assert rows.shape[0] == meta["rows"], (rows.shape, meta["rows"])
            for start in range(0, rows.shape[0], 65536):  # chunks keep memory flat for image replay
                self.rb.extend(rows[start:start + 65536].clone())
            self.cursor = meta["rows"] % self.capacity
        self.carry_reward = meta["carry_reward"]
