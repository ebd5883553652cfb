"""The FFCV engine: ``.beton`` files read by FFCV's loader (libjpeg-turbo decode of only the
random crop, in its compiled pipeline), giving uint8 channels-last crops on the device; the
project's own augment, normalize and mix stages run after it (not FFCV's ``NormalizeImage``,
whose GPU path needs cupy).

FFCV keeps its own order (``OrderOption.RANDOM``, or ``QUASI_RANDOM`` on one process),
sharding (``distributed=True`` under DDP) and crops (``capabilities()``: it does not follow the
plan); the Loader's plan supplies the epoch, the image size (progressive resizing sets the decoder's output size between epochs) and how many
batches to skip when resuming. FFCV shards with torch's ``DistributedSampler(drop_last=False)``,
which pads the epoch with repeats of its first samples up to a multiple of the world size (rank
r gets samples r, r + world, …): in evaluation those repeats are cut, so every sample is counted
exactly once across ranks. ``import ffcv`` sets torch's CPU threads to 1, and FFCV's loader
to its worker count: the caller's count is put back each time.
"""
from __future__ import annotations

import gc
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch

from tricks.errors import DataError, OptionError

from ..beton import import_ffcv
from ..records import RecordFile
from ..sampling import BatchTask
from .base import Capabilities, EngineSpec, register_engine

def beton_path(records: RecordFile):
    return records.path.with_suffix(".beton")


@register_engine("ffcv")
class FfcvEngine:
    """Options: ``order`` (``random`` or ``quasi_random``: FFCV's own traversal orders) and
    ``os_cache`` (FFCV's: read through the page cache rather than its own)."""

    @classmethod
    def capabilities(cls, device: torch.device, order: str = "random", os_cache: bool = True,
                     **options) -> Capabilities:
        if options:
            raise OptionError(f"the FFCV engine has no option(s) {', '.join(options)}")
        if order not in ("random", "quasi_random"):
            raise OptionError(f"FFCV order must be random or quasi_random, got {order!r}")
        return Capabilities(follows_plan=False, reason="FFCV draws its own order and crops "
                            "(only its order is seeded)")

    def __init__(self, records: RecordFile, spec: EngineSpec, *, order: str = "random",
                 os_cache: bool = True):
        _, decoders, loader, transforms = import_ffcv()
        plan, workers, prefetch = spec.plan, spec.workers, spec.prefetch
        distributed = plan.world_size > 1
        if order == "quasi_random" and distributed:
            raise OptionError("FFCV refuses quasi_random order with distributed=True; use random")
        path = beton_path(records)
        if not path.is_file():
            raise DataError(f"{path} is missing: make it with `tricks convert SRC DST "
                            "--format beton`")
        self.device = torch.device(spec.device)
        self.train = plan.train
        # evaluation: this rank's real samples under DistributedSampler's strided assignment
        # (the rest of its share is padding, repeated samples)
        self._keep = len(range(plan.rank, plan.n, plan.world_size)) \
            if distributed and not plan.train else None
        size = 224
        if plan.train:
            self.decoder = decoders.RandomResizedCropRGBImageDecoder(
                (size, size), scale=plan.scale, ratio=plan.ratio)
            image = [self.decoder, transforms.RandomHorizontalFlip()]
        else:
            self.decoder = decoders.CenterCropRGBImageDecoder((size, size),
                                                              ratio=plan.crop_ratio)
            image = [self.decoder]
        non_blocking = self.device.type == "cuda"
        image += [transforms.ToTensor(), transforms.ToDevice(self.device, non_blocking),
                  transforms.ToTorchImage(channels_last=True)]
        # no Squeeze(): on a last batch of one it makes a 0-d tensor that ToDevice cannot take
        # (FFCV's thread dies and the loader hangs); labels are reshaped below instead
        label = [decoders.IntDecoder(), transforms.ToTensor(),
                 transforms.ToDevice(self.device, non_blocking)]
        Order = loader.OrderOption
        order_opt = (Order.QUASI_RANDOM if order == "quasi_random" else Order.RANDOM) \
            if plan.train else Order.SEQUENTIAL
        self._threads = torch.get_num_threads()
        self.loader = loader.Loader(
            str(path), batch_size=plan.batch_size // plan.world_size, num_workers=workers,
            order=order_opt, os_cache=os_cache, drop_last=plan.drop_last,
            distributed=distributed, seed=plan.seed, batches_ahead=max(1, prefetch),
            pipelines={"image": image, "label": label})
        torch.set_num_threads(self._threads)  # FFCV set torch's threads to num_workers

    def batches(self, tasks: Iterable[BatchTask]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        tasks = list(tasks)
        if not tasks:
            return
        self.decoder.output_size = (tasks[0].size, tasks[0].size)
        self.loader.next_epoch = tasks[0].epoch
        skip = tasks[0].batch  # resuming mid-epoch: FFCV has no seek, so decode and drop
        left = self._keep
        for k, (images, labels) in enumerate(self.loader):
            if k == 0:  # FFCV's epoch thread has set torch's threads to num_workers again
                torch.set_num_threads(self._threads)
            if left is not None:  # cut DistributedSampler's padding (evaluation only)
                images, labels = images[:left], labels[:left]
                left -= len(images)
                if len(images) == 0:
                    continue
            if k >= skip:
                yield images, labels.long().reshape(-1)

    def close(self) -> None:
        """Drop FFCV's loader and collect its compiled pipeline now, where a known numba
        finalizer error is silenced (see ``_numba_finalizer_errors_silenced``)."""
        if self.loader is None:
            return
        self.loader = None
        with _numba_finalizer_errors_silenced():
            gc.collect()


@contextmanager
def _numba_finalizer_errors_silenced():
    """While collecting a closed FFCV loader, drop one known, harmless error: numba's dispatcher
    finalizer (seen with numba 0.68) raises ``KeyError`` iterating the overloads of FFCV's
    generated pipeline functions when a second loader with another output size has compiled
    its own, and Python prints it as "Exception ignored in:
    <finalize object …>" with a traceback. The finalizer only unregisters compiled functions
    from numba's target context, so nothing leaks that matters; every other unraisable error
    goes to the previous hook unchanged."""
    previous = sys.unraisablehook

    def hook(unraisable):
        tb, last = unraisable.exc_traceback, None
        while tb is not None:
            last, tb = tb, tb.tb_next
        code = last.tb_frame.f_code if last is not None else None
        if (isinstance(unraisable.exc_value, KeyError) and code is not None
                and code.co_name == "finalizer" and "numba" in code.co_filename):
            return
        previous(unraisable)

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous
