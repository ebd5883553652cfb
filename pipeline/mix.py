"""Batch mixing: mixup, CutMix, RICAP. Targets become N×K distributions.

Each function draws on the CPU from an explicit generator (λ, permutations, boxes), moves the
draw to the images' device in one non-blocking copy from pinned memory (``transfer.to_device``:
no host-device sync), applies it to the images, builds the targets from the same draw, and
returns the draw.
Label smoothing is left to the loss: being affine, it commutes with any of these.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tricks.errors import OptionError
from .options_check import check_nonneg
from .transfer import to_device


def _beta(gen: torch.Generator, a: float, size=None) -> np.ndarray | float:
    # torch's Beta takes no generator: seed numpy's from ours, so the draw stays keyed
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=gen)))
    return rng.beta(a, a, size)


def _one_hot(labels: torch.Tensor, k: int, dtype) -> torch.Tensor:
    # a scatter, not F.one_hot: that checks the label range on the host on some devices
    return torch.zeros(len(labels), k, dtype=dtype, device=labels.device).scatter_(
        1, labels.view(-1, 1), 1)


@dataclass
class MixDraw:
    lam: torch.Tensor                   # mixup, CutMix: weight of the sample's own image
    perms: list[torch.Tensor]           # the permutation(s) partners come from
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)  # (y0, y1, x0, x1)
    weights: list[float] = field(default_factory=list)  # RICAP: each patch's area fraction


def mixup(x, labels, num_classes, gen, alpha=0.2, per_sample=False):
    """x ← λ·x + (1−λ)·x[perm], targets likewise (Zhang et al. 2018, λ ~ Beta(α, α)).

    λ is rounded once to the images' dtype and that one λ weights both the pixels and the
    labels (targets in fp32), so in fp16/bf16 the targets describe the images exactly as in
    fp32. Returns the mixed images (x's dtype), N×K fp32 targets and the draw (λ as applied)."""
    n = len(x)
    lam = torch.as_tensor(_beta(gen, alpha, n if per_sample else None), dtype=torch.float32)
    lam = lam.expand(n).contiguous() if lam.ndim == 0 else lam
    lam = lam.to(x.dtype).float()  # the λ the pixels get, for the labels too
    perm = torch.randperm(n, generator=gen)
    dev_perm, lam_d = to_device([perm, lam], x.device)
    out = torch.lerp(x[dev_perm], x, lam_d.to(x.dtype).view(-1, 1, 1, 1))
    y = _one_hot(labels, num_classes, torch.float32)
    targets = torch.lerp(y[dev_perm], y, lam_d.view(-1, 1))
    return out, targets, MixDraw(lam, [perm])


def cutmix(x, labels, num_classes, gen, alpha=1.0):
    """Paste a box of area ≈ (1−λ) from a partner; targets by the pasted area (Yun et al. 2019)."""
    n, _, h, w = x.shape
    lam = float(_beta(gen, alpha))
    r = (1 - lam) ** 0.5
    ch, cw = int(h * r), int(w * r)
    cy = int(torch.randint(0, h, (1,), generator=gen))
    cx = int(torch.randint(0, w, (1,), generator=gen))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    perm = torch.randperm(n, generator=gen)
    (dev_perm,) = to_device([perm], x.device)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[:, :, y0:y1, x0:x1][dev_perm]  # gather the box only
    lam_adj = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    y = _one_hot(labels, num_classes, torch.float32)
    targets = lam_adj * y + (1 - lam_adj) * y[dev_perm]
    return out, targets, MixDraw(torch.full((n,), lam_adj), [perm], [(y0, y1, x0, x1)])


def ricap(x, labels, num_classes, gen, beta=0.3):
    """Four crops from four permutations patched into one image; targets weighted by the four
    areas (Takahashi et al. 2018). The boundary (w, h) ~ W·Beta(β, β), H·Beta(β, β)."""
    n, _, h, w = x.shape
    bw = int(round(w * float(_beta(gen, beta))))
    bh = int(round(h * float(_beta(gen, beta))))
    sizes = [(bh, bw), (bh, w - bw), (h - bh, bw), (h - bh, w - bw)]  # TL, TR, BL, BR
    perms, boxes, patches, weights = [], [], [], []
    for ph, pw in sizes:
        perms.append(torch.randperm(n, generator=gen))
        oy = int(torch.randint(0, h - ph + 1, (1,), generator=gen))
        ox = int(torch.randint(0, w - pw + 1, (1,), generator=gen))
        boxes.append((oy, oy + ph, ox, ox + pw))
        weights.append(ph * pw / (h * w))
    targets = torch.zeros(n, num_classes, device=x.device)
    y = _one_hot(labels, num_classes, torch.float32)
    for dev_perm, (oy, oy1, ox, ox1), weight in zip(to_device(perms, x.device), boxes, weights):
        patches.append(x[:, :, oy:oy1, ox:ox1][dev_perm])  # gather the crop only
        targets += weight * y[dev_perm]
    top = torch.cat(patches[:2], dim=3)
    bottom = torch.cat(patches[2:], dim=3)
    out = torch.cat([top, bottom], dim=2)
    return out, targets, MixDraw(torch.ones(n), perms, boxes, weights)


class Mixup:
    def __init__(self, alpha=0.2, per_sample=False):
        if check_nonneg("mixup alpha", alpha) == 0:
            raise OptionError("mixup alpha must be > 0")
        self.alpha, self.per_sample = alpha, per_sample

    def __call__(self, x, labels, num_classes, gen):
        return mixup(x, labels, num_classes, gen, self.alpha, self.per_sample)[:2]


class CutMix:
    def __init__(self, alpha=1.0):
        if check_nonneg("cutmix alpha", alpha) == 0:
            raise OptionError("cutmix alpha must be > 0")
        self.alpha = alpha

    def __call__(self, x, labels, num_classes, gen):
        return cutmix(x, labels, num_classes, gen, self.alpha)[:2]


class Ricap:
    def __init__(self, beta=0.3):
        if check_nonneg("ricap beta", beta) == 0:
            raise OptionError("ricap beta must be > 0")
        self.beta = beta

    def __call__(self, x, labels, num_classes, gen):
        return ricap(x, labels, num_classes, gen, self.beta)[:2]
