"""The FFCV engine: ``.beton`` files decoded by FFCV's compiled pipeline (libjpeg-turbo, then
OpenCV's crop-and-resize), giving uint8 channels-last crops on the device; the project's own
augment, normalize and mix stages run after it.

It keeps the engine contract: the batches are the Loader's ``BatchTask``s, in their order, with
their records, crop boxes and flips (it draws nothing itself), so
same-seed runs, any number of ranks and a resumed epoch see the same data as with the other
engines. FFCV 1.0.2 draws its own order and crops; here only its reading, decoding and
compiled-pipeline machinery is used:

- the order is the tasks' record indices, handed to FFCV's pipeline batch by batch (this rank's
  share only: FFCV's own ``distributed`` sampler is not used, so nothing is padded or repeated);
  a resumed epoch starts at its first task, with no batch decoded and dropped;
- the crops are ``PlanCropDecoder``'s (``_ffcv_ops``), which reads each sample's box and flip
  from the batch's memory. FFCV crops whole source pixels: a box is rounded to the nearest pixel
  edges (``whole_pixel_boxes``), exact for training boxes (whole pixels already), within half a
  source pixel of a fractional validation box, and never empty (a 1-pixel image included);
- one epoch runs in a background thread (``_Epoch``, which follows FFCV's ``EpochIterator``:
  ``batches_ahead`` batches queued, ``batches_ahead + 2`` memory slots, one CUDA stream per
  slot) that stops and is joined when the epoch ends, is abandoned (``break``, an exception) or
  the engine is closed, and returns its memory for the next epoch. On CUDA the host waits, before
  decoding into a slot, for the host→device copy that last read the slot's pinned memory (FFCV
  does not: with the GPU more than ``batches_ahead + 2`` batches behind, a batch could be
  overwritten by a later one before its copy ran).

A yielded batch's images live in the slot's memory: they are valid until the next batch is asked
for (the Loader's stages copy them before then); its labels are a copy of their own.
``import ffcv`` sets torch's CPU threads to 1, and FFCV's loader to its worker count: the
caller's count is put back each time.
"""
from __future__ import annotations

import gc
import queue
import sys
import threading
from contextlib import contextmanager, nullcontext
from typing import Iterable, Iterator

import numpy as np
import torch

from tricks.errors import DataError, OptionError

from ..beton import import_ffcv
from ..records import RecordFile
from ..sampling import BatchTask
from .base import Capabilities, EngineSpec, register_engine

def beton_path(records: RecordFile):
    return records.path.with_suffix(".beton")


def whole_pixel_boxes(boxes: np.ndarray, scale_x: np.ndarray, scale_y: np.ndarray,
                      widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """The plan's crop boxes in whole pixels of the stored images.

    Args:
        boxes: N×4 float (x0, y0, x1, y1) in the records' source pixels (``BatchTask.boxes``).
        scale_x, scale_y: N stored ÷ record width and height (1 unless the beton was written
            with ``max_resolution``, which stores smaller images).
        widths, heights: N sides of the stored images, pixels.
    Returns:
        int32 N×4 (x0, y0, x1, y1), end exclusive: each edge rounded to the nearest pixel edge
        (half to even), then clamped so that the box holds at least one pixel inside the image
        (OpenCV aborts the process on an empty crop).
    """
    w = widths.astype(np.float64)
    h = heights.astype(np.float64)
    x0 = np.clip(np.rint(boxes[:, 0] * scale_x), 0, w - 1)
    y0 = np.clip(np.rint(boxes[:, 1] * scale_y), 0, h - 1)
    x1 = np.clip(np.rint(boxes[:, 2] * scale_x), x0 + 1, w)
    y1 = np.clip(np.rint(boxes[:, 3] * scale_y), y0 + 1, h)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.int32)


