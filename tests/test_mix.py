"""Mixing ops: constant-colour images make λ, the partner and the patch areas visible in the
pixels, and the targets must say the same; and (last section) the random draws against their
papers' definitions."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import cuda
from tricks.pipeline import Engine, Loader, Sampling
from tricks.errors import OptionError
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
        loader = Loader(shapes_records, "train", 16, image_size=32, engine=Engine(workers=0), mix=op,
                        sampling=Sampling(seed=2))
        loader.set_epoch(epoch)
        return next(iter(loader))
    a, b, c = first(0), first(0), first(1)
    assert a.targets.shape == (16, 10) and torch.allclose(a.targets.sum(1), torch.ones(16))
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    assert a.images.is_contiguous(memory_format=torch.channels_last)


def test_mix_can_be_switched_off(shapes_records):
    loader = Loader(shapes_records, "train", 16, image_size=32, engine=Engine(workers=0), mix=Mixup())
    loader.set_mix(False)
    assert next(iter(loader)).targets.ndim == 1


@cuda
@pytest.mark.parametrize("fn", [mixup, cutmix, ricap])
def test_cpu_and_cuda_agree(fn):
    x, y = _constant_batch()
    a = fn(x, y, K, _gen(5))
    b = fn(x.cuda(), y.cuda(), K, _gen(5))
    assert torch.allclose(a[0], b[0].cpu()) and torch.allclose(a[1], b[1].cpu())


# --- distributions of the draws -------------------------------------------------------------

def ks(a, b) -> float:
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a)
                               - np.searchsorted(b, grid, "right") / len(b))))


def _batch(n=4, h=32, w=32):
    return torch.zeros(n, 3, h, w), torch.arange(n) % K


def test_mixup_batch_lambda_follows_beta_alpha_alpha():
    # Zhang et al. 2018: one λ ~ Beta(α, α) per batch (α = 0.4: mean ½, var 1/(4(2α+1)))
    x, y = _batch()
    lams = np.array([float(mixup(x, y, K, keyed_generator("mixup", k), alpha=0.4)[2].lam[0])
                     for k in range(1000)])
    ref = np.random.default_rng(0).beta(0.4, 0.4, 20000)
    assert ks(lams, ref) < 0.065
    assert abs(lams.var() - 1 / (4 * 1.8)) < 0.02


def cutmix_reference(h, w, alpha, n, seed=0):
    """Yun et al. 2019: λ ~ Beta(α, α), a box of sides W·√(1−λ), H·√(1−λ) centred uniformly in
    the image and clipped; the target weight is 1 − (clipped box area)/(W·H)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lam = rng.beta(alpha, alpha)
        r = np.sqrt(1 - lam)
        ch, cw = int(h * r), int(w * r)
        cy, cx = rng.integers(0, h), rng.integers(0, w)
        y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch // 2, 0, h)
        x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw // 2, 0, w)
        out.append(1 - (y1 - y0) * (x1 - x0) / (h * w))
    return np.array(out)


def test_cutmix_target_weight_has_the_papers_distribution():
    h, w = 24, 40
    x, y = _batch(4, h, w)
    ours = np.array([float(cutmix(x, y, K, keyed_generator("cutmix", k), alpha=1.0)[2].lam[0])
                     for k in range(1000)])
    ref = cutmix_reference(h, w, 1.0, 20000)
    assert ks(ours, ref) < 0.065
    # clipping only ever shrinks the pasted box: the own-image weight averages above ½
    assert 0.55 < ours.mean() < 0.75


def test_ricap_boundary_follows_beta_and_crops_are_placed_uniformly():
    # Takahashi et al. 2018: w = round(W·Beta(β, β)), h = round(H·Beta(β, β)); each patch is
    # cropped at a uniform position of its source image
    h, w, beta = 40, 50, 0.3
    x, y = _batch(4, h, w)
    bw, bh, oy = [], [], []
    for k in range(1000):
        d = ricap(x, y, K, keyed_generator("ricap", k), beta=beta)[2]
        y0, y1, x0, x1 = d.boxes[0]  # the top-left patch is bh × bw
        bh.append(y1 - y0)
        bw.append(x1 - x0)
        if 0 < y1 - y0 < h:
            oy.append(y0 / (h - (y1 - y0)))
    rng = np.random.default_rng(1)
    ref = np.round(w * rng.beta(beta, beta, 20000))
    assert ks(bw, ref) < 0.065
    assert ks(bh, np.round(h * rng.beta(beta, beta, 20000))) < 0.065
    assert abs(np.var(np.array(bw) / w) - 1 / (4 * (2 * beta + 1))) < 0.02
    assert abs(np.mean(oy) - 0.5) < 0.04


