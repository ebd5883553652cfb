"""The native engine: records → uint8 channels-last crops, two ways.

- ``decode="workers"`` (every CPU run; GPU hosts that ask for it): C threads of
  ``tricks.pipeline._jpeg`` (libjpeg-turbo, the GIL released) write each batch straight into one
  preallocated uint8 N×S×S×3 tensor (pinned when the target is CUDA). Per image only the crop's
  rows and columns are decoded (``jpeg_skip_scanlines``/``jpeg_crop_scanline``), DCT-scaled
  by 1/2, 1/4 or 1/8 when the crop is at least 6× the output side (2× with ``fast_dct``: see
  ``dct_denominator``), then box-filtered (shrink)
  or bilinearly resampled (enlarge) and flipped in the same pass. A background thread makes
  batch i+1 while the consumer uses batch i. An image libjpeg cannot decode (CMYK, corrupt
  data) is redone with Pillow and counted (``fallbacks``). Where the extension was not built (no
  libjpeg headers at install time), worker processes (torch's DataLoader) make whole batches
  with Pillow instead: said once, and counted.
- ``decode="device"``: the main process hands the batch's JPEG bytes to
  ``torchvision.io.decode_jpeg(list, device=...)`` (batched nvJPEG on CUDA), then crops, resizes
  and flips the whole batch on the device with one ``roi_align`` over an edge-padded canvas; a
  background thread (its own CUDA stream) prepares batch i+1 while step i runs.
"""
from __future__ import annotations

import atexit
import io
import queue
import signal
import threading
import weakref
import warnings
from contextlib import nullcontext
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.ops import roi_align

from tricks.errors import DataError, OptionError, RecordError
from ..records import RecordFile
from ..buffers import HostBuffers
from ..sampling import BatchTask
from ..transfer import to_device
from .base import Capabilities, EngineSpec, register_engine

try:  # the C extension: built by `pip install` where libjpeg-turbo's headers exist
    from .. import _jpeg
except ImportError:
    _jpeg = None

CPU_DECODERS = ("auto", "libjpeg-turbo", "pillow")


# The crop must be at least this many times d × the output side to be decoded at 1/d (d = 2, 4,
# 8) in exact mode; 1 with ``fast_dct``. Same rule in C (``_jpeg.c``, which says why 3).
EXACT_MARGIN = 3


def dct_denominator(box: np.ndarray, size: int, margin: int = EXACT_MARGIN) -> int:
    """The JPEG DCT-domain reduction (1, 2, 4 or 8) for a crop: the largest that still leaves
    the crop's shorter side at least ``margin`` × d × ``size`` pixels."""
    shrink = min(box[2] - box[0], box[3] - box[1]) / size / margin
    return 8 if shrink >= 8 else 4 if shrink >= 4 else 2 if shrink >= 2 else 1


