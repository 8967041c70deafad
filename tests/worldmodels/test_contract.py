"""The world-model contract, checked on every backbone in the dict."""
import pytest
import torch

from worldmodels.base import index_state
from worldmodels.model import BACKBONES, ObsSpec, WorldModel
from worldmodels.nets import NetsConfig

B, T, E, A = 3, 9, 16, 2


def split(name):
    """"s5wm" or "s5wm+separate": the backbone and how its core reads [z, a] (NetsConfig.action_embed)."""
    backbone, _, embed = name.partition("+")
    return backbone, embed or "joint"


def make_core(name):
    torch.manual_seed(0)
    backbone, embed = split(name)
    core_cls, cfg_cls = BACKBONES[backbone]
    return core_cls(cfg_cls(size="xs"), E, A, embed).double()


def fixed_noise(core, T):
    """Uniforms for every latent draw ("stoch", one per class), so two passes sample the same latents."""
    g = torch.Generator().manual_seed(1)
    return {"stoch": torch.rand(B, T, *core.state_shapes()["stoch"], generator=g, dtype=torch.float64)}


def inputs(T, first_at=()):
    g = torch.Generator().manual_seed(2)
    embed = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    action = torch.randn(B, T, A, generator=g, dtype=torch.float64)
    is_first = torch.zeros(B, T, dtype=torch.float64)
    is_first[:, 0] = 1
    for t in first_at:
        is_first[:, t] = 1
    return embed, action, is_first


@pytest.fixture(params=sorted(BACKBONES) + [f"{n}+separate" for n in sorted(BACKBONES)])
def name(request):
    return request.param


def test_shapes(name):
    core = make_core(name)
    states, feat, losses = core.observe(core.initial(B), *inputs(T))
    assert feat.shape == (B, T, core.feat_size), feat.shape
    for k, s in core.state_shapes().items():
        assert states[k].shape == (B, T, *s), (k, states[k].shape)
    for k in ("dyn", "rep"):
        assert losses[k].shape == (B, T) and (losses[k] >= -1e-9).all()
    feats, actions = core.imagine(index_state(states, -1), lambda f: torch.tanh(f[:, :A]), 5)
    assert feats.shape == (B, 6, core.feat_size) and actions.shape == (B, 6, A)
    assert torch.allclose(feats[:, 0], feat[:, -1])


@pytest.mark.parametrize("T", [T, 40])  # 40: long enough that the SSMs train on the chunked scan on a CPU
def test_sequence_equals_steps(name, T):
    """One observe over T equals T observes of one step, with the same latent samples."""
    core = make_core(name)
    embed, action, is_first = inputs(T, first_at=(4, T - 7))
    noise = fixed_noise(core, T)
    _, feat, _ = core.observe(core.initial(B), embed, action, is_first, noise=noise)
    state, steps = core.initial(B), []
    for t in range(T):
        s, f, _ = core.observe(state, embed[:, t:t + 1], action[:, t:t + 1], is_first[:, t:t + 1],
                               noise={k: v[:, t:t + 1] for k, v in noise.items()})
        state = index_state(s, -1)
        steps.append(f[:, 0])
    torch.testing.assert_close(feat, torch.stack(steps, 1), rtol=1e-5, atol=1e-8)


def test_sequence_equals_steps_fp32(name):
    """The same in float32, the training precision: the parallel path (chunked scan, attention) and the
    recurrent one agree to 1e-5 relative to the features' scale."""
    T = 40
    core = make_core(name).float()
    embed, action, is_first = (x.float() for x in inputs(T, first_at=(4, T - 7)))
    noise = {k: v.float() for k, v in fixed_noise(core, T).items()}
    with torch.no_grad():
        _, feat, _ = core.observe(core.initial(B), embed, action, is_first, noise=noise)
        state, steps = core.initial(B), []
        for t in range(T):
            s, f, _ = core.observe(state, embed[:, t:t + 1], action[:, t:t + 1], is_first[:, t:t + 1],
                                   noise={k: v[:, t:t + 1] for k, v in noise.items()})
            state = index_state(s, -1)
            steps.append(f[:, 0])
    err = ((feat - torch.stack(steps, 1)).abs().max() / feat.abs().max()).item()
    assert err < 1e-5, f"{name}: parallel vs recurrent relative error {err:.1e}"


