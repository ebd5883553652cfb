"""Each augment op against a reference: torchvision's functional op per sample with the same
drawn parameters, or the op's defining property on images built to show it; and each op's
random draw against its definition (last section): a statistic with a tolerance that a
plausible mistake (square boxes, a uniform instead of log-uniform ratio, a range off by one, a
factor range not centred on 1) falls outside."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from torchvision.transforms import RandomErasing as TVRandomErasing

from conftest import cuda
from tricks.pipeline.augment import (EIGVAL, EIGVEC, ColorJitter, Cutout, ErasingDraw,
                                     GaussianBlur, Lighting, RandomErasing, RandomGrayscale,
                                     adjust_hue, apply_cutout, apply_erasing, apply_jitter,
                                     apply_lighting, draw_cutout, draw_erasing, draw_jitter,
                                     draw_lighting)
from tricks.pipeline.autoaugment import (BatchAutoAugment, BatchRandAugment,
                                         BatchTrivialAugmentWide)
from tricks.errors import OptionError
from tricks.pipeline.sampling import keyed_generator


def _images(n=16, h=24, w=20, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, h, w, generator=g)
    return x.to(dtype).contiguous(memory_format=torch.channels_last)


def _gen(*key):
    return keyed_generator("test", *key)


# --- colour jitter ------------------------------------------------------------------------

@pytest.mark.parametrize("random_order", [False, True])
def test_jitter_matches_torchvision_per_sample(random_order):
    x = _images()
    d = draw_jitter(len(x), _gen(1), 0.4, 0.4, 0.4, 0.1, random_order)
    ours = apply_jitter(x, d)
    tv_ops = [lambda im, f: TF.adjust_brightness(im, float(f)),
              lambda im, f: TF.adjust_contrast(im, float(f)),
              lambda im, f: TF.adjust_saturation(im, float(f)),
              lambda im, f: TF.adjust_hue(im, float(f))]
    params = [d.brightness, d.contrast, d.saturation, d.hue]
    for i in range(len(x)):
        ref = x[i]
        for op in d.order[i].tolist():
            ref = tv_ops[op](ref, params[op][i])
        assert torch.allclose(ours[i], ref, atol=1e-5), i  # float32 rounding only


def _torchvision_jitter(x, d):
    """Each sample through torchvision's functional ops, in its drawn order."""
    tv_ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    params = [d.brightness, d.contrast, d.saturation, d.hue]
    out = []
    for i in range(len(x)):
        ref = x[i]
        for op in d.order[i].tolist():
            ref = tv_ops[op](ref, float(params[op][i]))
        out.append(ref)
    return torch.stack(out)


@pytest.mark.parametrize("order", [[1, 0, 3, 2], [3, 2, 1, 0], [0, 1, 2, 3]])
def test_jitter_follows_an_order_shared_by_every_sample(order):
    # torchvision applies the ops in the drawn permutation; a batch whose samples all drew the
    # same order (each op moved, or none) must follow it like any other
    x = _images(6)
    d = draw_jitter(len(x), _gen(18), 0.4, 0.4, 0.4, 0.1)
    d.order = torch.tensor(order).expand(len(x), 4)
    assert torch.allclose(apply_jitter(x, d), _torchvision_jitter(x, d), atol=1e-5)


@pytest.mark.parametrize("strengths", [(0.4, 0.3, 0.2, 0.1), (0.0, 0.3, 0.0, 0.1),
                                       (0.4, 0.0, 0.2, 0.0)])
@pytest.mark.parametrize("random_order", [False, True])
def test_color_jitter_applies_each_op_with_a_nonzero_strength(strengths, random_order):
    # the op draws as draw_jitter does from the same generator and applies every op whose
    # strength is above 0 (the others draw factor 1 or shift 0: no change), as torchvision
    x = _images(12)
    out = ColorJitter(*strengths, random_order=random_order)(x, _gen(19))
    d = draw_jitter(len(x), _gen(19), *strengths, random_order)
    assert torch.allclose(out, _torchvision_jitter(x, d), atol=1e-5)


@pytest.mark.parametrize("shift", [-1e-9, 1e-9, -0.5, 0.5])
def test_hue_rotation_wraps_around_the_circle_as_torchvision(shift):
    # hue is an angle: red (hue 0) shifted by −1e-9 lands on 1 − 1e-9, which float32 rounds to
    # one whole turn (h·6 = 6, the seventh sextant): it must read as hue 0 again, not fail
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.2, 0.4, 0.9], [0.5, 0.5, 0.5],
                            [1.0, 0, 0.5]])
    x = colours.view(5, 3, 1, 1).expand(5, 3, 2, 2).contiguous()
    out = adjust_hue(x, torch.full((5,), shift))
    ref = torch.stack([TF.adjust_hue(x[i], shift) for i in range(5)])
    assert torch.allclose(out, ref, atol=1e-5)


