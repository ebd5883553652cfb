"""The DALI engine: JPEG decode, crop, resize and flip inside an NVIDIA DALI pipeline.

The project's record file goes in through ``fn.external_source`` in batch mode: the Loader's
tasks (order, shards, crop boxes, flips) are fed in, and DALI decodes only each crop
(``fn.decoders.image_slice``, the ROI decode), so batches are the same samples and crops as the
native engine's: keyed by (seed, epoch, batch), resumable at any batch. (A former
``source="files"`` drew DALI's own crops with ``fn.decoders.image_random_crop`` from the same
records: it decoded the same ROI at the same speed but could neither resume nor match another
run's crops, so it is gone.)

On CUDA, decoding is ``device="mixed"`` (nvJPEG, with ``hw_decoder_load`` for the A100/H100
hardware decoder) and resize/flip run on the GPU; without a GPU the pipeline runs on the CPU
(``device_id=None``). The pipeline is built once and reused for every epoch and image size.
"""
from __future__ import annotations

from collections import deque
from typing import Iterable, Iterator

import numpy as np
import torch

from tricks.errors import OptionError, UserError
from ..records import RecordFile
from ..sampling import BatchTask
from .base import Capabilities, EngineSpec, register_engine

INSTALL_HINT = ("the DALI engine needs NVIDIA DALI: pip install 'tricks[dali]' (CUDA 12) or "
                "'tricks[dali-cu13]' (CUDA 13); install only one of them")


def _import_dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return fn, pipeline_def, types


class _Feed:
    """Iterable the pipeline pulls batches from (DALI calls ``iter`` on each reset): the tasks'
    records, crop boxes, flips, output sizes and labels.

    The JPEG bytes go to DALI as zero-copy views of the record file's memory map, which the
    external source takes with ``no_copy=True``: no copy of the batch's ~100 MB (1,024 ImageNet
    JPEGs) in the training thread, where DALI calls this. DALI's external_source docs: with
    ``no_copy`` the memory must stay alive and unmodified until consumed, i.e. for
    ``prefetch_queue_depth`` iterations after it was fed, and a CPU batch may be a list of
    contiguous arrays (each view is). The map lives as long as the engine's ``RecordFile`` and
    is read-only; the small per-batch arrays (boxes, sizes, labels) are kept here for ``keep``
    batches, more than the queue holds."""

    def __init__(self, records: RecordFile, keep: int = 4):
        self.records = records
        self.tasks: list[BatchTask] = []
        self._alive: deque = deque(maxlen=keep)

    def __iter__(self):
        labels = self.records.index["label"]
        for t in self.tasks:
            jpegs = [self.records.raw(int(i)) for i in t.indices]
            sizes = [np.array(float(t.size), np.float32)] * len(t.indices)
            lab = [np.array(labels[i], np.int64) for i in t.indices]
            b = t.boxes.astype(np.float32)
            anchors = list(b[:, :2])
            shapes = list(b[:, 2:] - b[:, :2])
            flips = [np.array(int(f), np.int32) for f in t.flips]
            batch = jpegs, anchors, shapes, flips, sizes, lab
            self._alive.append(batch)
            yield batch


