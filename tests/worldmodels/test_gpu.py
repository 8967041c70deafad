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


def _agent(backbone, capturable, actor_grad="auto", discrete=False):
    from agents.dreamer import Agent, AgentConfig

    torch.manual_seed(0)
    wm = WorldModel(backbone, BACKBONES[backbone][1](size="xs"), NetsConfig(name="xs"),
                    ObsSpec(pixels=False, obs_dim=24, action_dim=6, discrete=discrete))
    agent = Agent(wm, AgentConfig(actor_grad=actor_grad)).to(DEV)
    return agent, agent.optimizers(capturable=capturable)


def _batches(n, Bu=4, Tu=32, discrete=False):
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(n):
        is_first = torch.zeros(Bu, Tu)
        is_first[:, 0] = is_first[:2, Tu * 5 // 8] = 1
        action = (torch.nn.functional.one_hot(torch.randint(6, (Bu, Tu), generator=g), 6).float() if discrete
                  else torch.rand(Bu, Tu, 6, generator=g) * 2 - 1)
        b = {"obs": torch.randn(Bu, Tu, 24, generator=g), "action": action,
             "reward": torch.rand(Bu, Tu, generator=g), "is_first": is_first, "is_terminal": torch.zeros(Bu, Tu)}
        out.append({k: v.to(DEV) for k, v in b.items()})
    return out


@pytest.mark.parametrize("backbone,actor_grad,discrete", [(b, "auto", False) for b in sorted(BACKBONES)]
                         + [("rssm", "reinforce", False), ("rssm", "auto", True)])
def test_cuda_graph_update_equals_its_eager_twin(backbone, actor_grad, discrete):
    """Two eager warm-up steps, the capture, three replays on new batches: the same weights, optimiser
    state and metrics as the graphable update run eagerly with the same seeds (dynamics gradients,
    REINFORCE, discrete actions)."""
    from agents.cudagraph import GraphedUpdate
    from agents.dreamer import mutable_state, update

    batches = _batches(5, discrete=discrete)
    graphed, g_opts = _agent(backbone, True, actor_grad, discrete)
    eager, e_opts = _agent(backbone, True, actor_grad, discrete)
    step = GraphedUpdate(graphed, g_opts, warmup=2)
    for i, b in enumerate(batches):
        torch.cuda.manual_seed(100 + i)
        mg, _ = step(b)
        mg = {k: v.clone() for k, v in mg.items()}
        torch.cuda.manual_seed(100 + i)
        me, _ = update(eager, e_opts, b, graphable=True)
        for k in me:
            assert rel(mg[k], me[k]) < 1e-4 or (me[k].abs() < 1e-6 and mg[k].abs() < 1e-6), (i, k, mg[k], me[k])
    assert step.graph is not None
    for x, y in zip(mutable_state(graphed, g_opts), mutable_state(eager, e_opts)):
        assert rel(x.float(), y.float()) < 1e-4


def test_cuda_graph_update_undoes_a_nonfinite_step_and_refuses_a_new_shape():
    from agents.cudagraph import GraphedUpdate
    from agents.dreamer import mutable_state

    agent, opts = _agent("rssm", True)
    step = GraphedUpdate(agent, opts, warmup=1)
    b1, b2 = _batches(2)
    step(b1)
    step(b2)  # captured and replayed
    before = [t.clone() for t in mutable_state(agent, opts)]
    bad = {k: v.clone() for k, v in b1.items()}
    bad["reward"][0, 3] = float("nan")
    m, _ = step(bad)
    assert m["train/nonfinite"].item() == 1
    assert all(torch.equal(x, y) for x, y in zip(before, mutable_state(agent, opts)))
    m, _ = step(b1)
    assert m["train/nonfinite"].item() == 0
    assert not all(torch.equal(x, y) for x, y in zip(before, mutable_state(agent, opts)))
    with pytest.raises(ValueError, match="changed shape"):
        step(_batches(1, Tu=16)[0])