def test_jitter_factors_are_per_sample_and_in_range():
    d = draw_jitter(1000, _gen(2))
    for f in (d.brightness, d.contrast, d.saturation):
        assert f.min() >= 0.6 and f.max() <= 1.4 and f.std() > 0.2
    assert len(set(d.order[:, 0].tolist())) == 1  # fixed order unless asked
    r = draw_jitter(1000, _gen(2), random_order=True)
    assert len({tuple(o) for o in r.order.tolist()}) == 24


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_jitter_in_half_precision_is_close_to_float(dtype):
    x = _images()
    d = draw_jitter(len(x), _gen(3), hue=0.05)
    full = apply_jitter(x, d)
    half = apply_jitter(x.to(dtype), d)
    assert half.dtype == dtype
    assert (half.float() - full).abs().max() < 0.03


# --- lighting -----------------------------------------------------------------------------

def test_lighting_adds_exactly_alpha_eigval_along_eigvec():
    x = torch.full((3, 3, 4, 4), 0.5)
    alpha = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0.1, -0.2, 0.3]])
    out = apply_lighting(x, alpha)
    for i in range(3):
        want = sum(alpha[i, j] * EIGVAL[j] * EIGVEC[:, j] for j in range(3))
        assert torch.allclose(out[i] - 0.5, want.view(3, 1, 1).expand(3, 4, 4), atol=1e-7)
    a = draw_lighting(20000, _gen(4), std=0.1)
    assert abs(a.std() - 0.1) < 0.005 and abs(a.mean()) < 0.005


def test_lighting_eigenpairs_are_the_published_imagenet_ones():
    # fb.resnet.torch (datasets/imagenet.lua, pixels in [0, 1]; Krizhevsky et al. 2012's PCA):
    # eigenvalues 0.2175, 0.0188, 0.0045 and these eigenvector columns. The columns of an
    # eigenbasis are orthonormal: a sign or digit slip in one entry breaks that (the published
    # four-digit values are orthonormal to 5e-5)
    assert torch.allclose(EIGVAL, torch.tensor([0.2175, 0.0188, 0.0045]), atol=1e-6)
    gram = EIGVEC.T @ EIGVEC
    assert torch.allclose(gram, torch.eye(3), atol=1e-3), gram
    assert torch.allclose(EIGVEC, torch.tensor([[-0.5675, 0.7192, 0.4009],
                                                [-0.5808, -0.0045, -0.8140],
                                                [-0.5836, -0.6948, 0.4203]]), atol=1e-6)


# --- cutout -------------------------------------------------------------------------------

def test_cutout_zeroes_exactly_the_clipped_square():
    x = torch.ones(64, 3, 20, 20)
    d = draw_cutout(64, 20, 20, _gen(5), holes=1, size=8)
    out = apply_cutout(x, d)
    clipped = 0
    for i in range(64):
        y0, y1, x0, x1 = d.boxes[i, 0].tolist()
        want = torch.ones(3, 20, 20)
        want[:, y0:y1, x0:x1] = 0
        assert torch.equal(out[i], want)
        clipped += (y1 - y0) * (x1 - x0) < 64
    assert 0 < clipped < 64  # some holes hit the border and are clipped, some do not


def test_cutout_several_holes_and_probability():
    d = draw_cutout(4000, 32, 32, _gen(6), holes=3, size=4, p=0.3)
    assert abs(d.applied.float().mean() - 0.3) < 0.03
    out = apply_cutout(torch.ones(4000, 1, 32, 32), d)
    assert torch.all(out[~d.applied] == 1)
    assert torch.all((out[d.applied] == 0).flatten(1).sum(1) > 0)


# --- random erasing -----------------------------------------------------------------------

def test_erasing_matches_torchvision_erase():
    x = _images(32)
    d = draw_erasing(32, 24, 20, _gen(7), p=0.7)
    out = apply_erasing(x, d, "zero")
    for i in range(32):
        if not d.applied[i]:
            assert torch.equal(out[i], x[i])
            continue
        y0, y1, x0, x1 = d.boxes[i].tolist()
        ref = TF.erase(x[i], y0, x0, y1 - y0, x1 - x0, torch.zeros(3, 1, 1))
        assert torch.equal(out[i], ref)


