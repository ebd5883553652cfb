"""The stages after a decode engine: augment → normalize → mix.

    engine   uint8 N×3×H×W (channels-last) + int64 labels, on the device; or, where the engine
             can fold the normalize stage into its decode (``engine_normalize``), the
             normalized float32 images themselves
    augment  float N×3×H×W in [0, 1], each op ``op(images, gen) -> images``
    normalize (x − mean) / std, in the training dtype
    augment  the ops marked ``after_normalize`` (cutout: its hole is 0, the dataset mean)
    mix      ``mix(images, labels, num_classes, gen) -> (images, targets)``; targets become
             N×K distributions. Without a mix op, targets stay integer labels (the fast path).

Ops get an explicit CPU generator keyed by (seed, epoch, batch, rank): they draw their
per-sample parameters with it, so the same batch gets the same draw on any device, and hand the
draw to the device in one non-blocking copy from pinned memory (``pipeline.transfer``): no stage
makes the host wait for the device (tests/test_no_sync.py counts it). ``pipeline.augment`` and ``pipeline.mix`` hold the ops, whose functional
forms also return what they drew.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from .buffers import HostBuffers
from .transfer import DeviceConstants

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class AugmentOp(Protocol):
    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor: ...


class MixOp(Protocol):
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


class Stages:
    """uint8 engine output → (model input, targets)."""

    def __init__(self, dtype: torch.dtype, num_classes: int, augment: Sequence[AugmentOp] = (),
                 mix: MixOp | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, channels_last: bool = True):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"unsupported image dtype {dtype}")
        self.dtype = dtype
        self.num_classes = num_classes
        self.augment = list(augment)
        self.mix = mix
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.channels_last = channels_last
        self.mix_enabled = True  # the trainer can switch mixing off for the last epochs
        self.engine_normalizes = False  # set by the loader when the engine took the stage
        self._rows: dict = {}  # image width → (scale, shift) repeated along a row (CPU)
        self._buffers = HostBuffers(limit=4)  # CPU outputs, reused once released
        # x_u8 · scale + shift == (x_u8 / 255 − mean) / std; moved once per device and dtype
        self._consts = DeviceConstants(mean=self.mean, std=self.std, scale=1 / (255 * self.std),
                                       shift=-self.mean / self.std)

    def engine_normalize(self) -> tuple[float, ...] | None:
        """The normalize stage as 6 floats (scale r, g, b, shift r, g, b: x_u8 · scale + shift)
        for an engine that can write normalized float32 pixels itself, or None where it must run
        here: a training dtype other than float32, or augment ops that need [0, 1] pixels."""
        if self.dtype != torch.float32 or self.before:
            return None
        scale, shift = self._consts.values["scale"], self._consts.values["shift"]
        return tuple(float(v) for v in (*scale.flatten(), *shift.flatten()))

    def _cpu_rows(self, images: torch.Tensor) -> bool:
        return (images.device.type == "cpu" and self.dtype == torch.float32
                and images.dtype == torch.uint8 and images.dim() == 4
                and images.is_contiguous(memory_format=torch.channels_last))

    def _normalize_rows(self, images: torch.Tensor) -> torch.Tensor:
        """The CPU normalize: channels-last uint8 N×3×H×W seen as N·H rows of W·3 values, each
        row converted into a reused float32 buffer, then scaled and shifted by W·3-long rows of
        constants. Broadcasting a 3-long channel axis kept torch's CPU kernels scalar (~100 ms
        for 64 × 224², one thread); whole rows vectorise (~15 ms), and a reused buffer saves the
        page faults of a fresh 38 MB one."""
        n, _, h, w = images.shape
        rows = images.permute(0, 2, 3, 1).reshape(n * h, w * 3)  # a view: channels-last
        if w not in self._rows:
            self._rows[w] = tuple(self._consts.values[k].flatten().repeat(w).float()
                                  for k in ("scale", "shift"))
        scale, shift = self._rows[w]
        out = self._buffers.get((n, h, w, 3), torch.float32)
        flat = out.view(n * h, w * 3)
        flat.copy_(rows).mul_(scale).add_(shift)
        return out.permute(0, 3, 1, 2)

    @property
    def before(self) -> list:
        return [op for op in self.augment if not getattr(op, "after_normalize", False)]

    @property
    def after(self) -> list:
        return [op for op in self.augment if getattr(op, "after_normalize", False)]

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 gen: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        const = lambda name: self._consts.get(name, images.device, self.dtype)  # noqa: E731
        if self.engine_normalizes and not self.before:
            x = images
        elif self.before:
            if self.engine_normalizes:
                # ops that need [0, 1] pixels were added after the loader let the engine
                # normalize: undo it (exact up to float rounding: the values were uint8 ones)
                x = images.sub(const("shift")).div_(const("scale") * 255)
            else:
                x = images.to(self.dtype).mul_(1 / 255)
            for op in self.before:
                x = op(x, gen)
            x = x.sub_(const("mean")).div_(const("std"))
        elif self._cpu_rows(images):
            x = self._normalize_rows(images)
        else:
            # uint8 in, training dtype out, in one pass (type promotion inside the kernel)
            x = torch.addcmul(const("shift"), images, const("scale"))
        for op in self.after:
            x = op(x, gen)
        targets = labels
        if self.mix is not None and self.mix_enabled:
            x, targets = self.mix(x, labels, self.num_classes, gen)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format), targets
