"""TSSM: a Transformer state-space model after TransDreamer (Chen et al. 2022).

    q(z_t | x_t)                                       posterior from the observation alone
    u_t = MLP([z_{t-1}, a_{t-1}])                      one token per step
    h_t = Transformer(u_{t-W+1..t})                    causal, pre-LN, rotary positions, window W
    p(z_t | h_t)                                       prior
    feat_t = [h_t, z_t]

Training attends in parallel with a causal, windowed mask that also stops attention across
`is_first` (torch scaled_dot_product_attention). Acting and imagination keep a KV cache of the last
W tokens per layer, so a new step costs one token against W keys instead of re-running the window.

The cache is part of the state: "k", "v" (L, W, D), slot j holding the token at position
pos - W + j (oldest first), and "pos" (1,), the number of tokens since the episode started. A slot
is valid when its position is >= 0, so a zeroed state (an episode start, or TorchRL's primer) is an
empty cache. Keys are stored already rotated by their position; rotary embeddings make attention
depend only on the offset between positions, so positions past the training length are fine.

Unlike the state-space cores, the training path holds T x (W + T) attention scores per head. The
states it returns hold a window of keys per step, but as views of one (B, L, W + T, D) buffer: the
window slides by one token per step. Imagination from every one of them (`imagine_all`, what the
learner does) attends to that buffer directly, one matrix product per row and head, instead of
copying B*T windows and reading each of them per imagined step; anything that copies the states
(the replay) pays W x D per step and layer. That is the price of attention; the state-space
backbones do not pay it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worldmodels.base import Policy, State, flatten_state
from worldmodels.nets import XS_LATENT, action_input, categorical_kl, fill_size, full, mlp, sample_onehot, token_in, unimix_probs

SIZES = {
    "xs": {"d_model": 64, "heads": 2, "layers": 2, "window": 64, "hidden": 64, **XS_LATENT},
    "s": {"d_model": 512, "heads": 8, "layers": 4, "window": 256, "hidden": 512, "stoch": 32, "classes": 32},
    "m": {"d_model": 768, "heads": 12, "layers": 6, "window": 256, "hidden": 768, "stoch": 32, "classes": 32},
}


@dataclass(frozen=True)
class TransformerConfig:
    size: str = "xs"
    d_model: int | None = None  # token width (D)
    heads: int | None = None
    layers: int | None = None
    window: int | None = None  # tokens a step attends to, itself included (W); the KV cache length
    hidden: int | None = None  # width of the input, prior and posterior MLPs
    stoch: int | None = None
    classes: int | None = None
    unimix: float = 0.01
    rope_base: float = 10000.0

    def __post_init__(self):
        fill_size(self, SIZES, self.size)
        if self.d_model % self.heads or (self.d_model // self.heads) % 2:
            raise ValueError(f"transformer d_model ({self.d_model}) must split into `heads` ({self.heads}) "
                             "heads of even width")
        if self.window < 1:
            raise ValueError(f"transformer window must be >= 1, got {self.window}")


def rotation(pos: Tensor, dh: int, base: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The rotary tables at positions pos (B, T), each (B, T, 1, 1, dh): [cos, cos] and [-sin, sin] of
    the angles pos * base^(-i / (dh/2)), i < dh/2. Computed once per pass or step and shared by every
    layer and by queries and keys, in the parameters' dtype (not an autocast dtype, whose 8-bit
    mantissa cannot hold positions past 256)."""
    half = dh // 2
    freq = base ** (-torch.arange(half, device=pos.device, dtype=dtype) / half)  # (dh/2,)
    angle = pos.to(dtype)[..., None, None, None] * freq
    cos, sin = angle.cos(), angle.sin()
    return torch.cat([cos, cos], -1), torch.cat([-sin, sin], -1)


def rotate(x: Tensor, rot: tuple[Tensor, Tensor]) -> Tensor:
    """Rotary position embedding of x (B, T, ..., dh) by `rotation` (B, T, 1, 1, dh): each pair
    (x_i, x_{i + dh/2}) turned by its angle, [x1 cos - x2 sin, x2 cos + x1 sin], as x * [cos, cos] +
    [x2, x1] * [-sin, sin] (three operations, no concatenation; `rotate_ref` is the pairwise form)."""
    cos, sin = rot
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, -1), sin)