@pytest.mark.parametrize("mean", [(0.485, 0.456, 0.406), (0.1, 0.5, 0.9)])
def test_erasing_mean_fill_is_the_loaders_own_mean(mean):
    """fill="mean" is the dataset mean the Loader normalizes with, not a literal ImageNet mean:
    it runs after normalization and fills 0."""
    from tricks.pipeline.stages import Stages
    std = (0.2, 0.25, 0.3)
    u8 = torch.full((16, 3, 24, 20), 77, dtype=torch.uint8)
    op = RandomErasing(p=1.0, fill="mean")
    out, _ = Stages(torch.float32, 10, [op], mean=mean, std=std)(
        u8, torch.zeros(16, dtype=torch.long), _gen(7))
    rgb = out * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    erased = (out == 0).all(1)
    assert erased.flatten(1).any(1).all()                   # every sample has its box
    assert torch.allclose(rgb.permute(0, 2, 3, 1)[erased], torch.tensor(mean).expand(
        int(erased.sum()), 3), atol=1e-6)


def test_erasing_area_ratio_and_rate():
    d = draw_erasing(20000, 100, 100, _gen(8), p=0.5)
    assert abs(d.applied.float().mean() - 0.5) < 0.02
    b = d.boxes[d.applied].double()
    h, w = b[:, 1] - b[:, 0], b[:, 3] - b[:, 2]
    area = h * w / 1e4
    assert area.min() >= 0.015 and area.max() <= 0.42  # [0.02, 0.4] up to rounding
    assert (h / w).min() >= 0.25 and (h / w).max() <= 4.0
    assert torch.all(b[:, 1] <= 100) and torch.all(b[:, 3] <= 100) and torch.all(b >= 0)


def test_erasing_random_fill_changes_only_the_box_and_stays_in_range():
    x = torch.full((16, 3, 30, 30), 0.5)
    op = RandomErasing(p=1.0, fill="random")
    out = op(x, _gen(9))
    changed = (out != 0.5).any(1)
    assert changed.any() and out.min() >= 0 and out.max() <= 1
    again = op(x, _gen(9))
    assert torch.equal(out, again)  # the fill noise is keyed too


# --- AutoAugment --------------------------------------------------------------------------

def test_autoaugment_matches_torchvision_sub_ops_per_sample():
    aa = BatchAutoAugment("imagenet")
    x_u8 = (torch.rand(64, 3, 32, 28, generator=torch.Generator().manual_seed(0)) * 255).round()
    x_u8 = x_u8.to(torch.uint8)
    x = x_u8.float() / 255
    d = aa.draw(64, _gen(10))
    ours = aa.apply(x, d)
    from torchvision.transforms.autoaugment import InterpolationMode, _apply_op
    ops = [aa.resolve(d, s) for s in range(2)]
    worst = []
    for i in range(64):
        ref = x_u8[i]
        for slot in range(2):
            if d.applied[i, slot]:
                name = aa.names[int(ops[slot][0][i])]
                mag = float(ops[slot][1][i]) * (255 if name == "Solarize" else 1)
                ref = _apply_op(ref, name, mag, InterpolationMode.NEAREST, None)
        diff = (ours[i] * 255 - ref.float()).abs()
        # 8-bit reference vs float: ≤ 2 levels, except a few nearest-neighbour ties at edges
        worst.append(float((diff > 2.5).float().mean()))
    assert max(worst) < 0.02, max(worst)
    assert d.applied.any(1).sum() > 32


def test_autoaugment_each_op_kind_matches_torchvision():
    """Every op of the table, forced on, with its largest magnitude."""
    from torchvision.transforms.autoaugment import InterpolationMode, _apply_op

    from tricks.pipeline.autoaugment import OPS
    x_u8 = (torch.rand(4, 3, 32, 28, generator=torch.Generator().manual_seed(1)) * 255).round()
    x_u8 = x_u8.to(torch.uint8)
    for name, (fn, mag, signed) in OPS.items():
        m = float(mag(9)) * (-1 if signed else 1)
        ours = fn(x_u8.float() / 255, torch.full((4,), m))
        for i in range(4):
            ref = _apply_op(x_u8[i], name, m * (255 if name == "Solarize" else 1),
                            InterpolationMode.NEAREST, None).float()
            diff = (ours[i] * 255 - ref).abs()
            assert float((diff > 2.5).float().mean()) < 0.02, name


@pytest.mark.parametrize("side", [1, 2])
def test_autoaugment_sharpness_leaves_tiny_images_unchanged_as_torchvision(side):
    from tricks.pipeline.autoaugment import OPS
    x = _images(6, side, side)
    out = OPS["Sharpness"][0](x, torch.full((6,), 0.9))
    ref = torch.stack([TF.adjust_sharpness(x[i], 1.9) for i in range(6)])
    assert torch.equal(out, ref) and torch.equal(out, x)
    BatchAutoAugment()(x, _gen(17))  # every sub-policy may draw it: none may crash


def test_autoaugment_applies_each_slot_at_its_probability():
    aa = BatchAutoAugment()
    d = aa.draw(50000, _gen(11))
    for slot in range(2):
        want = aa.probs[d.sub_policy, slot].mean()
        assert abs(d.applied[:, slot].float().mean() - want) < 0.01
    assert len(set(d.sub_policy.tolist())) == 25


# --- RandAugment, TrivialAugment Wide -------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: BatchRandAugment(2, 9), lambda: BatchRandAugment(1, 30),
                                  BatchTrivialAugmentWide])
def test_random_ops_match_torchvision_per_sample(make):
    """Each sample's drawn ops, in order, through torchvision's ``_apply_op`` (what its
    RandAugment and TrivialAugmentWide call) on the 8-bit image: ≤ 2 levels apart but for a
    few nearest-neighbour ties. (Chains of the strongest ops are left out: torchvision rounds
    to 8 bits between ops, we do not, and a one-level difference before a posterize or
    solarize threshold becomes a large one.)"""
    from torchvision.transforms.autoaugment import InterpolationMode, _apply_op
    op = make()
    x_u8 = (torch.rand(96, 3, 32, 28, generator=torch.Generator().manual_seed(0)) * 255)
    x_u8 = x_u8.round().to(torch.uint8)
    x = x_u8.float() / 255
    names, draws = op.draw(96, 32, 28, _gen(30))
    ours = op.apply(x, names, draws)
    worst, kinds = [], set()
    for i in range(96):
        ref = x_u8[i]
        for ops, mags in draws:
            name, m = names[int(ops[i])], float(mags[i])
            kinds.add(name)
            ref = _apply_op(ref, name, m * (255 if name == "Solarize" else 1),
                            InterpolationMode.NEAREST, None)
        worst.append(float(((ours[i] * 255 - ref.float()).abs() > 2.5).float().mean()))
    assert max(worst) < 0.03, max(worst)
    assert len(kinds) == 14  # every op of the space was drawn and checked


def test_random_ops_draw_as_torchvision_defines():
    # RandAugment: a fixed bin (9 of 31: 0.3·9/30 shear); TrivialAugment: a uniform bin; both a
    # uniform op over 14 and a sign flip with probability ½ on signed ops
    names, draws = BatchRandAugment(2, 9).draw(20000, 224, 224, _gen(31))
    assert len(draws) == 2
    ops, mags = draws[0]
    freq = torch.bincount(ops, minlength=14).double() / 20000
    assert torch.allclose(freq, torch.full((14,), 1 / 14, dtype=torch.float64), atol=0.01)
    shear = mags[ops == names.index("ShearX")]
    assert set(shear.abs().round(decimals=6).tolist()) == {round(0.3 * 9 / 30, 6)}
    assert abs(float((shear < 0).double().mean()) - 0.5) < 0.03
    tx = mags[ops == names.index("TranslateX")].abs()
    assert torch.allclose(tx, torch.full_like(tx, 150 / 331 * 224 * 9 / 30))
    names, ((ops, mags),) = BatchTrivialAugmentWide().draw(20000, 32, 32, _gen(32))
    rot = mags[ops == names.index("Rotate")].abs()
    assert len(set(rot.round(decimals=4).tolist())) == 31 and float(rot.max()) == 135.0


@pytest.mark.parametrize("make,message", [
    (lambda: BatchRandAugment(0), "num_ops must be an integer ≥ 1"),
    (lambda: BatchRandAugment(2, 31), r"magnitude must be a bin 0..30"),
    (lambda: BatchTrivialAugmentWide(1), "num_magnitude_bins must be an integer ≥ 2"),
    (lambda: RandomGrayscale(1.5), "grayscale p must be a probability"),
    (lambda: GaussianBlur(4), "blur kernel_size must be an odd integer"),
    (lambda: GaussianBlur(5, (2.0, 1.0)), "blur sigma must satisfy 0 < min ≤ max"),
])
def test_new_op_settings_are_refused(make, message):
    with pytest.raises(OptionError, match=message):
        make()


# --- grayscale, blur -----------------------------------------------------------------------

def test_random_grayscale_matches_torchvision_on_the_samples_it_picks():
    x = _images(2000, 8, 8)
    out = RandomGrayscale(0.3)(x, _gen(33))
    picked = [not torch.equal(out[i], x[i]) for i in range(2000)]
    assert abs(sum(picked) / 2000 - 0.3) < 0.03
    for i in range(40):
        ref = TF.rgb_to_grayscale(x[i], num_output_channels=3) if picked[i] else x[i]
        assert torch.allclose(out[i], ref, atol=1e-6)


def test_gaussian_blur_matches_torchvision_per_sample():
    x = _images(12, 24, 20)
    op = GaussianBlur(9, (0.1, 3.0), p=0.5)
    out = op(x, _gen(34))
    g = _gen(34)  # the op's draw: σ per sample, then whether it applies
    sigma = 0.1 + (3.0 - 0.1) * torch.rand(12, generator=g)
    applied = torch.rand(12, generator=g) < 0.5
    assert 2 <= int(applied.sum()) <= 10
    for i in range(12):
        ref = TF.gaussian_blur(x[i], [9, 9], [float(sigma[i])] * 2) if applied[i] else x[i]
        assert torch.allclose(out[i], ref, atol=1e-5), i


def test_gaussian_blur_larger_than_the_image_is_one_line():
    with pytest.raises(OptionError, match="blur kernel_size 23 needs images larger than 11"):
        GaussianBlur(23)(_images(2, 8, 8), _gen(35))


# --- shared properties ----------------------------------------------------------------------

OPS = {"jitter": lambda: ColorJitter(hue=0.1, random_order=True), "lighting": Lighting,
       "cutout": lambda: Cutout(2, 6), "erasing": lambda: RandomErasing(p=1.0),
       "autoaugment": BatchAutoAugment, "randaugment": BatchRandAugment,
       "trivialaugment": BatchTrivialAugmentWide, "grayscale": lambda: RandomGrayscale(0.5),
       "blur": lambda: GaussianBlur(5, p=0.7)}


