"""The TSSM's KV cache: stepping through the cache equals recomputing attention over the window."""
import pytest
import torch

from worldmodels.base import flatten_state, imagine_all, index_state
from worldmodels.transformer import TSSM, TransformerConfig, rotate, rotate_ref, rotation

B, E, A = 2, 12, 3


def make(layers, window):
    torch.manual_seed(0)
    return TSSM(TransformerConfig(size="xs", layers=layers, window=window), E, A).double()


def data(T, first_at=()):
    g = torch.Generator().manual_seed(3)
    is_first = torch.zeros(B, T, dtype=torch.float64)
    is_first[:, [0, *first_at]] = 1
    cfg = TransformerConfig(size="xs")
    noise = {"stoch": torch.rand(B, T, cfg.stoch, cfg.classes, generator=g, dtype=torch.float64)}
    return torch.randn(B, T, E, generator=g, dtype=torch.float64), torch.randn(B, T, A, generator=g, dtype=torch.float64), is_first, noise


@pytest.mark.parametrize("window", [1, 3, 64])
def test_window_sequence_equals_steps(window):
    """With a window shorter than the sequence the cache must slide: T one-step observes equal one
    parallel pass under the windowed mask, across a reset too."""
    core = make(2, window)
    embed, action, is_first, noise = data(11, first_at=(6,))
    _, feat, _ = core.observe(core.initial(B), embed, action, is_first, noise=noise)
    state, steps = core.initial(B), []
    for t in range(11):
        s, f, _ = core.observe(state, embed[:, t:t + 1], action[:, t:t + 1], is_first[:, t:t + 1],
                               noise={"stoch": noise["stoch"][:, t:t + 1]})
        state = index_state(s, -1)
        steps.append(f[:, 0])
    torch.testing.assert_close(feat, torch.stack(steps, 1), rtol=1e-5, atol=1e-8)


def test_window_limits_context():
    """A token W or more steps back has no influence."""
    core = make(1, 3)
    embed, action, is_first, noise = data(8)
    _, feat, _ = core.observe(core.initial(B), embed, action, is_first, noise=noise)
    action2 = action.clone()
    action2[:, 1] += 1  # token 1 reads a_0..; change a_1, seen by tokens 1..3 only (1 layer, W = 3)
    _, feat2, _ = core.observe(core.initial(B), embed, action2, is_first, noise=noise)
    assert not torch.allclose(feat[:, 1:4], feat2[:, 1:4])
    torch.testing.assert_close(feat[:, 4:], feat2[:, 4:])


