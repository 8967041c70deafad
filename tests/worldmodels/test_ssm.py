"""The state-space cores' imagination (each block stepped by its own stepper, or by the generic
BlockStepper) against stepping the contract's stacked state through `_core` one token at a time."""
import pytest
import torch

from worldmodels.base import index_state
from worldmodels.model import BACKBONES
from worldmodels.nets import sample_onehot, unimix_probs
from worldmodels.ssm import SSMCore

B, T, E, A, H = 3, 6, 16, 2, 5


def stepped_imagine(core, state, policy, horizon):
    feats, actions = [core.feat(state)], []
    actions.append(policy(feats[0]))
    no_reset = torch.zeros(B, 1, dtype=torch.float64)
    for _ in range(horizon):
        h, blocks, _ = core._core(state, state["stoch"][:, None], actions[-1][:, None], no_reset)
        prior = core._logits(core.prior_net, h[:, 0])
        z = sample_onehot(unimix_probs(prior, core.cfg.unimix))
        state = {**{k: v[:, 0] for k, v in blocks.items()}, "stoch": z, "h": h[:, 0]}
        feats.append(core.feat(state))
        actions.append(policy(feats[-1]))
    return torch.stack(feats, 1), torch.stack(actions, 1)


@pytest.mark.parametrize("name", sorted(n for n, (cls, _) in BACKBONES.items() if issubclass(cls, SSMCore)))
def test_imagine_equals_stepping_the_stacked_state(name):
    torch.manual_seed(0)
    core_cls, cfg_cls = BACKBONES[name]
    core = core_cls(cfg_cls(size="xs"), E, A).double()
    g = torch.Generator().manual_seed(1)
    embed, action = torch.randn(B, T, E, generator=g, dtype=torch.float64), torch.randn(B, T, A, generator=g, dtype=torch.float64)
    is_first = torch.zeros(B, T, dtype=torch.float64)
    is_first[:, 0] = 1
    states, _, _ = core.observe(core.initial(B), embed, action, is_first)
    start = {k: v.detach() for k, v in index_state(states, -1).items()}  # gradients from the rollout alone
    weight = torch.randn(core.feat_size, A, dtype=torch.float64, requires_grad=True)
    policy = lambda f: torch.tanh(f @ weight)  # noqa: E731
    def generic(*x):
        core.fast_steps = False
        try:
            return core.imagine(*x)
        finally:
            core.fast_steps = True

    params = [weight, *core.parameters()]
    out = []
    for imagine in (core.imagine, generic, lambda *x: stepped_imagine(core, *x)):
        torch.manual_seed(7)
        feat, act = imagine(start, policy, H)
        grads = torch.autograd.grad((feat * torch.linspace(-1, 1, feat.shape[-1], dtype=feat.dtype)).sum(), params,
                                    allow_unused=True)
        out.append((feat, act, *(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))))
    for fast, slow, stacked in zip(*out):
        torch.testing.assert_close(fast, stacked)
        torch.testing.assert_close(slow, stacked)


def test_s4_rollout_is_made_for_its_horizon():
    """S4's stateless rollout holds the free responses of exactly `horizon` steps: one more is refused,
    not answered from responses it does not have."""
    core_cls, cfg_cls = BACKBONES["s4wm"]
    core = core_cls(cfg_cls(size="xs"), E, A)
    x0 = core._per_block(core.initial(B))[0]
    stepper = core.blocks[0].stepper(x0, horizon=2)
    u = torch.randn(B, core.cfg.d_model)
    for _ in range(2):
        assert stepper.step(u).shape == u.shape
    with pytest.raises(RuntimeError, match="made for 2 steps"):
        stepper.step(u)