def test_defaults_are_the_papers_settings():
    # mixup α = 0.2 (He et al. 2019, the bag of tricks), one λ per batch; CutMix α = 1 (Yun et
    # al. 2019); RICAP β = 0.3 (Takahashi et al. 2018). The defaults must draw exactly what the
    # explicit settings draw (whose distributions the tests above pin down).
    x, y = torch.rand(8, 3, 12, 16), torch.arange(8) % K
    cases = [(Mixup(), lambda g: mixup(x, y, K, g, alpha=0.2, per_sample=False)),
             (lambda *a: mixup(*a)[:2], lambda g: mixup(x, y, K, g, alpha=0.2, per_sample=False)),
             (CutMix(), lambda g: cutmix(x, y, K, g, alpha=1.0)),
             (lambda *a: cutmix(*a)[:2], lambda g: cutmix(x, y, K, g, alpha=1.0)),
             (Ricap(), lambda g: ricap(x, y, K, g, beta=0.3)),
             (lambda *a: ricap(*a)[:2], lambda g: ricap(x, y, K, g, beta=0.3))]
    for k, (default, explicit) in enumerate(cases):
        for j in range(3):
            a = default(x, y, K, keyed_generator("defaults", k, j))
            b = explicit(keyed_generator("defaults", k, j))
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), (k, j)


def test_lambda_draws_of_independent_batches_never_repeat():
    # λ ~ Beta(α, α) is continuous: 3000 independent batches draw 3000 different λ, up to a
    # few ties where float32 (λ as applied) is coarse, next to 1. A numpy seed drawn from a
    # range of a few hundred values (2*62 for 2**62) repeats them, which no test of the
    # distribution's shape would notice
    x, y = _batch(2, 1, 1)
    lams = {float(mixup(x, y, K, keyed_generator("distinct", k), alpha=0.4)[2].lam[0])
            for k in range(3000)}
    assert len(lams) > 2990, len(lams)


def cutmix_extent_distribution(side):
    """The exact distribution of CutMix's box extent (lo, hi) along an axis of ``side`` pixels
    for α = 1 (Yun et al. 2019 and their code's rand_bbox): λ ~ U(0, 1), cut = int(side·√(1−λ))
    (so P(cut = k) = ((k+1)² − k²)/side²), centre c uniform in 0..side−1, lo = max(c − cut//2,
    0), hi = min(c + cut//2, side)."""
    p = {}
    for k in range(side):
        for c in range(side):
            cell = (max(c - k // 2, 0), min(c + k // 2, side))
            p[cell] = p.get(cell, 0.0) + ((k + 1) ** 2 - k ** 2) / side ** 2 / side
    return p


def test_cutmix_box_extents_have_the_exact_distribution_of_the_papers_code():
    # total variation between 4000 draws and the exact law: ≤ 0.046 in 99.9% of runs of the
    # exact law on these sides; a centre that never reaches 0 is at 0.12–0.16, a box never
    # touching the border or a cut//3 on one side at ≥ 0.37
    h, w, n = 6, 8, 4000
    x, y = _batch(2, h, w)
    ys, xs = {}, {}
    for k in range(n):
        y0, y1, x0, x1 = cutmix(x, y, K, keyed_generator("extent", k), alpha=1.0)[2].boxes[0]
        ys[(y0, y1)] = ys.get((y0, y1), 0) + 1 / n
        xs[(x0, x1)] = xs.get((x0, x1), 0) + 1 / n
    for seen, side in ((ys, h), (xs, w)):
        exact = cutmix_extent_distribution(side)
        tv = 0.5 * sum(abs(seen.get(c, 0) - exact.get(c, 0)) for c in set(seen) | set(exact))
        assert tv < 0.06, (side, tv)
