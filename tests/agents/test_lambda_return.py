import torch

from worldmodels.ops.scan import lambda_return


def test_hand_worked_example():
    # H=2, lam=0.5, gamma*cont = 0.9 then 0 (episode ends after the second step).
    reward = torch.tensor([[1.0, 2.0]])
    value = torch.tensor([[10.0, 20.0, 30.0]])
    cont = torch.tensor([[0.9, 0.0]])
    # R_1 = r_1 + 0 = 2;  R_0 = 1 + 0.9 * (0.5 * 20 + 0.5 * 2) = 10.9
    R = lambda_return(reward, value, cont, 0.5)
    torch.testing.assert_close(R, torch.tensor([[10.9, 2.0]]))


def test_lambda_one_is_discounted_return_and_zero_is_td():
    g = torch.Generator().manual_seed(0)
    reward, value = torch.randn(4, 6, generator=g), torch.randn(4, 7, generator=g)
    cont = torch.full((4, 6), 0.9)
    mc = lambda_return(reward, value, cont, 1.0)
    expect = value[:, -1]
    for t in reversed(range(6)):
        expect = reward[:, t] + 0.9 * expect
    torch.testing.assert_close(mc[:, 0], expect)
    td = lambda_return(reward, value, cont, 0.0)
    torch.testing.assert_close(td, reward + 0.9 * value[:, 1:])
