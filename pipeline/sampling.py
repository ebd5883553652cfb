"""Epoch order, sharding and crop parameters, all keyed by (seed, epoch, global batch).

Every random draw for global batch ``b`` of epoch ``e`` comes from one generator seeded by
(seed, e, b), drawn for the whole global batch and then sliced by rank: the same global batch
comes out whatever the number of ranks, and resuming at batch ``b`` needs no replay.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import torch

from .translate import draw_shifts

_ATTEMPTS = 10  # RandomResizedCrop's tries before its centre-crop fallback (as torchvision)


# torch's CPU generator state (the legacy THGeneratorState layout that ``get_state`` and
# ``set_state`` exchange, unchanged since torch 1.0): initial seed u64, left i32, seeded i32,
# next u64, then the 624 Mersenne-Twister words, each stored in a u64.
_MT_WORDS = 624
_MT_OFFSET = 24
_TEMPLATE = torch.Generator().manual_seed(0).get_state().numpy().copy()


def keyed_generator(*key: int | str) -> torch.Generator:
    """A CPU ``torch.Generator`` whose whole Mersenne-Twister state (624 × 32 bits) is a stable
    hash (SHAKE-256, not Python's salted ``hash``) of ``key``: ints and strs, e.g.
    ``(seed, epoch, batch, "ops")``.

    Not ``manual_seed(hash)``: torch's CPU generator keeps only the low 32 bits of a seed
    (``mt19937``'s seeding), so a million-batch run would see seed collisions (two batches
    drawing the same crops) with probability near 1; with the whole state hashed, distinct keys
    give distinct streams. ``initial_seed()`` returns the key's 63-bit hash, for logging.
    """
    words = hashlib.shake_256(repr(key).encode()).digest(4 * (_MT_WORDS + 2))
    state = _TEMPLATE.copy()
    state[:8] = np.frombuffer(words[-8:], np.uint8)
    state[7] &= 0x7F                            # a 63-bit initial seed, as manual_seed takes
    mt = np.frombuffer(words[:4 * _MT_WORDS], np.uint32).astype(np.uint64)
    state[_MT_OFFSET:_MT_OFFSET + 8 * _MT_WORDS] = mt.view(np.uint8)
    gen = torch.Generator()
    gen.set_state(torch.from_numpy(state))
    return gen


@dataclass(frozen=True)
class BatchTask:
    """One rank's share of one global batch: what an engine needs to produce it."""
    epoch: int
    batch: int                 # global batch number within the epoch
    indices: np.ndarray        # record indices, int64
    boxes: np.ndarray          # N×4 float32 crop boxes (x0, y0, x1, y1) in source pixels
    flips: np.ndarray          # N bool
    size: int                  # output side


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=keyed_generator(seed, epoch, "order"))


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def area_ratio_boxes(heights: torch.Tensor, widths: torch.Tensor, u: torch.Tensor,
                     scale: tuple[float, float], ratio: tuple[float, float],
                     strict: bool = False) -> tuple[torch.Tensor, ...]:
    """Boxes of area ``scale``·H·W and log-uniform aspect ``ratio`` (w/h), from uniforms ``u``
    (N × tries × 4): the first try that fits wins. Returns x0, y0, w, h (float64) and a mask
    of samples where some try fitted. ``strict``: the box must be smaller than the image
    (random erasing) rather than no larger (random-resized crop)."""
    h_img = heights.double()[:, None]
    w_img = widths.double()[:, None]
    area = h_img * w_img * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[..., 1]
    aspect = torch.exp(log_r)
    w = torch.round(torch.sqrt(area * aspect))
    h = torch.round(torch.sqrt(area / aspect))
    ok = (w > 0) & (h > 0) & ((w < w_img) & (h < h_img) if strict else
                              (w <= w_img) & (h <= h_img))
    first = torch.argmax(ok.int(), dim=1, keepdim=True)  # first fitting try (0 if none)
    pick = lambda t: t.gather(1, first)[:, 0]  # noqa: E731
    w, h, uy, ux = pick(w), pick(h), pick(u[..., 2]), pick(u[..., 3])
    y0 = torch.floor(uy * (heights - h + 1))
    x0 = torch.floor(ux * (widths - w + 1))
    return x0, y0, w, h, ok.any(dim=1)


def random_resized_boxes(heights: torch.Tensor, widths: torch.Tensor, gen: torch.Generator,
                         scale: tuple[float, float], ratio: tuple[float, float]) -> torch.Tensor:
    """Vectorised RandomResizedCrop: up to 10 tries per sample, the first that fits wins, else
    the centre crop with the ratio clamped (torchvision's algorithm, one batch at a time)."""
    u = torch.rand(len(heights), _ATTEMPTS, 4, generator=gen, dtype=torch.float64)
    x0, y0, w, h, found = area_ratio_boxes(heights, widths, u, scale, ratio)
    # fallback: whole image, with the aspect ratio clamped into range, centred
    img_ratio = widths.double() / heights.double()
    fw = torch.where(img_ratio < ratio[0], widths.double(),
                     torch.where(img_ratio > ratio[1], torch.round(heights * ratio[1]),
                                 widths.double()))
    fh = torch.where(img_ratio < ratio[0], torch.round(widths / ratio[0]),
                     heights.double())
    fallback = ~found
    w = torch.where(fallback, fw, w)
    h = torch.where(fallback, fh, h)
    y0 = torch.where(fallback, torch.floor((heights - h) / 2), y0)
    x0 = torch.where(fallback, torch.floor((widths - w) / 2), x0)
    return torch.stack([x0, y0, x0 + w, y0 + h], dim=1).float()


