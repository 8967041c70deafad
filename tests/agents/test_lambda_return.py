import torch

from agents.returns import lambda_return


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


def plain_lambda_return(reward, value, cont, lam):
    out, R = [], value[:, -1]
    for t in reversed(range(reward.shape[1])):
        R = reward[:, t] + cont[:, t] * ((1 - lam) * value[:, t + 1] + lam * R)
        out.append(R)
    return torch.stack(out[::-1], 1)


def random_returns_inputs(B=5, T=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    reward = torch.randn(B, T, generator=g, dtype=torch.float64)
    value = torch.randn(B, T + 1, generator=g, dtype=torch.float64)
    terminal = torch.rand(B, T, generator=g) < 0.15
    return reward, value, terminal


def test_lambda_return_matches_recursion_and_torchrl():
    from torchrl.objectives.value.functional import td_lambda_return_estimate

    reward, value, terminal = random_returns_inputs()
    gamma, lam = 0.97, 0.9
    cont = gamma * (~terminal).double()
    R = lambda_return(reward, value, cont, lam)
    torch.testing.assert_close(R, plain_lambda_return(reward, value, cont, lam))
    # TorchRL: time on dim -2, values of the next state, `terminated` cuts the bootstrap; the last
    # step is marked done (not terminated) so its bootstrap is value_T, as in Dreamer's R_T = v_T.
    done = terminal.clone()
    done[:, -1] = True
    tr = td_lambda_return_estimate(gamma, lam, value[:, 1:, None], reward[:, :, None],
                                   done=done[:, :, None], terminated=terminal[:, :, None])
    torch.testing.assert_close(R, tr[..., 0])


def test_lambda_return_gradient_flows_to_values():
    reward, value, terminal = random_returns_inputs()
    value.requires_grad_()
    lambda_return(reward, value, 0.9 * (~terminal).double(), 0.95).sum().backward()
    assert torch.isfinite(value.grad).all() and value.grad.abs().sum() > 0