@pytest.mark.parametrize("name", OPS)
def test_ops_are_keyed_per_sample_and_keep_layout(name):
    op = OPS[name]()
    x = (torch.full((32, 3, 24, 24), 0.5) + 0.3 * _images(32, 24, 24)).contiguous(
        memory_format=torch.channels_last)
    a = op(x, _gen(12, 0))
    b = op(x, _gen(12, 0))
    c = op(x, _gen(12, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    changes = (a - x).flatten(1).abs().sum(1)
    assert len(set(changes.round(decimals=4).tolist())) > 8  # samples drew differently
    assert a.shape == x.shape and a.dtype == x.dtype
    assert a.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", OPS)
def test_ops_run_in_half_precision(name, dtype):
    x = _images(8, 24, 24)
    out = OPS[name]()(x.to(dtype), _gen(15))
    assert out.dtype == dtype and torch.isfinite(out.float()).all()
    if name != "erasing":  # random fill aside, close to the float32 result
        ref = OPS[name]()(x, _gen(15))
        assert (out.float() - ref).abs().mean() < 0.02


@pytest.mark.parametrize("make,message", [
    (lambda: Cutout(p=1.5), "cutout p must be a probability"),
    (lambda: RandomErasing(p=-0.1), "erasing p must be a probability"),
    (lambda: RandomErasing(area=(0.5, 0.2)), "erasing area"),
    (lambda: ColorJitter(brightness=2.0), "jitter brightness"),
    (lambda: ColorJitter(hue=0.51), "jitter hue must be in \\[0, 0.5\\]"),
    (lambda: Lighting(std=-1), "lighting std must be ≥ 0"),
    (lambda: BatchAutoAugment("nope"), "unknown AutoAugment policy"),
    (lambda: Cutout(holes=0), "cutout needs ≥ 1 hole"),
    (lambda: Cutout(size=0), "cutout needs ≥ 1 hole of side ≥ 1"),
    (lambda: RandomErasing(area=(0.0, 0.4)), "erasing area must satisfy 0 < sl"),
    (lambda: RandomErasing(area=(0.1, 1.0)), "erasing area must satisfy 0 < sl ≤ sh < 1"),
    (lambda: RandomErasing(ratio=0.0), "erasing ratio r1 must be in \\(0, 1\\]"),
    (lambda: RandomErasing(ratio=1.5), "erasing ratio r1 must be in \\(0, 1\\]"),
])
def test_bad_settings_are_refused(make, message):
    with pytest.raises(OptionError, match=message):
        make()


def test_settings_at_the_ends_of_their_ranges_are_accepted():
    # torchvision's ColorJitter accepts 0 (no change) and 1 (factors down to 0); a 1-pixel
    # Cutout hole; Zhong et al.'s erasing with sl = sh (a fixed area) and r1 = 1 (squares)
    x = _images(8, 16, 16)
    for op in (ColorJitter(0, 0, 0, 0), ColorJitter(1, 1, 1, 0.5), Cutout(1, 1),
               RandomErasing(1.0, (0.3, 0.3), 1.0)):
        assert op(x, _gen(20)).shape == x.shape


def test_cutout_hole_larger_than_the_image_is_clipped_not_refused():
    # DeVries & Taylor clip a hole at the border; a hole wider than the image still runs
    x = torch.ones(64, 3, 8, 8)
    out = Cutout(size=9)(x, _gen(13))
    holes = out[:, 0] == 0
    assert holes.flatten(1).sum(1).min() >= 25  # a 9-px hole keeps ≥ 5×5 of an 8×8 image
    assert torch.equal(out == 0, holes[:, None].expand_as(out))


def test_cutout_runs_after_normalization_so_the_hole_is_the_mean():
    """DeVries & Taylor cut the normalized image: the hole is 0, the dataset mean, whatever
    the op order in the config (not black: (0 − mean)/std = −2.12, −2.04, −1.80)."""
    from tricks.pipeline.stages import IMAGENET_MEAN, IMAGENET_STD, Stages
    images = torch.full((16, 3, 24, 24), 200, dtype=torch.uint8)
    for ops in ([Cutout(1, 10)], [Cutout(1, 10), Lighting(0.0)]):
        out, _ = Stages(torch.float32, 10, ops)(images, torch.zeros(16, dtype=torch.long),
                                                _gen(16))
        hole = (out == 0).all(dim=1)
        assert hole.flatten(1).sum(1).min() >= 25  # every sample has its (clipped) hole
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        rest = out.permute(0, 2, 3, 1)[~hole]
        assert torch.allclose(rest, ((200 / 255 - mean) / std).expand_as(rest), atol=1e-5)


@cuda
@pytest.mark.parametrize("name", OPS)
def test_cpu_and_cuda_agree(name):
    op = OPS[name]()
    x = _images(32, 24, 24)
    cpu = op(x, _gen(14))
    gpu = op(x.cuda(), _gen(14))
    diff = (cpu - gpu.cpu()).abs()
    if name == "erasing":  # the random fill differs by device; the box does not
        assert torch.equal(cpu == x, gpu.cpu() == x)
    elif name == "autoaugment":
        # nearest-neighbour rotate/shear: a one-ulp difference in a sampling coordinate
        # between devices may pick the neighbouring pixel at a tie; such pixels are rare and
        # isolated. Everything else (the draw, colour ops) must agree.
        assert float((diff > 1e-4).float().mean()) < 0.01, float((diff > 1e-4).float().mean())
        assert float(diff.mean()) < 2e-3
    else:
        assert diff.max() < 1e-4


def test_loader_augment_draws_are_keyed_by_seed_and_epoch(shapes_records):
    from tricks.pipeline import Engine, Loader, Sampling

    def batch(epoch, seed=0):
        # validation crops are fixed, so any difference comes from the augment draw
        loader = Loader(shapes_records, "val", 16, train=False, image_size=32,
                        engine=Engine(workers=0), sampling=Sampling(seed=seed),
                        augment=[ColorJitter(), RandomErasing(p=1.0)])
        loader.set_epoch(epoch)
        return next(iter(loader)).images
    a = batch(0)
    assert torch.equal(a, batch(0))
    assert not torch.equal(a, batch(1)) and not torch.equal(a, batch(0, seed=1))


def test_op_defaults_are_the_papers_settings():
    # He et al. 2019 §2.1: brightness, contrast, saturation factors in [0.6, 1.4], PCA noise
    # N(0, 0.1); DeVries & Taylor 2017: one 16×16 hole on CIFAR; Zhong et al. 2020: p 0.5, area
    # [0.02, 0.4], r1 0.3, mean fill = the dataset mean. Defaults must equal these settings.
    x = _images(8, 32, 32)
    pairs = [(ColorJitter(), ColorJitter(0.4, 0.4, 0.4, 0.0, False)),
             (Lighting(), Lighting(0.1)),
             (Cutout(), Cutout(1, 16, 1.0)),
             (RandomErasing(fill="mean"), RandomErasing(0.5, (0.02, 0.4), 0.3, "mean"))]
    for k, (default, explicit) in enumerate(pairs):
        for j in range(3):
            a, b = default(x, _gen("defaults", k, j)), explicit(x, _gen("defaults", k, j))
            assert torch.equal(a, b), (k, j)
    ColorJitter(hue=0.5)  # torchvision's range for hue is [0, 0.5], both ends included


def test_draw_defaults_are_the_papers_settings():
    # the draw functions, called alone, draw what the ops' paper settings draw (see above):
    # He et al.'s jitter has no hue and a fixed order, PCA noise σ = 0.1; one 16-px Cutout hole
    # on every sample; Zhong et al.'s p 0.5, area [0.02, 0.4], r1 0.3 and torchvision's 10 tries
    n = 64
    pairs = [(lambda g: draw_jitter(n, g),
              lambda g: draw_jitter(n, g, 0.4, 0.4, 0.4, 0.0, False)),
             (lambda g: draw_lighting(n, g),
              lambda g: draw_lighting(n, g, 0.1)),
             (lambda g: draw_cutout(n, 32, 32, g),
              lambda g: draw_cutout(n, 32, 32, g, 1, 16, 1.0)),
             (lambda g: draw_erasing(n, 32, 32, g),
              lambda g: draw_erasing(n, 32, 32, g, 0.5, (0.02, 0.4), 0.3, 10))]
    for k, (default, explicit) in enumerate(pairs):
        a, b = default(_gen("draw-defaults", k)), explicit(_gen("draw-defaults", k))
        fields = [a] if torch.is_tensor(a) else [getattr(a, f) for f in vars(a)]
        wants = [b] if torch.is_tensor(b) else [getattr(b, f) for f in vars(b)]
        assert all(torch.equal(u, v) for u, v in zip(fields, wants)), k


def test_erasing_random_fill_is_uniform_noise_with_or_without_a_generator():
    # Zhong et al.: erased pixels take random values in [0, 1] (uniform, as torchvision's
    # "random" fill); with no generator the global one is used
    x = torch.full((64, 3, 40, 40), 0.5)
    d = draw_erasing(64, 40, 40, _gen(21), p=1.0)
    for gen in (None, _gen(22)):
        out = apply_erasing(x, d, "random", gen=gen)
        inside = ~torch.isclose(out, torch.full_like(out, 0.5))
        vals = out[inside]
        assert vals.numel() > 10000 and vals.min() >= 0 and vals.max() <= 1
        assert abs(float(vals.mean()) - 0.5) < 0.01 and abs(float(vals.var()) - 1 / 12) < 0.005


def test_erasing_noise_of_different_batches_is_different():
    # each batch seeds its fill noise from its own key with a 62-bit seed: 400 batches give 400
    # different noise fields (a seed range of a few hundred values repeats them)
    x = torch.full((1, 3, 8, 8), 0.5)
    d = ErasingDraw(torch.tensor([[0, 8, 0, 8]]), torch.tensor([True]))
    # (the first four values of each: single float32 values of 400 fields tie with p = 0.005)
    first = {tuple(apply_erasing(x, d, "random", gen=_gen("noise", k))[0, 0, 0, :4].tolist())
             for k in range(400)}
    assert len(first) == 400


# --- distributions of the draws -------------------------------------------------------------

def ks(a, b) -> float:
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a)
                               - np.searchsorted(b, grid, "right") / len(b))))