@pytest.mark.parametrize("layers,window", [(1, 4), (2, 64)])
def test_kv_cache_equals_recompute(layers, window):
    """Imagination through the cache equals re-running the Transformer over the window each step (exact
    for one layer, or when the window holds everything)."""
    core = make(layers, window)
    C, H = 6, 7
    embed, action, is_first, noise = data(C)
    states, feat, _ = core.observe(core.initial(B), embed, action, is_first, noise=noise)
    z = states["stoch"]
    first = is_first[..., None, None]
    z_prev = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], 1) * (1 - first)
    policy = lambda f: torch.tanh(f[:, :A] * 3)  # noqa: E731
    torch.manual_seed(5)
    cached, act_c = core.imagine(index_state(states, -1), policy, H)
    torch.manual_seed(5)
    recomputed, act_r = core.imagine_recompute((z_prev, action * (1 - is_first[..., None])), z[:, -1], policy, H)
    torch.testing.assert_close(cached, recomputed, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(act_c, act_r)
    torch.testing.assert_close(cached[:, 0], feat[:, -1])


@pytest.mark.parametrize("window,horizon", [(4, 9), (64, 7)])
def test_imagine_equals_sliding_cache(window, horizon):
    """Imagination against the fixed start cache equals stepping the sliding cache, also when the
    horizon outruns the window (imagined tokens must then drop out of it), and passes the same
    gradients to the actions."""
    core = make(2, window)
    embed, action, is_first, noise = data(6)
    states, _, _ = core.observe(core.initial(B), embed, action, is_first, noise=noise)
    start = index_state(states, -1)
    weight = torch.randn(core.feat_size, A, dtype=torch.float64, requires_grad=True)
    policy = lambda f: torch.tanh(f @ weight)  # noqa: E731
    out = []
    for imagine in (core.imagine, core.imagine_sliding):
        torch.manual_seed(5)
        feat, act = imagine(start, policy, horizon)
        grad, = torch.autograd.grad(feat.sum(), weight)
        out.append((feat, act, grad))
    for x, y in zip(*out):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("window,T,horizon", [(4, 9, 6), (64, 9, 5), (3, 5, 8)])
def test_imagine_all_equals_imagine_from_each_state(window, T, horizon, monkeypatch):
    """Imagination from every state of `observe` through the shared window buffer equals imagining
    from the flattened states (features, actions, gradients to the policy), across a reset, with
    windows shorter and longer than the sequence and a horizon that outruns the window; and it does
    take the shared path (no call to `imagine`). States whose cache slots do not alias go through
    `imagine` and give the same."""
    core = make(2, window)
    embed, action, is_first, noise = data(T, first_at=(4,))
    state = core.initial(B)
    state["pos"] += 2  # a start cache that is partly filled (zero keys at filled slots are fine here)
    states, _, _ = core.observe(state, embed, action, is_first, noise=noise)
    weight = torch.randn(core.feat_size, A, dtype=torch.float64, requires_grad=True)
    policy = lambda f: torch.tanh(f @ weight)  # noqa: E731

    def run(fn, s):
        torch.manual_seed(5)
        feat, act = fn(s, policy, horizon)
        grad, = torch.autograd.grad((feat * torch.linspace(0, 1, feat.shape[-1], dtype=torch.float64)).sum(), weight)
        return feat, act, grad

    reference = run(core.imagine, flatten_state(states))
    with monkeypatch.context() as m:
        m.setattr(core, "imagine", lambda *a: pytest.fail("the shared path fell back to imagine"))
        shared = run(lambda s, p, h: imagine_all(core, s, p, h), states)
    copied = run(lambda s, p, h: imagine_all(core, s, p, h), {k: v.contiguous() for k, v in states.items()})
    for out in (shared, copied):
        for x, y in zip(out, reference):
            torch.testing.assert_close(x, y, rtol=1e-7, atol=1e-10)


def test_rotary_scores_depend_on_offsets_only():
    """Rotary embeddings: q_m . k_n depends on m - n alone (shifting both positions changes nothing),
    and on the offset (not an identity); rotation keeps norms."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 1, 3, 8, generator=g, dtype=torch.float64).unbind(0)  # (T, ..., heads, dh) per row
    rot = lambda pos: rotation(pos[None], 8, 100.0, torch.float64)  # noqa: E731  (B, T) = (1, 5)
    score = lambda m, n: (rotate(q[None], rot(m)) * rotate(k[None], rot(n))).sum(-1)  # noqa: E731
    pm, pn = torch.tensor([3.0, 7, 0, 50, 9]), torch.tensor([1.0, 7, 4, 2, 300])
    torch.testing.assert_close(score(pm, pn), score(pm + 41, pn + 41))
    assert not torch.allclose(score(pm, pn), score(pm, pn + 1))
    torch.testing.assert_close(rotate(q[None], rot(pm)).norm(dim=-1), q[None].norm(dim=-1))


def test_rotate_equals_the_pairwise_rotation():
    """`rotate` (x * [cos, cos] + [x2, x1] * [-sin, sin]) equals the rotation written pair by pair,
    values and gradients, at the angles pos * base^(-i / (dh/2))."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 3, 4, 8, generator=g, dtype=torch.float64, requires_grad=True)  # (B, T, ..., heads, dh)
    pos = torch.tensor([[0.0, 1, 2, 30, 400], [7, 8, 9, 10, 11]], dtype=torch.float64)
    angle = pos[..., None, None, None] * 100.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    fast, ref = rotate(x, rotation(pos, 8, 100.0, torch.float64)), rotate_ref(x, angle)
    torch.testing.assert_close(fast, ref)
    w = torch.randn(fast.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(*[torch.autograd.grad((y * w).sum(), x)[0] for y in (fast, ref)])


def test_config_errors():
    with pytest.raises(ValueError, match="heads"):
        TransformerConfig(d_model=64, heads=3)
    with pytest.raises(ValueError, match="window"):
        TransformerConfig(window=0)
