"""The decode-engine interface: the one seam a new engine (DALI, FFCV, …) implements.

An engine turns a stream of ``BatchTask`` (record indices, crop boxes, flips, output side) into
``(images, labels)``: uint8 N×3×S×S on the engine's device with channels-last strides, and int64
labels on the same device. Everything after it (augment, normalize, mix) is shared.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Protocol

import torch

from ..errors import OptionError
from ..sampling import BatchTask


class Engine(Protocol):
    device: torch.device

    def batches(self, tasks: Iterable[BatchTask]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decode, crop, resize and flip each task's samples; yield them in task order."""
        ...

    def close(self) -> None:
        """Release workers and threads."""
        ...


_ENGINES: dict[str, type] = {}


def register_engine(name: str):
    def wrap(cls):
        if name in _ENGINES:
            raise ValueError(f"engine {name!r} is already registered")
        _ENGINES[name] = cls
        return cls
    return wrap


def engine_class(name: str) -> type:
    from . import dali, ffcv, native  # noqa: F401  (registers them; DALI, FFCV load lazily)
    if name not in _ENGINES:
        raise OptionError(f"unknown engine {name!r}; available: {', '.join(sorted(_ENGINES))}")
    return _ENGINES[name]
