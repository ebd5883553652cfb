"""Per-sample augmentations of a whole batch: N×3×H×W float in [0, 1], any float dtype, CPU or
CUDA. Each op is a pair: ``draw_*`` makes every sample's parameters on the CPU from an explicit
generator (small N-sized tensors, the same draw on every device), ``apply_*`` moves them to the
batch's device in one non-blocking copy from pinned memory (``transfer.to_device``: no
host-device sync) and applies them in a few kernels, with no loop over samples. The op classes at
the bottom join the two; they are what the augment stage runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tricks.errors import OptionError
from .options_check import check_nonneg, check_prob
from .sampling import area_ratio_boxes
from .transfer import to_device

_GRAY = (0.2989, 0.587, 0.114)  # ITU-R 601 luma, as torchvision's rgb_to_grayscale


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-sample vector as N×1×1×1 on x's device and dtype (ops hand it over already on
    the device: a CPU vector here would be a blocking copy)."""
    return v.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _uniform(n: int, gen: torch.Generator, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def device_generator(gen: torch.Generator, device: torch.device) -> torch.Generator | None:
    """A generator on ``device`` seeded from the CPU generator (for per-pixel noise). The seed
    is set on the host: no device sync. ``meta`` (the tests' CUDA stand-in) has none: None."""
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    if device.type == "meta":
        return None
    g = torch.Generator(device)
    g.manual_seed(seed)
    return g


# --- colour ---------------------------------------------------------------------------------

def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def blend(x: torch.Tensor, other: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _col(f, x)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x, f):
    return (x * _col(f, x)).clamp_(0, 1)


def adjust_contrast(x, f):
    return blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f)


def adjust_saturation(x, f):
    return blend(x, grayscale(x), f)


def adjust_hue(x, shift):
    """Rotate hue by ``shift`` (fraction of a turn, in [-0.5, 0.5]) per sample, via HSV."""
    dtype = x.dtype
    x = x.float()
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)),
                    torch.zeros_like(maxc))
    h = (h + shift.to(x.device, torch.float32).view(-1, 1, 1)) % 1.0
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = i.long() % 6
    sel = lambda *c: torch.stack(c, 0).gather(0, i.unsqueeze(0))[0]  # noqa: E731
    out = torch.stack([sel(v, q, p, p, t, v), sel(t, v, v, q, p, p), sel(p, p, t, v, v, q)], 1)
    return out.clamp_(0, 1).to(dtype)


@dataclass
class JitterDraw:
    brightness: torch.Tensor   # N factors
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor          # N shifts
    order: torch.Tensor        # N×4 op ids (0 b, 1 c, 2 s, 3 h), applied left to right


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def draw_jitter(n: int, gen: torch.Generator, brightness=0.4, contrast=0.4, saturation=0.4,
                hue=0.0, random_order=False) -> JitterDraw:
    b = _uniform(n, gen, 1 - brightness, 1 + brightness)
    c = _uniform(n, gen, 1 - contrast, 1 + contrast)
    s = _uniform(n, gen, 1 - saturation, 1 + saturation)
    h = _uniform(n, gen, -hue, hue)
    order = (torch.argsort(torch.rand(n, 4, generator=gen), dim=1) if random_order
             else torch.arange(4).expand(n, 4))
    return JitterDraw(b, c, s, h, order)


def apply_jitter(x: torch.Tensor, d: JitterDraw, enabled=(True, True, True, True)) -> torch.Tensor:
    params = (d.brightness, d.contrast, d.saturation, d.hue)
    if bool((d.order == torch.arange(4)).all()):  # CPU tensors: no device sync
        params = to_device(params, x.device)
        for op in range(4):
            if enabled[op]:
                x = _JITTER_OPS[op](x, params[op])
        return x
    # per-sample order: at each position, each op on the samples that have it there. The
    # sample lists and their parameters are found on the CPU, then moved in one copy.
    plan = []
    for pos in range(4):
        for op in range(4):
            idx = torch.nonzero(d.order[:, pos] == op)[:, 0]
            if enabled[op] and len(idx):
                plan.append((op, idx, params[op][idx]))
    moved = to_device([t for _, idx, p in plan for t in (idx, p)], x.device)
    for k, (op, _, _) in enumerate(plan):
        dev_idx, p = moved[2 * k], moved[2 * k + 1]
        x = x.index_copy(0, dev_idx, _JITTER_OPS[op](x.index_select(0, dev_idx), p))
    return x


