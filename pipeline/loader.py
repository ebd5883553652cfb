"""``Loader``: the drop-in replacement for a PyTorch DataLoader.

    loader = Loader("/data/imagenet", batch_size=256, device="cuda")  # train split, per process
    for epoch in range(epochs):
        for images, targets in loader:   # a new epoch on every iteration, as DataLoader
            ...                          # images: N×3×224×224 float32, normalized, on the GPU

DataLoader's conventions hold where a user expects them: each ``iter()`` starts the next epoch
(new order, crops and draws) unless ``set_epoch`` pins one; ``batch_size`` is per process; under
torchrun the shard comes from ``torch.distributed``; ``len()`` is what this rank yields, the
same on every rank. Every draw is keyed by (seed, epoch, batch), so a run is reproducible and
resumes at any batch (``state_dict``/``load_state_dict``) with the same data.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

import torch

from .atomic import interrupted_conversion
from .bad_records import BadRecords
from .engines.base import EngineSpec, engine_class
from tricks.errors import DataError, OptionError, UserError
from .options import (CenterCrop, Crop, Engine, Output, PadCrop, RandomResizedCrop, Sampling,
                      check_crop, check_device, check_positive_int)
from .records import RecordFile, list_splits, read_classes, split_path
from .sampling import EpochPlan
from .source import pairs_tree, resolve_dataset
from .stages import AugmentOp, BatchContext, MixOp, Stages, Translate, check_augment


class Batch(NamedTuple):
    images: torch.Tensor   # N×3×H×W, channels-last, on the device: normalized, or uint8
    targets: torch.Tensor  # N int64 labels, or N×K float32 distributions after mixing


class LoaderClosed(UserError):
    """Iterating a Loader after ``close()``."""


@dataclass(frozen=True)
class SplitInfo:
    """What ``Loader.dataset`` describes: the converted split behind the loader."""
    root: Path
    split: str
    classes: list[str]
    size: int

    def __len__(self) -> int:
        return self.size


class Loader:
    """Iterable of ``Batch(images, targets)`` over one split of a dataset.

    Args (grouped as a reader thinks of them):
        source, split, train: where the images come from. ``source``: a folder made by
            ``tricks convert``, or an ImageFolder tree (class folders, or ``train/``, ``val/``,
            … each with class folders: converted once into the cache, ``$TRICKS_CACHE`` or
            ``~/.cache/tricks``, with a progress bar, and reused while the tree is unchanged), or
            a list of ``(path, label)`` pairs forming ``split`` (labels all ints ≥ 0, kept as
            the targets, or all class names: ``pipeline.source.pairs_tree``), converted the same
            way. ``split``: "train", "val", …. ``train`` (default: ``split == "train"``): shuffle,
            drop the last partial batch and crop by ``RandomResizedCrop``; else in order, every
            image once, ``CenterCrop``.
        batch_size, sampling: images per batch per process (``Sampling(global_batch=True)``:
            of all processes together), and order and shard (``Sampling``: seed, shuffle,
            drop_last, rank and world size, by default torch.distributed's).
        image_size, crop: the output side S in pixels (``set_image_size`` changes it between
            epochs: progressive resizing) and how a record becomes an S×S image
            (``RandomResizedCrop``, ``CenterCrop``, ``PadCrop``).
        device, output: where batches arrive, and as what (``Output``: normalized
            float32/float16/bfloat16, or uint8; channels-last; mean and std).
        engine: which decode engine: a name ("native", "dali", "ffcv") or ``Engine(name,
            workers=…, prefetch=…, **its options)``.
        augment, mix: your batch ops and a mix op: see ``pipeline.stages.AugmentOp`` (float
            N×3×S×S in [0, 1] on the device, a keyed CPU generator to draw from) and ``MixOp``;
            ``PerSample`` runs a per-sample torchvision transform inside one.
        on_bad_record, bad_record_budget: at a record that cannot be used (checksum mismatch,
            undecodable), "stop" (a one-line ``RecordError`` naming it) or "skip" it: named once,
            counted, replaced by a deterministic substitute, up to ``bad_record_budget`` bad
            records (``pipeline.bad_records``; the policy is ``self.bad_records``).

    Batches: images N×3×S×S channels-last on ``device`` (N = ``batch_size``; the last batch of
    an evaluation epoch may be smaller), targets int64 N, or N×K float32 with a mix op.

    Raises:
        OptionError: a bad argument, named, in one line (sizes, batch, scale and ratio order,
            device availability, engine and its options, an op that is not a batch op).
        DataError: a missing dataset, split or file; a batch larger than the split.
    """

    def __init__(self, source: str | os.PathLike | Sequence[tuple], split: str = "train", batch_size: int = 256,
                 *, device: torch.device | str = "cpu", train: bool | None = None,
                 image_size: int = 224, crop: Crop | None = None,
                 sampling: Sampling | None = None, output: Output | None = None,
                 engine: str | Engine = "native", augment: Sequence[AugmentOp] = (),
                 mix: MixOp | None = None, on_bad_record: str = "stop",
                 bad_record_budget: int = 100):
        # arguments first, all of them, before any file is touched or converted
        check_positive_int("Loader(batch_size)", batch_size)
        check_positive_int("Loader(image_size)", image_size)
        self.device = check_device(device)
        augment = check_augment(augment)
        train = split == "train" if train is None else bool(train)
        crop = check_crop(crop, train)
        sampling = sampling or Sampling()
        if not isinstance(sampling, Sampling):
            raise OptionError(f"Loader(sampling={sampling!r}): give tricks.pipeline.Sampling(...)")
        output = output or Output()
        if not isinstance(output, Output):
            raise OptionError(f"Loader(output={output!r}): give tricks.pipeline.Output(...)")
        engine = Engine(engine) if isinstance(engine, str) else engine
        if not isinstance(engine, Engine):
            raise OptionError(f"Loader(engine={engine!r}): give an engine's name or "
                              "tricks.pipeline.Engine(...)")
        engine_cls = engine_class(engine.name)
        caps = engine_cls.capabilities(self.device, **engine.options)
        rank, world = sampling.shard()
        per_rank = batch_size // world if sampling.global_batch else batch_size
        if sampling.global_batch and batch_size % world:
            raise OptionError(f"Loader(batch_size={batch_size}) is the global batch "
                              f"(Sampling(global_batch=True)): it must divide by the world size "
                              f"({world})")

        root = self._resolve(source, split)
        path = split_path(root, split)
        if not path.is_file():
            raise DataError(f"{root} has no split {split!r} (has: "
                            f"{', '.join(list_splits(root)) or 'none'})")
        self.classes = read_classes(root)
        self.records = RecordFile(path, num_classes=len(self.classes))
        if len(self.records) == 0:
            raise DataError(f"{path} holds no images")
        self.dataset = SplitInfo(root, split, self.classes, len(self.records))
        self.train, self.crop, self.output, self.engine_options = train, crop, output, engine
        self.batch_size, self.global_batch_size = per_rank, per_rank * world
        self.seed, self.rank, self.world_size = sampling.seed, rank, world
        random_crop = isinstance(crop, (RandomResizedCrop, PadCrop))
        if isinstance(crop, RandomResizedCrop):
            scale, ratio, flip = crop.scale, crop.ratio, crop.flip
        else:  # PadCrop: the whole (square) image, flipped; CenterCrop: unused
            scale, ratio, flip = (1.0, 1.0), (1.0, 1.0), True
        self.plan = EpochPlan(
            len(self.records), self.global_batch_size, sampling.seed, random_crop,
            drop_last=train if sampling.drop_last is None else sampling.drop_last,
            shuffle=train if sampling.shuffle is None else sampling.shuffle,
            rank=rank, world_size=world, scale=scale, ratio=ratio,
            crop_ratio=crop.crop_ratio if isinstance(crop, CenterCrop) else 1.0, flip=flip)
        if len(self.plan) == 0:
            raise DataError(f"{path}: {len(self.records)} images make no full batch of "
                            f"{self.global_batch_size}; lower the batch size or keep the last "
                            "partial batch (Sampling(drop_last=False))")
        self.bad_records = BadRecords(self.records, self.plan, on_bad_record, bad_record_budget)
        self.image_size = image_size
        translate = None
        if isinstance(crop, PadCrop):
            if crop.pad >= image_size:
                raise OptionError(f"PadCrop(pad={crop.pad}) must be smaller than the "
                                  f"{image_size}² image")
            translate = Translate(crop.pad, crop.fill, crop.mode,
                                  lambda e, b: self.plan.shifts(e, b, crop.pad))
        before = [op for op in augment if not getattr(op, "after_normalize", False)]
        # the one place the normalize stage may move into the engine: float32 out, and no
        # stage before it that needs uint8 or [0, 1] pixels
        engine_normalizes = (caps.normalizes and output.dtype == torch.float32
                             and translate is None and not before)
        self.stages = Stages(output.dtype, len(self.classes), augment, mix, output.mean,
                             output.std, output.channels_last, translate,
                             input_normalized=engine_normalizes)
        spec = EngineSpec(self.device, engine.workers, engine.prefetch, per_rank,
                          self.stages.normalize_constants() if engine_normalizes else None)
        self.engine = engine_cls(self.records, spec, **engine.options)
        self.capabilities = caps
        self._mix = True
        self._next_epoch, self._pinned = 0, False
        self._resume_at: tuple[int, int] | None = None  # (epoch, batch) from load_state_dict
        self.epoch = 0               # the epoch being (or last) iterated
        self.position = 0            # batches of that epoch already yielded
        self.wait_time = 0.0         # seconds the consumer spent blocked on the engine
        self._closed, self._iterated = False, False
        index = self.records.index
        self._heights = index["height"].copy()
        self._widths = index["width"].copy()

    @staticmethod
    def _resolve(source, split: str) -> Path:
        if isinstance(source, (list, tuple)):
            return resolve_dataset(str(pairs_tree(source, split)))
        if not isinstance(source, (str, os.PathLike)):
            raise OptionError(f"Loader(source={source!r}): give a dataset folder, an "
                              "ImageFolder tree or a list of (path, label) pairs")
        path = Path(source).expanduser()
        if not path.exists():
            raise DataError(interrupted_conversion(path) or f"no such dataset folder: {path}")
        return resolve_dataset(str(path))

    # --- what a DataLoader user looks for --------------------------------------------------------
    @property
    def fallbacks(self) -> int:
        """Images libjpeg-turbo could not decode that Pillow did, so far (the native engine's
        CPU path; 0 for engines that do not count them)."""
        if getattr(self.engine, "cpu_decoder", None) != "libjpeg-turbo":
            return 0
        return getattr(self.engine, "fallbacks", 0)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        """Batches per epoch that this rank yields: the same on every rank."""
        return len(self.plan)

    def __repr__(self) -> str:
        return (f"Loader({str(self.dataset.root)!r}, {self.dataset.split!r}, batch_size="
                f"{self.batch_size}, device={str(self.device)!r}, image_size={self.image_size}, "
                f"engine={self.engine_options.name!r}, rank={self.rank}/{self.world_size})")

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- epochs, resume ------------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int | None = None) -> None:
        """Pin the epoch the next iteration gives (its order, crops and draws); later ones
        follow it (epoch + 1, …) unless pinned again. ``start_batch`` skips ahead; by default
        a position restored by ``load_state_dict`` for this same epoch is kept (so the usual
        ``load_state_dict(...)``, then ``set_epoch(epoch)`` at the top of the loop, resumes
        rather than replays), else 0."""
        if not isinstance(epoch, int) or epoch < 0:
            raise OptionError(f"set_epoch({epoch!r}): the epoch must be an integer ≥ 0")
        if start_batch is None:
            keep = self._resume_at is not None and self._resume_at[0] == epoch
            start_batch = self._resume_at[1] if keep else 0
        if not 0 <= start_batch <= len(self):
            raise OptionError(f"set_epoch(start_batch={start_batch}) outside 0..{len(self)}")
        self._next_epoch, self._pinned = epoch, True
        self._resume_at = (epoch, start_batch) if start_batch else None

    def set_image_size(self, size: int) -> None:
        """The output side from the next batch made on (progressive resizing)."""
        self.image_size = check_positive_int("set_image_size(size)", size)

    def set_mix(self, enabled: bool) -> None:
        """Switch the mix stage on or off (e.g. off for the last epochs of a run)."""
        self._mix = bool(enabled)

    def state_dict(self) -> dict:
        """Where the loader is: the epoch and the batches of it already yielded, with what
        they mean (seed, global batch, record count), so ``load_state_dict`` can refuse a
        loader on which the position would name other images."""
        if self._pinned or not self._iterated or self.position >= len(self):
            # not started, pinned by set_epoch since, or the last epoch finished: the next one
            epoch = self._next_epoch
            position = self._resume_at[1] if self._resume_at and \
                self._resume_at[0] == epoch else 0
        else:  # mid-epoch
            epoch, position = self.epoch, self.position
        return {"epoch": epoch, "position": position, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "records": len(self.records)}

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` (from ``state_dict``) left off: the next iteration gives
        the rest of its epoch, the same batches an uninterrupted run gets there.

        Raises:
            OptionError: the state was saved by a loader with another seed, global batch or
                record count (the position would name other images).
        """
        if not isinstance(state, dict):
            raise OptionError(f"load_state_dict: give what state_dict() returned (a dict), got "
                              f"{type(state).__name__}")
        for key, mine in (("seed", self.seed), ("global_batch_size", self.global_batch_size),
                          ("records", len(self.records))):
            if key in state and state[key] != mine:
                raise OptionError(f"load_state_dict: the state's {key} is {state[key]}, this "
                                  f"loader's {mine}: it would resume on other images")
        try:
            epoch, position = int(state["epoch"]), int(state["position"])
        except (KeyError, TypeError, ValueError):
            raise OptionError("load_state_dict: not a Loader state (it needs integer 'epoch' "
                              "and 'position': give what state_dict() returned)") from None
        self.set_epoch(epoch, position)

    # --- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        if self._closed:
            raise LoaderClosed(f"this Loader over {self.records.path} was closed")
        epoch = self._next_epoch
        start = self._resume_at[1] if self._resume_at and self._resume_at[0] == epoch else 0
        self._next_epoch, self._resume_at, self._pinned = epoch + 1, None, False
        self._iterated = True
        self.epoch, self.position = epoch, start
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[Batch]:
        empty = {}  # a rank's trailing batches with no record (see EpochPlan), made here

        def filled(first: int):  # the stream from batch ``first``: made again after a bad record
            for task in self.plan.tasks(epoch, self._heights, self._widths, self.image_size,
                                        first):
                if len(task.indices):
                    yield task
                else:
                    empty[task.batch] = task

        batches = self.bad_records.batches(self.engine, filled, start)
        while True:
            t0 = time.perf_counter()
            try:
                images, labels = next(batches)
            except StopIteration:
                break
            self.wait_time += time.perf_counter() - t0
            yield self._staged(images, labels, epoch)
        for task in empty.values():
            s = task.size
            images = torch.empty(0, 3, s, s, dtype=torch.uint8, device=self.device)
            yield self._staged(images, torch.empty(0, dtype=torch.int64, device=self.device),
                               epoch, raw=True)

    def _staged(self, images, labels, epoch: int, raw: bool = False) -> Batch:
        ctx = BatchContext(self.seed, epoch, self.position, self.rank)
        self.position += 1
        if raw and self.stages.input_normalized:
            images = images.float()
        return Batch(*self.stages(images, labels, ctx, mix=self._mix))

    def close(self) -> None:
        """Stop the engine's workers and release the record file; safe to call twice. The
        loader cannot be iterated afterwards."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self.engine.close()
        self.records.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
