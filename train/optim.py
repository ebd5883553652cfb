"""Optimizer construction with weight-decay groups chosen by parameter structure."""
from __future__ import annotations

import torch
from torch import nn

from .adabound import AdaBound


def param_groups(model: nn.Module, weight_decay: float, no_bias_decay: bool) -> list[dict]:
    """With ``no_bias_decay``, every parameter of ndim ≤ 1 (biases, BN γ and β wherever they
    sit, the downsample branch's included) gets no weight decay. Chosen by shape, not by name."""
    if not no_bias_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad],
                 "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def scaler_reads_back(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``torch.amp.GradScaler.step`` makes the host wait for the GPU every step with this
    optimizer (FP16): it reads its inf/NaN flag back (``found_inf.item()``) to decide whether to
    step, unless the optimizer applies the scale itself and skips on the device
    (``_step_supports_amp_scaling``: torch's fused SGD, Adam, AdamW). So with FP16, fused SGD
    (``optim.fused``) keeps the step free of host syncs; unfused SGD and AdaBound do not.
    ``tests/test_no_sync.py`` checks this answer against what a step does."""
    return not getattr(optimizer, "_step_supports_amp_scaling", False)


def fp16_sync_note(optimizer: torch.optim.Optimizer, name: str) -> str | None:
    """The one-line note the trainer prints at start-up when FP16 with the optimizer ``name``
    (``optim.name``) would sync the host every step (``scaler_reads_back``); None when not."""
    if not scaler_reads_back(optimizer):
        return None
    fix = "set optim.fused=true" if name == "sgd" \
        else "optim.name=sgd with optim.fused=true avoids it"
    return (f"note: train.precision=fp16 with optim.name={name}"
            f"{', optim.fused=false' if name == 'sgd' else ''}: the gradient scaler reads its "
            f"inf/NaN flag back to the host every step (a GPU sync per step); {fix}")


def build_optimizer(model: nn.Module, name: str, lr: float, momentum: float = 0.9,
                    nesterov: bool = True, weight_decay: float = 0.0, no_bias_decay: bool = False,
                    final_lr: float = 0.1, gamma: float = 1e-3, betas=(0.9, 0.999),
                    eps: float = 1e-8, fused: bool = False) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay, no_bias_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov,
                               fused=True if fused else None)
    if name in ("adabound", "amsbound"):
        return AdaBound(groups, lr=lr, betas=tuple(betas), final_lr=final_lr, gamma=gamma,
                        eps=eps, amsbound=name == "amsbound")
    raise ValueError(f"unknown optimizer {name!r}")