def ks_uniform(x, lo, hi) -> float:
    x = np.sort(np.asarray(x, float))
    n = len(x)
    cdf = np.clip((x - lo) / (hi - lo), 0, 1)
    return float(max(np.max(np.arange(1, n + 1) / n - cdf), np.max(cdf - np.arange(n) / n)))


def erasing_reference(h, w, n, area=(0.02, 0.4), r1=0.3):
    """torchvision's TVRandomErasing.get_params (Zhong et al. 2020 as torchvision draws it)."""
    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    out = []
    for _ in range(n):
        i, j, eh, ew, _ = TVRandomErasing.get_params(img, area, (r1, 1 / r1), [0.0])
        out.append((i, j, eh, ew))
    return np.array(out, float)


@pytest.mark.parametrize("h,w", [(100, 100), (60, 90)])
def test_erasing_boxes_have_torchvisions_aspect_area_and_position(h, w):
    n = 5000
    d = draw_erasing(4 * n, h, w, keyed_generator("erasing", h, w), p=1.0)
    assert bool(d.applied.all())
    b = d.boxes.double().numpy()
    bh, bw = b[:, 1] - b[:, 0], b[:, 3] - b[:, 2]
    ref = erasing_reference(h, w, n)
    rh, rw = ref[:, 2], ref[:, 3]
    # not square: forcing square boxes puts every log(h/w) at 0 (KS ≈ 0.5)
    assert np.mean(bh != bw) > 0.85
    assert ks(np.log(bh / bw), np.log(rh / rw)) < 0.03
    # log-uniform aspect: as many tall boxes as torchvision (on a square image, as many tall
    # as wide; a uniform ratio in [0.3, 3.33] makes about 77% of them tall)
    assert abs(np.mean(bh > bw) - np.mean(rh > rw)) < 0.03
    assert ks(bh * bw / (h * w), rh * rw / (h * w)) < 0.03
    assert ks(b[:, 0] + bh / 2, ref[:, 0] + rh / 2) < 0.03
    assert ks(b[:, 2] + bw / 2, ref[:, 1] + rw / 2) < 0.03