def pil_crop(jpeg: bytes | np.ndarray, box: np.ndarray, flip: bool, size: int) -> np.ndarray:
    """Decode one JPEG with Pillow, crop ``box`` (x0, y0, x1, y1 in source pixels), resize to
    size×size (per axis: ``BOX`` where it shrinks, ``BILINEAR`` where it enlarges), flip;
    HWC uint8 RGB. Raises what Pillow raises for a file it cannot read.

    A large crop is decoded at 1/2, 1/4 or 1/8 scale (``Image.draft``). Pillow then reports the
    rounded-up size ceil(W/d); the box is divided by the exact factor d, never scaled by the
    rounded size ratio (that shifted crops by up to half a source pixel)."""
    img = Image.open(io.BytesIO(jpeg))
    w0, h0 = img.size
    d = dct_denominator(box, size)
    if d > 1 and img.format == "JPEG":
        drafted = img.draft("RGB", (max(1, w0 // d), max(1, h0 // d)))
        d = w0 / drafted[1][2] if drafted else 1  # the factor Pillow chose: box = (0, 0, W/d, H/d)
    else:
        d = 1
    if img.mode != "RGB":
        img = img.convert("RGB")
    # clamped: the last block of a reduced decode can be partial
    x0, y0 = box[0] / d, box[1] / d
    x1, y1 = min(box[2] / d, img.size[0]), min(box[3] / d, img.size[1])
    # each axis its own filter (as the C path): an area average where it shrinks, bilinear
    # where it enlarges
    fx, fy = (Image.Resampling.BOX if n >= size else Image.Resampling.BILINEAR
              for n in (x1 - x0, y1 - y0))
    if fx == fy:
        out = img.resize((size, size), fx, box=(x0, y0, x1, y1))
    else:  # Pillow resamples separably too (horizontal, then vertical): same result
        out = img.resize((size, img.size[1]), fx, box=(x0, 0, x1, img.size[1]))
        out = out.resize((size, size), fy, box=(0, y0, size, y1))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


class _BatchDataset(Dataset):
    """Map-style dataset whose "index" is a whole BatchTask: one worker makes one batch."""

    def __init__(self, records: RecordFile):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, task: BatchTask):
        out = np.empty((len(task.indices), task.size, task.size, 3), np.uint8)
        for k, i in enumerate(task.indices):
            bad = self.records.check(int(i))
            if bad:
                raise RecordError(f"{self.records.path}: record {int(i)}: {bad}",
                                  str(self.records.path), int(i), bad)
            try:
                out[k] = pil_crop(self.records.raw(int(i)), task.boxes[k], bool(task.flips[k]),
                                  task.size)
            except Exception as e:
                reason = f"cannot be decoded ({type(e).__name__}: {e})"
                raise RecordError(f"{self.records.path}: record {int(i)} {reason}",
                                  str(self.records.path), int(i), reason) from None
        labels = self.records.index["label"][task.indices].astype(np.int64)
        return torch.from_numpy(out), torch.from_numpy(labels)


class _TaskSampler:
    """Yields the current epoch's tasks; the DataLoader's persistent workers stay alive."""

    def __init__(self):
        self.tasks: list[BatchTask] = []

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)


# Pixels per channel of one padded canvas: a batch whose canvas would be larger is cut into
# groups of similar sizes, so one 4,000-pixel photo among 500-pixel ones costs a group of its
# own, not a batch-wide 4,000² canvas. roi_align needs a float canvas (its box coordinates must
# share the canvas dtype, and fp16 has too few bits for those of large images), so a group's
# canvas costs 3 × 4 bytes a pixel, plus the uint8 gather it is made from: 2^24 pixels keep
# that within 250 MB (2^26 took ~1 GB). Each crop reads only its own image, so the grouping
# does not change the output (tests/test_loader.py holds one canvas equal to many).
CANVAS_PIXELS = 1 << 24


def size_groups(shapes: list[tuple[int, int]], budget: int = CANVAS_PIXELS) -> list[list[int]]:
    """Indices grouped, largest first, so that each group's padded canvas
    (count × max height × max width) stays within ``budget`` (a lone larger image excepted)."""
    order = sorted(range(len(shapes)), key=lambda i: shapes[i], reverse=True)
    groups: list[list[int]] = []
    h = w = 0
    for i in order:
        hi, wi = shapes[i]
        if groups and (len(groups[-1]) + 1) * max(h, hi) * max(w, wi) <= budget:
            groups[-1].append(i)
            h, w = max(h, hi), max(w, wi)
        else:
            groups.append([i])
            h, w = hi, wi
    return groups


def crop_resize_flip(images: list[torch.Tensor], boxes: torch.Tensor, flips: torch.Tensor,
                     size: int, budget: int = CANVAS_PIXELS) -> torch.Tensor:
    """Batched crop + resize + flip of differently sized images on their device.

    Args:
        images: N CHW uint8 tensors (3 channels) on one device, any sizes.
        boxes: N×4 (x0, y0, x1, y1) in source pixels, on the CPU.
        flips: N bools on the CPU.
        size: the output side S.
        budget: canvas pixels per group (``size_groups``).
    Returns:
        uint8 N×3×S×S on the images' device, channels-last.

    One ``_crop_group`` per group of similar sizes (usually a few per ImageNet batch). The
    host-side values (sizes, boxes, flips, the group order) reach the device in one
    non-blocking copy from pinned memory (``pipeline.transfer.to_device``): a plain ``.to()``
    of each would make the decode thread wait for the device, batch after batch."""
    device = images[0].device
    n = len(images)
    groups = size_groups([(im.shape[1], im.shape[2]) for im in images], budget)
    order = [i for g in groups for i in g] if len(groups) > 1 else list(range(n))
    perm = torch.tensor(order)  # host tensors, in group order: each group one slice
    hs = torch.tensor([images[i].shape[1] for i in order], dtype=torch.int32)
    ws = torch.tensor([images[i].shape[2] for i in order], dtype=torch.int32)
    hs_d, ws_d, boxes_d, flips_d, perm_d = to_device(
        [hs, ws, boxes.float()[perm], flips.bool()[perm], perm], device)
    if len(groups) == 1:
        return _crop_group(images, hs_d, ws_d, boxes_d, flips_d, size)
    out = torch.empty(n, 3, size, size, dtype=torch.uint8, device=device,
                      memory_format=torch.channels_last)
    start = 0
    for g in groups:
        part = slice(start, start + len(g))
        out[perm_d[part]] = _crop_group([images[i] for i in g], hs_d[part], ws_d[part],
                                        boxes_d[part], flips_d[part], size)
        start += len(g)
    return out


def _crop_group(images: list[torch.Tensor], hs: torch.Tensor, ws: torch.Tensor,
                boxes: torch.Tensor, flips: torch.Tensor, size: int) -> torch.Tensor:
    """The images (their heights ``hs`` and widths ``ws``: int32, and ``boxes``, ``flips``, all
    on the images' device) are gathered into one uint8 canvas whose padding repeats each
    image's last row and column (so bilinear samples at a crop's far edge never blend in
    zeros), then one ``roi_align`` on its float copy (adaptive sampling: an average over the
    source pixels of each output pixel, i.e. antialiased when shrinking) makes every crop."""
    device = images[0].device
    n = len(images)
    hmax = max(im.shape[1] for im in images)  # host-side shapes: no device sync
    wmax = max(im.shape[2] for im in images)
    flat = torch.cat([im.reshape(3, -1) for im in images], dim=1)   # 3 × Σ h·w
    starts = torch.cumsum(hs * ws, 0, dtype=torch.int32) - hs * ws
    ar = torch.arange(max(hmax, wmax), device=device, dtype=torch.int32)
    rows = torch.minimum(ar[None, :hmax], (hs - 1)[:, None])  # N × H, clamped: edge repeat
    cols = torch.minimum(ar[None, :wmax], (ws - 1)[:, None])  # N × W
    index = starts[:, None, None] + rows[:, :, None] * ws[:, None, None] + cols[:, None, :]
    canvas = flat.index_select(1, index.view(-1)).view(3, n, hmax, wmax).transpose(0, 1)
    # float32, not half: box coordinates of large images need more than fp16's 11 bits
    rois = torch.cat([torch.arange(n, dtype=torch.float32, device=device)[:, None], boxes],
                     dim=1)
    out = roi_align(canvas.float(), rois, (size, size), spatial_scale=1.0,
                    sampling_ratio=-1, aligned=True)
    out = torch.where(flips[:, None, None, None], out.flip(3), out)
    out = out.round_().clamp_(0, 255).to(torch.uint8)
    return out.contiguous(memory_format=torch.channels_last)


_END = object()

# The stops the main process handles (SIGINT, SIGTERM, SIGHUP: the trainer saves a checkpoint,
# then closes the engine). Sent to the whole process group (Ctrl-C, a closed terminal, scancel),
# they reach the Pillow workers too, which died of them first: torch then raised in the main
# process ("DataLoader worker … is killed by signal") before it could save.
_STOPS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n))
# engines with live worker processes: closed at exit before multiprocessing's own exit handler,
# which would SIGTERM them (ignored) and then wait for them forever
_LIVE: weakref.WeakSet = weakref.WeakSet()


