"""AutoAugment (Cubuk et al. 2018), RandAugment (Cubuk et al. 2020) and TrivialAugment Wide
(Müller & Hutter 2021), on a batch, each sample with its own draw.

The policy table and magnitude bins are torchvision's (``AutoAugment._get_policies``,
``_augmentation_space``). What is ours is running it on a batch: each op is implemented once
for a sub-batch with per-sample magnitudes, and each of the two slots of a sub-policy runs every
op kind once over the samples that drew it (≤ 10 kernels groups per slot, no loop over samples).
Images are float in [0, 1]; ops defined on 8-bit levels (posterize, equalize, solarize) work on
the 256 levels of ``round(x·255)``. Geometric ops use nearest sampling and fill with 0, as
torchvision's AutoAugment does by default.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms.autoaugment import AutoAugment, AutoAugmentPolicy

from .augment import adjust_brightness, adjust_contrast, adjust_saturation, blend, keep_layout
from tricks.errors import OptionError
from .transfer import to_device

_BINS = 10


def _policy(name: str):
    try:
        policy = AutoAugmentPolicy(name)
    except ValueError:
        raise OptionError(f"unknown AutoAugment policy {name!r}; choose "
                          f"{', '.join(p.value for p in AutoAugmentPolicy)}") from None
    return AutoAugment(policy)._get_policies(policy)


# --- ops on a sub-batch, m: per-sample magnitudes (float tensor on the device) ---------------

def _affine(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Inverse-map output pixels through per-sample 2×3 ``theta`` (pixel units, origin at the
    image centre), nearest sampling, zero fill: torchvision's tensor affine, batched."""
    n, _, h, w = x.shape
    ys = torch.arange(h, device=x.device, dtype=torch.float32) - h / 2 + 0.5
    xs = torch.arange(w, device=x.device, dtype=torch.float32) - w / 2 + 0.5
    base = torch.stack([xs.view(1, w).expand(h, w), ys.view(h, 1).expand(h, w),
                        torch.ones(h, w, device=x.device)], dim=-1).view(1, h * w, 3)
    grid = base.expand(n, -1, -1).bmm(theta.float().transpose(1, 2))
    grid = torch.stack([grid[..., 0] / (0.5 * w), grid[..., 1] / (0.5 * h)], dim=-1)
    out = F.grid_sample(x.float(), grid.view(n, h, w, 2), mode="nearest", padding_mode="zeros",
                        align_corners=False)
    return out.to(x.dtype)


def rotate(x, degrees):
    r = torch.deg2rad(-degrees.float())  # torchvision's rotate inverts the angle
    cos, sin, zero = torch.cos(r), torch.sin(r), torch.zeros_like(r)
    theta = torch.stack([torch.stack([cos, sin, zero], -1),
                         torch.stack([-sin, cos, zero], -1)], 1)
    return _affine(x, theta)


def shear_x(x, m):
    # torchvision: affine(shear=(degrees(atan(m)), 0), center=(0, 0)); inverse map x' = x + m·y
    h = x.shape[2]
    one, zero, m = torch.ones_like(m).float(), torch.zeros_like(m).float(), m.float()
    theta = torch.stack([torch.stack([one, m, m * h / 2], -1),
                         torch.stack([zero, one, zero], -1)], 1)
    return _affine(x, theta)


def shear_y(x, m):
    # torchvision: affine(shear=(0, degrees(atan(m))), center=(0, 0)); inverse map y' = y + m·x
    w = x.shape[3]
    one, zero, m = torch.ones_like(m).float(), torch.zeros_like(m).float(), m.float()
    theta = torch.stack([torch.stack([one, zero, zero], -1),
                         torch.stack([m, one, m * w / 2], -1)], 1)
    return _affine(x, theta)


def _translate(x, dx, dy):
    """Shift by whole pixels (torchvision's ``affine(translate=[int(m), …])``: truncated)."""
    one, zero = torch.ones_like(dx).float(), torch.zeros_like(dx).float()
    theta = torch.stack([torch.stack([one, zero, -dx.trunc().float()], -1),
                         torch.stack([zero, one, -dy.trunc().float()], -1)], 1)
    return _affine(x, theta)


def translate_x(x, pixels):
    return _translate(x, pixels, torch.zeros_like(pixels))


