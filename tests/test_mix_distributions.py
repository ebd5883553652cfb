"""The mixing ops' random draws against their papers' definitions (test_mix.py checks that
pixels and targets agree; these check what is drawn)."""
import numpy as np
import torch

from tricks.pipeline.mix import cutmix, mixup, ricap
from tricks.pipeline.sampling import keyed_generator

K = 10


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
    from tricks.pipeline.mix import CutMix, Mixup, Ricap
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
