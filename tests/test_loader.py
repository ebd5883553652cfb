import hashlib

import numpy as np
import pytest
import torch
from torchvision.transforms import RandomResizedCrop

from conftest import cuda
from tricks.pipeline import Engine, Loader, Output, Sampling
from tricks.pipeline.engines.native import crop_resize_flip, pil_crop, size_groups
from tricks.errors import DataError
from tricks.pipeline.sampling import EpochPlan, keyed_generator, random_resized_boxes


def _loader(root, split="train", *, batch_size=16, image_size=32, workers=0, seed=0,
            rank=None, world_size=None, dtype=torch.float32, engine="native", **kw):
    """A small loader; engine options (decode, cpu_decoder, …) as keywords."""
    options = {k: kw.pop(k) for k in ("decode", "cpu_decoder", "fast_dct") if k in kw}
    return Loader(root, split, batch_size, image_size=image_size,
                  sampling=Sampling(seed=seed, rank=rank, world_size=world_size,
                                    global_batch=world_size is not None),
                  output=Output(dtype), engine=Engine(engine, workers=workers, **options), **kw)


def _first(loader, epoch=0):
    loader.set_epoch(epoch)
    return next(iter(loader))


def test_batch_contract_shapes_dtype_strides(shapes_records):
    loader = _loader(shapes_records, batch_size=16)
    images, labels = _first(loader)
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert images.is_contiguous(memory_format=torch.channels_last)
    assert labels.dtype == torch.int64 and labels.shape == (16,)
    assert len(loader) == 400 // 16
    # normalized with ImageNet statistics: roughly zero-centred, not in [0, 255]
    assert -3 < images.mean() < 3 and images.abs().max() < 3.5


def test_engine_output_is_uint8_channels_last(shapes_records):
    loader = _loader(shapes_records, dtype=torch.float16)  # no float32 normalize to fold in
    tasks = loader.plan.tasks(0, loader._heights, loader._widths, 32)
    images, labels = next(loader.engine.batches(tasks))
    assert images.dtype == torch.uint8 and images.shape == (16, 3, 32, 32)
    assert images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(shapes_records, dtype):
    images, _ = _first(_loader(shapes_records, dtype=dtype))
    assert images.dtype == dtype


def test_same_seed_and_epoch_same_batch_next_epoch_different(shapes_records):
    a = _first(_loader(shapes_records, seed=3))
    b = _first(_loader(shapes_records, seed=3))
    c = _first(_loader(shapes_records, seed=3), epoch=1)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.targets, c.targets)  # reshuffled


def test_samples_within_a_batch_differ(shapes_records):
    images, _ = _first(_loader(shapes_records))
    flat = images.reshape(len(images), -1)
    assert len({hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in flat}) == len(images)


def test_flip_rate_is_near_half_and_crops_fit():
    plan = EpochPlan(4096, 512, seed=0, train=True, drop_last=True, shuffle=True)
    h = np.random.default_rng(0).integers(50, 500, 4096).astype(np.uint32)
    w = np.random.default_rng(1).integers(50, 500, 4096).astype(np.uint32)
    flips, areas = [], []
    for task in plan.tasks(0, h, w, 224):
        flips.append(task.flips)
        hh, ww = h[task.indices], w[task.indices]
        b = task.boxes
        assert np.all(b[:, 0] >= 0) and np.all(b[:, 1] >= 0)
        assert np.all(b[:, 2] <= ww) and np.all(b[:, 3] <= hh)
        areas.append((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) / (hh * ww))
    rate = np.concatenate(flips).mean()
    assert 0.46 < rate < 0.54
    areas = np.concatenate(areas)
    assert areas.min() >= 0.07 and areas.max() <= 1.0
    # the same area distribution as torchvision's RandomResizedCrop on the same image sizes
    torch.manual_seed(0)
    ref = []
    for hh, ww in zip(h[:2048], w[:2048]):
        _, _, ch, cw = RandomResizedCrop.get_params(torch.empty(1, int(hh), int(ww)),
                                                    (0.08, 1.0), (3 / 4, 4 / 3))
        ref.append(ch * cw / (hh * ww))
    assert abs(areas.mean() - np.mean(ref)) < 0.02, (areas.mean(), np.mean(ref))


def test_random_resized_crop_falls_back_to_centre_crop_for_extreme_aspect():
    # a 1000×10 strip can never fit a crop of ratio ≤ 4/3 with area ≥ 8%: centre crop, clamped
    gen = keyed_generator(0)
    boxes = random_resized_boxes(torch.tensor([10]), torch.tensor([1000]), gen, (0.08, 1.0),
                                 (3 / 4, 4 / 3))
    x0, y0, x1, y1 = boxes[0].tolist()
    assert (y0, y1) == (0, 10) and x1 - x0 == pytest.approx(13) and x0 == pytest.approx(493)


