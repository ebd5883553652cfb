"""One soft-target cross-entropy for every trick.

Targets are either integer labels (the fast path: nothing mixed) or N×K distributions (mixup,
CutMix, RICAP, distillation build those). Label smoothing in the paper's form (He et al. 2018
§5.2, after Szegedy et al. 2016): 1−ε on the true class and ε/(K−1) on each other one. That is
the affine map t ↦ (1−a)·t + a/K with a = εK/(K−1), applied to either kind of target; being
affine, it commutes with mixing. The loss is computed in fp32 whatever the autocast dtype.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from tricks.errors import ConfigError


def check_smoothing(epsilon: float, num_classes: int) -> None:
    """Refuse an ε the paper's form cannot give for K classes: it needs ε ≤ (K−1)/K, else the
    true class (1−ε) gets less than each other class (ε/(K−1)) and torch's uniform weight
    a = εK/(K−1) exceeds 1. Raises ConfigError naming ``train.label_smoothing``."""
    if num_classes < 2:
        if epsilon:
            raise ConfigError(f"train.label_smoothing={epsilon} needs at least 2 classes, "
                              f"the data has {num_classes}")
        return
    limit = (num_classes - 1) / num_classes
    if not 0 <= epsilon <= limit:
        raise ConfigError(f"train.label_smoothing={epsilon} is outside [0, {limit:g}] for "
                          f"{num_classes} classes: the paper's 1−ε on the true class must not "
                          f"fall below ε/(K−1) on the others")


def smoothing_weight(epsilon: float, num_classes: int) -> float:
    """``a`` such that torch's uniform smoothing gives the paper's 1−ε / ε/(K−1) targets."""
    return epsilon * num_classes / (num_classes - 1) if epsilon else 0.0


def smooth(targets: torch.Tensor, epsilon: float, num_classes: int) -> torch.Tensor:
    """N×K fp32 distributions (from N int64 labels, one-hot first, or N×K distributions) with
    the paper's label smoothing applied."""
    check_smoothing(epsilon, num_classes)
    if targets.ndim == 1:
        targets = F.one_hot(targets, num_classes)
    a = smoothing_weight(epsilon, num_classes)
    return targets.float() * (1 - a) + a / num_classes


class SoftTargetCrossEntropy(nn.Module):
    """mean over N of −Σ_k t_k·log softmax(z)_k, for logits z (N×K, any float dtype) and
    targets t (N int64 labels, or N×K distributions of any float dtype), with the paper's label
    smoothing ε. Log-softmax and targets are fp32 whatever the autocast dtype, so bf16/fp16
    training sees the same loss as fp32 on the same logits; integer labels take torch's fused
    kernel, which agrees with the soft path on one-hot targets to 1e-6. Returns a 0-d fp32
    tensor. Raises ConfigError when ε does not fit K (``check_smoothing``)."""

    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        super().__init__()
        check_smoothing(label_smoothing, num_classes)
        self.num_classes = num_classes
        self.epsilon = label_smoothing
        self.a = smoothing_weight(label_smoothing, num_classes)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with _autocast_off(logits.device.type):
            z = logits.float()
            if targets.ndim == 1:  # integer labels: torch's fused kernel
                return F.cross_entropy(z, targets, label_smoothing=self.a)
            t = targets.float()
            if self.a:
                t = t * (1 - self.a) + self.a / self.num_classes
            return torch.sum(-t * F.log_softmax(z, dim=-1), dim=-1).mean()


def _autocast_off(device_type: str):
    """Autocast disabled for ``device_type``; a device type autocast does not know (``meta``,
    the tests' CUDA stand-in) has no autocast to disable."""
    try:
        return torch.autocast(device_type, enabled=False)
    except RuntimeError:
        return nullcontext()
