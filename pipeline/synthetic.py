"""The embedded default dataset: 10 classes of JPEGs that differ by shape or texture only.

Colours (foreground and background), position, size and rotation are random, so colour alone
does not give the class; the model must learn shape. Made once, deterministically, from a seed.
"""
from __future__ import annotations

import math
import os
import random
from pathlib import Path

from PIL import Image, ImageDraw

CLASSES = ("disk", "square", "triangle", "plus", "ring", "hstripes", "vstripes", "checker",
           "diamond", "star")


def _colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    while True:
        fg = tuple(rng.randrange(256) for _ in range(3))
        bg = tuple(rng.randrange(256) for _ in range(3))
        if sum(abs(a - b) for a, b in zip(fg, bg)) > 180:  # keep the shape visible
            return fg, bg


def _polygon(cx, cy, r, n, rot, inner=None):
    pts = []
    for k in range(n * (2 if inner else 1)):
        rad = (inner if inner and k % 2 else 1.0) * r
        a = rot + math.pi * 2 * k / (n * (2 if inner else 1))
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def draw_sample(cls: int, rng: random.Random, size: int = 64) -> Image.Image:
    fg, bg = _colours(rng)
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = rng.uniform(0.2, 0.42) * size
    cx = rng.uniform(r, size - r)
    cy = rng.uniform(r, size - r)
    rot = rng.uniform(0, 2 * math.pi)
    name = CLASSES[cls]
    if name == "disk":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif name == "square":
        d.polygon(_polygon(cx, cy, r * 1.2, 4, math.pi / 4 + rng.uniform(-0.3, 0.3)), fill=fg)
    elif name == "diamond":
        d.polygon([(cx, cy - r * 1.2), (cx + r * 0.7, cy), (cx, cy + r * 1.2), (cx - r * 0.7, cy)],
                  fill=fg)
    elif name == "triangle":
        d.polygon(_polygon(cx, cy, r * 1.2, 3, rot), fill=fg)
    elif name == "star":
        d.polygon(_polygon(cx, cy, r * 1.2, 5, rot, inner=0.45), fill=fg)
    elif name == "plus":
        t = r * 0.35
        d.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fg)
        d.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fg)
    elif name == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=max(2, int(r * 0.3)))
    else:  # textures fill a square patch
        period = max(4, int(r / rng.uniform(1.5, 3)))
        x0, y0 = int(cx - r), int(cy - r)
        for y in range(y0, int(cy + r)):
            for x in range(x0, int(cx + r)):
                u, v = (x - x0) // (period // 2), (y - y0) // (period // 2)
                on = {"hstripes": v % 2, "vstripes": u % 2, "checker": (u + v) % 2}[name]
                if on:
                    img.putpixel((x, y), fg)
    return img


def make_dataset(root: str | os.PathLike, train_per_class: int = 400, val_per_class: int = 100,
                 size: int = 64, seed: int = 0, quality: int = 90) -> Path:
    """Write ``root/train/<class>/*.jpg`` and ``root/val/<class>/*.jpg``; returns ``root``."""
    root = Path(root)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        rng = random.Random(f"{seed}-{split}")
        for cls, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                draw_sample(cls, rng, size).save(folder / f"{k:05d}.jpg", quality=quality)
    return root
