"""The DALI engine: JPEG decode, crop, resize and flip inside an NVIDIA DALI pipeline.

Two sources, one output contract (uint8 N×3×S×S channels-last + int64 labels, on the device):

- ``source="records"`` (default): the project's record file through ``fn.external_source`` in
  batch mode. The Loader's plan (order, shards, crop boxes, flips) is fed in, and DALI decodes
  only each crop (``fn.decoders.image_slice``, the ROI decode), so batches are the same samples
  and crops as the native engine's: keyed by (seed, epoch, batch), resumable at any batch.
- ``source="files"``: the same stored records (what ``tricks convert`` validated: upright,
  8-bit RGB, transparency on white), in the Loader's order and shards, but training crops are
  DALI's own (``fn.decoders.image_random_crop``, seeded per rank) instead of the plan's boxes;
  validation is the records path (the plan's centre crops). It used to be DALI's file reader
  over the original files: those are not what convert normalised (transparency came out black,
  16-bit images, EXIF orientation differed), a list of names could not hold every name the file
  system allows, and DALI's reader sharding (``pad_last_batch``) disagreed with the plan's batch
  count, so sharded evaluation dropped images. Reading the records fixes all three.

On CUDA, decoding is ``device="mixed"`` (nvJPEG, with ``hw_decoder_load`` for the A100/H100
hardware decoder) and resize/flip run on the GPU; without a GPU the pipeline runs on the CPU
(``device_id=None``). Each pipeline is built once and reused for every epoch and image size.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import numpy as np
import torch

from ..errors import OptionError, UserError
from ..records import RecordFile
from ..sampling import BatchTask, EpochPlan, keyed_generator
from .base import register_engine

INSTALL_HINT = ("the DALI engine needs NVIDIA DALI: pip install 'tricks[dali]' (CUDA 12) or "
                "'tricks[dali-cu13]' (CUDA 13); install only one of them")


def _import_dali():
    try:
        import nvidia.dali as dali  # noqa: F401
        from nvidia.dali import fn, pipeline_def, types
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return fn, pipeline_def, types


def _seed(*key) -> int:
    return int(keyed_generator(*key).initial_seed() % (2**31 - 1))


class _Feed:
    """Iterable the pipeline pulls batches from (DALI calls ``iter`` on each reset): the plan's
    records, crop boxes and flips (``boxes=False``: records, sizes and labels only)."""

    def __init__(self, records: RecordFile, boxes: bool = True):
        self.records, self.boxes = records, boxes
        self.tasks: list[BatchTask] = []

    def __iter__(self):
        labels = self.records.index["label"]
        for t in self.tasks:
            jpegs = [np.array(self.records.raw(int(i))) for i in t.indices]
            sizes = [np.array(float(t.size), np.float32)] * len(t.indices)
            lab = [np.array(labels[i], np.int64) for i in t.indices]
            if not self.boxes:
                yield jpegs, sizes, lab
                continue
            b = t.boxes.astype(np.float32)
            anchors = list(b[:, :2])
            shapes = list(b[:, 2:] - b[:, :2])
            flips = [np.array(int(f), np.int32) for f in t.flips]
            yield jpegs, anchors, shapes, flips, sizes, lab


@register_engine("dali")
class DaliEngine:
    def __init__(self, records: RecordFile, device: torch.device | str, decode: str,
                 workers: int, prefetch: int, plan: EpochPlan, *, source: str = "records",
                 hw_decoder_load: float = 0.65):
        self.fn, self.pipeline_def, self.types = _import_dali()
        if source not in ("records", "files"):
            raise OptionError(f"unknown DALI source {source!r}; choose records or files")
        if decode not in ("auto", "device"):
            raise OptionError(f"the DALI engine decodes inside DALI; decode={decode!r} does "
                              "not apply (leave it auto)")
        self.records, self.source = records, source
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.device_id = (self.device.index or 0) if cuda else None
        self.batch_size = max(1, plan.batch_size // plan.world_size)
        self.train, self.seed = plan.train, plan.seed
        self.rank, self.world = plan.rank, plan.world_size
        self.scale, self.ratio, self.crop_ratio = plan.scale, plan.ratio, plan.crop_ratio
        self.opts = dict(threads=max(1, workers), prefetch=max(1, prefetch),
                         hw_decoder_load=hw_decoder_load)
        # the files source crops with DALI only in training; validation is the records path
        self._own_crops = source == "files" and plan.train
        # what this engine draws itself instead of taking it from the plan (see Loader.set_epoch)
        self.own_draws = ("DALI's files source draws its own training crops and flips, from one "
                          "random stream per pipeline" if self._own_crops else None)
        self._feed = _Feed(records, boxes=not self._own_crops)
        self._pipe = None
        self._clean = True  # False while an epoch is in flight (or was abandoned)

    # --- pipelines -----------------------------------------------------------------------------
    def _build_records(self):
        fn, types = self.fn, self.types
        cuda = self.device_id is not None
        o = self.opts

        @self.pipeline_def(batch_size=self.batch_size, num_threads=o["threads"],
                           device_id=self.device_id, prefetch_queue_depth=o["prefetch"],
                           seed=_seed(self.seed, self.rank, "dali"), exec_dynamic=True)
        def pipe():
            jpegs, anchors, shapes, flips, sizes, labels = fn.external_source(
                source=self._feed, num_outputs=6, batch=True, cycle="raise",
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

    def _build_files(self):
        """Training with DALI's own random-resized crop over the stored records."""
        fn, types = self.fn, self.types
        cuda = self.device_id is not None
        o = self.opts

        @self.pipeline_def(batch_size=self.batch_size, num_threads=o["threads"],
                           device_id=self.device_id, prefetch_queue_depth=o["prefetch"],
                           seed=_seed(self.seed, self.rank, "dali"), exec_dynamic=True)
        def pipe():
            jpegs, sizes, labels = fn.external_source(
                source=self._feed, num_outputs=3, batch=True, cycle="raise",
                dtype=[types.UINT8, types.FLOAT, types.INT64])
            extra = dict(hw_decoder_load=o["hw_decoder_load"]) if cuda else {}
            images = fn.decoders.image_random_crop(
                jpegs, device="mixed" if cuda else "cpu", output_type=types.RGB,
                random_area=list(self.scale), random_aspect_ratio=list(self.ratio),
                num_attempts=10, adjust_orientation=False, **extra)
            images = fn.resize(images, resize_x=sizes, resize_y=sizes, antialias=True)
            images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
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
            self._pipe = self._build_files() if self._own_crops else self._build_records()
        return self._pipe

    # --- batches -------------------------------------------------------------------------------
    def _run(self, pipe):
        """One batch from DALI, its GPU outputs bound to torch's current stream.

        DALI's docs: without ``cuda_stream``, ``run()`` returns host-synchronised outputs that
        stay valid only until the next ``run()``, while our copy of them is merely queued on
        torch's stream, behind the training step: the next ``run()`` could hand the buffers
        back to DALI before the copy has read them. With ``run(cuda_stream)`` (DALI's default,
        dynamic executor) the outputs are ordered on that stream, for reading and for their
        release, and the host does not wait for the batch either."""
        if self.device_id is None:
            return pipe.run()
        return pipe.run(torch.cuda.current_stream(self.device))

    def _to_torch(self, images, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """DALI outputs → torch tensors we own, copied on torch's current stream (the one
        ``_run`` bound the outputs to)."""
        x = torch.from_dlpack(images.as_tensor()).clone()   # N×H×W×3 uint8
        y = torch.from_dlpack(labels.as_tensor()).clone().reshape(-1).long()
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
