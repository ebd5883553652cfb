"""A PNG grid of one batch, each sample captioned with its target, to see what the pipeline does."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .stages import IMAGENET_MEAN, IMAGENET_STD


def caption(target: torch.Tensor, classes: Sequence[str], top: int = 4) -> str:
    """``"cat"`` for a label; ``"cat .62 dog .38"`` for a distribution (weights ≥ 0.01)."""
    if target.ndim == 0:
        return classes[int(target)]
    w, idx = target.float().topk(min(top, len(target)))
    return " ".join(f"{classes[int(i)]} {float(v):.2f}".replace(" 0.", " .")
                    for v, i in zip(w, idx) if v >= 0.01)


def save_grid(images: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
              path: str | Path, mean=IMAGENET_MEAN, std=IMAGENET_STD, cell: int = 160) -> Path:
    """Undo the normalization, lay the batch out in a grid, caption each sample."""
    x = images.detach().float().cpu()
    x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n = len(x)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    font = ImageFont.load_default()
    text_h = 14
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        r, c = divmod(i, cols)
        img = Image.fromarray(np.ascontiguousarray(x[i])).resize((cell, cell),
                                                                 Image.Resampling.NEAREST)
        sheet.paste(img, (c * cell, r * (cell + text_h)))
        draw.text((c * cell + 2, r * (cell + text_h) + cell), caption(targets[i].cpu(), classes),
                  fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