def _ignore_stops(worker_id: int) -> None:
    """``worker_init_fn`` of the Pillow workers: ignore the stop signals (see ``_STOPS``); the
    main process shuts the workers down (``NativeEngine.close``), and a worker whose main process
    died exits by itself (torch's worker watchdog)."""
    for s in _STOPS:
        signal.signal(s, signal.SIG_IGN)


@atexit.register
def _close_live_engines() -> None:
    for engine in list(_LIVE):
        engine.close()


_said_pillow = False


def _say_pillow_once() -> None:
    global _said_pillow
    if not _said_pillow:
        _said_pillow = True
        warnings.warn("tricks.pipeline._jpeg is not built (libjpeg-turbo's headers were missing "
                      "at install): the native engine decodes on the CPU with Pillow, ~2x slower; "
                      "install libjpeg62-turbo-dev (or libjpeg-dev) and reinstall", RuntimeWarning,
                      stacklevel=3)


def _resolve(device: torch.device, decode: str, cpu_decoder: str) -> tuple[str, str | None]:
    """The decode path and CPU decoder the options mean on ``device`` (``OptionError`` for
    values the engine does not take)."""
    if decode not in ("auto", "workers", "device"):
        raise OptionError(f"unknown decode mode {decode!r}; choose auto, workers or device")
    if cpu_decoder not in CPU_DECODERS:
        raise OptionError(f"cpu_decoder must be one of {', '.join(CPU_DECODERS)}, "
                          f"got {cpu_decoder!r}")
    if cpu_decoder == "libjpeg-turbo" and _jpeg is None:
        raise OptionError("cpu_decoder=libjpeg-turbo: tricks.pipeline._jpeg is not built "
                          "(install libjpeg62-turbo-dev and reinstall tricks)")
    if decode == "auto":
        decode = "device" if device.type == "cuda" else "workers"
    if decode == "device":
        return decode, None
    if cpu_decoder == "auto":
        cpu_decoder = "pillow" if _jpeg is None else "libjpeg-turbo"
    return decode, cpu_decoder