@pytest.mark.parametrize("world", [2, 3])
def test_val_shards_are_disjoint_and_complete(shapes_records, world):
    seen = []
    for rank in range(world):
        loader = _loader(shapes_records, "val", batch_size=24, rank=rank, world_size=world)
        plan_indices = [t.indices for t in loader.plan.tasks(0, loader._heights,
                                                             loader._widths, 32)]
        seen.append(np.concatenate(plan_indices))
    all_idx = np.concatenate(seen)
    assert len(all_idx) == 100 and len(set(all_idx.tolist())) == 100
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(seen[a]) & set(seen[b])


def test_train_global_batch_is_the_same_whatever_the_number_of_ranks(shapes_records):
    single = _first(_loader(shapes_records, batch_size=16, seed=5))
    halves = [_first(_loader(shapes_records, batch_size=16, seed=5, rank=r, world_size=2))
              for r in range(2)]
    assert torch.equal(torch.cat([h.images for h in halves]), single.images)
    assert torch.equal(torch.cat([h.targets for h in halves]), single.targets)


def test_train_epoch_visits_each_sample_at_most_once_and_drops_last(shapes_records):
    loader = _loader(shapes_records, batch_size=48)
    idx = np.concatenate([t.indices for t in loader.plan.tasks(0, loader._heights,
                                                                loader._widths, 32)])
    assert len(idx) == (400 // 48) * 48 and len(set(idx.tolist())) == len(idx)


def test_validation_is_deterministic_in_order_and_complete(shapes_records):
    loader = _loader(shapes_records, "val", batch_size=32)
    runs = [[b for b in loader] for _ in range(2)]
    assert [len(b.targets) for b in runs[0]] == [32, 32, 32, 4]
    for a, b in zip(*runs):
        assert torch.equal(a.images, b.images)
    assert torch.equal(torch.cat([b.targets for b in runs[0]]),
                       torch.from_numpy(loader.records.labels))


def test_resume_mid_epoch_gives_the_same_later_batches(shapes_records):
    loader = _loader(shapes_records, seed=1)
    loader.set_epoch(2)
    full = [b.images for b in loader]
    loader.set_epoch(2, start_batch=10)
    resumed = [b.images for b in loader]
    assert len(resumed) == len(full) - 10
    assert all(torch.equal(a, b) for a, b in zip(full[10:], resumed))


def test_worker_processes_give_the_same_batches_as_in_process(shapes_records):
    a = _first(_loader(shapes_records, workers=0))
    b = _first(_loader(shapes_records, workers=2))
    assert torch.equal(a.images, b.images)


def test_device_decode_path_agrees_with_worker_path(shapes_records):
    # same boxes and flips; Pillow's and roi_align's resampling differ only slightly
    a = _first(_loader(shapes_records, decode="workers", image_size=48))
    b = _first(_loader(shapes_records, decode="device", image_size=48))
    assert torch.equal(a.targets, b.targets)
    diff = (a.images - b.images).abs().mean() / a.images.std()
    assert diff < 0.1, diff


def test_large_batches_are_cropped_in_size_groups_with_the_same_result():
    """A canvas over budget is cut into groups of similar sizes: every image once, each
    group's padded canvas within budget, and the crops equal to one canvas's."""
    g = torch.Generator().manual_seed(0)
    shapes = [(int(h), int(w)) for h, w in torch.randint(8, 90, (40, 2), generator=g)]
    shapes[7] = (300, 200)  # one large photo among small ones
    groups = size_groups(shapes, budget=20_000)
    assert sorted(i for grp in groups for i in grp) == list(range(40)) and len(groups) > 3
    for grp in groups:
        canvas = len(grp) * max(shapes[i][0] for i in grp) * max(shapes[i][1] for i in grp)
        assert canvas <= 20_000 or len(grp) == 1
    assert [7] in groups
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in shapes]
    boxes = torch.tensor([[w * 0.1, h * 0.2, w * 0.9, h * 0.95] for h, w in shapes])
    flips = torch.rand(40, generator=g) < 0.5
    one = crop_resize_flip(images, boxes, flips, 12, budget=1 << 40)
    grouped = crop_resize_flip(images, boxes, flips, 12, budget=20_000)
    assert grouped.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(one, grouped)


def test_crop_resize_flip_matches_pil_on_an_exact_crop():
    # a 2× downscale of an aligned crop: both paths average the same 2×2 pixel blocks
    img = torch.randint(0, 256, (3, 40, 60), dtype=torch.uint8)
    box = np.array([[10, 4, 42, 36]], np.float32)
    ours = crop_resize_flip([img], torch.from_numpy(box), torch.tensor([True]), 16)[0]
    want = img[:, 4:36, 10:42].float().reshape(3, 16, 2, 16, 2).mean((2, 4)).flip(2)
    assert (ours.float() - want).abs().max() <= 1
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, "PNG")
    pil = torch.from_numpy(np.array(pil_crop(buf.getvalue(), box[0], True, 16))).permute(2, 0, 1)
    assert (pil.float() - want).abs().max() <= 1


def test_batch_larger_than_dataset_is_a_clear_error(shapes_records):
    with pytest.raises(DataError, match="no full batch"):
        _loader(shapes_records, batch_size=1000)


