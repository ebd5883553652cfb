"""Pad-and-crop (random translation) for small images, the CIFAR practice.

He et al. 2016 (§4.2, CIFAR-10): "4 pixels are padded on each side, and a 32×32 crop is randomly
sampled from the padded image or its horizontal flip". torchvision's ``RandomCrop(size,
padding=p, fill=f)`` draws the crop's top-left corner uniformly in 0..2p on each axis; that is
a shift s = corner − p uniform in −p..p, with pixels from outside the image set to the fill
(``padding_mode="constant"``) or taken from inside it by torchvision's other padding modes:
"edge" (the nearest border pixel), "reflect" (mirrored about the border pixel, which is not
repeated: numpy's and torch's ``reflect``) and "symmetric" (mirrored with the border repeated).
Reflection is what the fast CIFAR trainings pad with (Page's DAWNBench ResNet, 2018; Jordan's
airbench, 2024): no flat band the model can learn to ignore.

Here the decode engine delivers the whole image at the training size (box = the whole image,
flipped or not), and ``translate`` moves every sample of the batch by its own shift in one
gather: no padded copy, no loop over samples, any dtype (the engines' uint8), any device.
"""
from __future__ import annotations

import torch

from tricks.errors import OptionError

from .transfer import to_device


PAD_MODES = ("constant", "edge", "reflect", "symmetric")


def check_padding(pad: int, fill: int, size: int | None = None, mode: str = "constant") -> None:
    """Raise OptionError unless 0 ≤ pad (< size, when given), fill is a uint8 level and mode is
    one of ``PAD_MODES``."""
    if mode not in PAD_MODES:
        raise OptionError(f"unknown pad-and-crop padding mode {mode!r}; choose one of "
                          f"{', '.join(PAD_MODES)}")
    if not isinstance(pad, int) or pad < 0:
        raise OptionError(f"pad-and-crop padding must be an integer ≥ 0, got {pad!r}")
    if size is not None and pad >= size:
        raise OptionError(f"pad-and-crop padding {pad} must be smaller than the {size}² image")
    if not isinstance(fill, int) or not 0 <= fill <= 255:
        raise OptionError(f"pad-and-crop fill must be an integer 0..255, got {fill!r}")


def draw_shifts(n: int, pad: int, gen: torch.Generator) -> torch.Tensor:
    """N×2 int64 (dx, dy), each uniform in −pad..pad (torchvision's RandomCrop corner − pad)."""
    return torch.randint(-pad, pad + 1, (n, 2), generator=gen)


def translate(images: torch.Tensor, shifts: torch.Tensor, fill: int | float = 0,
              mode: str = "constant") -> torch.Tensor:
    """Pad-and-crop by per-sample shifts.

    Args:
        images: N×C×H×W, any dtype and device, any memory format.
        shifts: N×2 integers (dx, dy) on the CPU, each |shift| < its side; output pixel (y, x)
            is input pixel (y + dy, x + dx) where that lies inside the image. A crop whose
            top-left corner is (p + dx, p + dy) in the image padded by p on every side.
        fill: ``mode="constant"``: the value of pixels from outside the image (in the images'
            units).
        mode: torchvision's ``padding_mode``: "constant", "edge", "reflect" or "symmetric"
            (see the module's docstring).

    Returns:
        N×C×H×W, same dtype and device, channels-last.

    Raises:
        ValueError: ``shifts`` is not N×2, or ``mode`` unknown.
    """
    n, _, h, w = images.shape
    if shifts.shape != (n, 2):
        raise ValueError(f"shifts must be {n}×2, got {tuple(shifts.shape)}")
    if mode not in PAD_MODES:
        raise ValueError(f"unknown padding mode {mode!r}; choose one of {', '.join(PAD_MODES)}")
    dev = images.device
    s, = to_device([shifts.to(torch.int64)], dev)  # one non-blocking copy from pinned memory
    rows = torch.arange(h, device=dev)[None] + s[:, 1:2]  # N×H source rows
    cols = torch.arange(w, device=dev)[None] + s[:, 0:1]  # N×W source columns
    batch = torch.arange(n, device=dev)[:, None, None]
    # advanced indices split by the channel slice: the result is N×H×W×C (channels-last data)
    out = images[batch, :, _source(rows, h, mode)[:, :, None], _source(cols, w, mode)[:, None, :]]
    if mode == "constant":
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        # the fill as a scalar kernel argument: a ``torch.tensor(fill, device=…)`` would be a
        # blocking host → device copy every batch
        out = out.masked_fill(~inside[..., None], fill)
    return out.permute(0, 3, 1, 2)


def _source(i: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """Indices in −n < i < 2n − 1 mapped into 0..n−1 by the padding mode (constant: clamped,
    then masked by the caller)."""
    if mode == "reflect":      # … 2 1 | 0 1 2 … n−1 | n−2 n−3 …
        return torch.where(i < 0, -i, torch.where(i >= n, 2 * (n - 1) - i, i))
    if mode == "symmetric":    # … 1 0 | 0 1 2 … n−1 | n−1 n−2 …
        return torch.where(i < 0, -i - 1, torch.where(i >= n, 2 * n - 1 - i, i))
    return i.clamp(0, n - 1)   # edge, constant