@register_engine("ffcv")
class FfcvEngine:
    """Options (``engine_options``): ``os_cache`` (FFCV's: read through the OS page cache, else
    FFCV's own process cache), ``order`` (``random`` only: the Loader's plan; FFCV's
    ``quasi_random`` is its own order, which the plan cannot follow, and is refused)."""

    @classmethod
    def capabilities(cls, device: torch.device, order: str = "random", os_cache: bool = True,
                     **options) -> Capabilities:
        if options:
            raise OptionError(f"the FFCV engine has no option(s) {', '.join(options)}")
        if order == "quasi_random":
            raise OptionError("FFCV's quasi_random order is FFCV's own, not the Loader's plan: "
                              "batches would differ from every other engine's and a resumed "
                              "epoch could not find its place; use order=random (the plan's)")
        if order != "random":
            raise OptionError(f"FFCV order must be random (the Loader's plan), got {order!r}")
        return Capabilities()

    def __init__(self, records: RecordFile, spec: EngineSpec, *, order: str = "random",
                 os_cache: bool = True):
        _, decoders, loader, transforms = import_ffcv()
        import numba  # FFCV's dependency: after import_ffcv, which says how to install it

        from ._ffcv_ops import PlanCropDecoder  # needs FFCV: imported after import_ffcv
        path = beton_path(records)
        if not path.is_file():
            raise DataError(f"{path} is missing: make it with `tricks convert SRC DST "
                            "--format beton`")
        self.device = torch.device(spec.device)
        self.records = records
        self.threads = max(1, min(spec.workers, numba.config.NUMBA_NUM_THREADS))
        self.decoder = PlanCropDecoder(224)
        non_blocking = self.device.type == "cuda"
        image = [self.decoder, transforms.ToTensor(),
                 transforms.ToDevice(self.device, non_blocking),
                 transforms.ToTorchImage(channels_last=True)]
        # no Squeeze(): on a last batch of one it makes a 0-d tensor that ToDevice cannot take;
        # labels are reshaped below instead
        label = [decoders.IntDecoder(), transforms.ToTensor(),
                 transforms.ToDevice(self.device, non_blocking)]
        threads = torch.get_num_threads()
        try:
            # sequential and undistributed: FFCV's own order is never used (see _Epoch)
            self.loader = loader.Loader(
                str(path), batch_size=max(1, spec.batch_size),
                num_workers=self.threads, order=loader.OrderOption.SEQUENTIAL,
                os_cache=os_cache, drop_last=False, distributed=False, seed=0,
                batches_ahead=max(1, spec.prefetch), pipelines={"image": image, "label": label})
        finally:
            torch.set_num_threads(threads)  # FFCV set torch's threads to num_workers
        self._check_beton(path)
        graph = self.loader.graph
        self._decoder_node = graph.operation_to_node[self.decoder][0].id
        self._outputs = list(graph.leaf_nodes)  # names, in the order FFCV returns results
        self._spare: _Slots | None = None        # memory of the last epoch, for the next one
        self._epochs: set[_Epoch] = set()        # epochs in flight (closed by close())

    def _check_beton(self, path) -> None:
        """The beton must hold the records' images, in order, with their labels; its image
        sizes give the scale from record pixels to stored pixels."""
        reader = self.loader.reader
        n = len(self.records)
        if int(reader.num_samples) != n or set(reader.handlers) != {"image", "label"}:
            raise DataError(f"{path} does not match {self.records.path} ({reader.num_samples} "
                            f"samples, fields {', '.join(reader.handlers)}; the records hold "
                            f"{n}): remake it with `tricks convert SRC DST --format beton`")
        fix = self.loader.field_name_to_f_ix
        labels = reader.metadata[f"f{fix['label']}"]
        if not np.array_equal(labels, self.records.labels):
            raise DataError(f"{path} has other labels than {self.records.path}: remake it with "
                            "`tricks convert SRC DST --format beton`")
        meta = reader.metadata[f"f{fix['image']}"]
        self._widths = meta["width"].astype(np.int64)
        self._heights = meta["height"].astype(np.int64)
        index = self.records.index
        self._scale_x = self._widths / index["width"].astype(np.float64)
        self._scale_y = self._heights / index["height"].astype(np.float64)

    def params(self, task: BatchTask) -> np.ndarray:
        """int32 N×5: the task's boxes in stored whole pixels (``whole_pixel_boxes``) and
        flips, as ``PlanCropDecoder`` reads them."""
        i = task.indices
        boxes = whole_pixel_boxes(np.asarray(task.boxes, np.float64), self._scale_x[i],
                                  self._scale_y[i], self._widths[i], self._heights[i])
        return np.concatenate([boxes, task.flips.astype(np.int32)[:, None]], axis=1)

    def _take_slots(self, size: int) -> "_Slots":
        """Memory for one epoch at output side ``size``: the last epoch's, when it is free and
        of that size, else new (FFCV's ``allocate_memory``: pinned where CUDA exists)."""
        spare, self._spare = self._spare, None
        if spare is not None and spare.size == size:
            return spare
        self.decoder.output_size = size
        count = self.loader.batches_ahead + 2
        return _Slots(self.loader.graph.allocate_memory(self.loader.batch_size, count), size,
                      count)

    def batches(self, tasks: Iterable[BatchTask]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.loader is None:
            raise RuntimeError("the FFCV engine is closed")
        tasks = list(tasks)
        if not tasks:
            return
        epoch = _Epoch(self, tasks)
        self._epochs.add(epoch)
        try:
            for _ in tasks:
                images, labels = epoch.get()
                # labels are copied (N int64): the Loader hands them on as the targets, which a
                # consumer may keep; images are read by the Loader's stages before the next batch
                yield images, labels.reshape(-1).clone()
            if epoch.get() is not _END:
                raise RuntimeError("FFCV's pipeline made more batches than it was given")
        finally:
            self._epochs.discard(epoch)
            spare = epoch.close()
            if spare is not None and self.loader is not None:
                self._spare = spare

    def close(self) -> None:
        """Stop and join every epoch in flight, free the batch memory, and drop FFCV's loader,
        collecting its compiled pipeline now, where a known numba finalizer error is silenced
        (see ``_numba_finalizer_errors_silenced``)."""
        for epoch in list(self._epochs):
            epoch.close()
        self._epochs.clear()
        self._spare = None
        if self.loader is None:
            return
        self.loader = None
        with _numba_finalizer_errors_silenced():
            gc.collect()


_END = object()


class _Slots:
    """An epoch's batch memory: FFCV's buffers for ``count`` batches (``allocate_memory``: a
    dict of kind → node id → buffers, each ``count`` × batch × shape) at output side ``size``,
    and on CUDA, per slot, the event after the last host→device copy that read its pinned
    memory."""

    def __init__(self, memory: dict, size: int, count: int):
        self.memory, self.size, self.count = memory, size, count
        self.copied: list = [None] * count


class _Epoch:
    """One epoch's batches made by FFCV's compiled pipeline in a background thread.

    Follows FFCV 1.0.2's ``EpochIterator`` (the queue, the slots, the per-slot CUDA streams, the
    event on the consumer's stream that guards a slot's device memory until the consumer is done
    with it, and the arguments of FFCV's generated stage code), with three differences: the
    batches are the given tasks, with each task's boxes and flips written into the decoder's
    params memory just before it runs; the thread checks for a stop before every batch and while
    waiting to hand one over, so ``close()`` can join it (FFCV's thread ran on after an abandoned
    epoch, or blocked forever handing over its end marker); and on CUDA the host waits for a
    slot's last host→device copy before writing its pinned memory again. An exception in the
    thread is handed to the consumer and raised there."""

    def __init__(self, engine: FfcvEngine, tasks: list[BatchTask]):
        loader = engine.loader
        self.engine, self.tasks = engine, tasks
        self.ahead = loader.batches_ahead
        self.queue: queue.Queue = queue.Queue(self.ahead)
        self.stop = threading.Event()
        self.cuda = engine.device.type == "cuda"
        self.slots = engine._take_slots(tasks[0].size)
        self.context = loader.memory_manager.schedule_epoch([t.indices for t in tasks])
        self.context.__enter__()
        self.consumer = self.streams = self.start = None
        if self.cuda:
            self.consumer = torch.cuda.current_stream(engine.device)
            self.streams = [torch.cuda.Stream(engine.device) for _ in range(self.slots.count)]
            # the consumer may still read last epoch's batches in these slots' device memory
            self.start = torch.cuda.Event()
            self.start.record(self.consumer)
        self.closed = False
        self.thread = threading.Thread(target=self._produce, daemon=True, name="tricks-ffcv")
        self.thread.start()

    # --- the producer thread -------------------------------------------------------------------
    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def _produce(self) -> None:
        import numba
        try:
            numba.set_num_threads(self.engine.threads)  # this thread's; torch's is untouched
            count = self.slots.count
            free = [self.start] * count  # per slot: when its device memory may be rewritten
            for b, task in enumerate(self.tasks):
                if self.stop.is_set():
                    return
                s = b % count
                if self.cuda and self.slots.copied[s] is not None:
                    self.slots.copied[s].synchronize()  # its pinned memory is read no more
                result = self._run(b, task, s, free[s])
                if not self._put(result):
                    return
                if self.cuda:
                    # the consumer has taken batch b − ahead, so it is done queuing work on
                    # batch b − ahead − 1: that slot's device memory is free after this event
                    done = torch.cuda.Event()
                    done.record(self.consumer)
                    free[(s - self.ahead - 1) % count] = done
            self._put(_END)
        except BaseException as e:  # handed to the consumer, raised there
            self._put(e)

    def _run(self, b: int, task: BatchTask, s: int, free) -> tuple[torch.Tensor, torch.Tensor]:
        from ._ffcv_ops import FLIP, STATUS
        engine, loader = self.engine, self.engine.loader
        n = len(task.indices)
        memory = self.slots.memory
        params = memory["operation"][engine._decoder_node][2][s][:n]
        params[:, :FLIP + 1] = engine.params(task)
        self.context.start_batch(b)
        args = {"batch_indices": task.indices, "storage_state": self.context.state,
                "metadata": loader.reader.metadata,
                **{f"memory_{k}": _slot(v, s, n) for k, v in memory["operation"].items()},
                **{f"shared_memory_{k}": _slot(v, s, n) for k, v in memory["shared"].items()}}
        stream = self.streams[s] if self.cuda else None
        code, outputs = loader.code
        with torch.cuda.stream(stream) if self.cuda else nullcontext():
            if free is not None:
                stream.wait_event(free)
            for stage, defined in code:
                args.update((f"result_{i}", r) for i, r in zip(defined, stage(**args)))
            if self.cuda:
                copied = torch.cuda.Event()
                copied.record(stream)
                self.slots.copied[s] = copied
        bad = np.flatnonzero(params[:, STATUS])
        if len(bad):
            raise DataError(f"{engine.records.path.with_suffix('.beton')}: record "
                            f"{int(task.indices[bad[0]])} cannot be decoded by FFCV's "
                            "libjpeg-turbo")
        results = dict(zip(engine._outputs, (args[f"result_{i}"] for i in outputs)))
        return s, results["image"], results["label"]

    # --- the consumer --------------------------------------------------------------------------
    def get(self):
        """The next batch (images, labels) or ``_END``; raises what the thread raised."""
        while True:
            try:
                item = self.queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise RuntimeError("FFCV's epoch thread ended without a batch") from None
        if isinstance(item, BaseException):
            raise item
        if item is _END:
            return item
        s, images, labels = item
        if self.cuda:
            self.consumer.wait_stream(self.streams[s])  # the slot's copies are done first
        return images, labels

    def close(self) -> _Slots | None:
        """Stop and join the thread; returns the memory, free for another epoch (None if
        already closed)."""
        if self.closed:
            return None
        self.closed = True
        self.stop.set()
        self.thread.join()
        self.context.__exit__(None, None, None)
        while not self.queue.empty():  # batches made ahead: drop them with the thread
            self.queue.get_nowait()
        if self.cuda:
            # copies of batches never taken may still be queued on the slot streams: whatever
            # the consumer's stream does next (with this memory, or with blocks the allocator
            # hands out once it is freed) comes after them
            for stream in self.streams:
                self.consumer.wait_stream(stream)
        return self.slots


def _slot(buffer, s: int, n: int):
    """Slot ``s``'s first ``n`` rows of one of FFCV's buffers (a tuple of buffers for an
    operation that asked for several)."""
    if buffer is None:
        return None
    if isinstance(buffer, tuple):
        return tuple(_slot(x, s, n) for x in buffer)
    return buffer[s][:n]


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