# --- PCA lighting ---------------------------------------------------------------------------

# ImageNet RGB covariance (pixels in [0, 1]), as in AlexNet and fb.resnet.torch
EIGVAL = torch.tensor([0.2175, 0.0188, 0.0045])
EIGVEC = torch.tensor([[-0.5675, 0.7192, 0.4009],
                       [-0.5808, -0.0045, -0.8140],
                       [-0.5836, -0.6948, 0.4203]])  # columns are the eigenvectors


def draw_lighting(n: int, gen: torch.Generator, std: float = 0.1) -> torch.Tensor:
    return torch.randn(n, 3, generator=gen) * std


def apply_lighting(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Add Σ_j α_j·λ_j·v_j to every pixel (not clamped: the shift is exact)."""
    rgb = (alpha * EIGVAL) @ EIGVEC.T  # N×3, on the CPU
    (rgb,) = to_device([rgb], x.device)
    return x + rgb.to(x.dtype)[:, :, None, None]


# --- occlusion ------------------------------------------------------------------------------

def _box_mask(x: torch.Tensor, y0, y1, x0, x1) -> torch.Tensor:
    """N×1×H×W bool: rows [y0, y1) and columns [x0, x1) of each sample (bounds on x's device)."""
    n, _, h, w = x.shape
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    col = lambda t: t.view(-1, 1, 1)  # noqa: E731
    r = (rows >= col(y0)) & (rows < col(y1))
    c = (cols >= col(x0)) & (cols < col(x1))
    return (r & c).unsqueeze(1)


@dataclass
class CutoutDraw:
    boxes: torch.Tensor  # N×holes×4 (y0, y1, x0, x1), clipped to the image
    applied: torch.Tensor  # N bool


def draw_cutout(n: int, h: int, w: int, gen: torch.Generator, holes=1, size=16,
                p=1.0) -> CutoutDraw:
    cy = torch.randint(0, h, (n, holes), generator=gen)
    cx = torch.randint(0, w, (n, holes), generator=gen)
    y0, x0 = cy - size // 2, cx - size // 2
    boxes = torch.stack([y0.clamp(0, h), (y0 + size).clamp(0, h),
                         x0.clamp(0, w), (x0 + size).clamp(0, w)], dim=-1)
    return CutoutDraw(boxes, torch.rand(n, generator=gen) < p)


def apply_cutout(x: torch.Tensor, d: CutoutDraw) -> torch.Tensor:
    boxes, applied = to_device([d.boxes, d.applied], x.device)
    mask = torch.zeros(x.shape[0], 1, *x.shape[2:], dtype=torch.bool, device=x.device)
    for k in range(boxes.shape[1]):  # loop over holes, not samples
        b = boxes[:, k]
        mask |= _box_mask(x, b[:, 0], b[:, 1], b[:, 2], b[:, 3])
    mask &= applied.view(-1, 1, 1, 1)
    return x.masked_fill(mask, 0)


@dataclass
class ErasingDraw:
    boxes: torch.Tensor    # N×4 (y0, y1, x0, x1); empty where nothing is erased
    applied: torch.Tensor  # N bool


def draw_erasing(n: int, h: int, w: int, gen: torch.Generator, p=0.5, area=(0.02, 0.4),
                 ratio=0.3, tries=10) -> ErasingDraw:
    """Zhong et al.'s random erasing (torchvision's get_params, vectorised): area fraction in
    ``area``, aspect in [ratio, 1/ratio] log-uniform, up to ``tries`` tries to fit."""
    hs, ws = torch.full((n,), h), torch.full((n,), w)
    u = torch.rand(n, tries, 4, generator=gen, dtype=torch.float64)
    x0, y0, bw, bh, found = area_ratio_boxes(hs, ws, u, area, (ratio, 1 / ratio), strict=True)
    applied = (torch.rand(n, generator=gen) < p) & found
    boxes = torch.stack([y0, y0 + bh, x0, x0 + bw], dim=1).long()
    boxes[~applied] = 0
    return ErasingDraw(boxes, applied)


def apply_erasing(x: torch.Tensor, d: ErasingDraw, fill: str = "random",
                  gen: torch.Generator | None = None) -> torch.Tensor:
    """Fill each sample's drawn box: "random" (uniform noise from ``gen``) or "zero"."""
    (boxes,) = to_device([d.boxes], x.device)
    mask = _box_mask(x, boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
    if fill == "random":
        g = device_generator(gen, x.device) if gen is not None else None
        values = torch.empty_like(x).uniform_(generator=g)
    elif fill == "zero":
        values = torch.zeros((), device=x.device, dtype=x.dtype)
    else:
        raise OptionError(f"erasing fill must be random or zero, got {fill!r}")
    return torch.where(mask, values, x)


# --- the ops the augment stage runs ---------------------------------------------------------

def keep_layout(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out`` in ``x``'s memory format (ops built from stacks and masks fall back to NCHW)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return out.contiguous(memory_format=torch.channels_last)
    return out


class ColorJitter:
    def __init__(self, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0,
                 random_order=False):
        for name, v in (("brightness", brightness), ("contrast", contrast),
                        ("saturation", saturation)):
            if not 0 <= v <= 1:
                raise OptionError(f"jitter {name} must be in [0, 1], got {v}")
        if not 0 <= hue <= 0.5:
            raise OptionError(f"jitter hue must be in [0, 0.5], got {hue}")
        self.kw = dict(brightness=brightness, contrast=contrast, saturation=saturation,
                       hue=hue, random_order=random_order)
        self.enabled = (brightness > 0, contrast > 0, saturation > 0, hue > 0)

    def __call__(self, x, gen):
        return keep_layout(x, apply_jitter(x, draw_jitter(len(x), gen, **self.kw),
                                           self.enabled))


class Lighting:
    def __init__(self, std=0.1):
        self.std = check_nonneg("lighting std", std)

    def __call__(self, x, gen):
        return apply_lighting(x, draw_lighting(len(x), gen, self.std))


class Cutout:
    """Cutout (DeVries & Taylor 2017, arXiv:1708.04552): ``holes`` squares of side ``size``
    pixels, centres uniform over the image, clipped at the border (a hole near the edge is
    partly outside; never refused), each sample with probability ``p``. It runs after
    normalization (``after_normalize``), as the authors' code does, so a hole is 0: the
    dataset mean, not black."""
    after_normalize = True

    def __init__(self, holes=1, size=16, p=1.0):
        if holes < 1 or size < 1:
            raise OptionError(f"cutout needs ≥ 1 hole of side ≥ 1, got {holes} of {size}")
        self.holes, self.size, self.p = holes, size, check_prob("cutout p", p)

    def __call__(self, x, gen):
        h, w = x.shape[2:]
        d = draw_cutout(len(x), h, w, gen, self.holes, self.size, self.p)
        return keep_layout(x, apply_cutout(x, d))


class RandomErasing:
    """Random erasing (Zhong et al. 2020; torchvision's ``RandomErasing``): with probability
    ``p`` a box of area fraction in ``area`` and aspect ratio in [``ratio``, 1/``ratio``]
    (log-uniform, up to 10 tries) is filled with ``fill``: "random" (uniform noise in [0, 1]),
    "zero" (black) or "mean" (the dataset mean: the op then runs after normalization, as cutout,
    and fills 0, which is the Loader's own mean, whatever ``Output(mean)`` says)."""

    def __init__(self, p=0.5, area=(0.02, 0.4), ratio=0.3, fill="random"):
        self.p = check_prob("erasing p", p)
        if not (0 < area[0] <= area[1] < 1):
            raise OptionError(f"erasing area must satisfy 0 < sl ≤ sh < 1, got {list(area)}")
        if not 0 < ratio <= 1:
            raise OptionError(f"erasing ratio r1 must be in (0, 1], got {ratio}")
        if fill not in ("random", "mean", "zero"):
            raise OptionError(f"erasing fill must be random, mean or zero, got {fill!r}")
        self.area, self.ratio, self.fill = tuple(area), ratio, fill
        self.after_normalize = fill == "mean"

    def __call__(self, x, gen):
        h, w = x.shape[2:]
        d = draw_erasing(len(x), h, w, gen, self.p, self.area, self.ratio)
        # after normalization the mean is 0
        fill = "zero" if self.fill == "mean" else self.fill
        return keep_layout(x, apply_erasing(x, d, fill, gen=gen))


class RandomGrayscale:
    """torchvision's ``RandomGrayscale(p)``: each sample, with probability ``p``, becomes its
    ITU-R 601 luma (0.2989 R + 0.587 G + 0.114 B) in all three channels."""

    def __init__(self, p: float = 0.1):
        self.p = check_prob("grayscale p", p)

    def __call__(self, x, gen):
        (pick,) = to_device([torch.rand(len(x), generator=gen) < self.p], x.device)
        return keep_layout(x, torch.where(pick.view(-1, 1, 1, 1), grayscale(x).expand_as(x), x))


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """N×size normalised 1-D Gaussian kernels, one per σ (torchvision's
    ``_get_gaussian_kernel1d``: taps at −(size−1)/2 … (size−1)/2)."""
    half = (size - 1) * 0.5
    t = torch.linspace(-half, half, size, dtype=sigma.dtype, device=sigma.device)
    pdf = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)
    return pdf / pdf.sum(1, keepdim=True)


class GaussianBlur:
    """torchvision's ``GaussianBlur(kernel_size, sigma)``: σ uniform in ``sigma`` per sample, a
    ``kernel_size``² Gaussian with reflected borders; here applied to each sample with
    probability ``p`` (``RandomApply``'s role; SimCLR blurs half the images). Done as two 1-D
    passes with a kernel per sample (one grouped convolution each), which equals torchvision's
    2-D kernel (the outer product of the two) up to float rounding."""

    def __init__(self, kernel_size: int = 9, sigma: tuple[float, float] = (0.1, 2.0),
                 p: float = 1.0):
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise OptionError(f"blur kernel_size must be an odd integer ≥ 1, got {kernel_size!r}")
        if not 0 < sigma[0] <= sigma[1]:
            raise OptionError(f"blur sigma must satisfy 0 < min ≤ max, got {list(sigma)}")
        self.size, self.sigma, self.p = kernel_size, tuple(sigma), check_prob("blur p", p)

    def __call__(self, x, gen):
        n, c, h, w = x.shape
        r = self.size // 2
        if r >= min(h, w):
            raise OptionError(f"blur kernel_size {self.size} needs images larger than "
                              f"{r}×{r} (reflected borders), got {h}×{w}")
        sigma = _uniform(n, gen, *self.sigma).float()
        applied = torch.rand(n, generator=gen) < self.p
        k, applied = to_device([gaussian_kernels(sigma, self.size), applied], x.device)
        k = k.to(torch.float32).repeat_interleave(c, 0)  # (N·C) × size
        xf = F.pad(x.float().reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
        xf = F.conv2d(xf, k.view(n * c, 1, 1, self.size), groups=n * c)
        xf = F.conv2d(xf, k.view(n * c, 1, self.size, 1), groups=n * c)
        out = xf.view(n, c, h, w).to(x.dtype)
        return keep_layout(x, torch.where(applied.view(-1, 1, 1, 1), out, x))


class PerSample:
    """A per-sample transform run as a batch op: ``PerSample(T.RandomRotation(15))``.

    ``transform`` takes one image (float 3×H×W in [0, 1], on the Loader's device) and returns
    one of the same shape and dtype: torchvision's transforms (v1 and v2) on tensors, or any
    such function. Each image gets its own draw: torch's, Python's and NumPy's global
    generators are seeded per image from the batch's keyed generator (and restored after), so
    the draws, like every op's, depend only on (seed, epoch, batch, rank): a resumed run and
    another device draw the same. A Python loop over the images: use it for what has no batch
    op (``tricks.pipeline.augment``, ``.autoaugment`` have the common ones).

    Raises ``OptionError`` (naming the transform) when it returns another shape or type.
    """

    def __init__(self, transform, after_normalize: bool = False):
        if not callable(transform):
            raise OptionError(f"PerSample({transform!r}): not callable")
        self.transform = transform
        self.after_normalize = after_normalize

    def __repr__(self) -> str:
        return f"PerSample({self.transform!r})"

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        import random

        import numpy as np
        seeds = torch.randint(0, 2**62, (len(x),), generator=gen).tolist()
        devices = [x.device] if x.device.type == "cuda" else []
        py, npy = random.getstate(), np.random.get_state()
        out = torch.empty_like(x)
        try:
            with torch.random.fork_rng(devices=devices):
                for k, seed in enumerate(seeds):
                    torch.manual_seed(seed)
                    random.seed(seed)
                    np.random.seed(seed % 2**32)
                    y = self.transform(x[k])
                    if not isinstance(y, torch.Tensor) or y.shape != x[k].shape:
                        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                        raise OptionError(f"PerSample({self.transform!r}) returned {got} for "
                                          f"a {tuple(x[k].shape)} image; it must return a "
                                          "tensor of the same shape")
                    out[k] = y
        finally:
            random.setstate(py)
            np.random.set_state(npy)
        return out
