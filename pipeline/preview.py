"""A PNG grid of one batch, each sample captioned with its target, to see what the pipeline does."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .stages import IMAGENET_MEAN, IMAGENET_STD


def caption_parts(target: torch.Tensor, classes: Sequence[str], top: int = 4) -> list[str]:
    """``["cat"]`` for a label; ``["cat .62", "dog .38"]`` for a distribution (weights ≥ 0.01,
    at most ``top``: RICAP mixes four)."""
    if target.ndim == 0:
        return [classes[int(target)]]
    w, idx = target.float().topk(min(top, len(target)))
    return [f"{classes[int(i)]} {float(v):.2f}".replace(" 0.", " .")
            for v, i in zip(w, idx) if v >= 0.01]


def caption(target: torch.Tensor, classes: Sequence[str], top: int = 4) -> str:
    """``"cat"`` for a label; ``"cat .62 dog .38"`` for a distribution (weights ≥ 0.01)."""
    return " ".join(caption_parts(target, classes, top))


def wrap(parts: Sequence[str], font, width: int) -> list[str]:
    """Lines of at most ``width`` pixels in ``font``: whole parts (a class with its weight) where
    they fit, a part wider than a line cut between characters."""
    def fits(text: str) -> bool:
        return font.getlength(text) <= width

    lines: list[str] = []
    for part in parts:
        if lines and fits(f"{lines[-1]} {part}"):
            lines[-1] = f"{lines[-1]} {part}"
            continue
        line = ""
        for ch in part:
            if line and not fits(line + ch):
                lines.append(line)
                line = ""
            line += ch
        lines.append(line)
    return lines


def grid_image(images: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
               mean=IMAGENET_MEAN, std=IMAGENET_STD, cell: int = 160) -> Image.Image:
    """Undo the normalization of N×3×H×W ``images``, lay them out in a near-square grid of
    ``cell``-pixel squares, and caption each with its target (a label, or the largest weights
    of a distribution), wrapped to stay inside its cell."""
    x = images.detach().float().cpu()
    x = x * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n = len(x)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    font = ImageFont.load_default()
    line_h = 14
    captions = [wrap(caption_parts(targets[i].cpu(), classes), font, cell - 4) for i in range(n)]
    text_h = line_h * max(1, max(len(c) for c in captions))
    sheet = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        r, c = divmod(i, cols)
        img = Image.fromarray(np.ascontiguousarray(x[i])).resize((cell, cell),
                                                                 Image.Resampling.NEAREST)
        sheet.paste(img, (c * cell, r * (cell + text_h)))
        for k, line in enumerate(captions[i]):
            draw.text((c * cell + 2, r * (cell + text_h) + cell + k * line_h), line,
                      fill="black", font=font)
    return sheet


def save_grid(images: torch.Tensor, targets: torch.Tensor, classes: Sequence[str],
              path: str | Path, mean=IMAGENET_MEAN, std=IMAGENET_STD, cell: int = 160) -> Path:
    """:func:`grid_image` written as a PNG to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid_image(images, targets, classes, mean, std, cell).save(path)
    return path
