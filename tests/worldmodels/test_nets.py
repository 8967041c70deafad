import pytest
import torch

from worldmodels.nets import TwoHot, mlp, shared_input, symexp, symlog, two_hot, two_hot_nll


def test_symlog_inverts():
    x = torch.tensor([-1e4, -3.0, 0.0, 0.5, 1e4])
    torch.testing.assert_close(symexp(symlog(x)), x)


def test_two_hot_mean_recovers_value():
    bins = torch.linspace(-20, 20, 255)
    x = torch.tensor([-7.3, 0.0, 0.01, 3.14159, 19.9])
    enc = two_hot(x, bins)
    torch.testing.assert_close(enc.sum(-1), torch.ones(5))
    torch.testing.assert_close((enc * bins).sum(-1), x)
    assert ((enc > 0).sum(-1) <= 2).all()


def test_two_hot_nll_equals_the_encoding_it_skips():
    """two_hot_nll (two gathered bins) against the reference -sum(two_hot(x) * logp): values and
    gradients for the logits and the targets, over targets inside, on and past the bins' edges."""
    torch.manual_seed(0)
    bins = torch.linspace(-20, 20, 255, dtype=torch.float64)
    logits = torch.randn(6, 5, 255, dtype=torch.float64, requires_grad=True)
    x = torch.cat([torch.randn(27, dtype=torch.float64) * 8, torch.tensor([-20.0, 20.0, -25.0], dtype=torch.float64)])
    x = x.reshape(6, 5).requires_grad_(True)
    fast = two_hot_nll(logits.log_softmax(-1), x, bins)
    ref = -(two_hot(x, bins) * logits.log_softmax(-1)).sum(-1)
    torch.testing.assert_close(fast, ref)
    w = torch.randn(6, 5, dtype=torch.float64)
    g_fast = torch.autograd.grad((fast * w).sum(), [logits, x])
    g_ref = torch.autograd.grad((ref * w).sum(), [logits, x])
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b)
    head = TwoHot(4, 8, 1).double()  # the head's loss and mean go through the same path
    torch.testing.assert_close(head.loss(logits, symexp(x)), -(two_hot(x, head.bins) * logits.log_softmax(-1)).sum(-1))
    torch.testing.assert_close(head.mean(logits), symexp((logits.softmax(-1) * head.bins).sum(-1)))


def test_two_hot_head_learns_a_constant():
    torch.manual_seed(0)
    head = TwoHot(4, 16, 1)
    opt = torch.optim.Adam(head.parameters(), 1e-2)
    x, y = torch.randn(64, 4), torch.full((64,), -250.0)
    for _ in range(300):
        loss = head.loss(head(x), y).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(head.mean(head(x)).mean().item() + 250.0) < 10.0


def test_fast_categorical_sampler_matches_multinomial():
    """sample_index (inverse CDF) and its twin sample_index_ref (torch.multinomial) draw the same
    distribution: class frequencies over 200K draws of a skewed and a peaked categorical agree with the
    probabilities within 5 binomial standard errors, and so do those of the reference."""
    from worldmodels.nets import sample_index, sample_index_ref, sample_onehot

    torch.manual_seed(0)
    probs = torch.tensor([[0.05, 0.15, 0.3, 0.5], [0.97, 0.01, 0.01, 0.01]])
    n = 200_000
    for fn in (sample_index, sample_index_ref):
        idx = fn(probs.expand(n, 2, 4))  # (n, 2)
        assert idx.shape == (n, 2) and idx.min() >= 0 and idx.max() <= 3
        for row in range(2):
            freq = torch.bincount(idx[:, row], minlength=4).double() / n
            sigma = (probs[row].double() * (1 - probs[row].double()) / n).sqrt()
            assert ((freq - probs[row]).abs() <= 5 * sigma).all(), (fn.__name__, freq, probs[row])
    # zero-probability classes are never drawn, and the straight-through gradient reaches the probabilities
    p = torch.tensor([[0.0, 1.0, 0.0]], requires_grad=True)
    assert (sample_index(p.expand(1000, 3)) == 1).all()
    onehot = sample_onehot(p)
    (g,) = torch.autograd.grad((onehot * torch.tensor([1.0, 2.0, 3.0])).sum(), p)
    torch.testing.assert_close(g, torch.tensor([[1.0, 2.0, 3.0]]))


