"""The agent's policy at the TorchRL boundary: a TensorDict module a collector can run.

It carries the backbone's recurrent state from step to step through the env's TensorDictPrimer
(keys "state_<name>" plus "prev_action", zeroed at every reset), resets it where InitTracker's
"is_init" marks an episode start, and writes the next state under "next" for the collector to carry.
"""
from __future__ import annotations

import torch
from tensordict import TensorDict, TensorDictBase
from tensordict.nn import TensorDictModuleBase
from torch import Tensor

from agents.dreamer import Agent

RANDOM, EXPLORE, EVAL = 0, 1, 2


def observation(td: TensorDictBase, keys: list[str]):
    """The observation the world model reads from a TensorDict: the one key's tensor, or a TensorDict
    of the keys where there are several (an image and a vector)."""
    if len(keys) == 1:
        return td[keys[0]]
    return TensorDict({k: td[k] for k in keys}, td.batch_size)


class DreamerPolicy(TensorDictModuleBase):
    def __init__(self, agent: Agent, action_low: Tensor, action_high: Tensor, mode: int = EXPLORE):
        super().__init__()
        self.agent = agent
        wm = agent.wm
        self.obs_keys = wm.spec.keys  # "pixels" and/or "observation"
        self.state_keys = list(wm.core.state_shapes())
        self.in_keys = [*self.obs_keys, "is_init", "prev_action"] + [f"state_{k}" for k in self.state_keys]
        self.out_keys = ["action", ("next", "prev_action")] + [("next", f"state_{k}") for k in self.state_keys]
        self.register_buffer("low", action_low.float())
        self.register_buffer("high", action_high.float())
        # A buffer, not an attribute, so that weight syncing to collector workers carries it too.
        self.register_buffer("mode", torch.tensor(mode))

    def to_env(self, action: Tensor) -> Tensor:
        """Actor actions are one-hot, or unbounded samples meant for [-1, 1]: clip those there and
        rescale them to the env's bounds (the replay keeps the unclipped sample)."""
        if self.agent.wm.spec.discrete:
            return action
        return self.low + (action.clamp(-1, 1) + 1) / 2 * (self.high - self.low)

    @torch.no_grad()
    def forward(self, td: TensorDictBase) -> TensorDictBase:
        unbatched = td.batch_dims == 0
        if unbatched:
            td = td.unsqueeze(0)
        wm, dev = self.agent.wm, self.low.device
        obs = observation(td, self.obs_keys).to(dev)  # (N, ...), or {key: (N, ...)}
        N = obs.shape[0]
        is_first = td["is_init"].to(dev).reshape(N, 1).float()  # (N, 1)
        prev = td["prev_action"].to(dev).float()  # (N, A)
        state = {k: td[f"state_{k}"].to(dev).float() for k in self.state_keys}
        states, feat, _ = wm.core.observe(state, wm.encoder(obs.unsqueeze(1)), prev[:, None], is_first)
        feat = feat[:, 0]  # (N, F)
        mode = int(self.mode)
        if mode == RANDOM:
            action = self.random(N)
        elif mode == EXPLORE or self.agent.cfg.eval_sample:
            action = self.agent.actor.sample(feat)
        else:
            action = self.agent.actor.mode(feat)
        td["action"] = self.to_env(action).to(td.device if td.device is not None else dev)
        td["next", "prev_action"] = action.cpu() if td.device is None else action.to(td.device)
        for k in self.state_keys:
            td["next", f"state_{k}"] = states[k][:, 0].to(td["prev_action"].device)
        return td.squeeze(0) if unbatched else td

    def random(self, N: int) -> Tensor:
        A = self.agent.wm.spec.action_dim
        if self.agent.wm.spec.discrete:
            idx = torch.randint(A, (N,), device=self.low.device)
            return torch.nn.functional.one_hot(idx, A).float()
        return torch.rand(N, A, device=self.low.device) * 2 - 1
