"""Every backbone on a real GPU (marked `gpu`, skipped without CUDA): the core's training pass on CUDA
in float32 (the Triton scan for the state-space cores, cuBLAS, the GPU's rounding order) against the
same weights in float64 on the CPU, with the same latent draws; and one full learner update per
backbone on CUDA, in fp32 and under bf16 autocast."""
import copy

import pytest
import torch

from worldmodels.model import BACKBONES, ObsSpec, WorldModel
from worldmodels.nets import NetsConfig

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEV = "cuda"
B, T, E, A = 4, 80, 16, 2  # T = 80: past one Triton tile and the chunked scan's threshold, five resets


def rel(x, ref):
    """||x - ref|| / ||ref|| in float64 on the CPU."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture(autouse=True)
def no_tf32():
    """float32 products in full precision (TF32 would be the 3e-4 level, not what is checked here)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_core_on_cuda_matches_cpu_double(backbone):
    torch.manual_seed(0)
    core_cls, cfg_cls = BACKBONES[backbone]
    ref = core_cls(cfg_cls(size="xs"), E, A, "joint").double()
    gpu = copy.deepcopy(ref).float().to(DEV)
    g = torch.Generator().manual_seed(1)
    embed = torch.randn(B, T, E, generator=g, dtype=torch.float64)
    action = torch.randn(B, T, A, generator=g, dtype=torch.float64)
    is_first = torch.zeros(B, T, dtype=torch.float64)
    is_first[:, [0, 17, 33, 50, 64]] = 1
    noise = {"stoch": torch.rand(B, T, *ref.state_shapes()["stoch"], generator=g, dtype=torch.float64)}
    weight = torch.randn(B, T, ref.feat_size, generator=g, dtype=torch.float64)

    def run(core, dtype, device):
        cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
        states, feat, kl = core.observe({k: cast(v) for k, v in core.initial(B).items()}, cast(embed), cast(action), cast(is_first), noise={k: cast(v) for k, v in noise.items()})
        loss = (feat * cast(weight)).mean() + kl["dyn"].mean() + kl["rep"].mean()
        grads = torch.autograd.grad(loss, [p for p in core.parameters() if p.requires_grad], allow_unused=True)
        return feat, loss, grads

    f64, l64, g64 = run(ref, torch.float64, "cpu")
    f32, l32, g32 = run(gpu, torch.float32, DEV)
    assert rel(f32, f64) < 1e-4, rel(f32, f64)
    assert rel(l32, l64) < 1e-4
    for a, b in zip(g32, g64):
        if b is not None:
            assert a is not None and rel(a, b) < 1e-3, rel(a, b)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("backbone", sorted(BACKBONES))
def test_update_runs_on_cuda(backbone, precision):
    from agents.dreamer import Agent, AgentConfig, update

    torch.manual_seed(0)
    cfg_cls = BACKBONES[backbone][1]
    wm = WorldModel(backbone, cfg_cls(size="xs"), NetsConfig(name="xs"), ObsSpec(pixels=False, obs_dim=24, action_dim=6))
    agent = Agent(wm, AgentConfig(precision=precision)).to(DEV)
    opts = agent.optimizers()
    Bu, Tu = 4, 64
    is_first = torch.zeros(Bu, Tu)
    is_first[:, 0] = is_first[:2, 30] = 1
    batch = {"obs": torch.randn(Bu, Tu, 24), "action": torch.rand(Bu, Tu, 6) * 2 - 1, "reward": torch.rand(Bu, Tu),
             "is_first": is_first, "is_terminal": torch.zeros(Bu, Tu)}
    batch = {k: v.to(DEV) for k, v in batch.items()}
    before = [p.detach().clone() for p in agent.parameters()]
    for _ in range(2):
        metrics, states = update(agent, opts, batch)
    assert states is not None and metrics["train/nonfinite"].item() == 0
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, agent.parameters()))
