"""The decode-engine contract: the one seam every engine (native, DALI, FFCV, yours) implements.

An engine is constructed from the split's ``RecordFile`` and an ``EngineSpec`` (where its
batches go and what it may use), plus its own keyword options, and then does one thing:

    batches(tasks) → (images, labels) per task, in the tasks' order

where each ``BatchTask`` (``pipeline.sampling``) names the records of one batch of this rank, in
order, with a crop box (x0, y0, x1, y1 in source pixels) and a horizontal flip per record and the
output side S. The engine decodes those records, crops each box, resizes it to S×S and flips it
where told, and yields

    images  uint8 N×3×S×S with channels-last strides on ``spec.device``, or, where the Loader
            asked for it (``spec.normalize``), float32 ``x_u8 · scale + shift`` per channel
    labels  int64 N on ``spec.device``

An engine draws nothing itself: a batch depends only on (seed, epoch, batch), so same-seed runs
agree across engines and processes and a run resumes at any batch. Everything after the engine
(pad-and-crop, augment, normalize, mix) is the Loader's, the same for every engine. What an
engine can do beyond that (normalize while writing) and which of its options are valid it says
in one place, ``capabilities()``, which the Loader calls before building it (a bad option is a
one-line ``OptionError`` there); nothing else about an engine is duck-typed.

A new engine is one module with one ``@register_engine("name")`` class, imported in
``ENGINE_MODULES``; tests/test_engine_contract.py runs every registered engine through the same
conformance checks.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar, Iterable, Iterator, Protocol

import torch

from tricks.errors import OptionError
from ..sampling import BatchTask

# the modules that register engines; an engine whose own dependencies are missing still
# registers (it raises its install hint when built)
ENGINE_MODULES = ("native", "dali", "ffcv")


@dataclass(frozen=True)
class EngineSpec:
    """What the Loader tells an engine.

    Attributes:
        device: where batches go (``cpu``, ``cuda:N``; ``meta`` in the sync tests).
        workers: decode threads or processes (≥ 0; 0: the engine's in-process path).
        prefetch: batches made ahead of the consumer (≥ 1).
        batch_size: this rank's largest batch (for buffers and fixed-size pipelines).
        normalize: None for uint8 output, else 6 floats (scale r, g, b, shift r, g, b): write
            float32 ``x_u8 · scale + shift``; only given when ``capabilities().normalizes``.
    """
    device: torch.device = torch.device("cpu")
    workers: int = 0
    prefetch: int = 2
    batch_size: int = 256
    normalize: tuple[float, ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "device", torch.device(self.device))


@dataclass(frozen=True)
class Capabilities:
    """What an engine does with a task, for the Loader to check once, up front.

    Attributes:
        normalizes: can write normalized float32 itself (``EngineSpec.normalize``).
    """
    normalizes: bool = False


class Engine(Protocol):
    """The interface (see the module docstring). ``capabilities`` is a classmethod: the Loader
    calls it with the device and the engine's options before building the engine, and it
    raises ``OptionError`` for an option the engine does not take."""
    name: ClassVar[str]
    device: torch.device

    @classmethod
    def capabilities(cls, device: torch.device, **options) -> Capabilities: ...

    def batches(self, tasks: Iterable[BatchTask]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Decode, crop, resize and flip each task's records; yield them in task order."""
        ...

    def close(self) -> None:
        """Release workers, threads and buffers; safe to call twice."""
        ...


_ENGINES: dict[str, type] = {}


def register_engine(name: str):
    """Class decorator: make the engine available to ``Loader(engine=name)``; a name taken
    twice is an error (torchvision's model registry does the same)."""
    def wrap(cls):
        if name in _ENGINES:
            raise ValueError(f"engine {name!r} is already registered")
        cls.name = name
        _ENGINES[name] = cls
        return cls
    return wrap


def engine_names() -> list[str]:
    """Every registered engine's name (installed or not)."""
    for module in ENGINE_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return sorted(_ENGINES)


def engine_class(name: str) -> type:
    """The engine registered as ``name``; ``OptionError`` naming the choices otherwise."""
    names = engine_names()
    if name not in _ENGINES:
        raise OptionError(f"unknown engine {name!r}; available: {', '.join(names)}")
    return _ENGINES[name]