def test_s5_layer_is_its_complex_definition():
    """The S5 layer's real-pair products (B_bar u and Re(C x) as real matrix products) against the
    recurrence written in complex arithmetic: x_t = Lambda_bar x_{t-1} (reset at is_first) + B_bar u_t,
    y_t = Re(C x_t) + D u_t. Stepping and training share those products, so only this catches a sign."""
    from worldmodels.s5wm import S5Layer

    torch.manual_seed(0)
    Bn, Tn, Hn, P = 2, 7, 5, 4
    layer = S5Layer(Hn, P, 1e-3, 1e-1).double()
    u = torch.randn(Bn, Tn, Hn, dtype=torch.float64)
    x0 = torch.randn(Bn, P, dtype=torch.complex128)
    reset = torch.zeros(Bn, Tn, dtype=torch.float64)
    reset[0, 3] = 1
    lam_bar, B_bar = layer.discrete()
    C = torch.view_as_complex(layer.C)
    x, ys, xs = x0, [], []
    for t in range(Tn):
        x = lam_bar * x * (1 - reset[:, t, None]) + u[:, t].to(x.dtype) @ B_bar.T
        ys.append((x @ C.T).real + layer.D * u[:, t])
        xs.append(x)
    y, states = layer(u, x0, reset)
    torch.testing.assert_close(states, torch.stack(xs, 1))
    torch.testing.assert_close(y, torch.stack(ys, 1))
    params = layer.step_params(torch.complex128)
    y1, x1 = layer.step(u[:, 0], x0, params)
    torch.testing.assert_close((y1, x1), (ys[0], xs[0]))  # no reset at t = 0


def test_causal_conv_is_the_sum_it_names():
    """The FFT convolution against the lag-by-lag sum: y_t = sum_{k<=t} K_{t-k} v_k, no wrap-around."""
    from worldmodels.s4wm import causal_conv, causal_conv_ref

    g = torch.Generator().manual_seed(0)
    v, kernel = torch.randn(2, 3, 7, 4, generator=g, dtype=torch.float64), torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    out = causal_conv(v, kernel)
    assert out.shape == (2, 3, 2, 7, 4)
    torch.testing.assert_close(out, causal_conv_ref(v, kernel))
    # by hand at one entry: t = 2 reads v_0..v_2 with lags 2..0
    want = sum(kernel[1, 2 - k, 3] * v[1, 2, k, 3] for k in range(3))
    torch.testing.assert_close(out[1, 2, 1, 2, 3], want)


@pytest.mark.parametrize("segments", ["few", "many"])
@pytest.mark.parametrize("name", sorted(n for n, (cls, _) in BACKBONES.items()
                                        if issubclass(cls, SSMCore) and hasattr(cls(BACKBONES[n][1](size="xs"), E, A).blocks[0], "sequence")))
def test_training_pass_equals_the_scan_with_gradients(name, segments):
    """The blocks' training pass (`sequence`: S4's convolutions, states without gradient) against their
    forward (the scan, gradients through the states): features, states and every parameter's gradient,
    from a nonzero start state, across resets inside the window (and, with `many`, more segments than
    the convolutions take, where `sequence` falls back to the scan)."""
    from worldmodels import s4wm

    torch.manual_seed(0)
    core_cls, cfg_cls = BACKBONES[name]
    core = core_cls(cfg_cls(size="xs", layers=2), E, A).double()
    g = torch.Generator().manual_seed(1)
    Tn = 12
    embed, action = torch.randn(B, Tn, E, generator=g, dtype=torch.float64), torch.randn(B, Tn, A, generator=g, dtype=torch.float64)
    is_first = torch.zeros(B, Tn, dtype=torch.float64)
    is_first[0, 0] = is_first[0, 5] = is_first[1, 3] = is_first[1, 9] = 1  # row 2 runs on from the start state
    if segments == "many":
        is_first[2, : s4wm.MAX_SEGMENTS + 1] = 1
    start = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in core.initial(B).items()}
    params = list(core.parameters())
    out = []
    for fast in (True, False):
        core.fast_observe = fast
        try:
            torch.manual_seed(3)
            states, feat, losses = core.observe(start, embed, action, is_first)
        finally:
            core.fast_observe = True
        loss = (feat * torch.linspace(-1, 1, feat.shape[-1], dtype=feat.dtype)).sum() + losses["dyn"].sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        out.append((feat, *(states[k] for k in sorted(states)), *(torch.zeros_like(p) if g is None else g for p, g in zip(params, grads))))
    for fast, slow in zip(*out):
        torch.testing.assert_close(fast, slow)
    assert any(g.abs().sum() > 0 for g in out[0][1 + len(states):])