def test_erasing_rate_is_p():
    for p in (0.25, 0.5, 0.9):
        d = draw_erasing(20000, 64, 64, keyed_generator("rate", p), p=p)
        assert abs(float(d.applied.double().mean()) - p) < 0.015


@pytest.mark.parametrize("name,b", [("brightness", 0.4), ("contrast", 0.3), ("saturation", 0.2)])
def test_jitter_factors_are_uniform_in_one_minus_b_one_plus_b(name, b):
    d = draw_jitter(20000, keyed_generator("jitter"), brightness=0.4, contrast=0.3,
                    saturation=0.2, hue=0.1)
    f = getattr(d, name).numpy()
    assert ks_uniform(f, 1 - b, 1 + b) < 0.015
    h = d.hue.numpy()
    assert ks_uniform(h, -0.1, 0.1) < 0.015


def test_cutout_centre_is_uniform_over_the_image_and_the_hole_is_clipped():
    # DeVries & Taylor 2017: the centre is drawn uniformly over the image and the square is
    # clipped at the border, so the kept hole area is a known average (computed exactly here)
    n, h, w, size = 40000, 20, 30, 8
    d = draw_cutout(n, h, w, keyed_generator("cutout"), holes=1, size=size)
    y0, y1, x0, x1 = d.boxes[:, 0].double().unbind(-1)
    area = ((y1 - y0) * (x1 - x0)).numpy()

    def kept(extent):  # mean clipped side over centres c = 0..extent−1
        return np.mean([min(c - size // 2 + size, extent) - max(c - size // 2, 0)
                        for c in range(extent)])
    assert abs(area.mean() - kept(h) * kept(w)) < 0.3
    # every centre is possible: holes touch both borders on both axes
    assert (y0 == 0).any() and (y1 == h).any() and (x0 == 0).any() and (x1 == w).any()
    full = (y1 - y0 == size) & (x1 - x0 == size)
    assert abs(float(full.double().mean()) - (h - size + 1) / h * (w - size + 1) / w) < 0.01


def test_erasing_box_is_smaller_than_the_image_on_both_sides():
    # Zhong et al. 2020 (Algorithm 1) and torchvision keep a box only if He < H and We < W.
    # On a 3×3 image 15% of the drawn boxes are 3 pixels on a side: all must be refused
    d = draw_erasing(20000, 3, 3, keyed_generator("erasing-strict"), p=1.0)
    b = d.boxes[d.applied]
    bh, bw = b[:, 1] - b[:, 0], b[:, 3] - b[:, 2]
    assert int(bh.max()) == 2 and int(bw.max()) == 2  # 2-pixel sides are kept
    assert int(bh.min()) >= 1 and int(bw.min()) >= 1


def test_erasing_gives_up_after_torchvisions_ten_tries():
    # torchvision's RandomErasing tries 10 boxes, then erases nothing. Square 100² image,
    # aspect 1, area fraction s ~ U(0.9, 2.1): a try fits iff round(100√s) < 100, i.e.
    # s < 0.990025, so q = 0.090025/1.2 per try and the erasing rate is 1 − (1 − q)^10 = 0.542
    # (eleven tries 0.576, nine 0.505; standard error 0.0035)
    d = draw_erasing(20000, 100, 100, keyed_generator("erasing-tries"), p=1.0, area=(0.9, 2.1),
                     ratio=1.0)
    q = (0.990025 - 0.9) / 1.2
    assert abs(float(d.applied.double().mean()) - (1 - (1 - q) ** 10)) < 0.012