def test_reset_at_is_first(name):
    """After is_first at step k, outputs equal those of a fresh sequence started at k."""
    core = make_core(name)
    k = 5
    embed, action, is_first = inputs(T, first_at=(k,))
    noise = fixed_noise(core, T)
    _, feat, _ = core.observe(core.initial(B), embed, action, is_first, noise=noise)
    _, fresh, _ = core.observe(core.initial(B), embed[:, k:], action[:, k:], is_first[:, k:],
                               noise={n: v[:, k:] for n, v in noise.items()})
    torch.testing.assert_close(feat[:, k:], fresh, rtol=1e-5, atol=1e-8)
    # ...and the earlier context really mattered without the reset.
    is_first[:, k] = 0
    _, cont, _ = core.observe(core.initial(B), embed, action, is_first, noise=noise)
    assert not torch.allclose(cont[:, k:], fresh)


def test_causality(name):
    """Perturbing inputs after step k changes no output at or before k."""
    core = make_core(name)
    k = 4
    embed, action, is_first = inputs(T)
    noise = fixed_noise(core, T)
    _, feat, _ = core.observe(core.initial(B), embed, action, is_first, noise=noise)
    embed2, action2 = embed.clone(), action.clone()
    embed2[:, k + 1:] += 1.0
    action2[:, k + 1:] -= 1.0
    _, feat2, _ = core.observe(core.initial(B), embed2, action2, is_first, noise=noise)
    torch.testing.assert_close(feat[:, :k + 1], feat2[:, :k + 1])
    assert not torch.allclose(feat[:, k + 1:], feat2[:, k + 1:])


@pytest.mark.parametrize("pixels", [False, True])
def test_world_model_gradients_finite(name, pixels):
    torch.manual_seed(0)
    backbone, embed = split(name)
    spec = ObsSpec(pixels=pixels, obs_dim=0 if pixels else 5, action_dim=A)
    wm = WorldModel(backbone, BACKBONES[backbone][1](size="xs"), NetsConfig(action_embed=embed), spec)
    Bw, Tw = 2, 6
    obs = torch.randint(0, 256, (Bw, Tw, 3, 64, 64), dtype=torch.uint8) if pixels else torch.randn(Bw, Tw, 5)
    total, terms, *_ = wm.loss(obs, torch.randn(Bw, Tw, A), torch.randn(Bw, Tw), torch.zeros(Bw, Tw), torch.zeros(Bw, Tw))
    total.backward()
    assert set(terms) == {"dec", "reward", "cont", "dyn", "rep"}
    grads = [p.grad for p in wm.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_world_model_with_an_image_and_a_vector():
    """Observations of two parts: each has its own encoder and decoder, the embeddings are concatenated
    and the reconstruction loss is the sum of the parts' losses."""
    from tensordict import TensorDict

    torch.manual_seed(0)
    spec = ObsSpec(pixels=True, obs_dim=5, action_dim=A, image=(16, 16, 3))
    wm = WorldModel("rssm", BACKBONES["rssm"][1](size="xs"), NetsConfig(), spec)
    Bw, Tw = 2, 4
    obs = TensorDict({"pixels": torch.randint(0, 256, (Bw, Tw, 3, 16, 16), dtype=torch.uint8),
                      "observation": torch.randn(Bw, Tw, 5)}, [Bw, Tw])
    enc = wm.encoder
    assert enc.out_dim == enc.encoders["pixels"].out_dim + enc.encoders["observation"].out_dim
    total, terms, _, feat, _ = wm.loss(obs, torch.randn(Bw, Tw, A), torch.randn(Bw, Tw), torch.zeros(Bw, Tw),
                                       torch.zeros(Bw, Tw))
    pred = wm.decoder(feat)
    parts = {k: wm.decoder.decoders[k].loss(pred[k], obs[k]).mean() for k in ("pixels", "observation")}
    torch.testing.assert_close(terms["dec"], parts["pixels"] + parts["observation"])
    total.backward()
    for k in ("pixels", "observation"):  # both encoders learn
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in wm.encoder.encoders[k].parameters())
    assert set(wm.open_loop(obs, torch.randn(Bw, Tw, A), torch.zeros(Bw, Tw), 2)) == {"pixels", "observation"}
