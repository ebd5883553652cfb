"""The stages after a decode engine, built once per Loader and never changed after:

    engine     uint8 N×3×S×S channels-last + int64 labels, on the device; or, when the Loader
               let the engine normalize (``input_normalized``), normalized float32 images
    pad-crop   (``Translate``, optional) pad-and-crop by per-sample shifts, on the uint8 images
    augment    batch ops on float N×3×S×S in [0, 1] (the training dtype): ``op(images, gen)``
    normalize  (x − mean) / std, in the training dtype
    augment    the ops marked ``after_normalize`` (cutout: its hole is 0, the dataset mean)
    mix        ``mix(images, labels, num_classes, gen) -> (images, targets)``: targets become
               N×K distributions; without one, targets stay integer labels (the fast path)

With ``dtype=torch.uint8`` (the Loader's uint8 output, as FFCV's and DALI's users get) only
pad-and-crop runs: no augment op, normalize or mix (the Loader refuses them in one line).

Ops get an explicit CPU generator keyed by (seed, epoch, batch, rank) (``BatchContext``): they
draw their per-sample parameters with it, so the same batch gets the same draw on any device and
after a resume, and hand the draw to the device in one non-blocking copy from pinned memory
(``pipeline.transfer``): no stage makes the host wait for the device (tests/test_no_sync.py
counts it). ``pipeline.augment`` and ``pipeline.mix`` hold the ops.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from .buffers import HostBuffers
from tricks.errors import OptionError
from .options import IMAGENET_MEAN, IMAGENET_STD
from .sampling import keyed_generator
from .transfer import DeviceConstants
from .translate import check_padding, translate

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class AugmentOp(Protocol):
    """A batch op: ``op(images, gen) -> images``.

    images: float N×3×H×W in [0, 1] in the training dtype (float32, float16 or bfloat16), on the
        Loader's device, channels-last strides; this rank's share of one batch (N may be 0 only
        in the last evaluation batch of a rank with fewer images than batches).
    gen: a CPU ``torch.Generator`` keyed by (seed, epoch, batch, rank): draw every random
        parameter from it (e.g. ``torch.rand(N, generator=gen)``), one per sample, then move it
        to the images' device; never torch's global generator, so a resumed run and a run on
        another device draw the same.
    Returns images of the same shape and dtype (any memory format). An op with a true
    ``after_normalize`` attribute gets normalized images instead (cutout: 0 is the mean).
    """
    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> torch.Tensor: ...


class MixOp(Protocol):
    """``mix(images, labels, num_classes, gen) -> (images, targets)``: normalized images, int64
    labels N; returns the mixed images and N×K float32 target distributions."""
    def __call__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class BatchContext:
    """Which batch the stages are making: the key of every draw they take."""
    seed: int
    epoch: int
    batch: int   # the global batch number within the epoch
    rank: int
    _gen: torch.Generator | None = field(default=None, repr=False)

    @classmethod
    def of(cls, gen: torch.Generator) -> "BatchContext":
        """A context whose ops draw from ``gen`` (running the stages outside a Loader)."""
        return cls(0, 0, 0, 0, gen)

    @property
    def generator(self) -> torch.Generator:
        """The ops' CPU generator, keyed by (seed, epoch, batch, rank, "ops"); made on first use
        and shared by every op of the batch, in stage order."""
        if self._gen is None:
            self._gen = keyed_generator(self.seed, self.epoch, self.batch, self.rank, "ops")
        return self._gen


class Translate:
    """Pad-and-crop as a stage (``pipeline.translate``): each sample shifted by its own (dx, dy)
    from ``shifts(epoch, batch)`` (the plan's keyed draw, N×2 int64 on the CPU), the outside
    filled with ``fill`` (uint8 level) or the image's own pixels by ``mode``."""

    def __init__(self, pad: int, fill: int, mode: str,
                 shifts: Callable[[int, int], torch.Tensor]):
        check_padding(pad, fill, None, mode)
        self.pad, self.fill, self.mode, self.shifts = pad, fill, mode, shifts

    def __call__(self, images: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        return translate(images, self.shifts(ctx.epoch, ctx.batch), self.fill, self.mode)


def _takes_a_batch(op) -> str | None:
    """Why ``op`` is not a batch op (see ``AugmentOp``), or None. Catches the usual mistake:
    a per-sample torchvision transform (one image in, one random draw) where a batch op
    belongs."""
    import inspect
    module = type(op).__module__ or ""
    if module.startswith("torchvision.transforms"):
        return (f"{type(op).__name__} is a per-sample torchvision transform; wrap it with "
                "tricks.pipeline.PerSample(...) to run it on each image with its own draw, or "
                "use a batch op (tricks.pipeline.augment, .autoaugment)")
    if not callable(op):
        return f"{op!r} is not callable"
    try:
        inspect.signature(op).bind(torch.empty(0), torch.Generator())
    except TypeError:
        return (f"{getattr(op, '__name__', type(op).__name__)} does not take (images, gen): a "
                "batch op is op(images N×3×H×W in [0, 1], gen: torch.Generator)")
    except ValueError:  # no signature to read (a builtin): let it run
        pass
    return None


def check_augment(ops: Sequence, hook: str = "augment") -> list:
    """The augment ops as a list, or ``OptionError`` naming the hook and position of the first
    that is not a batch op."""
    if callable(ops) or isinstance(ops, (str, bytes)):
        raise OptionError(f"{hook}= takes a list of batch ops, got one object ({ops!r}): "
                          f"pass [op]")
    try:
        ops = list(ops)
    except TypeError:
        raise OptionError(f"{hook}= takes a list of batch ops, got {ops!r}") from None
    for i, op in enumerate(ops):
        why = _takes_a_batch(op)
        if why is not None:
            raise OptionError(f"{hook}[{i}]: {why}")
    return ops


def _apply(op, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``op(x, gen)``, checked to keep the batch's contract (a tensor of x's shape, dtype and
    device: metadata only, no sync); ``OptionError`` naming the op otherwise."""
    y = op(x, gen)
    if not isinstance(y, torch.Tensor):
        raise OptionError(f"augment op {op!r} returned {type(y).__name__}, not the batch (an "
                          "in-place op must still return its tensor)")
    if y.shape != x.shape or y.dtype != x.dtype or y.device != x.device:
        raise OptionError(f"augment op {op!r} turned the {tuple(x.shape)} {x.dtype} batch on "
                          f"{x.device} into {tuple(y.shape)} {y.dtype} on {y.device}: a batch "
                          "op keeps shape, dtype and device")
    return y


class Stages:
    """uint8 engine output → (model input, targets), the stages in the module's order.

    Args:
        dtype: the images' dtype out: float32, float16 or bfloat16 (normalized), or uint8 (as
            decoded: only ``pad_crop`` runs).
        num_classes: K, for the mix targets.
        augment: batch ops (``AugmentOp``), in order.
        mix: a ``MixOp`` or None.
        mean, std: per channel, of pixels in [0, 1].
        channels_last: the output's memory format.
        pad_crop: a ``Translate`` stage (pad-and-crop), or None.
        input_normalized: the engine already wrote normalized float32 (the Loader decides this
            once, and only where no stage needs uint8 or [0, 1] pixels: float32 out, no
            pad-crop, no augment op before normalize).
    Raises:
        OptionError: an unknown dtype, a non-batch op, augment/mix with uint8 output, or
            ``input_normalized`` where a stage needs the raw pixels.
    """

    def __init__(self, dtype: torch.dtype, num_classes: int, augment: Sequence[AugmentOp] = (),
                 mix: MixOp | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, channels_last: bool = True,
                 pad_crop: Translate | None = None, input_normalized: bool = False):
        if dtype not in DTYPES + (torch.uint8,):
            raise OptionError(f"unsupported image dtype {dtype}; choose float32, float16, "
                              "bfloat16 or uint8")
        augment = check_augment(augment)
        if dtype == torch.uint8 and (augment or mix is not None):
            raise OptionError("uint8 output takes no augment or mix op (they work on float "
                              "pixels): normalize on the device yourself, or drop them")
        self.dtype = dtype
        self.num_classes = num_classes
        self.before = tuple(op for op in augment if not getattr(op, "after_normalize", False))
        self.after = tuple(op for op in augment if getattr(op, "after_normalize", False))
        self.mix = mix
        self.pad_crop = pad_crop
        if input_normalized and (dtype != torch.float32 or self.before or pad_crop):
            raise OptionError("the engine's normalized output cannot feed pad-and-crop, "
                              "[0, 1]-pixel ops or a dtype other than float32")
        self.input_normalized = input_normalized
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.channels_last = channels_last
        self._rows: dict = {}  # image width → (scale, shift) repeated along a row (CPU)
        self._buffers = HostBuffers(limit=4)  # CPU outputs, reused once released
        # x_u8 · scale + shift == (x_u8 / 255 − mean) / std; moved once per device and dtype
        self._consts = DeviceConstants(mean=self.mean, std=self.std, scale=1 / (255 * self.std),
                                       shift=-self.mean / self.std)

    @property
    def augment(self) -> tuple:
        return self.before + self.after

    def normalize_constants(self) -> tuple[float, ...]:
        """The normalize stage as 6 floats (scale r, g, b, shift r, g, b: x_u8 · scale + shift),
        for an engine that writes normalized float32 itself (``EngineSpec.normalize``)."""
        scale, shift = self._consts.values["scale"], self._consts.values["shift"]
        return tuple(float(v) for v in (*scale.flatten(), *shift.flatten()))

    def _cpu_rows(self, images: torch.Tensor) -> bool:
        return (images.device.type == "cpu" and self.dtype == torch.float32
                and images.dtype == torch.uint8 and images.dim() == 4
                and images.is_contiguous(memory_format=torch.channels_last))

    def _normalize_rows(self, images: torch.Tensor) -> torch.Tensor:
        """The CPU normalize: channels-last uint8 N×3×H×W seen as N·H rows of W·3 values, each
        row converted into a reused float32 buffer, then scaled and shifted by W·3-long rows of
        constants. Broadcasting a 3-long channel axis kept torch's CPU kernels scalar; whole
        rows vectorise, and a reused buffer saves the page faults of a fresh one."""
        n, _, h, w = images.shape
        rows = images.permute(0, 2, 3, 1).reshape(n * h, w * 3)  # a view: channels-last
        if w not in self._rows:
            self._rows[w] = tuple(self._consts.values[k].flatten().repeat(w).float()
                                  for k in ("scale", "shift"))
        scale, shift = self._rows[w]
        out = self._buffers.get((n, h, w, 3), torch.float32)
        flat = out.view(n * h, w * 3)
        flat.copy_(rows).mul_(scale).add_(shift)
        return out.permute(0, 3, 1, 2)

    def _normalized(self, images: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        const = lambda name: self._consts.get(name, images.device, self.dtype)  # noqa: E731
        if self.input_normalized:
            return images
        if self.before:
            x = images.to(self.dtype).mul_(1 / 255)
            for op in self.before:
                x = _apply(op, x, ctx.generator)
            return x.sub_(const("mean")).div_(const("std"))
        if self._cpu_rows(images):
            return self._normalize_rows(images)
        # uint8 in, training dtype out, in one pass (type promotion inside the kernel)
        return torch.addcmul(const("shift"), images, const("scale"))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 ctx: BatchContext | torch.Generator | None, mix: bool = True
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch through the stages. ``ctx``: the batch's key (a Loader's); outside a
        Loader, the generator the ops draw from (None: the key (0, 0, 0, 0)). ``mix=False``
        skips the mix stage (the trainer turns mixing off for a run's last epochs)."""
        if not isinstance(ctx, BatchContext):
            ctx = BatchContext(0, 0, 0, 0) if ctx is None else BatchContext.of(ctx)
        if self.pad_crop is not None:
            images = self.pad_crop(images, ctx)
        targets = labels
        if self.dtype == torch.uint8:
            x = images
        else:
            x = self._normalized(images, ctx)
            for op in self.after:
                x = _apply(op, x, ctx.generator)
            if self.mix is not None and mix:
                x, targets = self.mix(x, labels, self.num_classes, ctx.generator)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        return x.contiguous(memory_format=memory_format), targets
