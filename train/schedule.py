"""Learning-rate schedules as pure functions of the update number, evaluated every update.

Updates are counted from 1: update ``i`` is the ``i``-th optimizer step of the run, the one
the trainer makes right after setting the LR to ``lr_at(i, …)``.
"""
from __future__ import annotations

import bisect
import math


def scaled_lr(base_lr: float, batch: int, scaling: str = "linear") -> float:
    """The linear scaling rule of Goyal et al. 2017, used by He et al. 2018 (§3.1):
    η = base_lr × batch / 256; ``scaling="none"`` keeps ``base_lr``."""
    return base_lr * batch / 256 if scaling == "linear" else base_lr


def lr_at(i: int, *, peak: float, total: int, warmup: int = 0, kind: str = "cosine",
          milestones: list[int] = (), gamma: float = 0.1) -> float:
    """The LR of update ``i`` (1-based, i = 1..total), in the optimizer's units.

    Warmup (Goyal et al. 2017; He et al. 2018 §3.1): lr = i·η/m for the first m updates, so
    update m runs at η.

    Cosine (He et al. 2018 §5.1, after Loshchilov & Hutter 2017): η_t = ½(1 + cos(tπ/T))·η,
    where t = i − m − 1 counts the T = total − m post-warmup updates from 0: the first of them
    runs at exactly η, the last at ½(1 + cos((T−1)π/T))·η > 0 (no wasted update at 0).

    Linear (Li, Yumer & Ramanan 2020, "Budgeted training", ICLR: decay linearly to zero over the
    budget, their best schedule for short runs; with warmup, the triangular one-cycle shape of the
    fast CIFAR-10 trainings): η_t = (1 − t/T)·η with t, T as for cosine: the first post-warmup
    update runs at η, the last at η/T.

    Step (He et al. 2016; the paper's baseline §2.1, torch's ``MultiStepLR`` stepped once per
    epoch): η·γ^k with k the number of ``milestones`` (in updates, epoch × steps per epoch)
    already completed before update i, i.e. milestones < i. With 10 updates an epoch and a
    milestone at epoch 2 (update 20), updates 1..20 run at η and update 21 is the first at γη.

    Raises ValueError for ``i`` outside 1..total or an unknown ``kind``.
    """
    if not 1 <= i <= total:
        raise ValueError(f"update {i} outside 1..{total}")
    if warmup and i <= warmup:
        return i * peak / warmup
    if kind == "cosine":
        span = max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * (i - warmup - 1) / span)) * peak
    if kind == "linear":
        span = max(1, total - warmup)
        return (1 - (i - warmup - 1) / span) * peak
    if kind == "step":
        return peak * gamma ** bisect.bisect_left(sorted(milestones), i)
    raise ValueError(f"unknown schedule {kind!r}")


def schedule_args(name: str, warmup_epochs: float, step_epochs: list, step_gamma: float,
                  peak: float, steps_per_epoch: int, epochs: int) -> dict:
    """The keyword arguments of ``lr_at`` for a run (epochs turned into updates): what the
    trainer and ``tricks lr`` both use, so the listing is the schedule the trainer runs."""
    return dict(peak=peak, total=steps_per_epoch * epochs,
                warmup=round(warmup_epochs * steps_per_epoch), kind=name,
                milestones=[e * steps_per_epoch for e in step_epochs], gamma=step_gamma)