@register_engine("dali")
class DaliEngine:
    """Options: ``hw_decoder_load`` (the share of images nvJPEG's hardware decoder takes on
    A100/H100, DALI's own option; CUDA only)."""

    @classmethod
    def capabilities(cls, device: torch.device, hw_decoder_load: float = 0.65, **options
                     ) -> Capabilities:
        if options.pop("source", "records") != "records":
            raise OptionError("the DALI engine reads the records (source=records); its former "
                              "files source, with DALI's own crops, is gone")
        if options:
            raise OptionError(f"the DALI engine has no option(s) {', '.join(options)}")
        if not 0 <= hw_decoder_load <= 1:
            raise OptionError(f"DALI hw_decoder_load must be in [0, 1], got {hw_decoder_load}")
        return Capabilities()

    def __init__(self, records: RecordFile, spec: EngineSpec, *, hw_decoder_load: float = 0.65,
                 source: str = "records"):
        self.fn, self.pipeline_def, self.types = _import_dali()
        self.records = records
        self.device = torch.device(spec.device)
        cuda = self.device.type == "cuda"
        self.device_id = (self.device.index or 0) if cuda else None
        self.batch_size = max(1, spec.batch_size)
        self.opts = dict(threads=max(1, spec.workers), prefetch=max(1, spec.prefetch),
                         hw_decoder_load=hw_decoder_load)
        self._feed = _Feed(records, keep=self.opts["prefetch"] + 2)
        self._pipe = None
        self._clean = True  # False while an epoch is in flight (or was abandoned)

    # --- pipelines -----------------------------------------------------------------------------
    def _build(self):
        fn, types = self.fn, self.types
        cuda = self.device_id is not None
        o = self.opts

        # no random op in the graph: every draw is the plan's, so the seed is a constant
        @self.pipeline_def(batch_size=self.batch_size, num_threads=o["threads"],
                           device_id=self.device_id, prefetch_queue_depth=o["prefetch"],
                           seed=0, exec_dynamic=True)
        def pipe():
            jpegs, anchors, shapes, flips, sizes, labels = fn.external_source(
                source=self._feed, num_outputs=6, batch=True, cycle="raise", no_copy=True,
                dtype=[types.UINT8, types.FLOAT, types.FLOAT, types.INT32, types.FLOAT,
                       types.INT64])
            extra = dict(hw_decoder_load=o["hw_decoder_load"]) if cuda else {}
            images = fn.decoders.image_slice(
                jpegs, anchors, shapes, device="mixed" if cuda else "cpu",
                output_type=types.RGB, axis_names="WH", normalized_anchor=False,
                normalized_shape=False, adjust_orientation=False, **extra)
            images = fn.resize(images, resize_x=sizes, resize_y=sizes, antialias=True)
            images = fn.flip(images, horizontal=flips)
            return images, labels.gpu() if cuda else labels
        p = pipe()
        p.build()
        return p

    def _pipeline(self):
        if not self._clean:
            # an epoch was abandoned mid-way: its prefetched batches are still queued inside
            # DALI, so start over with a fresh pipeline rather than serve stale batches
            self._pipe = None
        if self._pipe is None:
            self._pipe = self._build()
        return self._pipe

    # --- batches -------------------------------------------------------------------------------
    def _run(self, pipe):
        """One batch from DALI. On CUDA, ``run(cuda_stream)`` (DALI's default, dynamic executor)
        returns outputs ordered on torch's current stream: the step that reads them waits for
        DALI's work on the device, and the host does not wait for the batch."""
        if self.device_id is None:
            return pipe.run()
        return pipe.run(torch.cuda.current_stream(self.device))

    def _to_torch(self, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """DALI outputs → torch tensors over DALI's own buffers (DLPack, no copy).

        Safe to keep and to free at any time, by DALI's DLPack release path: under the dynamic
        executor the outputs are not reused by later ``run()`` calls (``TensorGPU.__dlpack__``'s
        and ``Pipeline.release_outputs``' docs: they may be kept indefinitely); the capsule
        shares the buffer's ownership, and when torch drops the tensor, DALI's deleter hands
        the buffer to its ``DLTensorGraveyard``, a thread that releases it only after a
        ``cudaDeviceSynchronize`` (``dali/pipeline/data/dltensor.cc``), so kernels still
        queued on torch's stream never read reused memory. (The copy each batch used to make
        here, ~150 MB at 1,024 × 224², bought nothing.)"""
        x = torch.from_dlpack(images.as_tensor())                # N×H×W×3 uint8
        y = torch.from_dlpack(labels.as_tensor()).reshape(-1).long()
        return x.permute(0, 3, 1, 2), y                     # channels-last N×3×H×W, no copy

    def batches(self, tasks: Iterable[BatchTask]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        tasks = list(tasks)
        self._feed.tasks = tasks
        pipe = self._pipeline()
        self._clean = False
        for _ in tasks:
            images, labels = self._run(pipe)
            yield self._to_torch(images, labels)
        try:  # the feed is exhausted: DALI says so, and is reset for the next epoch
            self._run(pipe)
            raise RuntimeError("DALI returned more batches than were fed")
        except StopIteration:
            pipe.reset()
        self._clean = True

    def close(self) -> None:
        self._pipe = None
