"""``Loader``: the drop-in replacement for a PyTorch DataLoader.

    loader = Loader("data/imagenet", "train", batch_size=1024, device="cuda", dtype=torch.float16)
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, targets in loader:   # on the device, channels-last, normalized
            ...

``batch_size`` is the global batch; with ``rank``/``world_size`` each rank gets its disjoint
share of every global batch. Crops and flips are keyed by (seed, epoch, global batch), so a
given epoch gives the same batches whatever the number of ranks, and a resumed run picks up at
any batch with the same data.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch

from .engines.base import engine_class
from .errors import DataError, OptionError
from .records import RecordFile, list_splits, read_classes, split_path
from .sampling import EpochPlan, keyed_generator
from .stages import IMAGENET_MEAN, IMAGENET_STD, AugmentOp, MixOp, Stages
from .translate import check_padding, translate


class Batch(NamedTuple):
    images: torch.Tensor   # N×3×H×W in the training dtype, channels-last, on the device
    targets: torch.Tensor  # N int64 labels, or N×K float distributions after mixing


def default_workers() -> int:
    return max(1, min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1, 16))


class Loader:
    """Iterable of ``Batch(images, targets)`` over one split of a converted dataset.

    Args:
        root: a folder made by ``tricks convert``.
        split: "train", "val", … (a ``<split>.rec`` file in ``root``).
        batch_size: the global batch size.
        train: random-resized-crop + flip, shuffled, last partial batch dropped; else
            resize + centre crop, in order, every sample once. Defaults to ``split == "train"``.
        crop: training crops: "random_resized" (scale, ratio: Inception-style) or "pad"
            (pad-and-crop for small images: the whole image, its centre square if not square,
            resized to image_size and flipped, then shifted by up to ``pad`` pixels each way
            with ``pad_fill`` (0..255) outside it, or the image's own pixels by ``pad_mode``:
            torchvision's "constant", "edge", "reflect", "symmetric"; see
            ``pipeline.translate``).
        image_size: output side in pixels; ``set_image_size`` changes it between epochs.
        device, dtype, channels_last: where and how images arrive.
        engine, decode, workers: which decode engine ("native", "dali"), its decode mode and
            worker count (DALI: its threads); ``engine_options`` are the engine's own knobs.
        seed, rank, world_size: the random key and the shard.
        augment, mix: the ops of the augment and mix stages (see ``pipeline.stages``).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", batch_size: int = 256, *,
                 train: bool | None = None, image_size: int = 224,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 channels_last: bool = True, engine: str = "native", decode: str = "auto",
                 workers: int | None = None, prefetch: int = 2, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool | None = None, shuffle: bool | None = None,
                 scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), crop_ratio: float = 0.875,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 augment: Sequence[AugmentOp] = (), mix: MixOp | None = None,
                 engine_options: dict | None = None, crop: str = "random_resized",
                 pad: int = 4, pad_fill: int = 0, pad_mode: str = "constant"):
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"no such dataset folder: {root}")
        path = split_path(root, split)
        if not path.is_file():
            raise DataError(f"{root} has no split {split!r} (has: "
                            f"{', '.join(list_splits(root)) or 'none'})")
        self.classes = read_classes(root)
        self.records = RecordFile(path)
        if len(self.records) == 0:
            raise DataError(f"{path} holds no images")
        train = split == "train" if train is None else train
        if crop not in ("random_resized", "pad"):
            raise OptionError(f"unknown crop {crop!r}; choose random_resized or pad")
        self.pad = pad if train and crop == "pad" else 0
        if crop == "pad":
            check_padding(pad, pad_fill, image_size, pad_mode)
            scale, ratio = (1.0, 1.0), (1.0, 1.0)  # the whole (square) image, in every engine
        self.pad_fill, self.pad_mode = pad_fill, pad_mode
        self.plan = EpochPlan(len(self.records), batch_size, seed, train,
                              drop_last=train if drop_last is None else drop_last,
                              shuffle=train if shuffle is None else shuffle,
                              rank=rank, world_size=world_size, scale=scale, ratio=ratio,
                              crop_ratio=crop_ratio)
        if len(self.plan) == 0:
            raise DataError(f"{path}: {len(self.records)} images make no full batch of "
                            f"{batch_size}; lower the batch size")
        self.device = torch.device(device)
        self.image_size = image_size
        self.engine = engine_class(engine)(
            self.records, device=self.device, decode=decode,
            workers=default_workers() if workers is None else workers, prefetch=prefetch,
            plan=self.plan, **(engine_options or {}))
        self.stages = Stages(dtype, len(self.classes), augment, mix, mean, std, channels_last)
        # the normalize stage folded into the engine's decode where it can (not under
        # pad-and-crop: its fill is a uint8 value, set after the decode)
        fold = getattr(self.engine, "fold_normalize", None)
        constants = self.stages.engine_normalize()
        if fold is not None and constants is not None and not self.pad:
            self.stages.engine_normalizes = fold(constants)
        self.seed, self.rank = seed, rank
        self.epoch, self.start_batch = 0, 0
        self.position = 0            # global batches of the current epoch already yielded
        self.wait_time = 0.0         # seconds the consumer spent blocked on the engine
        index = self.records.index
        self._heights = index["height"].copy()
        self._widths = index["width"].copy()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        """Global batches per epoch (the same on every rank)."""
        return len(self.plan)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (new order and crops); ``start_batch`` skips ahead, for resuming.
        With an engine that draws part of its batches itself (its ``own_draws`` says what), a
        start inside an epoch would not give the uninterrupted run's batches: refused
        (``OptionError``)."""
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside 0..{len(self)}")
        draws = getattr(self.engine, "own_draws", None)
        if draws and start_batch:
            raise OptionError(f"cannot start epoch {epoch} at batch {start_batch} (a resumed "
                              f"run): {draws}, so the batches would differ from an "
                              "uninterrupted run's; resume with an engine that follows the "
                              "Loader's plan, or from an epoch's end")
        self.epoch, self.start_batch = epoch, start_batch

    def set_image_size(self, size: int) -> None:
        self.image_size = size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(state["epoch"], state["position"])

    def set_mix(self, enabled: bool) -> None:
        """Switch the mix stage on or off (e.g. off for the last epochs of a run)."""
        self.stages.mix_enabled = enabled

    def _generator(self, batch: int) -> torch.Generator | None:
        if not (self.stages.augment or self.stages.mix):
            return None
        return keyed_generator(self.seed, self.epoch, batch, self.rank, "ops")

    def __iter__(self) -> Iterator[Batch]:
        tasks = self.plan.tasks(self.epoch, self._heights, self._widths, self.image_size,
                                self.start_batch)
        self.position = self.start_batch
        batches = self.engine.batches(tasks)
        while True:
            t0 = time.perf_counter()
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            self.wait_time += time.perf_counter() - t0
            self.position += 1
            if self.pad:
                images = translate(images, self.plan.shifts(self.epoch, self.position - 1,
                                                            self.pad), self.pad_fill,
                                   self.pad_mode)
            yield Batch(*self.stages(images, labels, self._generator(self.position - 1)))
        self.start_batch = 0

    def close(self) -> None:
        self.engine.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
