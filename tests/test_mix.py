"""Mixing ops: constant-colour images make λ, the partner and the patch areas visible in the
pixels, and the targets must say the same."""
import pytest
import torch
import torch.nn.functional as F

from conftest import cuda
from tricks.pipeline import Loader
from tricks.pipeline.errors import OptionError
from tricks.pipeline.mix import CutMix, Mixup, Ricap, cutmix, mixup, ricap
from tricks.pipeline.sampling import keyed_generator
from tricks.train.loss import SoftTargetCrossEntropy, smooth

K = 10


def _constant_batch(n=12, h=16, w=20):
    """Sample i is filled with the value i (one channel value per sample) and has label i % K."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, h, w).clone()
    return x.contiguous(memory_format=torch.channels_last), torch.arange(n) % K


def _gen(*key):
    return keyed_generator("mix-test", *key)


@pytest.mark.parametrize("per_sample", [False, True])
def test_mixup_pixels_reveal_lambda_and_partner_and_targets_match(per_sample):
    x, y = _constant_batch()
    out, targets, d = mixup(x, y, K, _gen(0), alpha=0.4, per_sample=per_sample)
    perm = d.perms[0]
    for i in range(len(x)):
        lam = float(d.lam[i])
        assert torch.allclose(out[i], torch.full_like(out[i], lam * i + (1 - lam) * int(perm[i])),
                              atol=1e-5)
        want = lam * F.one_hot(y[i], K) + (1 - lam) * F.one_hot(y[perm[i]], K)
        assert torch.allclose(targets[i], want.float(), atol=1e-6)
    assert torch.allclose(targets.sum(1), torch.ones(len(x)))
    assert (len(set(d.lam.tolist())) > 1) == per_sample


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixup_weights_pixels_and_labels_with_one_lambda_in_half_precision(dtype):
    """An image of ones mixed with a partner of zeros shows its λ in its pixels exactly
    (lerp(0, 1, λ) = λ in any dtype); the targets must carry the same λ, to no worse than
    fp32 does (Zhang et al.: one λ for both). (Zeros mixed with ones would show 1 − λ rounded
    to the dtype: pixel rounding, not a λ mismatch, so those are left out.)"""
    def gap(dt):
        n = 64
        x = torch.zeros(n, 3, 4, 4, dtype=dt)
        x[: n // 2] = 1
        y = (torch.arange(n) < n // 2).long()  # class 1 ↔ the images of ones
        worst = 0.0
        for k in range(20):
            out, targets, d = mixup(x, y, 2, _gen(6, k), alpha=0.4, per_sample=True)
            shown = (y == 1) & (y[d.perms[0]] == 0)
            pixel_lam = out[shown, 0, 0, 0].float()  # the λ applied to the pixels
            worst = max(worst, float((pixel_lam - targets[shown, 1]).abs().max()))
        return worst
    assert gap(dtype) <= gap(torch.float32)


def test_mixup_lambda_follows_beta():
    lams = torch.cat([mixup(torch.zeros(64, 3, 2, 2), torch.zeros(64, dtype=torch.long), K,
                            _gen(1, k), alpha=0.2, per_sample=True)[2].lam for k in range(50)])
    # Beta(0.2, 0.2): mean 1/2, variance 1/(4·(2α+1)) = 0.1786
    assert abs(lams.mean() - 0.5) < 0.03 and abs(lams.var() - 0.1786) < 0.02


def test_cutmix_pasted_area_equals_target_weight():
    x, y = _constant_batch(8, 32, 32)  # labels 0..7: distinct, so areas map to classes
    out, targets, d = cutmix(x, y, K, _gen(2), alpha=1.0)
    (y0, y1, x0, x1), perm = d.boxes[0], d.perms[0]
    assert 0 < (y1 - y0) * (x1 - x0) < 1024
    for i in range(8):
        if perm[i] == i:
            continue
        pasted = out[i, 0] == perm[i]
        assert pasted.sum() == (y1 - y0) * (x1 - x0) and torch.all(pasted[y0:y1, x0:x1])
        assert torch.all((out[i, 0] == i) | pasted)
        from_pixels = torch.zeros(K)
        from_pixels[i] = (out[i, 0] == i).float().mean()
        from_pixels[int(perm[i])] = pasted.float().mean()
        assert torch.allclose(targets[i], from_pixels, atol=1e-6)
    assert abs(float(d.lam[0]) - (1 - (y1 - y0) * (x1 - x0) / 1024)) < 1e-6


def test_ricap_patch_areas_read_from_pixels_equal_target_weights():
    n = 10  # labels 0..9 are all distinct, so every patch's source is identifiable
    x, y = _constant_batch(n, 24, 30)
    for k in range(5):
        out, targets, d = ricap(x, y, K, _gen(3, k), beta=0.3)
        assert torch.allclose(targets.sum(1), torch.ones(n))
        assert abs(sum(d.weights) - 1) < 1e-9
        for i in range(n):
            values, counts = out[i, 0].round().long().unique(return_counts=True)
            from_pixels = torch.zeros(K)
            from_pixels[values] = counts.float() / (24 * 30)
            assert torch.allclose(from_pixels, targets[i], atol=1e-6), (k, i)


def test_mixing_then_smoothing_equals_smoothing_the_mixed_targets():
    x, y = _constant_batch()
    _, targets, _ = mixup(x, y, K, _gen(4))
    logits = torch.randn(len(x), K)
    loss = SoftTargetCrossEntropy(K, 0.1)(logits, targets)
    # smoothing each one-hot first, then mixing with the same draw, gives the same distribution
    _, _, d = mixup(x, y, K, _gen(4))
    lam, perm = d.lam.view(-1, 1), d.perms[0]
    pre = lam * smooth(y, 0.1, K) + (1 - lam) * smooth(y[perm], 0.1, K)
    assert torch.allclose(loss, -(pre * torch.log_softmax(logits, 1)).sum(1).mean(), atol=1e-6)


@pytest.mark.parametrize("make,message", [
    (lambda: Mixup(alpha=-1), "mixup alpha must be ≥ 0"),
    (lambda: Mixup(alpha=0), "mixup alpha must be > 0"),
    (lambda: CutMix(alpha=-0.5), "cutmix alpha"),
    (lambda: CutMix(alpha=0), "cutmix alpha must be > 0"),  # Beta(0, 0) is no distribution
    (lambda: Ricap(beta=-0.3), "ricap beta must be ≥ 0"),
    (lambda: Ricap(beta=0), "ricap beta must be > 0"),
])
def test_bad_mix_settings_are_refused(make, message):
    with pytest.raises(OptionError, match=message):
        make()


@pytest.mark.parametrize("op", [Mixup(), CutMix(), Ricap()], ids=["mixup", "cutmix", "ricap"])
def test_loader_mix_stage_gives_distributions_keyed_by_epoch(shapes_records, op):
    def first(epoch):
        loader = Loader(shapes_records, "train", 16, image_size=32, workers=0, mix=op, seed=2)
        loader.set_epoch(epoch)
        return next(iter(loader))
    a, b, c = first(0), first(0), first(1)
    assert a.targets.shape == (16, 10) and torch.allclose(a.targets.sum(1), torch.ones(16))
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    assert a.images.is_contiguous(memory_format=torch.channels_last)


def test_mix_can_be_switched_off(shapes_records):
    loader = Loader(shapes_records, "train", 16, image_size=32, workers=0, mix=Mixup())
    loader.set_mix(False)
    assert next(iter(loader)).targets.ndim == 1


@cuda
@pytest.mark.parametrize("fn", [mixup, cutmix, ricap])
def test_cpu_and_cuda_agree(fn):
    x, y = _constant_batch()
    a = fn(x, y, K, _gen(5))
    b = fn(x.cuda(), y.cuda(), K, _gen(5))
    assert torch.allclose(a[0], b[0].cpu()) and torch.allclose(a[1], b[1].cpu())