def rotate_ref(x: Tensor, angle: Tensor) -> Tensor:
    """The rotation written pair by pair, the comparator of `rotate`: angle (..., dh/2) broadcast to x."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x1 * angle.sin() + x2 * angle.cos()], -1)


class Layer(nn.Module):
    def __init__(self, D: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.proj = nn.Linear(D, D)
        self.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def split(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, heads, T, dh)
        B, T, D = x.shape
        return x.reshape(B, T, self.heads, D // self.heads).transpose(1, 2)

    def _qkv(self, x: Tensor, rot: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys (rotated) and values of x (B, T, D), each (B, heads, T, dh)."""
        B, T, D = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(B, T, 3, self.heads, D // self.heads)
        q, k = rotate(qkv[:, :, :2], rot).permute(2, 0, 3, 1, 4)  # queries and keys in one rotation
        return q, k, qkv[:, :, 2].transpose(1, 2)

    def _out(self, x: Tensor, att: Tensor) -> Tensor:  # att (B, heads, T, dh)
        B, T, D = x.shape
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.norm2(x))

    def forward(self, x: Tensor, rot: tuple[Tensor, Tensor], cache_k: Tensor, cache_v: Tensor, mask: Tensor):
        """x (B, T, D) at rotation `rot` attends to the cache (B, W, D) and to itself under mask (B, T, W + T). Returns the
        new x and this layer's rotated keys and values for the T tokens, (B, T, D) each."""
        B, T, D = x.shape
        q, k, v = self._qkv(x, rot)
        keys = torch.cat([self.split(cache_k), k], 2)
        values = torch.cat([self.split(cache_v), v], 2)
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None])
        merge = lambda t: t.transpose(1, 2).reshape(B, T, D)  # noqa: E731
        return self._out(x, att), merge(k), merge(v)

    def step(self, x: Tensor, rot: tuple[Tensor, Tensor], cache: "_OwnWindows | _SharedWindows", new_k: list[Tensor],
             new_v: list[Tensor], bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One token x (N, 1, D) at rotation `rot` attends to the fixed start cache (its `scores` and
        `read` for this layer; C slots per token), to earlier tokens' keys and values (lists of
        (1, N, heads, dh)) and to itself; bias (N, 1, 1, C + n + 1) is 0 where it may look and -inf
        where not. The softmax runs over the scores of both parts, so the cache is read, never
        copied. Returns the new x and the token's rotated key and value, (1, N, heads, dh)."""
        q, k, v = self._qkv(x, rot)  # (N, heads, 1, dh)
        k, v = k.permute(2, 0, 1, 3), v.permute(2, 0, 1, 3)  # (1, N, heads, dh)
        # the imagined tokens' keys stacked on a leading axis (one contiguous copy per step; along the
        # token axis of (N, heads, n + 1, dh) the copy of strided pieces cost about 5x more)
        keys, values = torch.cat([*new_k, k], 0), torch.cat([*new_v, v], 0)  # (n + 1, N, heads, dh)
        # one query against n + 1 <= H + 1 private keys per start and head: a broadcast product and sum
        # (N x heads products of 1 x dh by dh x (n + 1) as a batched matmul cost 2-4x more, backward included)
        own = (q[:, :, 0] * keys).sum(-1).permute(1, 2, 0)[:, :, None]  # (N, heads, 1, n + 1)
        p = torch.add(bias, torch.cat([cache.scores(q), own], -1), alpha=q.shape[-1] ** -0.5).softmax(-1)
        C = p.shape[-1] - keys.shape[0]  # p (N, heads, 1, C + n + 1)
        mine = (p[:, :, 0, C:].permute(2, 0, 1)[..., None] * values).sum(0)[:, :, None]  # (N, heads, 1, dh)
        return self._out(x, cache.read(p[..., :C]) + mine), k, v


