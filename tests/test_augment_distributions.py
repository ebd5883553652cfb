"""Each augment op's random draw against its definition: a statistic with a tolerance that a
plausible mistake (square boxes, a uniform instead of log-uniform ratio, a range off by one,
a factor range not centred on 1) falls outside. The ops' pixel effects are tested in
test_augment.py; these pin down the distributions."""
import math

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomErasing

from tricks.pipeline.augment import draw_cutout, draw_erasing, draw_jitter
from tricks.pipeline.sampling import keyed_generator


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
    """torchvision's RandomErasing.get_params (Zhong et al. 2020 as torchvision draws it)."""
    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    out = []
    for _ in range(n):
        i, j, eh, ew, _ = RandomErasing.get_params(img, area, (r1, 1 / r1), [0.0])
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