def center_boxes(heights: torch.Tensor, widths: torch.Tensor, crop_ratio: float) -> torch.Tensor:
    """Validation: the square that "resize the shorter side to size/crop_ratio, then centre-crop
    size" would keep, in source pixels."""
    side = torch.minimum(heights, widths).double() * crop_ratio
    y0 = (heights - side) / 2
    x0 = (widths - side) / 2
    return torch.stack([x0, y0, x0 + side, y0 + side], dim=1).float()


@dataclass
class EpochPlan:
    """Which records each batch of an epoch holds, for one rank, and their crops.

    Two ways to cut an epoch over ``world_size`` ranks, both with every rank yielding the same
    number of batches (``len``), and each record at most once (exactly once without
    ``drop_last``):

    - global batches (``drop_last``, or one rank): batch b is records
      ``order[b·B:(b+1)·B]`` (B the global ``batch_size``), cut into ``world_size`` consecutive
      shares; its crops are drawn for the whole global batch, so a batch is the same whatever
      the number of ranks;
    - shards (no ``drop_last``, several ranks: evaluation): the order is cut into
      ``world_size`` consecutive shards (sizes differ by at most one) and each shard into
      ``len`` batches of at most B / world_size records, the last ones smaller where a shard is
      short, so that every rank yields ``len`` batches (DistributedSampler instead repeats
      records to even the shards; here nothing is counted twice). Only when a shard has fewer
      records than ``len`` (a per-rank batch of 1, or fewer records than ranks) does a rank's
      last batch hold none.
    """
    n: int
    batch_size: int               # global
    seed: int
    train: bool                   # random-resized crops and flips; else centre crops
    drop_last: bool
    shuffle: bool
    rank: int = 0
    world_size: int = 1
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    crop_ratio: float = 0.875
    flip: bool = True             # with ``train``: flip horizontally with probability ½

    def __post_init__(self):
        if self.batch_size % self.world_size:
            raise ValueError(f"the global batch ({self.batch_size}) must divide evenly by the "
                             f"world size ({self.world_size})")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world size {self.world_size}")

    @property
    def sharded(self) -> bool:
        return self.world_size > 1 and not self.drop_last

    def __len__(self) -> int:
        if self.sharded:
            per_rank = self.batch_size // self.world_size
            return math.ceil(math.ceil(self.n / self.world_size) / per_rank)
        return num_batches(self.n, self.batch_size, self.drop_last)

    def _shard_batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        """This rank's shard of ``order`` cut into ``len(self)`` batches (see the class)."""
        share = torch.tensor_split(order, self.world_size)[self.rank]
        per_rank, slots, left = self.batch_size // self.world_size, len(self), len(share)
        sizes = []
        for k in range(slots):
            after = slots - 1 - k  # batches still to fill after this one
            take = min(per_rank, left - after) if left > after else min(1, left)
            sizes.append(take)
            left -= take
        return list(torch.split(share, sizes))

    def tasks(self, epoch: int, heights: np.ndarray, widths: np.ndarray, size: int,
              start: int = 0):
        """Yield this rank's BatchTask for batches ``start..len-1`` of ``epoch`` (a task may
        hold no record: see the class)."""
        order = epoch_order(self.n, self.seed, epoch, self.shuffle)
        shards = self._shard_batches(order) if self.sharded else None
        for b in range(start, len(self)):
            if shards is not None:
                glob = shards[b]
                key = (self.seed, epoch, b, "shard", self.rank, self.world_size)
            else:
                glob = order[b * self.batch_size:(b + 1) * self.batch_size]
                key = (self.seed, epoch, b)
            h = torch.from_numpy(heights[glob.numpy()].astype(np.int64))
            w = torch.from_numpy(widths[glob.numpy()].astype(np.int64))
            if self.train:
                gen = keyed_generator(*key)
                boxes = random_resized_boxes(h, w, gen, self.scale, self.ratio)
                flips = torch.rand(len(glob), generator=gen) < 0.5
                if not self.flip:
                    flips[:] = False
            else:
                boxes = center_boxes(h, w, self.crop_ratio)
                flips = torch.zeros(len(glob), dtype=torch.bool)
            if shards is None:
                mine = torch.tensor_split(torch.arange(len(glob)), self.world_size)[self.rank]
                glob, boxes, flips = glob[mine], boxes[mine], flips[mine]
            yield BatchTask(epoch, b, glob.numpy(), boxes.numpy(), flips.numpy(), size)

    def shifts(self, epoch: int, batch: int, pad: int) -> torch.Tensor:
        """This rank's pad-and-crop shifts (N×2 int64 dx, dy, uniform in −pad..pad) for batch
        ``batch`` of ``epoch``: for global batches, drawn for the whole batch from its own key,
        then sliced by rank like the crops, so they do not depend on the number of ranks."""
        if self.sharded:
            n = len(self._shard_batches(torch.arange(self.n))[batch])
            return draw_shifts(n, pad, keyed_generator(self.seed, epoch, batch, "translate",
                                                       self.rank, self.world_size))
        n = min(self.batch_size, self.n - batch * self.batch_size)
        s = draw_shifts(n, pad, keyed_generator(self.seed, epoch, batch, "translate"))
        return s[torch.tensor_split(torch.arange(n), self.world_size)[self.rank]]
