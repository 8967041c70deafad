"""One process of the data-parallel tests (tests/agents/test_distributed.py), launched as torchrun would
launch it (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment), or alone as the reference.

    python dist_worker.py update <out.pt> <steps>   updates on this rank's share of a fixed batch
    python dist_worker.py ops <out.pt>              the collective helpers on known inputs

Sampling is replaced by the distributions' modes, so an update is a function of its batch alone and
two ranks with half the batch each can be compared with one process on all of it.
"""
import os
import sys

import torch

import worldmodels.nets as nets
from agents import distributed
from agents.dreamer import Actor, Agent, AgentConfig, update
from worldmodels.model import ObsSpec, WorldModel
from worldmodels.nets import NetsConfig
from worldmodels.rssm import RSSMConfig

B, T = 4, 6


def deterministic():
    nets.sample_index = lambda probs: probs.detach().argmax(-1)
    Actor.sample = Actor.mode
    Actor.rsample = lambda self, feat: self.dist(feat).base_dist.mean


def full_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    first = torch.zeros(B, T)
    first[:, 0] = 1
    terminal = torch.zeros(B, T)
    terminal[1, 3] = 1  # one episode ends inside a window
    first[1, 4] = 1
    return {"obs": torch.randn(B, T, 3, generator=g), "action": torch.rand(B, T, 2, generator=g) * 2 - 1,
            "reward": torch.randn(B, T, generator=g), "is_first": first, "is_terminal": terminal}


def main(mode: str, out: str, steps: int = 3) -> None:
    torch.set_num_threads(1)
    group = distributed.setup("cpu")
    if mode == "ops":
        r = group.rank
        a = torch.nn.Parameter(torch.zeros(3))
        b = torch.nn.Parameter(torch.zeros(2))
        c = torch.nn.Parameter(torch.zeros(1))
        a.grad = torch.full((3,), float(r + 1))  # every rank
        if r == 0:
            b.grad = torch.ones(2) * 4  # rank 0 only: the others count zero
        distributed.average_grads([a, b, c])  # c: no rank has a gradient
        res = {"a": a.grad, "b": b.grad, "c": c.grad, "gather": distributed.gather(torch.tensor([r, 10 * r])),
               "all_true": distributed.all_true(r == 0), "all_true_all": distributed.all_true(True),
               "flags": distributed.broadcast_flags([r == 0, r == 1])}
    else:
        deterministic()
        torch.manual_seed(0)
        wm = WorldModel("rssm", RSSMConfig(), NetsConfig(), ObsSpec(pixels=False, obs_dim=3, action_dim=2, discrete=False))
        agent = Agent(wm, AgentConfig())
        distributed.broadcast_module(agent)
        opts = agent.optimizers()
        share = B // group.world
        batch = {k: v[group.rank * share:(group.rank + 1) * share] for k, v in full_batch().items()}
        for _ in range(steps):
            m, _ = update(agent, opts, batch)
            assert m["train/nonfinite"] == 0
        res = {"state": agent.state_dict()}
    if group.rank == 0:
        torch.save(res, out)
    distributed.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(int(a) for a in sys.argv[3:]))
    os._exit(0)
