"""Replay: collector frames -> Dreamer rows on disk -> uniform [B, T] windows that start from the
model state stored with them (DreamerV3's replay context).

Rows. A collector frame holds (x_t, a_t, next: r_t, x_{t+1}, done). The world model wants, per row,
the observation, the action that led to it, the reward received on arriving at it and the flags
is_first / is_terminal (DreamerV3's layout); where an episode ends an extra row holds its last
observation, so the continue head sees terminal states.

Streams. Every env has one stream of rows numbered by a logical index l = 0, 1, 2, ... that only
grows, across buffer wraps and resumes. Row l of env e lives in slot e * C + (l mod C) of a
memory-mapped TensorDict (tensordict, TorchRL's data layer) in the run directory, C rows per env,
and env e holds the rows [lo_e, hi_e) with hi_e - lo_e <= C. TorchRL's own storages keep one cursor
and one length for all envs and its SliceSampler draws trajectories, not steps, uniformly (a short
segment as often as a long one); a per-env logical stream is what makes uniform windows possible.
A resumed env continues its stream with an is_first row, so no window joins two episodes silently,
and a window can never join old and overwritten data because both ends lie in [lo_e, hi_e).

Sampling. A window of T rows may start at any l in [lo_e, hi_e - T] of any env; starts are drawn
uniformly over all of them (DreamerV3's uniform selector), so every stored step that can start a
full window is equally likely to, whatever the wraps, resumes and collector batches.

Replay context. Each row also keeps the backbone state the policy was in before the row (what the
collector carries as "state_*"); a window starts from the state stored with its first row, not from
zero, so a model trained on T-step windows learns from states that have seen the whole episode
(a true episode start still resets, at is_first). Training passes write the states they compute
back (`refresh`), so they stay fresh. A state that is large (S4WM's H x N complex states per layer,
the Transformer's KV cache) is stored only every k-th row (k = `context_every`); a window starting
between two such anchors is burned in, without gradient, from the anchor before it over at most
k - 1 rows, feeding the latent samples stored with every row (`z`), so the burned-in state equals
the stored one exactly. Latents ("stoch", one-hot) are stored as class indices.

Durability. The storage is the run directory's own; a checkpoint records what reopens it (lo, hi,
the row builder's carry, a digest of the rows written since the previous checkpoint) and flushes it,
instead of copying rows. Before rows are written, `marks.json` names the highest row about to be
written; a resume after a kill drops the rows that the killed run may have overwritten since the
checkpoint (only a full, wrapped buffer loses any) and continues every stream from the checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from tensordict import TensorDict, TensorDictBase
from torch import Tensor

from agents.policy import observation

ROW_KEYS = ("obs", "action", "reward", "is_first", "is_terminal")  # the transition; digests cover these
CONTEXT_BUDGET = 3 * 64 * 64  # bytes a stored state may cost per row (one 64x64 RGB frame) before it is stored every k rows
ALLOC_CHUNK = 1 << 16  # rows per env reserved on disk at a time (see _reserve)
DIGEST_ROWS = 8192  # rows per digested segment (bounded memory for image rows)
VERSION = 2


class ReplayError(RuntimeError):
    """A replay storage that cannot be created, reopened or trusted; one line that says what to do."""


def context_bytes(state_shapes: dict[str, tuple[int, ...]], itemsize: int = 4) -> int:
    """Bytes of one stored state: float entries at `itemsize`, the latent ("stoch", (S, K)) as S indices."""
    total = 0
    for key, shape in state_shapes.items():
        total += shape[0] * (1 if shape[1] <= 256 else 2) if key == "stoch" else math.prod(shape) * itemsize
    return total


def context_every(state_shapes: dict[str, tuple[int, ...]], seq_len: int, budget: int = CONTEXT_BUDGET) -> int:
    """Anchor spacing k: 1 where a state fits the per-row budget, else the smallest power of two that
    brings it under, at most seq_len (a burn-in never reaches past its window's rows)."""
    per_row = context_bytes(state_shapes)
    if per_row <= budget:
        return 1
    return max(1, min(seq_len, 2 ** math.ceil(math.log2(per_row / budget))))


def row_bytes(state_shapes: dict[str, tuple[int, ...]], k: int) -> float:
    """Context bytes per stored row: the state every k rows plus the latent indices of every row (k > 1)."""
    S = state_shapes["stoch"][0] * (1 if state_shapes["stoch"][1] <= 256 else 2)
    return context_bytes(state_shapes) / k + (S if k > 1 else 0)


def _write_json(path: Path, data: dict) -> None:
    """Write-then-rename, so a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _digest(td: TensorDictBase) -> str:
    h = hashlib.sha256()
    for key in ROW_KEYS:
        v = td[key]
        parts = [v[k] for k in sorted(v.keys(True, True))] if isinstance(v, TensorDictBase) else [v]  # obs may have parts
        for part in parts:
            h.update(part.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _empty_like_rows(obs: Tensor | TensorDictBase, n: int) -> Tensor | TensorDict:
    """n empty rows shaped like the observation's (a tensor, or a TensorDict of parts)."""
    if isinstance(obs, TensorDictBase):
        return TensorDict({k: torch.empty(n, *v.shape[1:], dtype=v.dtype) for k, v in obs.items()}, [n])
    return torch.empty(n, *obs.shape[1:], dtype=obs.dtype)


class Replay:
    def __init__(self, capacity: int, batch_size: int, seq_len: int, directory: str | Path, obs_keys: str | list[str],
                 n_envs: int = 1, state_shapes: dict[str, tuple[int, ...]] | None = None, context: bool = True,
                 every: int = 0, state_dtype: torch.dtype = torch.float32, expected_rows: int | None = None,
                 fixed_shapes: bool = False):
        """`capacity` rows in all (split evenly over `n_envs` streams); `state_shapes`, the backbone's
        carried state (core.state_shapes()), is stored where `context` is on, every `every` rows
        (0: chosen by size, see `context_every`). `expected_rows`, the rows the run will write in all
        (None: the capacity), sizes the free-space check: the files are sparse and grow as rows come.
        `fixed_shapes`: every batch has the same shapes (a CUDA graph of the update needs them): the
        burn-in rows are always k - 1, each window's own `length` of them read."""
        self.batch_size, self.seq_len, self.n_envs = batch_size, seq_len, n_envs
        self.fixed_shapes = fixed_shapes
        self.obs_keys = [obs_keys] if isinstance(obs_keys, str) else list(obs_keys)
        self.directory = Path(directory)
        self.state_shapes = dict(state_shapes or {}) if context else {}
        self.context = bool(self.state_shapes)
        self.k = (every or context_every(self.state_shapes, seq_len)) if self.context else 1
        if self.k > seq_len:
            raise ReplayError(f"replay_context_every ({self.k}) must be at most seq_len ({seq_len})")
        C = -(-capacity // n_envs)
        self.C = -(-C // self.k) * self.k  # rows per env, a multiple of k so anchors keep their slots
        if self.C < seq_len:
            raise ReplayError(f"replay_capacity ({capacity}) holds fewer than seq_len ({seq_len}) rows per env")
        self.state_dtype = state_dtype
        self.lo = [0] * n_envs  # logical index of each env's oldest stored row
        self.hi = [0] * n_envs  # logical index of the row each env writes next
        self.carry_reward = torch.zeros(n_envs)  # r_{t-1} of each stream across collector batches
        self.segments: list[list] = []  # [env, l0, l1, digest] of the rows added since reopening or checkpointing
        self.rows: TensorDictBase | None = None  # (n_envs * C,) transitions (+ "z", the latent indices, if k > 1)
        self.ctx: TensorDictBase | None = None  # (n_envs * C / k,) stored states of the anchor rows
        self._reserved = [0] * n_envs
        self.expected_rows = expected_rows
        self._since_ckpt = list(self.hi)

    # --- layout ---
    def _slots(self, env: Tensor, l: Tensor) -> Tensor:
        return env * self.C + l % self.C

    def _anchor_slots(self, env: Tensor, l: Tensor) -> Tensor:
        n = self.C // self.k
        return env * n + (l // self.k) % n

    def __len__(self) -> int:
        return sum(h - lo for lo, h in zip(self.lo, self.hi))

    def ready(self) -> bool:
        """Some env holds a full window."""
        return any(h - lo >= self.seq_len for lo, h in zip(self.lo, self.hi))

    def bytes_per_row(self) -> dict[str, float]:
        if self.rows is None:
            return {}
        row = sum(v.element_size() * v[0].numel() for k, v in self.rows.items(True, True))
        ctx = sum(v.element_size() * v[0].numel() for k, v in self.ctx.items(True, True)) / self.k if self.ctx is not None else 0
        return {"row": row, "context": ctx}

    # --- writing ---
    def _create(self, rows: TensorDict, ctx: TensorDict | None) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(parents=True, exist_ok=True)
        per_env = self.C if self.expected_rows is None else min(self.C, -(-self.expected_rows // self.n_envs))
        need = (rows[0].bytes() + (ctx[0].bytes() / self.k if ctx is not None else 0)) * per_env * self.n_envs
        free = shutil.disk_usage(self.directory).free
        if need > free:
            raise ReplayError(f"the replay needs {need / 2**30:.1f} GiB in '{self.directory}' but {free / 2**30:.1f} GiB "
                              f"are free; lower replay_capacity or steps, or choose another run_dir")
        self.rows = rows[0].expand(self.n_envs * self.C).memmap_like(prefix=self.directory / "rows")
        if ctx is not None:
            self.ctx = ctx[0].expand(self.n_envs * self.C // self.k).memmap_like(prefix=self.directory / "context")

    def _files(self):
        for td, per_env in ((self.rows, self.C), (self.ctx, self.C // self.k)):
            if td is not None:
                for v in td.values(True, True):
                    yield v, per_env

    def _reserve(self, e: int, hi: int) -> None:
        """Allocate env e's disk blocks up to row `hi` ahead of writing them: a full disk is then an
        OSError here, where it can be reported, instead of a SIGBUS on a write into the memory map."""
        if hi <= self._reserved[e] or not hasattr(os, "posix_fallocate"):
            return
        end = min(self.C, hi + ALLOC_CHUNK)
        for v, per_env in self._files():
            row = v.element_size() * v[0].numel()
            scale = per_env / self.C
            first, last = int(self._reserved[e] * scale), math.ceil(end * scale)
            fd = os.open(v.filename, os.O_RDWR)
            try:
                os.posix_fallocate(fd, (e * per_env + first) * row, max(1, (last - first) * row))
            except OSError as err:
                raise ReplayError(f"cannot grow the replay in '{self.directory}': {err.strerror}; free disk space "
                                  f"(the last checkpoint stays loadable) or lower replay_capacity") from None
            finally:
                os.close(fd)
        self._reserved[e] = end

    def add(self, frames: TensorDictBase) -> int:
        """Append a collector batch, shaped (F,) for one env or (n_envs, F). Returns rows written."""
        frames = frames.reshape(-1, frames.shape[-1]) if frames.batch_dims > 1 else frames.unsqueeze(0)
        assert frames.shape[0] == self.n_envs, (frames.shape, self.n_envs)
        built = [self._rows(frames[e], e) for e in range(self.n_envs)]
        longest = max(rows.shape[0] for rows, _ in built)
        if longest > self.C:
            raise ReplayError(f"a collector batch of {longest} rows per env does not fit in "
                              f"{self.C} rows per env; raise replay_capacity or lower collect_every")
        if self.rows is None:
            self._create(*built[0])
        new_hi = [self.hi[e] + rows.shape[0] for e, (rows, _) in enumerate(built)]
        for e in range(self.n_envs):
            self._reserve(e, new_hi[e])
        # the mark goes down before the rows: a resume after a kill knows which slots may have changed
        _write_json(self.directory / "marks.json", {"hi": [max(a, b) for a, b in zip(new_hi, self._marks())]})
        for e, (rows, ctx) in enumerate(built):
            n = rows.shape[0]
            l = torch.arange(self.hi[e], self.hi[e] + n)
            env = torch.full_like(l, e)
            self.rows[self._slots(env, l)] = rows
            if ctx is not None:
                anchor = l % self.k == 0
                if anchor.any():
                    self.ctx[self._anchor_slots(env[anchor], l[anchor])] = ctx[anchor]
            self.hi[e] += n
            self.lo[e] = max(self.lo[e], self.hi[e] - self.C)
        return sum(r.shape[0] for r, _ in built)

    def _marks(self) -> list[int]:
        path = self.directory / "marks.json"
        return json.loads(path.read_text())["hi"] if path.exists() else list(self.hi)

    def _encode(self, state: dict[str, Tensor]) -> TensorDict:
        """Backbone state (N, ...) -> its stored form: float entries at state_dtype, latents as indices."""
        n = next(iter(state.values())).shape[0]
        out = {}
        for key, v in state.items():
            if key == "stoch":
                out[key] = v.argmax(-1).to(torch.uint8 if v.shape[-1] <= 256 else torch.int16)
            else:
                out[key] = v.to(self.state_dtype)
        return TensorDict(out, [n])

    def _decode(self, ctx: TensorDictBase, device) -> dict[str, Tensor]:
        out = {}
        for key, shape in self.state_shapes.items():
            v = ctx[key].to(device)
            out[key] = F.one_hot(v.long(), shape[-1]).float() if key == "stoch" else v.float() if v.dtype == torch.float32 else v
        return out

    def _rows(self, f: TensorDictBase, e: int) -> tuple[TensorDict, TensorDict | None]:
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
        obs = observation(f, self.obs_keys)
        rows = TensorDict({
            "obs": _empty_like_rows(obs, n),
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
            rows["obs"][end_pos] = observation(f["next"], self.obs_keys)[done]
            rows["action"][end_pos] = f["next", "prev_action"][done].float()
            rows["reward"][end_pos] = next_reward[done]
            rows["is_terminal"][end_pos] = f["next", "terminated"].reshape(F_)[done]
        if not self.context:
            return rows, None
        # the state before row t is the one the policy read at t; before a terminal row, the one it left
        before = self._encode({k: f[f"state_{k}"] for k in self.state_shapes})
        ctx = before.new_zeros(n) if D else before
        if D:
            ctx[pos] = before
            ctx[end_pos] = self._encode({k: f["next", f"state_{k}"][done] for k in self.state_shapes})
        if self.k > 1:  # the latent sampled at each row, for burn-ins from the anchors
            stoch = f["next", "state_stoch"]
            z = torch.zeros(n, stoch.shape[-2], dtype=torch.uint8 if stoch.shape[-1] <= 256 else torch.int16)
            z[pos] = stoch.argmax(-1).to(z.dtype)
            rows["z"] = z
        return rows, ctx

    # --- sampling ---
    def starts(self) -> tuple[Tensor, Tensor]:
        """Every (env, logical start) a full window can begin at; for tests and diagnostics."""
        envs, starts = [], []
        for e, (lo, hi) in enumerate(zip(self.lo, self.hi)):
            s = torch.arange(lo, max(lo, hi - self.seq_len + 1))
            envs.append(torch.full_like(s, e))
            starts.append(s)
        return torch.cat(envs), torch.cat(starts)

    def draw(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n window starts, uniform over all (env, start) pairs: (env (n,), logical start (n,))."""
        counts = torch.tensor([max(0, h - lo - self.seq_len + 1) for lo, h in zip(self.lo, self.hi)])
        total = int(counts.sum())
        if total == 0:
            raise ReplayError("the replay holds no full window yet")
        u = torch.randint(total, (n,), generator=generator)
        ends = counts.cumsum(0)
        env = torch.searchsorted(ends, u, right=True)
        start = torch.tensor(self.lo)[env] + u - (ends - counts)[env]
        return env, start

    def sample(self, device: torch.device | str = "cpu", generator: torch.Generator | None = None) -> dict:
        """A batch of B windows of T rows: the transition (B, T, ...), and with replay context the state
        before each window ("start") plus the rows to burn it in over ("burn", None when k = 1)."""
        B, T = self.batch_size, self.seq_len
        env, start = self.draw(B, generator)
        l = start[:, None] + torch.arange(T)  # (B, T)
        rows = self.rows[self._slots(env[:, None].expand(B, T), l).flatten()].reshape(B, T)
        out = {k: rows[k].to(device) for k in ROW_KEYS}
        out["is_first"] = out["is_first"].float()
        out["where"] = (env, start)
        if not self.context:
            out["is_first"][:, 0] = 1.0  # without context every window starts from the initial state
            return out
        anchor = start // self.k * self.k
        # an anchor older than the stream's oldest row is gone: such a window starts from zero instead
        known = anchor >= torch.tensor(self.lo)[env]
        anchor = torch.where(known, anchor, start)
        out["start"] = self._decode(self.ctx[self._anchor_slots(env, anchor)], device)
        out["known"] = known
        out["is_first"][~known.to(out["is_first"].device), 0] = 1.0
        burn = torch.where(known, start - anchor, 0)  # (B,) rows between anchor and window start
        P = self.k - 1 if self.fixed_shapes else int(burn.max())
        out["burn"] = None
        if P:
            lb = anchor[:, None] + torch.arange(P)  # (B, P) every one of them lies in [lo, hi)
            b = self.rows[self._slots(env[:, None].expand(B, P), lb).flatten()].reshape(B, P)
            out["burn"] = {"obs": b["obs"].to(device), "action": b["action"].to(device),
                           "is_first": b["is_first"].float().to(device), "z": b["z"].long().to(device),
                           "length": burn.to(device)}
        return out

    @torch.no_grad()
    def refresh(self, batch: dict, states: dict[str, Tensor]) -> None:
        """Write the states a training pass computed over `batch` (B, T, ...) back: the latent of every
        window row and the state before every anchor row the window reaches (rows start+1 .. start+T).
        Windows that started from zero for want of a stored state are skipped (their states are not
        those of the episode)."""
        if not self.context:
            return
        env, start = batch["where"]
        keep = batch["known"]
        if not keep.any():
            return
        env, start = env[keep], start[keep]
        states = {k: v.detach()[keep.to(v.device)].cpu() for k, v in states.items() if k in self.state_shapes}
        B, T = start.shape[0], self.seq_len
        l = start[:, None] + torch.arange(T)  # (B, T) rows of the window
        if self.k > 1:
            self.rows["z"][self._slots(env[:, None].expand(B, T), l).flatten()] = \
                states["stoch"].argmax(-1).reshape(B * T, -1).to(self.rows["z"].dtype)
        nxt = l + 1  # the state after window row j is the one before row start + j + 1
        hi = torch.tensor(self.hi)[env][:, None]
        write = (nxt % self.k == 0) & (nxt < hi)
        if write.any():
            b, j = write.nonzero(as_tuple=True)
            self.ctx[self._anchor_slots(env[b], nxt[b, j])] = self._encode({k: v[b, j] for k, v in states.items()})

    # --- checkpoints: metadata only; the rows stay where they are ---
    def flush(self) -> None:
        for v, _ in self._files():
            fd = os.open(v.filename, os.O_RDWR)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def digest(self, e: int, l0: int, l1: int) -> str:
        """Content digest of env e's rows [l0, l1) (the transition fields, not the refreshed states)."""
        l = torch.arange(l0, l1)
        return _digest(self.rows[self._slots(torch.full_like(l, e), l)])

    def save(self, path: Path) -> dict:
        """Flush the storage and write what reopens it to `path`; returns the metadata."""
        path.mkdir(parents=True, exist_ok=True)
        for e in range(self.n_envs):  # digest the rows added since the last checkpoint, in bounded pieces
            for l0 in range(max(self._since_ckpt[e], self.lo[e]), self.hi[e], DIGEST_ROWS):
                l1 = min(self.hi[e], l0 + DIGEST_ROWS)
                self.segments.append([e, l0, l1, self.digest(e, l0, l1)])
            self._since_ckpt[e] = self.hi[e]
        self.segments = [s for s in self.segments if s[2] > self.lo[s[0]]]
        if self.rows is not None:
            self.flush()
        meta = {"version": VERSION, "n_envs": self.n_envs, "C": self.C, "k": self.k, "context": self.context,
                "lo": self.lo, "hi": self.hi, "carry_reward": self.carry_reward.tolist(), "segments": self.segments,
                "created": self.rows is not None}
        body = json.dumps(meta, sort_keys=True)
        _write_json(path / "replay.json", {"meta": meta, "sha256": hashlib.sha256(body.encode()).hexdigest()})
        return meta

    @staticmethod
    def read_meta(path: Path) -> dict:
        try:
            data = json.loads((path / "replay.json").read_text())
            meta = data["meta"]
            ok = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest() == data["sha256"]
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise ReplayError(f"the replay record in '{path}' is missing or corrupt; delete the checkpoint or start a new run_dir")
        return meta

    def load(self, path: Path, verify: bool = True) -> dict:
        """Reopen the storage as the checkpoint at `path` left it. Returns what was restored."""
        meta = self.read_meta(path)
        layout = {"n_envs": self.n_envs, "C": self.C, "k": self.k, "context": self.context}
        if meta.get("version") != VERSION or any(meta.get(k) != v for k, v in layout.items()):
            raise ReplayError(f"the replay in '{path}' has another layout ({ {k: meta.get(k) for k in layout} } vs "
                              f"{layout}); resume with the settings it was made with or start a new run_dir")
        for stale in self.directory.glob("live-*"):  # storages of an older version that copied rows
            shutil.rmtree(stale, ignore_errors=True)
        self.lo, self.hi = list(meta["lo"]), list(meta["hi"])
        self.carry_reward = torch.tensor(meta["carry_reward"])
        dropped = 0
        if meta["created"]:
            try:
                self.rows = TensorDict.load_memmap(self.directory / "rows")
                self.ctx = TensorDict.load_memmap(self.directory / "context") if self.context else None
            except Exception as err:
                raise ReplayError(f"the replay storage in '{self.directory}' cannot be reopened ({type(err).__name__}); "
                                  f"it belongs to the checkpoint '{path}': start a new run_dir") from None
            if self.rows.shape[0] != self.n_envs * self.C:
                raise ReplayError(f"the replay storage in '{self.directory}' does not match its checkpoint; start a new run_dir")
            # rows the killed run wrote after the checkpoint may have overwritten the oldest ones
            for e, mark in enumerate(self._marks()):
                lo = max(self.lo[e], mark - self.C)
                dropped += lo - self.lo[e]
                self.lo[e] = min(lo, self.hi[e])
        self.segments = [s for s in meta["segments"] if s[2] > self.lo[s[0]]]
        if verify:  # the newest rows are the likeliest to be damaged: check each env's newest whole segment
            newest = {s[0]: s for s in self.segments}
            for e, l0, l1, d in newest.values():
                if l0 >= self.lo[e] and self.digest(e, l0, l1) != d:
                    raise ReplayError(f"replay rows {l0}-{l1} of env {e} in '{self.directory}' differ from checkpoint "
                                      f"'{path}'; the storage is damaged: start a new run_dir")
        self._since_ckpt = list(self.hi)
        self._reserved = [0] * self.n_envs
        return {"rows": len(self), "dropped": dropped, "context": self.context, "every": self.k}

    @classmethod
    def open(cls, directory: str | Path, checkpoint: Path) -> "Replay":
        """The replay a checkpoint names, reopened to read (rows, digests), not to sample: it needs
        none of the training settings and writes nothing."""
        meta = cls.read_meta(checkpoint)
        rp = cls(meta["C"] * meta["n_envs"], 1, 1, directory, "", meta["n_envs"])
        rp.context, rp.k, rp.C = meta["context"], meta["k"], meta["C"]
        rp.load(checkpoint, verify=False)
        return rp

    def verify(self) -> list[tuple[int, int, int]]:
        """Check every recorded digest of rows still stored; returns the (env, l0, l1) that differ."""
        return [(e, l0, l1) for e, l0, l1, d in self.segments
                if l0 >= self.lo[e] and self.digest(e, l0, l1) != d]

