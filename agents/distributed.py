"""Data-parallel learning: `torchrun --nproc-per-node N -m agents.cli train ...` (or `longdream train`
under any launcher that sets RANK / WORLD_SIZE / MASTER_ADDR), torch.distributed with NCCL on GPUs and
gloo on CPUs.

Each rank collects from its own envs (seeds offset by rank) into its own replay shard and draws its own
batch of `batch_size` windows, so the global batch is N x batch_size. After the backward passes of an
update the gradients of the world model, the actor and the critic are averaged over the ranks (one
all-reduce of one flat buffer per update), then every rank clips and steps the same optimiser state:
the weights stay identical without being sent again. The few quantities of an update that are not
means over the batch are made global too: the return percentiles of the actor's normalisation are taken
over every rank's returns, and a non-finite loss on any rank skips the step on all of them.

Why not torch's DistributedDataParallel wrapper: DDP averages gradients from hooks armed by the
wrapped module's forward(), and an update here calls the world model through several methods (loss,
imagination, the policy) and runs three backward passes over one graph, the actor's through the
dynamics into world-model parameters whose gradients are then discarded. DDP would average those too,
or need its static-graph mode; averaging once, after the three passes, is the same arithmetic as DDP's
all-reduce (mean of the ranks' gradients of per-rank means) with nothing to arm. The test
tests/agents/test_distributed.py checks 2 ranks against one process on the concatenated batch.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class Group:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def setup(device: str) -> Group:
    """Join the process group the launcher describes (WORLD_SIZE > 1), or stay a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Group()
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend)
    return Group(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_module(module: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers those of rank `src`."""
    if not active():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            dist.broadcast(t.data, src)


def average_grads(params: list[nn.Parameter]) -> None:
    """Replace each gradient by its mean over the ranks. A gradient missing on some ranks counts as zero
    there; one missing on every rank stays None (as a single process would leave it)."""
    if not active():
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device, dtype=grads[0].dtype)
    flat = torch.cat([g.reshape(-1) for g in grads] + [present])
    dist.all_reduce(flat)
    flat[:-len(params)] /= dist.get_world_size()
    seen = flat[-len(params):] > 0
    i = 0
    for j, (p, g) in enumerate(zip(params, grads)):
        n = g.numel()
        mean = flat[i:i + n].view_as(p)
        if p.grad is not None:
            p.grad.copy_(mean)
        elif seen[j]:
            p.grad = mean.clone()
        i += n


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """Whether `flag` holds on every rank."""
    if not active():
        return flag
    t = torch.tensor(1.0 if flag else 0.0, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def gather(x: Tensor) -> Tensor:
    """Every rank's `x` (the same shape on each), concatenated along dim 0 in rank order."""
    if not active():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def broadcast_flags(flags: list[bool], device: torch.device | str = "cpu", src: int = 0) -> list[bool]:
    """Rank `src`'s flags on every rank (decisions made on one rank's clock, such as checkpointing)."""
    if not active():
        return flags
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.broadcast(t, src)
    return [bool(v) for v in t.tolist()]


def barrier() -> None:
    if active():
        dist.barrier()