def test_missing_split_and_folder_are_clear_errors(shapes_records, tmp_path):
    with pytest.raises(DataError, match="has no split 'test'"):
        _loader(shapes_records, "test")
    with pytest.raises(DataError, match="no such dataset folder"):
        _loader(tmp_path / "nope")


@cuda
def test_nvjpeg_path_on_cuda_matches_cpu_path(shapes_records):
    a = _first(_loader(shapes_records, decode="device", device="cpu", image_size=48))
    b = _first(_loader(shapes_records, decode="device", device="cuda", image_size=48))
    assert b.images.is_cuda and b.images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a.targets, b.targets.cpu())
    assert (a.images - b.images.cpu()).abs().mean() < 0.05


@pytest.mark.parametrize("workers", [0, 2])
def test_a_corrupt_record_is_a_one_line_error_naming_file_and_record(tmp_path, capsys,
                                                                      shapes_records, workers):
    import shutil

    from tricks.pipeline.records import RecordFile, RecordWriter
    from tricks.train.cli import _one_line

    src = RecordFile(shapes_records / "val.rec")
    root = tmp_path / "bad"
    root.mkdir()
    shutil.copy(shapes_records / "classes.json", root)
    with RecordWriter(root / "val.rec") as w:
        for i in range(8):
            data = src.raw(i).tobytes() if i != 5 else b"\xff\xd8garbage"
            w.add(data, 0, 64, 64)
    loader = _loader(root, "val", batch_size=8, workers=workers)
    with pytest.raises(DataError) as e:
        next(iter(loader))
    loader.close()
    line = _one_line(e.value)
    assert "val.rec: record 5 cannot be decoded" in line and "\n" not in line


@pytest.mark.parametrize("w,h", [(451, 333), (499, 301), (401, 397)])
def test_pil_crop_of_the_whole_image_after_dct_downscaling(w, h):
    """A box reaching the far edges, shrunk by ≥ 2 (so Pillow drafts): no overshoot error."""
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 200, 30)).save(buf, "JPEG")
    for size in (64, 100, 160):
        out = pil_crop(buf.getvalue(), np.array([0, 0, w, h], np.float32), False, size)
        assert out.shape == (size, size, 3) and abs(int(out[..., 1].mean()) - 200) <= 3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3),
                                       (torch.bfloat16, 3e-2)])
def test_normalize_stage_matches_the_definition(dtype, tol):
    from tricks.pipeline.stages import IMAGENET_MEAN, IMAGENET_STD, Stages
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8).contiguous(
        memory_format=torch.channels_last)
    out, targets = Stages(dtype, 10)(x, torch.arange(4), None)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert (out.float() - (x.float() / 255 - mean) / std).abs().max() < tol
    assert torch.equal(targets, torch.arange(4))


@pytest.mark.parametrize("workers", [0, 2])
def test_normalize_folded_into_the_decode_gives_the_stage_s_pixels(shapes_records, workers,
                                                                   monkeypatch):
    from tricks.pipeline.engines.base import Capabilities
    from tricks.pipeline.engines.native import NativeEngine, _jpeg
    if _jpeg is None:
        pytest.skip("tricks.pipeline._jpeg not built")
    folded = _loader(shapes_records, workers=workers, seed=4)
    assert folded.stages.input_normalized
    monkeypatch.setattr(NativeEngine, "capabilities",
                        classmethod(lambda cls, device, **o: Capabilities(normalizes=False)))
    staged = _loader(shapes_records, workers=workers, seed=4)
    assert not staged.stages.input_normalized
    for a, b in zip(folded, staged):
        assert a.images.dtype == torch.float32
        assert a.images.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=1e-6)
        assert torch.equal(a.targets, b.targets)


@pytest.mark.parametrize("why", ["fp16", "augment", "pad", "pillow", "uint8"])
def test_normalize_stays_a_stage_where_the_engine_cannot_do_it(shapes_records, why):
    from tricks.pipeline import PadCrop
    from tricks.pipeline.augment import ColorJitter
    kw = {"fp16": dict(dtype=torch.float16), "augment": dict(augment=[ColorJitter(0.4, 0.4, 0.4)]),
          "pad": dict(crop=PadCrop(4)), "pillow": dict(cpu_decoder="pillow"),
          "uint8": dict(dtype=torch.uint8)}
    loader = _loader(shapes_records, **kw[why])
    assert not loader.stages.input_normalized and loader.engine._normalize is None
    assert next(iter(loader)).images.dtype == loader.stages.dtype


def test_kept_batches_are_never_overwritten(shapes_records):
    """The CPU path reuses a batch buffer only when nothing holds it (HostBuffers)."""
    kept = list(_loader(shapes_records, workers=2, seed=7))
    again = _loader(shapes_records, workers=2, seed=7)
    for a, b in zip(kept, again):  # `again`'s batches are dropped at once: reused buffers
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert len({k.images.data_ptr() for k in kept}) == len(kept)
