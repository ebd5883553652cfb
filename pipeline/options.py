"""The Loader's option groups, each checked when it is made (a one-line ``OptionError`` naming
the option): how to crop, how to order and shard, what comes out, which engine decodes.

    Loader(path, batch_size=256, device="cuda")                       # the common case
    Loader(path, batch_size=128, crop=RandomResizedCrop(scale=(0.35, 1)),
           sampling=Sampling(seed=1), output=Output(dtype=torch.float16),
           engine=Engine("dali", workers=8))

Defaults follow torchvision's ImageNet reference (``RandomResizedCrop``'s scale and ratio, a
0.875 centre crop for evaluation, ImageNet's mean and std).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from tricks.errors import OptionError
from .translate import PAD_MODES, check_padding

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SCALE = (0.08, 1.0)       # torchvision's RandomResizedCrop
DEFAULT_RATIO = (3 / 4, 4 / 3)
DEFAULT_CROP_RATIO = 0.875        # 224 / 256: resize to 256, centre-crop 224
OUTPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.uint8)


def _pair(name: str, v, positive: bool = True) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in v)
    except (TypeError, ValueError):
        raise OptionError(f"{name} must be a pair (low, high), got {v!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or (positive and lo <= 0) or lo > hi:
        raise OptionError(f"{name} must be a pair 0 < low ≤ high, got ({lo:g}, {hi:g})")
    return lo, hi


@dataclass(frozen=True)
class RandomResizedCrop:
    """Inception-style training crop (Szegedy et al. 2015; torchvision's ``RandomResizedCrop``:
    area fraction uniform in ``scale``, aspect ratio w/h log-uniform in ``ratio``, 10 tries,
    then the whole image with its ratio clamped), resized to the output side, then flipped
    horizontally with probability ½ when ``flip``."""
    scale: tuple[float, float] = DEFAULT_SCALE
    ratio: tuple[float, float] = DEFAULT_RATIO
    flip: bool = True

    def __post_init__(self):
        scale = _pair("RandomResizedCrop(scale)", self.scale)
        if scale[1] > 1:
            raise OptionError(f"RandomResizedCrop(scale) is an area fraction in (0, 1], got "
                              f"{scale}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", _pair("RandomResizedCrop(ratio)", self.ratio))


@dataclass(frozen=True)
class CenterCrop:
    """Evaluation crop: the central square of side ``crop_ratio`` × the shorter side, resized to
    the output side (torchvision's Resize(S / crop_ratio) + CenterCrop(S))."""
    crop_ratio: float = DEFAULT_CROP_RATIO

    def __post_init__(self):
        if not 0 < self.crop_ratio <= 1:
            raise OptionError(f"CenterCrop(crop_ratio) must be in (0, 1], got {self.crop_ratio}")


@dataclass(frozen=True)
class PadCrop:
    """The CIFAR practice (He et al. 2016, §4.2; torchvision's ``RandomCrop(S, padding=pad,
    fill=fill, padding_mode=mode)``): the whole image (its centre square if not square) at the
    output side, flipped with probability ½, then shifted by up to ``pad`` pixels each way, the
    outside filled with ``fill`` (a uint8 level) or, by ``mode`` (constant, edge, reflect,
    symmetric), the image's own pixels (see ``pipeline.translate``)."""
    pad: int = 4
    fill: int = 0
    mode: str = "constant"

    def __post_init__(self):
        if self.mode not in PAD_MODES:
            raise OptionError(f"PadCrop(mode={self.mode!r}): choose one of "
                              f"{', '.join(PAD_MODES)}")
        check_padding(self.pad, self.fill, None, self.mode)


Crop = RandomResizedCrop | CenterCrop | PadCrop


@dataclass(frozen=True)
class Sampling:
    """Order and shard.

    Attributes:
        seed: the key of every draw (order, crops, augment, mix): same seed, same batches.
        shuffle: a new order each epoch (default: for training).
        drop_last: drop the last partial batch (default: for training). Without it every
            record is seen exactly once per epoch, across all ranks.
        rank, world_size: this process's shard; default: ``torch.distributed``'s when it is
            initialized (torchrun), else one process. Given explicitly, they win.
        global_batch: ``batch_size`` is the batch of all ranks together (each rank gets
            ``batch_size / world_size``), as ``tricks train``'s ``train.batch``; default: per
            process, as DataLoader, DistributedSampler, FFCV, DALI and timm mean it.
    """
    seed: int = 0
    shuffle: bool | None = None
    drop_last: bool | None = None
    rank: int | None = None
    world_size: int | None = None
    global_batch: bool = False

    def __post_init__(self):
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise OptionError(f"Sampling(seed) must be an integer, got {self.seed!r}")
        if self.world_size is not None and (not isinstance(self.world_size, int)
                                            or self.world_size < 1):
            raise OptionError(f"Sampling(world_size) must be an integer ≥ 1, got "
                              f"{self.world_size!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 0 or
                                      self.rank >= (self.world_size or 1 << 62)):
            raise OptionError(f"Sampling(rank={self.rank!r}) must be in 0..world_size−1")

    def shard(self) -> tuple[int, int]:
        """(rank, world_size): the explicit ones, else torch.distributed's, else (0, 1)."""
        rank, world = self.rank, self.world_size
        if rank is None or world is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank() if rank is None else rank
                world = dist.get_world_size() if world is None else world
        rank, world = rank or 0, world or 1
        if not 0 <= rank < world:
            raise OptionError(f"Sampling(rank={rank}) must be in 0..{world - 1} "
                              f"(world_size {world})")
        return rank, world


@dataclass(frozen=True)
class Output:
    """What a batch's images are.

    Attributes:
        dtype: float32, float16 or bfloat16: normalized ``(x / 255 − mean) / std``; uint8: the
            decoded pixels as they are (0..255), for users who normalize on the device
            themselves (no augment or mix op then).
        channels_last: channels-last strides (N×3×H×W, stored N×H×W×3), as the model wants.
        mean, std: per channel, of pixels in [0, 1].
    """
    dtype: torch.dtype = torch.float32
    channels_last: bool = True
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self):
        if self.dtype not in OUTPUT_DTYPES:
            raise OptionError(f"Output(dtype={self.dtype}): choose float32, float16, bfloat16 "
                              "or uint8")
        for name in ("mean", "std"):
            v = getattr(self, name)
            try:
                v = tuple(float(x) for x in v)
            except (TypeError, ValueError):
                v = ()
            if len(v) != 3 or not all(math.isfinite(x) for x in v):
                raise OptionError(f"Output({name}) must be 3 numbers (R, G, B), got "
                                  f"{getattr(self, name)!r}")
            object.__setattr__(self, name, v)
        if min(self.std) <= 0:
            raise OptionError(f"Output(std) must be positive, got {self.std}")