def test_conv_encoder_decoder_any_power_of_two_size():
    import pytest

    from worldmodels.nets import ConvDecoder, ConvEncoder

    for size, stages in ((16, 2), (32, 3), (64, 4)):
        enc, dec = ConvEncoder(8, 3, size), ConvDecoder(20, 8, 3, size)
        assert sum(isinstance(m, torch.nn.Conv2d) for m in enc.modules()) == stages
        x = torch.randint(0, 256, (2, 5, 3, size, size), dtype=torch.uint8)
        assert enc(x).shape == (2, 5, enc.out_dim) and enc.out_dim == 8 * 2 ** (stages - 1) * 16
        assert dec(torch.randn(2, 5, 20)).shape == (2, 5, 3, size, size)
    with pytest.raises(ValueError, match="8, 16, 32, 64"):
        ConvEncoder(8, 3, 48)


def test_separate_action_embedding_normalises_each_input_on_its_own():
    """action_embed=separate: the action and the latent each pass their own Linear -> LN -> SiLU, so the
    action's half of the token ignores the latent (however wide or large) and vice versa; joint is the
    one MLP over the concatenation, with the parameter names checkpoints already have."""
    from worldmodels.nets import token_in

    torch.manual_seed(0)
    S, A, Hd = 512, 2, 16
    sep, width = token_in(S, A, Hd, None, "separate")
    assert width == 2 * Hd
    z, a = torch.randn(8, S), torch.eye(A)[torch.randint(A, (8,))]
    y = sep(torch.cat([z, a], -1))
    y_z = sep(torch.cat([100 * torch.randn(8, S), a], -1))  # another latent, much larger
    y_a = sep(torch.cat([z, 1 - a], -1))  # the other action
    torch.testing.assert_close(y[:, Hd:], y_z[:, Hd:])  # the action's half depends on the action only
    torch.testing.assert_close(y[:, :Hd], y_a[:, :Hd])
    assert (y[:, Hd:] - y_a[:, Hd:]).abs().mean() > 0.1  # and the action moves it by O(1)
    joint, width = token_in(S, A, Hd, 7, "joint")
    assert width == 7 and [k for k, _ in joint.named_parameters()] == ["0.weight", "1.weight", "1.bias", "3.weight", "3.bias"]
    with pytest.raises(ValueError, match="action_embed"):
        token_in(S, A, Hd, None, "sum")


@pytest.mark.parametrize("layers", [0, 1, 2])
def test_shared_input_equals_each_net_on_its_own(layers):
    """Several MLPs on one input with their first layers as one product: the same outputs, and the
    same gradients for the input and for every net's parameters, as running each net alone; nets of
    mixed kinds (a bias in one first layer only) run one by one and agree too."""
    torch.manual_seed(0)
    nets = [mlp(7, 5, layers, out).double() for out in (3, 1, 4)]
    mixed = [mlp(7, 5, 1, 2).double(), mlp(7, 5, 0, 2).double()]
    for group in (nets, mixed):
        x = torch.randn(2, 6, 7, dtype=torch.float64, requires_grad=True)
        weights = [torch.randn(2, 6, net[-1].out_features, dtype=torch.float64) for net in group]
        results = []
        for run in (shared_input, lambda x, ns: [n(x) for n in ns]):
            outs = run(x, group)
            loss = sum((o * w).sum() for o, w in zip(outs, weights))
            params = [p for n in group for p in n.parameters()]
            results.append((outs, torch.autograd.grad(loss, [x, *params])))
        (o1, g1), (o2, g2) = results
        for a, b in zip([*o1, *g1], [*o2, *g2]):
            torch.testing.assert_close(a, b)
