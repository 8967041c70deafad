import torch

from worldmodels.nets import TwoHot, symexp, symlog, two_hot


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
