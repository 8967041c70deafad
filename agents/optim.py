"""LaProp with adaptive gradient clipping and a linear warmup: the optimiser of DreamerV3's current
recipe (Hafner et al. 2025; the chain of `embodied/jax/opt.py`), per parameter tensor p with gradient g:

    g  <- g / max(1, ||g|| / (agc * max(pmin, ||p||)))     adaptive gradient clipping (AGC)
    nu <- beta2 nu + (1 - beta2) g^2                      RMS of the gradient, bias-corrected:
    u  <- g / (sqrt(nu / (1 - beta2^t)) + eps)            eps 1e-20: scale by the RMS, almost nothing added
    mu <- beta1 mu + (1 - beta1) u                        momentum of the *scaled* gradient (LaProp),
    p  <- p - lr_t mu / (1 - beta1^t)                     bias-corrected; lr_t = lr min(1, t / warmup)

Where Adam keeps momentum of the raw gradient and divides afterwards, LaProp (Ziyin et al. 2020)
divides first, which decouples momentum from the adaptive scale. AGC bounds each update relative to
the size of the weights it changes, so no global gradient-norm clip is needed.
"""
from __future__ import annotations

import torch


class LaProp(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 4e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-20,
                 agc: float = 0.3, pmin: float = 1e-3, warmup: int = 1000):
        if lr <= 0 or not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1 or eps < 0 or agc < 0 or warmup < 0:
            raise ValueError(f"bad LaProp settings: lr={lr}, betas={betas}, eps={eps}, agc={agc}, warmup={warmup}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, agc=agc, pmin=pmin, warmup=warmup))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["nu"] = torch.zeros_like(p, dtype=torch.float32)
                    state["mu"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                t = state["step"]
                if group["agc"]:
                    upper = group["agc"] * p.detach().float().norm().clamp(min=group["pmin"])
                    g = g / (g.norm() / upper).clamp(min=1.0)
                nu, mu = state["nu"], state["mu"]
                nu.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                u = g / ((nu / (1 - beta2 ** t)).sqrt() + group["eps"])
                mu.mul_(beta1).add_(u, alpha=1 - beta1)
                lr = group["lr"] * (min(1.0, t / group["warmup"]) if group["warmup"] else 1.0)
                p.add_((mu / (1 - beta1 ** t)).to(p.dtype), alpha=-lr)
        return loss
