"""Knowledge distillation (Hinton et al. 2015, the paper's §5.4): the teacher's tempered
distribution joins the soft-target loss.

    loss = CE(targets, softmax(z)) + w·T²·CE(softmax(r/T), softmax(z/T))

with student logits z, teacher logits r, temperature T and weight w. The teacher sees the same
(augmented, mixed) images as the student, in eval mode, without gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def distillation_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float
                      ) -> torch.Tensor:
    """T²·CE(softmax(r/T), softmax(z/T)), averaged over the batch."""
    t = temperature
    p = F.softmax(teacher.float() / t, dim=-1)
    return -(p * F.log_softmax(student.float() / t, dim=-1)).sum(-1).mean() * t * t


class DistillationLoss(nn.Module):
    def __init__(self, base: nn.Module, temperature: float = 20.0, weight: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.base, self.temperature, self.weight = base, temperature, weight

    def forward(self, logits, targets, teacher_logits):
        return self.base(logits, targets) + self.weight * distillation_term(
            logits, teacher_logits, self.temperature)