def default_workers() -> int:
    """The cores this process may use (its affinity), at most 16."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
        os.cpu_count() or 1
    return max(1, min(cores, 16))


@dataclass(frozen=True, init=False)
class Engine:
    """Which decode engine, and its knobs: ``Engine("native", workers=4, fast_dct=True)``.

    Attributes:
        name: a registered engine: native, dali, ffcv (``pipeline.engines``).
        workers: decode threads or processes (default: the cores this process may use, ≤ 16;
            0: the native engine decodes in the consumer's thread).
        prefetch: batches made ahead of the consumer (≥ 1).
        options: the engine's own keyword options (see its class), checked when the Loader is
            built.
    """
    name: str
    workers: int
    prefetch: int
    options: dict = field(default_factory=dict)

    def __init__(self, name: str = "native", *, workers: int | None = None, prefetch: int = 2,
                 **options):
        if not isinstance(name, str):
            raise OptionError(f"Engine(name) must be an engine's name, got {name!r}")
        workers = default_workers() if workers is None else workers
        if not isinstance(workers, int) or workers < 0:
            raise OptionError(f"Engine(workers) must be an integer ≥ 0, got {workers!r}")
        if not isinstance(prefetch, int) or prefetch < 1:
            raise OptionError(f"Engine(prefetch) must be an integer ≥ 1, got {prefetch!r}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "workers", workers)
        object.__setattr__(self, "prefetch", prefetch)
        object.__setattr__(self, "options", dict(options))


def check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` this machine has (cpu, cuda[:N], or meta for tests);
    ``OptionError`` naming it otherwise."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise OptionError(f"Loader(device={device!r}): not a device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"Loader(device={device!r}): CUDA is not available on this "
                              "machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"Loader(device={device!r}): this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif dev.type not in ("cpu", "meta"):
        raise OptionError(f"Loader(device={device!r}): choose cpu or cuda")
    return dev


def check_positive_int(name: str, v) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise OptionError(f"{name} must be a positive integer, got {v!r}")
    return v


def check_crop(crop, train: bool) -> Crop:
    """The crop option, defaulting to ``RandomResizedCrop()`` for training and
    ``CenterCrop()`` for evaluation."""
    if crop is None:
        return RandomResizedCrop() if train else CenterCrop()
    if not isinstance(crop, (RandomResizedCrop, CenterCrop, PadCrop)):
        raise OptionError(f"Loader(crop={crop!r}): give RandomResizedCrop(...), CenterCrop(...) "
                          "or PadCrop(...) from tricks.pipeline")
    return crop
