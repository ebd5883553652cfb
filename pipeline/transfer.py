"""Host → device hand-off of an op's random draws: one non-blocking copy from pinned memory.

A plain ``t.to("cuda")`` of a pageable CPU tensor, or ``torch.tensor(..., device="cuda")``,
waits for the device to drain its stream (the previous training step included), so the CPU can
no longer run ahead. The ops therefore draw on the CPU, pack all the small tensors of one call
into one pinned byte buffer and move it with one ``non_blocking=True`` copy; the pieces are views
of the device copy. Pinned host memory comes from torch's caching host allocator, which keeps a
block until the copy that reads it has finished, so reusing it is safe.

The code takes its device path whenever ``device.type != "cpu"``, so the ``meta`` device can
stand in for CUDA in the CPU tests (tests/sync_harness.py). Pinning needs CUDA: on a build
without it, the buffer stays pageable and is marked with ``PINNED_STAND_IN`` so the test
harness can tell a copy that would be pinned from one that would not.
"""
from __future__ import annotations

from typing import Sequence

import torch

PINNED_STAND_IN = "_tricks_pinned_stand_in"
_ALIGN = 16  # bytes: every piece starts where any dtype's view of it is legal


def pinned_empty(nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 host buffer of ``nbytes`` bytes, pinned when it is bound for a non-CPU device
    and CUDA exists (else pageable, marked ``PINNED_STAND_IN``)."""
    pin = device.type != "cpu" and torch.cuda.is_available()
    buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    if device.type != "cpu" and not pin:
        setattr(buf, PINNED_STAND_IN, True)
    return buf


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """CPU tensors → the same tensors on ``device``, by one non-blocking copy of one pinned
    buffer (no host-device sync). On the CPU they come back as they are.

    Args:
        tensors: small CPU tensors of any dtype and shape (an op's per-sample draws).
        device: the target device.
    Returns:
        device tensors of the same dtypes and shapes, contiguous views of one device buffer
        (do not resize them; in-place writes are fine, each view owns its bytes).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return list(tensors)
    flat = [t.detach().contiguous().reshape(-1) for t in tensors]
    spans, total = [], 0
    for t in flat:
        nbytes = t.numel() * t.element_size()
        spans.append((total, nbytes))
        total += -(-nbytes // _ALIGN) * _ALIGN
    buf = pinned_empty(max(total, _ALIGN), device)
    for t, (start, nbytes) in zip(flat, spans):
        if nbytes:
            buf[start:start + nbytes].copy_(t.view(torch.uint8))
    dev = buf.to(device, non_blocking=True)
    return [dev[start:start + nbytes].view(t.dtype).view(src.shape)
            for t, src, (start, nbytes) in zip(flat, tensors, spans)]


class DeviceConstants:
    """Constant tensors (mean/std, eigenvectors, …) made once per (device, dtype) and reused,
    so their host → device copy happens on the first batch only."""

    def __init__(self, **values: torch.Tensor):
        self.values = values
        self._cache: dict = {}

    def get(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (name, device, dtype)
        if key not in self._cache:
            self._cache[key] = self.values[name].to(device, dtype)
        return self._cache[key]
