"""One soft-target cross-entropy for every trick.

Targets are either integer labels (the fast path: nothing mixed) or N×K distributions (mixup,
CutMix, RICAP, distillation build those). Label smoothing in the paper's form — 1−ε on the true
class, ε/(K−1) on each other — is the affine map t ↦ (1−a)·t + a/K with a = εK/(K−1), applied to
either kind of target; being affine, it commutes with mixing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def smoothing_weight(epsilon: float, num_classes: int) -> float:
    """``a`` such that torch's uniform smoothing gives the paper's 1−ε / ε/(K−1) targets."""
    return epsilon * num_classes / (num_classes - 1) if epsilon else 0.0


def smooth(targets: torch.Tensor, epsilon: float, num_classes: int) -> torch.Tensor:
    """Distributions (or labels, one-hot first) with the paper's label smoothing applied."""
    if targets.ndim == 1:
        targets = F.one_hot(targets, num_classes).float()
    a = smoothing_weight(epsilon, num_classes)
    return targets * (1 - a) + a / num_classes


class SoftTargetCrossEntropy(nn.Module):
    def __init__(self, num_classes: int, label_smoothing: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.epsilon = label_smoothing
        self.a = smoothing_weight(label_smoothing, num_classes)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.ndim == 1:  # integer labels: torch's fused kernel
            return F.cross_entropy(logits, targets, label_smoothing=self.a)
        t = targets.to(logits.dtype)
        if self.a:
            t = t * (1 - self.a) + self.a / self.num_classes
        return torch.sum(-t * F.log_softmax(logits, dim=-1), dim=-1).mean()
