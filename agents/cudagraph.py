"""The learner update captured in one CUDA graph and replayed at every step (`agent.cuda_graph=true`).

An eager update launches thousands of small kernels (every imagined step through every layer, every
head, every optimiser tensor), and on a GPU the host's launching, not the arithmetic, sets its pace.
A CUDA graph records the whole step's kernels once and replays them with one launch. What that needs
and how it is met here:

- no read-back to the host inside the step: `update(..., graphable=True)` (agents/dreamer.py) makes
  the non-finite skip a device-side undo and Adam keeps its step count on the device
  (`Agent.optimizers(capturable=True)`);
- fixed addresses: the batch is copied into buffers the graph reads (its shapes must not change
  between steps), and the metrics and states it returns are the graph's own outputs, overwritten at
  the next replay: read or copy them before the next call;
- lazy state made before the capture: the first `warmup` calls run the same update eagerly on a
  side stream (optimiser moments, cuBLAS workspaces), each on its own batch, so that no batch is
  trained on twice; the call after them captures the graph and replays it;
- random draws: the graph takes the default CUDA generator's seed and offset at every replay, so
  each replay draws fresh latents and actions.

`update(..., graphable=True)` run eagerly is the slow twin (tests compare the two on a GPU).
"""
from __future__ import annotations

import torch
from torch import Tensor

from agents.dreamer import Agent, update


def _leaves(tree: dict, prefix: str = "") -> dict[str, Tensor]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        elif isinstance(v, Tensor):
            out[prefix + k] = v
    return out


def _clone_tree(tree: dict) -> dict:
    return {k: _clone_tree(v) if isinstance(v, dict) else v.clone() if isinstance(v, Tensor) else v for k, v in tree.items()}


class GraphedUpdate:
    """`step = GraphedUpdate(agent, opts)`; then `metrics, states = step(batch)` in place of
    `update(agent, opts, batch)`. The optimisers must be Adam made with `capturable=True`."""

    def __init__(self, agent: Agent, opts: dict[str, torch.optim.Optimizer], warmup: int = 3):
        device = next(agent.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"a CUDA graph of the update needs the agent on a CUDA device, not {device}")
        if not all(g.get("capturable") for o in opts.values() for g in o.param_groups):
            raise ValueError("a CUDA graph of the update needs capturable optimisers: agent.optimizers(capturable=True)")
        self.agent, self.opts, self.warmup = agent, opts, warmup
        self.calls, self.graph, self.static, self.out = 0, None, None, None

    def __call__(self, batch: dict) -> tuple[dict[str, Tensor], dict]:
        if self.graph is None and self.calls < self.warmup:
            self.calls += 1
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = update(self.agent, self.opts, batch, graphable=True)
            torch.cuda.current_stream().wait_stream(side)
            return out
        if self.graph is None:
            self.static = _clone_tree(batch)
            self.static_leaves = _leaves(self.static)  # the buffers the graph reads, filled at every replay
            self.shapes = {k: (v.shape, v.dtype) for k, v in self.static_leaves.items()}
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = update(self.agent, self.opts, self.static, graphable=True)
        else:
            leaves = _leaves(batch)
            shapes = {k: (v.shape, v.dtype) for k, v in leaves.items()}
            if shapes != self.shapes:
                raise ValueError("the batch changed shape or keys since the CUDA graph was captured: "
                                 f"{sorted(set(shapes.items()) ^ set(self.shapes.items()), key=str)[:2]}")
            for k, v in self.static_leaves.items():
                v.copy_(leaves[k])
        self.graph.replay()
        return self.out
