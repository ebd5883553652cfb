"""AdaBound and AMSBound (Luo et al., ICLR 2019): Adam whose per-parameter step size is clipped
into bounds that tighten, with rate ``gamma``, towards ``final_lr`` (SGD's) as training goes on.

Written here (the authors' ``adabound`` package is unmaintained); the rule follows their
reference implementation: the final LR follows the schedule of ``lr`` (final_lr · lr / base_lr),
and weight decay is added to the gradient (L2, not decoupled).
"""
from __future__ import annotations

import math

import torch


class AdaBound(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), final_lr=0.1, gamma=1e-3, eps=1e-8,
                 weight_decay=0.0, amsbound=False):
        for name, v in (("lr", lr), ("final_lr", final_lr), ("gamma", gamma), ("eps", eps),
                        ("weight_decay", weight_decay)):
            if v < 0:
                raise ValueError(f"AdaBound {name} must be ≥ 0, got {v}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"AdaBound betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, betas=tuple(betas), final_lr=final_lr, gamma=gamma, eps=eps,
                        weight_decay=weight_decay, amsbound=amsbound)
        super().__init__(params, defaults)
        for group in self.param_groups:
            group.setdefault("base_lr", group["lr"])

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
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                    if group["amsbound"]:
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                if group["amsbound"]:
                    torch.maximum(state["max_exp_avg_sq"], exp_avg_sq,
                                  out=state["max_exp_avg_sq"])
                    denom = state["max_exp_avg_sq"].sqrt().add_(group["eps"])
                else:
                    denom = exp_avg_sq.sqrt().add_(group["eps"])
                step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                final_lr = group["final_lr"] * group["lr"] / group["base_lr"]
                lower = final_lr * (1 - 1 / (group["gamma"] * t + 1))
                upper = final_lr * (1 + 1 / (group["gamma"] * t))
                bounded = torch.full_like(denom, step_size).div_(denom).clamp_(lower, upper)
                p.sub_(bounded.mul_(exp_avg))
        return loss
