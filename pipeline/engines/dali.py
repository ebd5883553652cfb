"""The DALI engine: JPEG decode, crop, resize and flip inside an NVIDIA DALI pipeline.

Two sources, one output contract (uint8 N×3×S×S channels-last + int64 labels, on the device):

- ``source="records"`` (default): the project's record file through ``fn.external_source`` in
  batch mode. The Loader's plan (order, shards, crop boxes, flips) is fed in, and DALI decodes
  only each crop (``fn.decoders.image_slice``, the ROI decode), so batches are the same samples
  and crops as the native engine's: keyed by (seed, epoch, batch), resumable at any batch.
- ``source="files"``: DALI's own file reader over the list ``tricks convert`` validated
  (``<split>.files.txt``: DALI aborts the whole pipeline on one undecodable file), with DALI's
  sharding (``shard_id``/``num_shards``, ``pad_last_batch``), a global reshuffle every epoch
  (``shuffle_after_epoch``) and its own random crop (``fn.decoders.image_random_crop``). Its
  order and crops are DALI's, so a resumed run sees other (equally random) batches.

On CUDA, decoding is ``device="mixed"`` (nvJPEG, with ``hw_decoder_load`` for the A100/H100
hardware decoder) and resize/flip run on the GPU; without a GPU the pipeline runs on the CPU
(``device_id=None``). Each pipeline is built once and reused for every epoch and image size.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Iterator

import numpy as np
import torch

from ..errors import DataError, OptionError, UserError
from ..records import RecordFile
from ..sampling import BatchTask, EpochPlan, epoch_order, keyed_generator
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
    """Iterable the records pipeline pulls batches from (DALI calls ``iter`` on each reset)."""

    def __init__(self, records: RecordFile):
        self.records = records
        self.tasks: list[BatchTask] = []

    def __iter__(self):
        labels = self.records.index["label"]
        for t in self.tasks:
            jpegs = [np.array(self.records.raw(int(i))) for i in t.indices]
            b = t.boxes.astype(np.float32)
            anchors = list(b[:, :2])
            shapes = list(b[:, 2:] - b[:, :2])
            flips = [np.array(int(f), np.int32) for f in t.flips]
            sizes = [np.array(float(t.size), np.float32)] * len(t.indices)
            lab = [np.array(labels[i], np.int64) for i in t.indices]
            yield jpegs, anchors, shapes, flips, sizes, lab


@register_engine("dali")
class DaliEngine:
    def __init__(self, records: RecordFile, device: torch.device | str, decode: str,
                 workers: int, prefetch: int, plan: EpochPlan, *, source: str = "records",
                 hw_decoder_load: float = 0.65, dont_use_mmap: bool = False,
                 initial_fill: int = 1024):
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
                         hw_decoder_load=hw_decoder_load, dont_use_mmap=dont_use_mmap,
                         initial_fill=initial_fill)
        self._size = 224
        self._pipe_size = None  # files: the size the built pipeline's callback has handed out
        self._feed = _Feed(records)
        self._pipe = None
        self._clean = True  # False while an epoch is in flight (or was abandoned)
        self._start_epoch = 0   # files: the epoch the reader was built for …
        self._reader_epoch = 0  # … and the one it will read next

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
        fn, types = self.fn, self.types
        cuda = self.device_id is not None
        o = self.opts
        listing = self.records.path.with_name(self.records.path.stem + ".files.txt")
        if not listing.is_file():
            raise DataError(f"{listing} is missing: the DALI file reader needs the list "
                            "`tricks convert` writes beside the records")
        rows = [ln.rsplit("\t", 1) for ln in listing.read_text().splitlines() if ln.strip()]
        missing = next((p for p, _ in rows if not os.path.exists(p)), None)
        if missing:
            raise DataError(f"{missing} (listed in {listing}) no longer exists")
        files, labels = [p for p, _ in rows], [int(lab) for _, lab in rows]
        if self.train:  # the reader's first epoch is in list order: start from a shuffled one
            order = epoch_order(len(files), self.seed, self._start_epoch, True).tolist()
            files, labels = [files[i] for i in order], [labels[i] for i in order]
        self.files_count = len(files)

        # a global reshuffle every epoch, with one seed on every rank so shards stay disjoint
        shuffle = dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=_seed(self.seed, "order")
                       ) if self.train else {}

        @self.pipeline_def(batch_size=self.batch_size, num_threads=o["threads"],
                           device_id=self.device_id, prefetch_queue_depth=o["prefetch"],
                           seed=_seed(self.seed, self.rank, "dali"), exec_dynamic=True)
        def pipe():
            jpegs, labels_ = fn.readers.file(
                files=files, labels=labels, shard_id=self.rank, num_shards=self.world,
                pad_last_batch=True, **shuffle,
                dont_use_mmap=o["dont_use_mmap"], initial_fill=o["initial_fill"],
                name="Reader")
            sizes = fn.external_source(source=lambda: [np.array(float(self._size), np.float32)]
                                       * self.batch_size, batch=True)
            dev = "mixed" if cuda else "cpu"
            extra = dict(hw_decoder_load=o["hw_decoder_load"]) if cuda else {}
            if self.train:
                images = fn.decoders.image_random_crop(
                    jpegs, device=dev, output_type=types.RGB, random_area=list(self.scale),
                    random_aspect_ratio=list(self.ratio), num_attempts=10,
                    adjust_orientation=False, **extra)
                images = fn.resize(images, resize_x=sizes, resize_y=sizes, antialias=True)
                images = fn.flip(images, horizontal=fn.random.coin_flip(probability=0.5))
            else:
                images = fn.decoders.image(jpegs, device=dev, output_type=types.RGB,
                                           adjust_orientation=False, **extra)
                images = fn.resize(images, resize_shorter=sizes / self.crop_ratio,
                                   antialias=True)
                images = fn.crop(images, crop_w=sizes, crop_h=sizes)
            labels_ = fn.cast(labels_, dtype=types.INT64)
            return images, labels_.gpu() if cuda else labels_
        p = pipe()
        p.build()
        return p

    def _pipeline(self):
        if not self._clean:
            # an epoch was abandoned mid-way: its prefetched batches are still queued inside
            # DALI, so start over with a fresh pipeline rather than serve stale batches
            self._pipe = None
        if self._pipe is None:
            self._pipe = self._build_records() if self.source == "records" else \
                self._build_files()
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
        if tasks:
            self._size = tasks[0].size
        if self.source == "records":
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
            return
        epoch = tasks[0].epoch if tasks else self._reader_epoch
        if epoch != self._reader_epoch or (self._pipe is not None and
                                           self._size != self._pipe_size):
            # DALI's reader only moves forward: a jump (a resume, a repeated epoch) starts a
            # reader whose first order is ours for that epoch; DALI reshuffles from there on.
            # A new image size does too: DALI has already called the size callback for the
            # batches it prefetched, at the old size (progressive resizing)
            self._pipe, self._start_epoch, self._reader_epoch = None, epoch, epoch
        pipe = self._pipeline()
        self._pipe_size = self._size
        self._clean = False
        yield from self._files_epoch(pipe, len(tasks))
        self._clean = True
        self._reader_epoch += 1

    def _files_epoch(self, pipe, wanted: int):
        """One epoch of DALI's reader on this shard: ``wanted`` batches at most (the Loader's
        count); the padded tail of the shard is trimmed, and the reader is run to its epoch end
        so the next epoch starts aligned."""
        n, s = self.files_count, self.rank
        shard = (s + 1) * n // self.world - s * n // self.world
        runs = math.ceil(shard / self.batch_size)
        for k in range(runs):
            images, labels = self._run(pipe)
            x, y = self._to_torch(images, labels)
            keep = min(self.batch_size, shard - k * self.batch_size)
            full = keep == self.batch_size
            if k < wanted and (full or not self.train):
                yield x[:keep], y[:keep]

    def close(self) -> None:
        self._pipe = None
