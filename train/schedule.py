"""Learning-rate schedules as pure functions of the iteration, evaluated every iteration."""
from __future__ import annotations

import bisect
import math


def scaled_lr(base_lr: float, batch: int, scaling: str = "linear") -> float:
    """The paper's linear scaling rule: η = base_lr × batch / 256."""
    return base_lr * batch / 256 if scaling == "linear" else base_lr


def lr_at(i: int, *, peak: float, total: int, warmup: int = 0, kind: str = "cosine",
          milestones: list[int] = (), gamma: float = 0.1) -> float:
    """LR for update ``i`` (1-based, i = 1..total).

    Warmup: lr = i·η/m for i ≤ m. Then cosine: ½(1 + cos(π(i−m)/(T−m)))·η, or step:
    η·γ^(number of milestones ≤ i), milestones given in iterations.
    """
    if warmup and i <= warmup:
        return i * peak / warmup
    if kind == "cosine":
        span = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(i - warmup, span) / span)) * peak
    if kind == "step":
        return peak * gamma ** bisect.bisect_right(sorted(milestones), i)
    raise ValueError(f"unknown schedule {kind!r}")