class _OwnWindows:
    """The start cache of one layer when every start has a window of its own: keys and values
    (N, heads, W, dh), slot j of start n at position p0_n - W + j."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v

    def scores(self, q: Tensor) -> Tensor:  # q (N, heads, 1, dh) -> (N, heads, 1, W)
        return q @ self.k.transpose(-1, -2)

    def read(self, p: Tensor) -> Tensor:  # p (N, heads, 1, W) -> (N, heads, 1, dh)
        return p @ self.v


class _SharedWindows:
    """The start cache of one layer when the N = B*T starts are `observe`'s consecutive states: start
    (b, t)'s slot j is token t + j of one buffer per row, keys and values (B, heads, W + T - 1, dh).
    A step's attention to the cache is then one (T x dh) @ (dh x (W + T - 1)) product per row and
    head over a buffer read once, instead of N products of one query against W slots (N windows of
    W x D read per layer, twice more in the backward pass). Slots outside a start's window are
    masked (see TSSM.imagine_all)."""

    def __init__(self, k: Tensor, v: Tensor, T: int):
        self.k, self.v, self.T = k, v, T

    def _rows(self, x: Tensor) -> Tensor:  # (N, heads, 1, c) -> (B, heads, T, c)
        return x.reshape(-1, self.T, x.shape[1], x.shape[-1]).transpose(1, 2)

    def _flat(self, x: Tensor) -> Tensor:  # (B, heads, T, c) -> (N, heads, 1, c)
        return x.transpose(1, 2).reshape(-1, x.shape[1], 1, x.shape[-1])

    def scores(self, q: Tensor) -> Tensor:  # (N, heads, 1, dh) -> (N, heads, 1, W + T - 1)
        return self._flat(self._rows(q) @ self.k.transpose(-1, -2))

    def read(self, p: Tensor) -> Tensor:  # (N, heads, 1, W + T - 1) -> (N, heads, 1, dh)
        return self._flat(self._rows(p) @ self.v)


class TSSM(nn.Module):
    def __init__(self, cfg: TransformerConfig, embed_dim: int, action_dim: int, action_embed: str = "joint"):
        super().__init__()
        self.cfg = cfg
        S, K, D = cfg.stoch, cfg.classes, cfg.d_model
        self.feat_size = D + S * K
        self.inp = token_in(S * K, action_dim, cfg.hidden, D, action_embed)[0]
        self.layers = nn.ModuleList(Layer(D, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(D)
        self.prior_net = mlp(D, cfg.hidden, 1, S * K)
        self.post_net = mlp(embed_dim, cfg.hidden, 1, S * K)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        return {"k": (c.layers, c.window, c.d_model), "v": (c.layers, c.window, c.d_model), "pos": (1,),
                "stoch": (c.stoch, c.classes), "h": (c.d_model,)}

    def initial(self, batch_size: int) -> State:
        p = next(self.parameters())
        return {k: torch.zeros(batch_size, *s, device=p.device, dtype=p.dtype) for k, s in self.state_shapes().items()}

    def _rotation(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        return rotation(pos, self.cfg.d_model // self.cfg.heads, self.cfg.rope_base, self.norm.weight.dtype)

    def _logits(self, net: nn.Module, x: Tensor) -> Tensor:
        return full(net(x)).reshape(*x.shape[:-1], self.cfg.stoch, self.cfg.classes)

    def _core(self, state: State, z_prev: Tensor, action: Tensor, first: Tensor) -> tuple[Tensor, State]:
        """Tokens for (B, T) steps after `state`: h (B, T, D) and the cache after every step."""
        B, T = first.shape
        W, dev = self.cfg.window, first.device
        x = self.inp(torch.cat([z_prev.flatten(-2), action_input(action)], -1))  # (B, T, D)
        t = torch.arange(T, device=dev)
        # last episode start at or before t within this chunk (-1: none), and each token's position
        last_reset = torch.where(first > 0, t, -1).cummax(1).values  # (B, T)
        p0 = state["pos"][:, 0].round().long()  # (B,)
        pos = torch.where(last_reset >= 0, t - last_reset, p0[:, None] + t)  # (B, T)
        # cache slot j holds position p0 - W + j: visible to token t while no reset came in between,
        # the slot is filled, and it lies within the window (p_t - slot < W  <=>  j > t)
        j = torch.arange(W, device=dev)
        see_cache = ((last_reset < 0)[:, :, None] & (p0[:, None, None] - W + j >= 0)
                     & (j[None, None, :] > t[None, :, None]))  # (B, T, W)
        see_seq = ((t[None, :] <= t[:, None]) & (t[:, None] - t[None, :] < W))[None] \
            & (t[None, None, :] >= last_reset[:, :, None])  # (B, T, T)
        mask = torch.cat([see_cache, see_seq], -1)
        rot = self._rotation(pos)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, rot, state["k"][:, i], state["v"][:, i], mask)
            ks.append(k)
            vs.append(v)
        # the cache after step t is the last W tokens up to t: a sliding window over [cache, new]
        window = lambda old, new: torch.cat([old, torch.stack(new, 1)], 2).unfold(2, W, 1)[:, :, 1:] \
            .permute(0, 2, 1, 4, 3)  # noqa: E731  (B, L, W + T, D) -> (B, T, L, W, D)
        cache = {"k": window(state["k"], ks), "v": window(state["v"], vs), "pos": (pos + 1).to(x.dtype)[..., None]}
        return self.norm(x), cache

    def observe(self, state, embed, action, is_first, noise=None):
        first = is_first.to(embed.dtype)  # (B, T)
        probs = unimix_probs(self._logits(self.post_net, embed), self.cfg.unimix)
        z = sample_onehot(probs, None if noise is None else noise["stoch"])  # (B, T, S, K)
        z_prev = torch.cat([state["stoch"][:, None], z[:, :-1]], 1) * (1 - first)[..., None, None]
        h, cache = self._core(state, z_prev, action * (1 - first)[..., None], first)
        prior = self._logits(self.prior_net, h)
        post_lp, prior_lp = probs.log(), unimix_probs(prior, self.cfg.unimix).log()
        losses = {"dyn": categorical_kl(post_lp.detach(), prior_lp), "rep": categorical_kl(post_lp, prior_lp.detach())}
        states = {**cache, "stoch": z, "h": h}
        return states, self.feat(states), losses

    def feat(self, state: State) -> Tensor:
        return torch.cat([state["h"], state["stoch"].flatten(-2)], -1)

    def _step(self, state: State, action: Tensor) -> State:
        """One imagined step from the prior, sliding the whole KV cache (the acting path, T = 1)."""
        no_reset = torch.zeros(action.shape[0], 1, device=action.device, dtype=action.dtype)
        h, cache = self._core(state, state["stoch"][:, None], action[:, None], no_reset)
        prior = self._logits(self.prior_net, h[:, 0])
        z = sample_onehot(unimix_probs(prior, self.cfg.unimix))
        return {**{k: v[:, 0] for k, v in cache.items()}, "stoch": z, "h": h[:, 0]}

    def imagine_sliding(self, state: State, policy: Policy, horizon: int):
        """Imagination by `_step`: the obviously correct twin of `imagine` (tests compare them)."""
        feats = [self.feat(state)]
        actions = [policy(feats[0])]
        for _ in range(horizon):
            state = self._step(state, actions[-1])
            feats.append(self.feat(state))
            actions.append(policy(feats[-1]))
        return torch.stack(feats, 1), torch.stack(actions, 1)

    def imagine(self, state: State, policy: Policy, horizon: int):
        """The start's KV cache stays as it is; each imagined token attends to it and to the tokens
        imagined so far, within the window. Sliding the cache would copy all W slots per step and,
        with gradients through the dynamics, scatter them back in the backward pass; here only the
        imagined keys (at most `horizon` per layer) carry gradients."""
        W, dev = self.cfg.window, state["stoch"].device
        p0 = state["pos"][:, 0].round().long()  # (N,) position of the first imagined token
        j = torch.arange(W, device=dev)
        filled = p0[:, None] - W + j >= 0  # (N, W) cache slots that hold a token
        # token i sees cache slot j while p0 - W + j > p0 + i - W (j > i)
        windows = [_OwnWindows(layer.split(state["k"][:, i]).contiguous(), layer.split(state["v"][:, i]).contiguous())
                   for i, layer in enumerate(self.layers)]  # (N, heads, W, dh), read by every step
        return self._rollout(windows, lambda i: filled & (j > i), p0, state, policy, horizon)

    def imagine_all(self, states: State, policy: Policy, horizon: int):
        """Imagination from every state `observe` returned (B, T, ...): equals `imagine` from
        flatten_state(states) (same random stream). Consecutive states' caches are views of one
        (B, L, W + T, D) buffer (the window slides by one token per step), so start (b, t)'s slot j
        is token t + j of that buffer: the rollout attends to the buffer (`_SharedWindows`) and never
        copies the B*T windows. States that are not such views (their slots do not alias) go
        through `imagine`."""
        k, v = states["k"], states["v"]
        B, T, L, W, D = k.shape
        if T < 2 or k.stride(1) != k.stride(3) or v.stride(1) != v.stride(3):  # no aliasing: no shared buffer
            return self.imagine(flatten_state(states), policy, horizon)
        # the buffer: start 0's window, then each later start's newest slot -> (B, L, W + T - 1, D)
        buf = lambda x: torch.cat([x[:, 0], x[:, 1:, :, -1].transpose(1, 2)], 2)  # noqa: E731
        kb, vb = buf(k), buf(v)
        windows = [_SharedWindows(layer.split(kb[:, i]), layer.split(vb[:, i]), T) for i, layer in enumerate(self.layers)]
        dev = k.device
        p0 = states["pos"][..., 0].round().long()  # (B, T)
        off = torch.arange(W + T - 1, device=dev)[None, :] - torch.arange(T, device=dev)[:, None]  # (T, S): slot index j
        inside = (off >= 0) & (off < W) & (p0[..., None] - W + off >= 0)  # (B, T, S): start's filled slots
        N = B * T
        flat = {n: states[n].reshape(N, *states[n].shape[2:]) for n in ("stoch", "h")}
        return self._rollout(windows, lambda i: (inside & (off > i)).reshape(N, -1), p0.reshape(N), flat, policy, horizon)

    def _rollout(self, windows: list, visible, p0: Tensor, state: State, policy: Policy, horizon: int):
        """The imagination loop over a start cache: `windows` per layer, `visible(i)` (N, C) the cache
        slots imagined token i may see, p0 (N,) its first position; `state` gives "stoch" and "h"."""
        N, W, dev = p0.shape[0], self.cfg.window, p0.device
        new_k: list[list[Tensor]] = [[] for _ in self.layers]
        new_v: list[list[Tensor]] = [[] for _ in self.layers]
        feats = [self.feat(state)]
        actions = [policy(feats[0])]
        z = state["stoch"]
        for i in range(horizon):
            x = self.inp(torch.cat([z.flatten(-2), action_input(actions[-1])], -1))[:, None]  # (N, 1, D)
            # the mask covers [cache, imagined tokens 0..i-1, itself]; imagined token m is seen while i - m < W
            m = torch.arange(i, device=dev)
            mask = torch.cat([visible(i), (i - m < W).expand(N, i), torch.ones(N, 1, dtype=torch.bool, device=dev)], 1)
            bias = torch.zeros(mask.shape, dtype=x.dtype, device=dev).masked_fill_(~mask, float("-inf"))[:, None, None]
            rot = self._rotation((p0 + i)[:, None])
            for layer, window, ks, vs in zip(self.layers, windows, new_k, new_v):
                x, k, v = layer.step(x, rot, window, ks, vs, bias)
                ks.append(k)
                vs.append(v)
            h = self.norm(x)[:, 0]
            z = sample_onehot(unimix_probs(self._logits(self.prior_net, h), self.cfg.unimix))
            feats.append(torch.cat([h, z.flatten(-2)], -1))
            actions.append(policy(feats[-1]))
        return torch.stack(feats, 1), torch.stack(actions, 1)

    def imagine_recompute(self, tokens: tuple[Tensor, Tensor], start: Tensor, policy: Policy, horizon: int):
        """Imagination without the cache, its comparator: every step re-runs the Transformer over the
        last W tokens. `tokens` are the context's inputs (z_{t-1}, a_{t-1}), (N, C, S, K) and (N, C, A),
        the first an episode start; `start` is the latent z at the context's last step (N, S, K). With
        one layer, or a window longer than context + horizon, this equals `imagine` from the state that
        `observe` left after the same context (same random stream)."""
        z_prev, a_prev = tokens
        N, W = z_prev.shape[0], self.cfg.window
        feats, actions, z = [], [], start
        for i in range(horizon + 1):
            zw, aw = z_prev[:, -W:], a_prev[:, -W:]
            # positions restart at the window's first token: rotary attention sees only offsets
            first = torch.zeros(N, zw.shape[1], device=zw.device, dtype=aw.dtype)
            first[:, 0] = 1
            h, _ = self._core(self.initial(N), zw, aw, first)
            if i:
                z = sample_onehot(unimix_probs(self._logits(self.prior_net, h[:, -1]), self.cfg.unimix))
            feats.append(torch.cat([h[:, -1], z.flatten(-2)], -1))
            actions.append(policy(feats[-1]))
            z_prev = torch.cat([z_prev, z[:, None]], 1)
            a_prev = torch.cat([a_prev, actions[-1][:, None]], 1)
        return torch.stack(feats, 1), torch.stack(actions, 1)
