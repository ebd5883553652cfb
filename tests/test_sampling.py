"""The crop sampler's distributions against torchvision's RandomResizedCrop (Szegedy et al.
2015's Inception crops, as torchvision defines them): area fraction uniform in ``scale``, aspect
ratio log-uniform in ``ratio``, position uniform over the places the box fits."""
import hashlib
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torchvision.transforms import RandomResizedCrop

from tricks.pipeline.sampling import (EpochPlan, area_ratio_boxes, center_boxes, epoch_order,
                                      keyed_generator, random_resized_boxes)


def ks(a, b) -> float:
    """Two-sample Kolmogorov–Smirnov distance."""
    a, b = np.sort(np.asarray(a, float)), np.sort(np.asarray(b, float))
    grid = np.concatenate([a, b])
    return float(np.max(np.abs(np.searchsorted(a, grid, "right") / len(a)
                               - np.searchsorted(b, grid, "right") / len(b))))


def ours(h, w, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), seed=0):
    boxes = random_resized_boxes(torch.full((n,), h), torch.full((n,), w), keyed_generator(seed),
                                 scale, ratio).double()
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0].numpy(), boxes[:, 1].numpy(), bw.numpy(), bh.numpy()


def reference(h, w, n, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    torch.manual_seed(1)
    img = torch.empty(1, h, w)
    out = np.array([RandomResizedCrop.get_params(img, scale, ratio) for _ in range(n)], float)
    return out[:, 1], out[:, 0], out[:, 3], out[:, 2]  # x0, y0, w, h


@pytest.mark.parametrize("h,w", [(400, 400), (300, 500)])
def test_aspect_ratio_is_log_uniform_as_torchvision(h, w):
    n = 6000
    _, _, bw, bh = ours(h, w, 4 * n)
    _, _, rw, rh = reference(h, w, n)
    log_r, ref = np.log(bw / bh), np.log(rw / rh)
    # KS critical value at 0.1% for these sizes ≈ 0.028; a uniform (not log-uniform) ratio
    # shifts the distribution of log(w/h) by ≥ 0.06 at 0, square boxes by ≈ 0.5
    assert ks(log_r, ref) < 0.03, ks(log_r, ref)
    assert abs(np.mean(bw > bh) - np.mean(rw > rh)) < 0.03
    assert np.mean(bw != bh) > 0.9


def test_aspect_ratio_of_a_fitting_first_try_is_exactly_log_uniform():
    # tiny areas always fit on the first try: log(w/h) is the drawn log-uniform up to rounding
    n = 20000
    u = torch.rand(n, 1, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    _, _, bw, bh, ok = area_ratio_boxes(torch.full((n,), 4000), torch.full((n,), 4000), u,
                                        (0.01, 0.02), (0.5, 2.0))
    assert bool(ok.all())
    log_r = torch.log(bw / bh)
    want = math.log(0.5) + (math.log(2.0) - math.log(0.5)) * u[:, 0, 1]
    assert torch.allclose(log_r, want, atol=0.01)
    # median ratio 1 (the geometric mean of 1/2 and 2; a uniform ratio would put it at 1.25)
    assert abs(float(torch.median(bw / bh)) - 1.0) < 0.02


@pytest.mark.parametrize("h,w", [(400, 400), (300, 500), (64, 48)])
def test_area_and_position_follow_torchvision(h, w):
    n = 6000
    x0, y0, bw, bh = ours(h, w, 4 * n)
    rx, ry, rw, rh = reference(h, w, n)
    assert ks(bw * bh / (h * w), rw * rh / (h * w)) < 0.03
    # position relative to the slack, uniform over 0..W−w (both ends reachable)
    assert ks(x0 + bw / 2, rx + rw / 2) < 0.03 and ks(y0 + bh / 2, ry + rh / 2) < 0.03
    assert np.all(x0 >= 0) and np.all(x0 + bw <= w) and np.all(y0 + bh <= h)


def test_position_reaches_both_ends_with_equal_frequency():
    # area exactly H·W·0.81 at ratio 1 on a 10×10 image: a 9×9 box, x0 and y0 ∈ {0, 1}
    n = 20000
    x0, y0, bw, bh = ours(10, 10, n, scale=(0.81, 0.81), ratio=(1.0, 1.0))
    assert np.all(bw == 9) and np.all(bh == 9)
    for v in (x0, y0):
        assert set(np.unique(v)) == {0, 1} and abs(np.mean(v) - 0.5) < 0.015


def test_centre_box_is_the_resize_then_centre_crop_square():
    b = center_boxes(torch.tensor([300, 400]), torch.tensor([500, 400]), 0.875)
    assert torch.allclose(b[0], torch.tensor([250 - 131.25, 150 - 131.25, 250 + 131.25,
                                              150 + 131.25]))
    assert torch.allclose(b[1], torch.tensor([25.0, 25.0, 375.0, 375.0]))


def test_epoch_order_is_a_fresh_uniform_permutation_each_epoch():
    n, epochs = 8, 4000
    first = torch.stack([epoch_order(n, 0, e, True) for e in range(epochs)])
    assert all(sorted(r.tolist()) == list(range(n)) for r in first[:20])
    # each index lands in each position with frequency 1/n
    freq = torch.stack([(first == i).double().mean(0) for i in range(n)])
    assert torch.allclose(freq, torch.full_like(freq, 1 / n), atol=0.03)
    assert torch.equal(epoch_order(n, 0, 3, False), torch.arange(n))


def test_plan_flips_are_fair_and_independent_of_the_crop():
    plan = EpochPlan(8192, 1024, seed=2, train=True, drop_last=True, shuffle=True)
    h = np.full(8192, 300, np.uint32)
    w = np.full(8192, 500, np.uint32)
    flips, widths = [], []
    for t in plan.tasks(0, h, w, 224):
        flips.append(t.flips)
        widths.append(t.boxes[:, 2] - t.boxes[:, 0])
    f, bw = np.concatenate(flips), np.concatenate(widths)
    assert abs(f.mean() - 0.5) < 0.02
    assert abs(np.corrcoef(f, bw)[0, 1]) < 0.04


@pytest.mark.parametrize("h,w,box", [(10, 1000, (493, 0, 506, 10)), (1000, 10, (0, 493, 10, 506))])
def test_fallback_is_the_centre_crop_with_the_ratio_clamped_both_ways(h, w, box):
    # torchvision's fallback: too wide → width = round(h·max ratio); too tall → height =
    # round(w / min ratio); centred
    boxes = random_resized_boxes(torch.tensor([h]), torch.tensor([w]), keyed_generator(0),
                                 (0.9999, 1.0), (3 / 4, 4 / 3))
    assert tuple(boxes[0].tolist()) == box


@pytest.mark.parametrize("h,w", [(100, 120), (120, 100), (100, 100), (10, 1000), (1000, 10),
                                 (300, 401), (401, 300)])
def test_fallback_matches_torchvision_for_every_shape(h, w):
    # an area twice the image never fits, so every sample takes the fallback; images whose
    # ratio is in range (100×120, 120×100) keep the whole image, out-of-range ones are clamped
    boxes = random_resized_boxes(torch.full((64,), h), torch.full((64,), w), keyed_generator(0),
                                 (2.0, 2.0), (3 / 4, 4 / 3))
    i, j, bh, bw = RandomResizedCrop.get_params(torch.empty(1, h, w), (2.0, 2.0), (3 / 4, 4 / 3))
    assert torch.equal(boxes, torch.tensor([[j, i, j + bw, i + bh]] * 64, dtype=torch.float32))


@pytest.mark.parametrize("h,w", [(1, 1), (2, 2), (2, 3)])
def test_box_sizes_on_tiny_images_follow_torchvision(h, w):
    # a few-pixel image: rounded boxes of width or height 0 must be rejected and those of 1
    # kept, as torchvision does (on 2×2, 44% of boxes are 1×1)
    n = 20000
    _, _, bw, bh = ours(h, w, n)
    _, _, rw, rh = reference(h, w, n)
    sizes = sorted(set(zip(rw, rh)) | set(zip(bw, bh)))
    freq = lambda a, b: np.array([np.mean((a == sw) & (b == sh)) for sw, sh in sizes])  # noqa
    assert np.all(bw >= 1) and np.all(bh >= 1)
    assert np.abs(freq(bw, bh) - freq(rw, rh)).max() < 0.02, (sizes, freq(bw, bh), freq(rw, rh))


def test_keyed_generators_are_distinct_streams_for_distinct_keys():
    # every (seed, epoch, batch) key seeds its own stream: 4000 keys give 4000 different first
    # draws (float64: 4000 float32 draws would tie with probability ½), uniform on [0, 1) (a
    # seed mask of a few bits, e.g. 2*63 − 1 for 2**63 − 1, maps thousands of keys onto a
    # few dozen streams)
    first = np.array([float(torch.rand(1, generator=keyed_generator(0, e, b),
                                       dtype=torch.float64))
                      for e in range(40) for b in range(100)])
    assert len(set(first.tolist())) == len(first)
    assert ks(first, np.linspace(0, 1, 4001)[:-1] + 1 / 8000) < 0.03


def test_keys_that_agree_in_32_bits_of_their_hash_are_distinct_streams():
    # torch's CPU generator keeps only the low 32 bits of a manual seed, so seeding by a 64-bit
    # hash gave ~2**32 streams: these two keys were found by a birthday search (their blake2b-64
    # digests, the former seed, agree in the low 32 bits) and drew the same stream under it
    digest = lambda key: int.from_bytes(hashlib.blake2b(repr(key).encode(),  # noqa: E731
                                                        digest_size=8).digest(), "little")
    a, b = (99757,), (111089,)
    assert digest(a) != digest(b) and digest(a) % 2**32 == digest(b) % 2**32
    old = lambda key: torch.Generator().manual_seed(digest(key) & (2**63 - 1))  # noqa: E731
    assert torch.equal(torch.rand(4, generator=old(a)), torch.rand(4, generator=old(b)))
    assert not torch.equal(torch.rand(4, generator=keyed_generator(*a)),
                           torch.rand(4, generator=keyed_generator(*b)))
    # the same key, the same stream (a pure function of the key, across processes too)
    assert torch.equal(torch.rand(8, generator=keyed_generator(*a)),
                       torch.rand(8, generator=keyed_generator(*a)))


def test_fallback_comes_after_torchvisions_ten_tries():
    # RandomResizedCrop (torchvision) tries 10 boxes before falling back to the whole image.
    # Square image 100², ratio 1, area fraction s ~ U(0.9, 2.1): a try fits iff round(100√s) ≤
    # 100, i.e. s < 1.010025, so p = 0.110025/1.2 per try; the whole image comes out on a
    # fallback ((1 − p)^10 = 0.382) or on a fitting try with s ≥ 0.990025 (a fifth of fits):
    # 0.494. Eleven tries give 0.466, nine 0.524; the standard error here is 0.0035
    n = 20000
    _, _, bw, bh = ours(100, 100, n, scale=(0.9, 2.1), ratio=(1.0, 1.0), seed=4)
    p = (1.010025 - 0.9) / 1.2
    fall = (1 - p) ** 10
    want = fall + (1 - fall) * (1.010025 - 0.990025) / (1.010025 - 0.9)
    assert abs(np.mean((bw == 100) & (bh == 100)) - want) < 0.012


def test_area_aspect_and_position_are_drawn_independently():
    # torchvision draws the area, log-ratio and both offsets from separate uniforms; tiny boxes
    # fit on the first try, so each drawn uniform can be read back from the box (one uniform
    # used twice makes two of them perfectly correlated with the same marginals)
    n, side = 20000, 4000
    u = torch.rand(n, 1, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x0, y0, bw, bh, ok = area_ratio_boxes(torch.full((n,), side), torch.full((n,), side), u,
                                          (0.01, 0.02), (0.5, 2.0))
    assert bool(ok.all())
    area = (bw * bh / side ** 2).numpy()
    log_r = torch.log(bw / bh).numpy()
    fy = (y0 / (side - bh + 1)).numpy()
    fx = (x0 / (side - bw + 1)).numpy()
    c = np.corrcoef([area, log_r, fy, fx])
    assert np.abs(c[np.triu_indices(4, 1)]).max() < 0.04, c
    for f in (fy, fx):
        assert ks(f, np.linspace(0, 1, n)) < 0.02


def test_plan_defaults_are_torchvisions_and_the_papers():
    # He et al. 2019 §2.1: RandomResizedCrop with torchvision's scale (0.08, 1) and ratio
    # (3/4, 4/3); validation resizes the shorter side to 256 and centre-crops 224 (0.875)
    import inspect
    sig = inspect.signature(RandomResizedCrop.__init__).parameters
    h = np.full(64, 300, np.uint32)
    w = np.full(64, 500, np.uint32)
    for train in (True, False):
        default = EpochPlan(64, 32, seed=3, train=train, drop_last=False, shuffle=True)
        explicit = EpochPlan(64, 32, seed=3, train=train, drop_last=False, shuffle=True,
                             rank=0, world_size=1, scale=sig["scale"].default,
                             ratio=sig["ratio"].default, crop_ratio=224 / 256)
        a, b = list(default.tasks(0, h, w, 224)), list(explicit.tasks(0, h, w, 224))
        assert len(a) == len(b) == 2
        for ta, tb in zip(a, b):
            assert np.array_equal(ta.indices, tb.indices) and np.allclose(ta.boxes, tb.boxes)


@pytest.mark.parametrize("n,batch,world", [(103, 16, 1), (103, 16, 4), (6, 4, 4), (5, 8, 8),
                                          (10, 4, 4), (10, 16, 4), (11, 8, 4)])
@pytest.mark.parametrize("drop_last", [False, True])
def test_plan_ranks_together_cover_each_sample_once_in_equal_batch_counts(n, batch, world,
                                                                          drop_last):
    # over all ranks, an epoch holds every record once (or every record of the full global
    # batches once with drop_last), and every rank yields len(plan) batches of at most
    # batch / world records: a user's loop with one collective per batch never deadlocks
    h = np.full(n, 40, np.uint32)
    w = np.full(n, 50, np.uint32)
    seen, counts = [], []
    for rank in range(world):
        plan = EpochPlan(n, batch, seed=1, train=True, drop_last=drop_last, shuffle=True,
                         rank=rank, world_size=world)
        tasks = list(plan.tasks(2, h, w, 32))
        counts.append(len(tasks))
        assert [t.batch for t in tasks] == list(range(len(plan)))
        for t in tasks:
            assert len(t.indices) <= batch // world
            seen.extend(t.indices.tolist())
    assert counts == [len(plan)] * world
    want = n - n % batch if drop_last else n
    assert len(seen) == want and len(set(seen)) == want
    if drop_last or world == 1:  # global batches: DataLoader's length
        assert sorted(seen) == sorted(epoch_order(n, 1, 2, True)[:want].tolist())
        assert len(plan) == len(DataLoader(range(n), batch_size=batch, drop_last=drop_last))


def test_sharded_batches_are_empty_only_when_a_shard_is_shorter_than_the_epoch():
    # 11 records, 4 ranks, one per rank and batch: shards of 3, 3, 3, 2 in 3 batches each; the
    # last rank's last batch is empty. With 2 per rank and batch, none is (shards of ≥ 2 fill 2)
    h = np.full(11, 40, np.uint32)
    sizes = [[len(t.indices) for t in EpochPlan(11, 4, 0, False, False, False, r, 4)
              .tasks(0, h, h, 8)] for r in range(4)]
    assert sizes == [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0]]
    sizes = [[len(t.indices) for t in EpochPlan(11, 8, 0, False, False, False, r, 4)
              .tasks(0, h, h, 8)] for r in range(4)]
    assert sizes == [[2, 1], [2, 1], [2, 1], [1, 1]]


def test_plan_refuses_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2 outside world size 2"):
        EpochPlan(8, 4, seed=0, train=True, drop_last=False, shuffle=True, rank=2, world_size=2)


@pytest.mark.parametrize("world", [1, 3])
def test_plan_shifts_give_one_shift_per_sample_of_the_ranks_share(world):
    # pad-and-crop: each rank gets exactly one (dx, dy) per record of its share of each global
    # batch, the short last batch included, each in −pad..pad
    n, batch, pad = 50, 12, 4
    h = np.full(n, 32, np.uint32)
    for rank in range(world):
        plan = EpochPlan(n, batch, seed=7, train=True, drop_last=False, shuffle=True,
                         rank=rank, world_size=world)
        tasks = list(plan.tasks(1, h, h, 32))
        assert len(tasks) == len(plan)
        for t in tasks:
            s = plan.shifts(1, t.batch, pad)
            assert s.shape == (len(t.indices), 2) and int(s.abs().max()) <= pad