@register_engine("native")
class NativeEngine:
    """Options: ``decode`` (``auto``: ``device`` on CUDA, else ``workers``), ``cpu_decoder``
    (``auto``: libjpeg-turbo through the C extension where built, else Pillow; or
    ``libjpeg-turbo``/``pillow`` by name) and ``fast_dct`` (DCT-domain reduction whenever the
    crop is at least twice the output side, libjpeg's fast integer IDCT and plain chroma
    upsampling: faster, a few levels less exact; training crops only). ``fallbacks`` counts the
    images decoded by Pillow."""

    @classmethod
    def capabilities(cls, device: torch.device, decode: str = "auto",
                     cpu_decoder: str = "auto", fast_dct: bool = False, **options
                     ) -> Capabilities:
        """Follows the plan on every path; writes normalized float32 from its decode threads
        only for a CPU target decoded by libjpeg-turbo (a CUDA target gets uint8: 4× fewer
        bytes to copy, normalized there)."""
        if options:
            raise OptionError(f"the native engine has no option(s) {', '.join(options)}")
        device = torch.device(device)
        _, decoder = _resolve(device, decode, cpu_decoder)
        return Capabilities(normalizes=device.type == "cpu" and decoder == "libjpeg-turbo")

    def __init__(self, records: RecordFile, spec: EngineSpec, *, decode: str = "auto",
                 cpu_decoder: str = "auto", fast_dct: bool = False):
        self.records = records
        self.device = torch.device(spec.device)
        self.decode, self.cpu_decoder = _resolve(self.device, decode, cpu_decoder)
        if self.cpu_decoder == "pillow" and cpu_decoder == "auto":
            _say_pillow_once()
        self.prefetch = max(1, spec.prefetch)
        self.workers = spec.workers
        self.fast_dct = bool(fast_dct)
        self.fallbacks = 0  # images decoded by Pillow on the CPU path
        self.fallback_reasons: list[str] = []  # the first few, for a report
        self._labels = torch.from_numpy(records.labels)
        self._crcs = np.ascontiguousarray(records.index["crc"], dtype="<u4")
        self._sampler = _TaskSampler()
        self._loader = None
        # x_u8 · scale + shift per channel, written by the decode threads (EngineSpec.normalize)
        self._normalize = spec.normalize if self.cpu_decoder == "libjpeg-turbo" else None
        if spec.normalize is not None and self._normalize is None:
            raise OptionError("the native engine normalizes only on the libjpeg-turbo CPU path")
        # the batches in the queue, the one being made, the consumer's, and two to spare
        self._buffers = HostBuffers(self.prefetch + 4)
        if self.cpu_decoder == "pillow":
            workers = self.workers
            cuda = self.device.type == "cuda"
            self._loader = DataLoader(
                _BatchDataset(records), batch_size=None, sampler=self._sampler,
                num_workers=workers, pin_memory=cuda, persistent_workers=workers > 0,
                prefetch_factor=self.prefetch if workers > 0 else None,
                worker_init_fn=_ignore_stops if workers > 0 else None)
            _LIVE.add(self)

    def batches(self, tasks: Iterable[BatchTask]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.cpu_decoder == "pillow":
            self._sampler.tasks = list(tasks)
            for images, labels in self._loader:
                self.fallbacks += len(images)
                yield (images.to(self.device, non_blocking=True).permute(0, 3, 1, 2),
                       labels.to(self.device, non_blocking=True))
        elif self.cpu_decoder == "libjpeg-turbo":
            made = map(self._turbo_batch, tasks)
            for images, labels in (self._prefetched(made) if self.workers > 0 else made):
                yield (images.to(self.device, non_blocking=True).permute(0, 3, 1, 2),
                       labels.to(self.device, non_blocking=True))
        else:
            yield from self._threaded(tasks)

    def _turbo_batch(self, task: BatchTask) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch, HWC on the host: uint8 (pinned for a CUDA target), or normalized
        float32 (``EngineSpec.normalize``); and its labels."""
        n, size = len(task.indices), task.size
        norm = self._normalize
        dtype = torch.uint8 if norm is None else torch.float32
        if self.device.type == "cpu":
            images = self._buffers.get((n, size, size, 3), dtype)
        else:
            images = torch.empty((n, size, size, 3), dtype=dtype,
                                 pin_memory=self.device.type == "cuda")
        out = images.numpy()
        jpegs = [self.records.raw(int(i)) for i in task.indices]
        boxes = np.ascontiguousarray(task.boxes, dtype=np.float32)
        flips = np.ascontiguousarray(task.flips, dtype=np.uint8)
        # each record's CRC-32 checked in the decode threads the first time this process
        # decodes it (records.RecordFile.verified)
        unchecked = not self.records.verified[task.indices].all()
        failed = _jpeg.decode_crops(jpegs, boxes, flips, out, threads=max(1, self.workers),
                                    fast=self.fast_dct, normalize=norm,
                                    crcs=self._crcs[task.indices] if unchecked else None)
        for k, reason in failed:  # what libjpeg refuses, Pillow may read (or it is an error)
            i = int(task.indices[k])
            if reason.startswith("checksum mismatch"):  # not the bytes convert wrote
                raise RecordError(f"{self.records.path}: record {i}: {reason}",
                                  str(self.records.path), i, reason)
            try:
                pixels = pil_crop(jpegs[k], boxes[k], bool(flips[k]), size)
                if norm is not None:  # as the C code: the uint8 value · scale + shift
                    scale, shift = np.float32(norm[:3]), np.float32(norm[3:])
                    pixels = pixels.astype(np.float32) * scale + shift
                out[k] = pixels
            except Exception as e:
                why = f"cannot be decoded ({reason}; Pillow: {type(e).__name__}: {e})"
                raise RecordError(f"{self.records.path}: record {i} {why}",
                                  str(self.records.path), i, why) from None
            self.fallbacks += 1
            if len(self.fallback_reasons) < 10:
                self.fallback_reasons.append(f"record {i}: {reason}")
        if unchecked:
            self.records.verified[task.indices] = True  # a mismatch raised above
        labels = self._labels[torch.from_numpy(task.indices)]
        if self.device.type == "cuda":
            labels = labels.pin_memory()
        return images, labels

    def _prefetched(self, made: Iterator, name: str = "tricks-cpu-decode") -> Iterator:
        """Run the iterator ``made`` in a background thread, ``prefetch`` items ahead (the
        decode releases the GIL, so it overlaps the consumer's work)."""
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def produce():
            try:
                for item in made:
                    if not put(item):
                        return
                put(_END)
            except BaseException as e:  # handed to the consumer, raised there
                put(e)

        thread = threading.Thread(target=produce, daemon=True, name=name)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join(timeout=5)

    def _device_batch(self, task: BatchTask) -> tuple[torch.Tensor, torch.Tensor]:
        for i in task.indices:  # in the producer thread (zlib's CRC releases the GIL)
            bad = self.records.check(int(i))
            if bad:
                raise RecordError(f"{self.records.path}: record {int(i)}: {bad}",
                                  str(self.records.path), int(i), bad)
        datas = [torch.from_numpy(np.array(self.records.raw(int(i)))) for i in task.indices]
        if self.device.type == "cuda":
            # torchvision's CUDA decoder writes from its own stream into memory allocated on
            # ours without waiting for it (pytorch/vision#9606): a block freed by the previous
            # batch's still-queued crop kernels could be overwritten. Only this thread waits.
            torch.cuda.current_stream(self.device).synchronize()
        try:
            images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as e:
            raise DataError(f"{self.records.path}: a record of batch {task.batch} cannot be "
                            f"decoded ({e})") from None
        out = crop_resize_flip(images, torch.from_numpy(task.boxes),
                               torch.from_numpy(task.flips), task.size)
        labels, = to_device([self._labels[torch.from_numpy(task.indices)]], self.device)
        return out, labels

    def _threaded(self, tasks: Iterable[BatchTask]):
        """Make batches in a background thread, ``prefetch`` ahead, on a side CUDA stream."""
        cuda = self.device.type == "cuda"
        stream = torch.cuda.Stream(self.device) if cuda else None

        def made():  # runs in the background thread: the stream is that thread's
            with torch.cuda.stream(stream) if cuda else nullcontext():
                for task in tasks:
                    out = self._device_batch(task)
                    event = torch.cuda.Event() if cuda else None
                    if cuda:
                        event.record(stream)
                    yield out, event

        for (images, labels), event in self._prefetched(made(), "tricks-decode"):
            if cuda:
                current = torch.cuda.current_stream(self.device)
                current.wait_event(event)
                images.record_stream(current)
                labels.record_stream(current)
            yield images, labels

    def close(self) -> None:
        """Free the host buffers and shut the Pillow worker processes down (torch's shutdown:
        a done event, then a join; a worker still alive after it, which ignores SIGTERM, is
        killed)."""
        self._buffers.clear()
        if self._loader is not None:
            it = getattr(self._loader, "_iterator", None)
            if it is not None:
                it._shutdown_workers()
                for w in getattr(it, "_workers", ()):
                    if w.is_alive():
                        w.kill()
                        w.join()
            self._loader = None
        _LIVE.discard(self)
