"""Exponential moving average of a model's weights, without a host-device sync per update.

torch's ``AveragedModel`` keeps its update count ``n_averaged`` in a CPU tensor and copies it to
the device at every update (a blocking copy that waits for the step to finish), and tests it
with ``n_averaged == 0`` / ``> 0``. This class does the same arithmetic with the count held as a
Python int, so an update is a copy (the first) or one ``_foreach_lerp_`` per (device, dtype)
group, all queued without waiting.

Semantics are those of ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay),
use_buffers=True)`` (torch.optim.swa_utils): W₀ᴱᴹᴬ = W₀, Wₜ₊₁ᴱᴹᴬ = decay·Wₜᴱᴹᴬ + (1 − decay)·Wₜ₊₁,
over parameters and buffers (BatchNorm statistics averaged too; integer buffers such as
``num_batches_tracked`` by the same formula, truncated, as torch does). The state dict has the
same keys (``module.*`` and ``n_averaged``), so checkpoints load either way.
"""
from __future__ import annotations

import copy
import itertools

import torch
from torch import nn


class ExponentialMovingAverage(nn.Module):
    """EMA of ``model`` (parameters and buffers). ``module`` is the averaged copy, on the
    model's device; ``n_updates`` counts ``update_parameters`` calls.

    Args:
        model: the model to average (not modified).
        decay: weight of the old average, in [0, 1).
    Raises:
        ValueError: decay outside [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.module = copy.deepcopy(model)
        self.module.requires_grad_(False)
        self.decay = decay
        self.n_updates = 0
        # AveragedModel's buffer, kept on the CPU for its state dict; never read in an update
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))

    def _pairs(self, model: nn.Module):
        mine = itertools.chain(self.module.parameters(), self.module.buffers())
        theirs = itertools.chain(model.parameters(), model.buffers())
        return [(a.detach(), b.detach()) for a, b in zip(mine, theirs, strict=True)]

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (queued on the device)."""
        pairs = self._pairs(model)
        if self.n_updates == 0:
            torch._foreach_copy_([a for a, _ in pairs], [b for _, b in pairs])
        else:
            groups: dict = {}
            for a, b in pairs:
                groups.setdefault((a.device, a.dtype), ([], []))
                groups[(a.device, a.dtype)][0].append(a)
                groups[(a.device, a.dtype)][1].append(b)
            for (_, dtype), (mine, theirs) in groups.items():
                if dtype.is_floating_point or dtype.is_complex:
                    torch._foreach_lerp_(mine, theirs, 1 - self.decay)
                else:
                    for a, b in zip(mine, theirs):
                        a.copy_(a * self.decay + b * (1 - self.decay))
        self.n_updates += 1
        self.n_averaged.fill_(self.n_updates)  # a CPU tensor: no device work

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _apply(self, fn, recurse=True):
        # keep the count on the CPU when the average moves (``.to(device)``)
        n = self.n_averaged
        out = super()._apply(fn, recurse)
        self.n_averaged = n
        return out

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict, assign)
        self.n_updates = int(self.n_averaged)
        return result
