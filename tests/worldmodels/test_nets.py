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
