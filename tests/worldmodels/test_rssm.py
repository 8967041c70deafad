"""The RSSM's observe (posterior projection of the embeddings before the loop, prior after it) against
its per-step twin, observe_stepwise: states, features, KL terms and every gradient."""
import pytest
import torch

from worldmodels.rssm import RSSM, RSSMConfig

B, T, E, A = 3, 12, 16, 2


@pytest.mark.parametrize("action_embed", ["joint", "separate"])
def test_observe_equals_its_stepwise_twin(action_embed):
    torch.manual_seed(0)
    core = RSSM(RSSMConfig(size="xs"), E, A, action_embed).double()
    g = torch.Generator().manual_seed(1)
    embed = torch.randn(B, T, E, generator=g, dtype=torch.float64, requires_grad=True)
    action = torch.randn(B, T, A, generator=g, dtype=torch.float64)
    is_first = torch.zeros(B, T, dtype=torch.float64)
    is_first[0, 0] = is_first[1, 5] = is_first[2, 9] = 1  # resets mid-window; rows 1 and 2 start from `start`
    noise = {"stoch": torch.rand(B, T, core.cfg.stoch, core.cfg.classes, generator=g, dtype=torch.float64)}
    start = {k: torch.randn(B, *s, generator=g, dtype=torch.float64) for k, s in core.state_shapes().items()}
    start["stoch"] = torch.nn.functional.one_hot(start["stoch"].argmax(-1), core.cfg.classes).double()

    def run(fn):
        states, feat, losses = fn(start, embed, action, is_first, noise=noise)
        # a loss that reaches every output: features, both KL terms (prior and posterior nets)
        w = torch.linspace(-1, 1, feat.shape[-1], dtype=torch.float64)
        total = (feat * w).sum() + (losses["dyn"] * 0.7).sum() + (losses["rep"] * 1.3).sum()
        params = [embed, *core.parameters()]
        return states, feat, losses, torch.autograd.grad(total, params, allow_unused=True)

    fast, slow = run(core.observe), run(core.observe_stepwise)
    for k in ("deter", "stoch"):
        torch.testing.assert_close(fast[0][k], slow[0][k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast[1], slow[1], rtol=1e-10, atol=1e-12)
    for k in ("dyn", "rep"):
        torch.testing.assert_close(fast[2][k], slow[2][k], rtol=1e-10, atol=1e-12)
    names = ["embed", *(n for n, _ in core.named_parameters())]
    for n, a, b in zip(names, fast[3], slow[3]):
        assert (a is None) == (b is None), n
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=n)
    assert all(g is not None for n, g in zip(names, fast[3]) if "prior_net" in n or "post_net" in n)