def translate_y(x, pixels):
    return _translate(x, torch.zeros_like(pixels), pixels)


def identity(x, _=None):
    return x


def _levels(x):
    return torch.round(x.float() * 255).clamp_(0, 255)


def posterize(x, bits):
    keep = (2 ** (8 - bits.long())).view(-1, 1, 1, 1).to(x.device)
    return (torch.div(_levels(x).long(), keep, rounding_mode="floor") * keep / 255).to(x.dtype)


def solarize(x, threshold):
    t = threshold.view(-1, 1, 1, 1).to(x.device, x.dtype)
    return torch.where(x >= t, 1 - x, x)


def invert(x, _=None):
    return 1 - x


def autocontrast(x, _=None):
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    flat = hi == lo
    scale = torch.where(flat, torch.ones_like(hi), 1 / torch.where(flat, torch.ones_like(hi),
                                                                   hi - lo))
    lo = torch.where(flat, torch.zeros_like(lo), lo)
    return ((x - lo) * scale).clamp_(0, 1)


def equalize(x, _=None):
    """Per-channel histogram equalisation on 256 levels (PIL's / torchvision's algorithm)."""
    n, c, h, w = x.shape
    lv = _levels(x).long().view(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(
        1, lv, torch.ones_like(lv, dtype=torch.float32))
    # step = (pixels − count of the last non-empty level) // 255
    last = 255 - torch.argmax((hist.flip(1) > 0).int(), dim=1)
    step = torch.div(h * w - hist.gather(1, last[:, None])[:, 0], 255, rounding_mode="floor")
    safe = torch.where(step > 0, step, torch.ones_like(step))[:, None]
    lut = torch.div(torch.cumsum(hist, 1) + torch.div(safe, 2, rounding_mode="floor"), safe,
                    rounding_mode="floor")
    lut = F.pad(lut, (1, 0))[:, :-1].clamp_(0, 255)
    out = lut.gather(1, lv)
    out = torch.where((step > 0)[:, None], out, lv.float())
    return (out.view(n, c, h, w) / 255).to(x.dtype)


def sharpness(x, f):
    """Blend with the 3×3 smoothing filter [[1,1,1],[1,5,1],[1,1,1]]/13 (borders kept).
    Images with a side ≤ 2 have no interior to smooth: returned unchanged, as torchvision's
    ``adjust_sharpness``."""
    if x.shape[-1] <= 2 or x.shape[-2] <= 2:
        return x
    k = torch.ones(3, 3, device=x.device)
    k[1, 1] = 5
    k = (k / k.sum()).expand(3, 1, 3, 3)
    xf = x.float()
    blurred = F.conv2d(xf, k, groups=3)
    degenerate = xf.clone()
    degenerate[:, :, 1:-1, 1:-1] = blurred
    return blend(xf, degenerate, f).to(x.dtype)


# op name → (function, magnitude of bin b, signed)
OPS = {
    "ShearX": (shear_x, lambda b: 0.3 * b / (_BINS - 1), True),
    "Rotate": (rotate, lambda b: 30.0 * b / (_BINS - 1), True),
    "Color": (lambda x, m: adjust_saturation(x, 1 + m), lambda b: 0.9 * b / (_BINS - 1), True),
    "Contrast": (lambda x, m: adjust_contrast(x, 1 + m), lambda b: 0.9 * b / (_BINS - 1), True),
    "Brightness": (lambda x, m: adjust_brightness(x, 1 + m), lambda b: 0.9 * b / (_BINS - 1),
                   True),
    "Sharpness": (lambda x, m: sharpness(x, 1 + m), lambda b: 0.9 * b / (_BINS - 1), True),
    "Posterize": (posterize, lambda b: 8 - round(b / ((_BINS - 1) / 4)), False),
    "Solarize": (solarize, lambda b: 1.0 - b / (_BINS - 1), False),
    "AutoContrast": (autocontrast, lambda b: 0.0, False),
    "Equalize": (equalize, lambda b: 0.0, False),
    "Invert": (invert, lambda b: 0.0, False),
}

# the functions by torchvision's op names (RandAugment's and TrivialAugment's spaces)
FUNCTIONS = {name: fn for name, (fn, _, _) in OPS.items()} | {
    "ShearY": shear_y, "TranslateX": translate_x, "TranslateY": translate_y, "Identity": identity}


@dataclass
class AutoAugmentDraw:
    sub_policy: torch.Tensor  # N
    applied: torch.Tensor     # N×2 bool
    sign: torch.Tensor        # N×2, ±1


class BatchAutoAugment:
    def __init__(self, policy: str = "imagenet"):
        self.policy = _policy(policy)
        for sub in self.policy:
            for name, _, _ in sub:
                if name not in OPS:
                    raise OptionError(f"AutoAugment policy {policy!r} uses {name}, which "
                                      "the batched implementation does not have")
        # per (sub-policy, slot): probability, op id, magnitude, signed — tables, so a batch's
        # draw is resolved with gathers rather than a loop over samples
        self.names = list(OPS)
        self.probs = torch.tensor([[p for _, p, _ in sub] for sub in self.policy])
        self.op_ids = torch.tensor([[self.names.index(n) for n, _, _ in sub]
                                    for sub in self.policy])
        self.mags = torch.tensor([[float(OPS[n][1](b or 0)) for n, _, b in sub]
                                  for sub in self.policy], dtype=torch.float64)
        self.signed = torch.tensor([[OPS[n][2] for n, _, _ in sub] for sub in self.policy])

    def draw(self, n: int, gen: torch.Generator) -> AutoAugmentDraw:
        sub = torch.randint(0, len(self.policy), (n,), generator=gen)
        applied = torch.rand(n, 2, generator=gen) < self.probs[sub]
        sign = torch.where(torch.rand(n, 2, generator=gen) < 0.5, -1.0, 1.0)
        return AutoAugmentDraw(sub, applied, sign)

    def resolve(self, d: AutoAugmentDraw, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's op id and signed magnitude in ``slot``, as torchvision computes them."""
        ops = self.op_ids[d.sub_policy, slot]
        mags = self.mags[d.sub_policy, slot]
        mags = torch.where(self.signed[d.sub_policy, slot], mags * d.sign[:, slot].double(), mags)
        return ops, mags

    def apply(self, x: torch.Tensor, d: AutoAugmentDraw) -> torch.Tensor:
        # which samples run which op in each slot, found on the CPU; every sample list and
        # magnitude then reaches the device in one copy
        plan = []
        for slot in range(2):
            ops, mags = self.resolve(d, slot)
            for k, name in enumerate(self.names):  # each op kind once, on its samples
                idx = torch.nonzero((ops == k) & d.applied[:, slot])[:, 0]
                if len(idx):
                    plan.append((name, idx, mags[idx]))
        moved = to_device([t for _, idx, m in plan for t in (idx, m)], x.device)
        for j, (name, _, _) in enumerate(plan):
            dev_idx, m = moved[2 * j], moved[2 * j + 1]
            sub = OPS[name][0](x.index_select(0, dev_idx), m)
            x = x.index_copy(0, dev_idx, sub.to(x.dtype))
        return x

    def __call__(self, x, gen):
        return keep_layout(x, self.apply(x, self.draw(len(x), gen)))


# --- RandAugment and TrivialAugment Wide --------------------------------------------------------

def _space(kind: str, bins: int, h: int, w: int) -> list[tuple[str, torch.Tensor | None, bool]]:
    """torchvision's augmentation spaces (``RandAugment._augmentation_space``,
    ``TrivialAugmentWide._augmentation_space``) in our units: [0, 1] pixels (solarize's
    threshold / 255), pixels for translations. (name, magnitude per bin or None, signed)."""
    lin = lambda hi: torch.linspace(0.0, hi, bins, dtype=torch.float64)  # noqa: E731
    wide = kind == "trivialaugment"
    return [
        ("Identity", None, False),
        ("ShearX", lin(0.99 if wide else 0.3), True),
        ("ShearY", lin(0.99 if wide else 0.3), True),
        ("TranslateX", lin(32.0 if wide else 150.0 / 331.0 * w), True),
        ("TranslateY", lin(32.0 if wide else 150.0 / 331.0 * h), True),
        ("Rotate", lin(135.0 if wide else 30.0), True),
        ("Brightness", lin(0.99 if wide else 0.9), True),
        ("Color", lin(0.99 if wide else 0.9), True),
        ("Contrast", lin(0.99 if wide else 0.9), True),
        ("Sharpness", lin(0.99 if wide else 0.9), True),
        ("Posterize", (8 - (torch.arange(bins) / ((bins - 1) / (6 if wide else 4))).round()
                       ).double(), False),
        ("Solarize", torch.linspace(255.0, 0.0, bins, dtype=torch.float64) / 255, False),
        ("AutoContrast", None, False),
        ("Equalize", None, False),
    ]


class _RandomOps:
    """``slots`` ops in sequence, each sample drawing its own op (uniform over the space), bin
    and sign; each op kind then runs once per slot over the samples that drew it."""
    kind = ""

    def __init__(self, slots: int, bins: int):
        if not isinstance(bins, int) or bins < 2:
            raise OptionError(f"{self.kind}: num_magnitude_bins must be an integer ≥ 2, "
                              f"got {bins!r}")
        self.slots, self.bins = slots, bins

    def _bins(self, n: int, gen: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def draw(self, n: int, h: int, w: int, gen: torch.Generator):
        """Per slot: each sample's op index (N) and signed magnitude (N, float64)."""
        space = _space(self.kind, self.bins, h, w)
        table = torch.stack([m if m is not None else torch.zeros(self.bins, dtype=torch.float64)
                             for _, m, _ in space])            # ops × bins
        signed = torch.tensor([s for _, _, s in space])
        out = []
        for _ in range(self.slots):
            op = torch.randint(0, len(space), (n,), generator=gen)
            b = self._bins(n, gen)
            flip = torch.rand(n, generator=gen) < 0.5
            mag = table[op, b]
            out.append((op, torch.where(signed[op] & flip, -mag, mag)))
        return [name for name, _, _ in space], out

    def apply(self, x: torch.Tensor, names: list[str], draws) -> torch.Tensor:
        plan = []
        for op, mag in draws:
            for k, name in enumerate(names):
                idx = torch.nonzero(op == k)[:, 0]
                if len(idx) and name != "Identity":
                    plan.append((name, idx, mag[idx]))
        moved = to_device([t for _, idx, m in plan for t in (idx, m)], x.device)
        for j, (name, _, _) in enumerate(plan):  # slot by slot, in order
            dev_idx, m = moved[2 * j], moved[2 * j + 1]
            sub = FUNCTIONS[name](x.index_select(0, dev_idx), m)
            x = x.index_copy(0, dev_idx, sub.to(x.dtype))
        return x

    def __call__(self, x, gen):
        names, draws = self.draw(len(x), x.shape[2], x.shape[3], gen)
        return keep_layout(x, self.apply(x, names, draws))


class BatchRandAugment(_RandomOps):
    """RandAugment (Cubuk et al. 2020) as torchvision's ``RandAugment(num_ops, magnitude,
    num_magnitude_bins)`` defines it (nearest sampling, fill 0): ``num_ops`` ops in sequence,
    each uniform over 14 (identity included), at bin ``magnitude`` of the op's range, negated
    with probability ½ where signed. Each sample draws its own ops and signs."""
    kind = "randaugment"

    def __init__(self, num_ops: int = 2, magnitude: int = 9, num_magnitude_bins: int = 31):
        super().__init__(num_ops, num_magnitude_bins)
        if not isinstance(num_ops, int) or num_ops < 1:
            raise OptionError(f"randaugment: num_ops must be an integer ≥ 1, got {num_ops!r}")
        if not isinstance(magnitude, int) or not 0 <= magnitude < num_magnitude_bins:
            raise OptionError(f"randaugment: magnitude must be a bin 0..{num_magnitude_bins - 1}"
                              f", got {magnitude!r}")
        self.magnitude = magnitude

    def _bins(self, n, gen):
        return torch.full((n,), self.magnitude, dtype=torch.long)


class BatchTrivialAugmentWide(_RandomOps):
    """TrivialAugment Wide (Müller & Hutter 2021) as torchvision's ``TrivialAugmentWide``
    defines it (nearest sampling, fill 0): one op per sample, uniform over 14, at a uniform bin
    of its wide range, negated with probability ½ where signed."""
    kind = "trivialaugment"

    def __init__(self, num_magnitude_bins: int = 31):
        super().__init__(1, num_magnitude_bins)

    def _bins(self, n, gen):
        return torch.randint(0, self.bins, (n,), generator=gen)
