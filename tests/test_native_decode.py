"""The native engine's CPU decode path (tricks.pipeline._jpeg, and Pillow's ``pil_crop``, its
fallback) against a full-resolution PIL reference of the same box: same pixels, no shift."""
import io
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from tricks.pipeline.engines import native
from tricks.pipeline.engines.base import EngineSpec
from tricks.pipeline.engines.native import NativeEngine, dct_denominator, pil_crop
from tricks.errors import DataError, OptionError
from tricks.pipeline.records import RecordFile, RecordWriter
from tricks.pipeline.sampling import BatchTask, center_boxes, keyed_generator, random_resized_boxes

HOPPER = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
needs_ext = pytest.mark.skipif(native._jpeg is None, reason="tricks.pipeline._jpeg not built")


def _photo(size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """Grace Hopper's photograph at ``size`` with sharp-edged shapes drawn over it: edges at
    every angle, thin lines, saturated colours (chroma subsampling shows there)."""
    img = Image.open(HOPPER).convert("RGB").resize(size, Image.Resampling.LANCZOS)
    d = ImageDraw.Draw(img)
    w, h = size
    d.rectangle((w // 10, h // 8, w // 3, h // 3), fill=(250, 20, 20))
    d.ellipse((w // 2, h // 2, w - w // 8, h - h // 10), outline=(20, 240, 30), width=3)
    d.polygon([(w // 5, h - 5), (w // 2, h // 2 + 7), (w - 9, h - 3)], fill=(30, 30, 230))
    for k in range(0, w, max(7, w // 12)):
        d.line((k, 0, k + h // 3, h // 3), fill=(255, 255, 255), width=1)
    return img.convert(mode)


def _shapes(size: tuple[int, int]) -> Image.Image:
    """Large flat shapes with sharp edges at many angles: where a sub-pixel shift shows most,
    with no fine texture for the DCT-domain reduction to smooth differently."""
    w, h = size
    img = Image.new("RGB", size, (40, 60, 90))
    d = ImageDraw.Draw(img)
    rng = np.random.default_rng(3)
    for _ in range(40):
        x, y = rng.integers(0, w), rng.integers(0, h)
        r = int(rng.integers(min(w, h) // 12, min(w, h) // 4))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            d.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        else:
            a = rng.uniform(0, np.pi)
            pts = [(x + r * np.cos(a + k * 2.1), y + r * np.sin(a + k * 2.1)) for k in range(3)]
            d.polygon(pts, fill=colour)
    return img


def _jpeg(img: Image.Image, subsampling: int = 2, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    kw = {} if img.mode == "L" else {"subsampling": subsampling}
    img.save(buf, "JPEG", quality=quality, **kw)
    return buf.getvalue()


def _reference(data: bytes, box, flip: bool, size: int) -> np.ndarray:
    """PIL at full resolution, each axis on its own: BOX (area averaging) where it shrinks,
    BILINEAR where it enlarges."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    x0, y0, x1, y1 = (float(v) for v in box)
    pick = lambda n: Image.Resampling.BOX if n >= size else Image.Resampling.BILINEAR  # noqa
    out = img.resize((size, img.height), pick(x1 - x0), box=(x0, 0, x1, img.height))
    out = out.resize((size, size), pick(y1 - y0), box=(0, y0, size, y1))
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def _boxes(w: int, h: int, n: int, train: bool, seed: int = 0) -> np.ndarray:
    hs, ws = torch.full((n,), h), torch.full((n,), w)
    if train:
        return random_resized_boxes(hs, ws, keyed_generator(seed), (0.08, 1.0),
                                    (3 / 4, 4 / 3)).numpy()
    return center_boxes(hs, ws, 0.875).numpy()


def _turbo(data: bytes, boxes: np.ndarray, flips: np.ndarray, size: int,
           fast: bool = False) -> np.ndarray:
    out = np.zeros((len(boxes), size, size, 3), np.uint8)
    failed = native._jpeg.decode_crops([data] * len(boxes), boxes.astype(np.float32),
                                       flips.astype(np.uint8), out, threads=2, fast=fast)
    assert failed == []
    return out


def _pillow(data: bytes, boxes: np.ndarray, flips: np.ndarray, size: int,
            jpegs: list | None = None) -> np.ndarray:
    jpegs = jpegs or [data] * len(boxes)
    return np.stack([pil_crop(j, b, bool(f), size) for j, b, f in zip(jpegs, boxes, flips)])


DECODERS = [pytest.param(_turbo, id="libjpeg-turbo", marks=needs_ext),
            pytest.param(_pillow, id="pillow")]
# odd sizes; 4:4:4, 4:2:2 and 4:2:0 subsampling; a grayscale-origin JPEG
IMAGES = [((500, 375), "RGB", 2), ((333, 251), "RGB", 0), ((251, 333), "RGB", 1),
          ((97, 131), "RGB", 2), ((301, 227), "L", 2)]


def _mae(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("shape,mode,sub", IMAGES)
@pytest.mark.parametrize("train", [True, False], ids=["train", "val"])
@pytest.mark.parametrize("size", [224, 160, 57])
def test_crops_match_a_full_resolution_pil_reference(decode, shape, mode, sub, train, size):
    data = _jpeg(_photo(shape, mode), sub)
    n = 24 if train else 1
    boxes = _boxes(*shape, n, train, seed=size)
    flips = np.arange(n) % 2 == 1
    got = decode(data, boxes, flips, size)
    maes = [_mae(got[k], _reference(data, boxes[k], flips[k], size)) for k in range(n)]
    direct = [m for m, b in zip(maes, boxes) if dct_denominator(b, size) == 1]
    scaled = [m for m, b in zip(maes, boxes) if dct_denominator(b, size) > 1]
    # decoded at full size, every crop matches (measured: ≤ 0.25 levels)
    assert max(direct, default=0) <= 1.5, direct
    # decoded at 1/2, 1/4 or 1/8 in the DCT domain (crop ≥ 6× the output; see
    # test_dct_reduced_crops_match_too): Pillow's fallback reduces with draft(), then its BOX
    # filter (measured: mean 2.5, single crops up to 3); a wrong region or channel order is ≥ 20
    assert np.mean(scaled or [0]) <= 3.5 and max(scaled, default=0) <= 5, scaled


@needs_ext
@pytest.mark.parametrize("sub", [2, 0])
def test_dct_reduced_crops_match_too(sub):
    """Crops at least 6× the output side are decoded at 1/2, 1/4 or 1/8, then area-filtered
    by the remaining ≥ 3×: still within 1.5 levels of the full-resolution box (measured here:
    mean 1.2–1.3, single crops up to 1.6; with a remaining shrink of only 1–2×, as libjpeg's
    reduction allows whenever the crop is twice the output, it was 2.5–4)."""
    data = _jpeg(_photo((1200, 900)), sub)
    boxes = _boxes(1200, 900, 24, True, seed=11)
    flips = np.arange(24) % 2 == 0
    for size in (57, 96):
        got = _turbo(data, boxes, flips, size)
        scaled = [_mae(got[k], _reference(data, boxes[k], flips[k], size)) for k in range(24)
                  if dct_denominator(boxes[k], size) > 1]
        assert len(scaled) >= 6  # the test reaches the reduction
        assert np.mean(scaled) <= 1.5 and max(scaled) <= 2.0, scaled


def _shift_errors(decode, data, boxes, flips, size, axis) -> dict[float, float]:
    got = decode(data, boxes, flips, size)
    errors = {}
    for s in (-0.5, -0.25, 0.0, 0.25, 0.5):
        d = np.zeros(4, np.float32)
        d[[axis, axis + 2]] = s
        errors[s] = float(np.mean([_mae(got[k], _reference(data, boxes[k] + d, flips[k], size))
                                   for k in range(len(boxes))]))
    return errors


@pytest.mark.parametrize("decode", DECODERS)
@pytest.mark.parametrize("axis", [0, 1], ids=["x", "y"])
@pytest.mark.parametrize("size", [112, 60])  # 60: most crops decoded at 1/2 or 1/4 scale
def test_no_geometric_shift(decode, axis, size):
    """The error against references shifted by -1/2 … +1/2 source pixel is least at no shift:
    the vertex of a parabola through the five errors lies within 0.2 pixel of 0, so an output
    off by a quarter pixel or more fails here (the old draft rounding did, by up to 1 pixel)."""
    shape = (501, 375)  # ceil(375 / d) · d ≠ 375: the draft path's old rounding shows
    data = _jpeg(_shapes(shape), 0, quality=95)
    boxes = _boxes(*shape, 48, True, seed=7)
    inside = (boxes[:, 0] >= 1) & (boxes[:, 1] >= 1) & (boxes[:, 2] <= shape[0] - 1) & \
        (boxes[:, 3] <= shape[1] - 1)  # room for the shifted references
    boxes = boxes[inside][:24]
    errors = _shift_errors(decode, data, boxes, np.zeros(len(boxes), bool), size, axis)
    a, b, _ = np.polyfit(list(errors), list(errors.values()), 2)
    assert a > 0 and abs(-b / (2 * a)) < 0.2, errors


@needs_ext
def test_fast_dct_stays_close():
    data = _jpeg(_photo((500, 375)), 2)
    boxes = _boxes(500, 375, 16, True)
    flips = np.zeros(16, bool)
    fast = _turbo(data, boxes, flips, 160, fast=True)
    exact = _turbo(data, boxes, flips, 160)
    # DCT-domain reduction from 2× (not 6×), another IDCT and upsampling: close to the exact
    # crops (measured 2.1 on this image), never a different region (≥ 20)
    assert 0 < _mae(fast, exact) <= 3.5


@needs_ext
def test_flip_is_the_mirror_image():
    data = _jpeg(_photo((333, 251)), 0)
    boxes = _boxes(333, 251, 4, True)
    plain = _turbo(data, boxes, np.zeros(4, bool), 96)
    flipped = _turbo(data, boxes, np.ones(4, bool), 96)
    assert np.array_equal(plain[:, :, ::-1], flipped)


@needs_ext
def test_full_decode_equals_pillow():
    data = _jpeg(_photo((333, 251)), 1)
    h, w, pixels = native._jpeg.decode(data)
    ours = np.frombuffer(pixels, np.uint8).reshape(h, w, 3)
    assert (h, w) == (251, 333)
    assert _mae(ours, np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))) < 0.5


def _cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    _photo((120, 90)).convert("CMYK").save(buf, "JPEG", quality=90)
    return buf.getvalue()


@needs_ext
def test_what_libjpeg_refuses_is_reported_per_image():
    good = _jpeg(_photo((120, 90)))
    bad = [_cmyk_jpeg(), good[: len(good) // 2], b"\xff\xd8 not a jpeg"]
    boxes = np.tile(np.array([[0, 0, 90, 90]], np.float32), (4, 1))
    out = np.zeros((4, 32, 32, 3), np.uint8)
    failed = native._jpeg.decode_crops([good] + bad, boxes, np.zeros(4, np.uint8), out)
    assert [k for k, _ in failed] == [1, 2, 3]
    assert "CMYK" in failed[0][1] and all(reason for _, reason in failed)


@needs_ext
def test_decode_crops_checks_its_buffers():
    out = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="boxes"):
        native._jpeg.decode_crops([b"", b""], np.zeros((2, 3), np.float32), np.zeros(2, np.uint8),
                                  out)
    with pytest.raises(ValueError, match="out must be"):
        native._jpeg.decode_crops([b"", b""], np.zeros((2, 4), np.float32), np.zeros(2, np.uint8),
                                  np.zeros((2, 8, 7, 3), np.uint8))


def _records(tmp_path, jpegs: list[bytes]) -> RecordFile:
    path = tmp_path / "train.rec"
    with RecordWriter(path) as w:
        for k, data in enumerate(jpegs):
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
            w.add(data, k % 3, height, width)
    return RecordFile(path)


def _task(records: RecordFile, size: int, seed: int = 0) -> BatchTask:
    n = len(records)
    idx = np.arange(n)
    boxes = random_resized_boxes(torch.from_numpy(records.index["height"].astype(np.int64)),
                                 torch.from_numpy(records.index["width"].astype(np.int64)),
                                 keyed_generator(seed), (0.08, 1.0), (3 / 4, 4 / 3)).numpy()
    return BatchTask(0, 0, idx, boxes, idx % 2 == 0, size)


@needs_ext
@pytest.mark.parametrize("workers", [0, 2])
def test_engine_uses_libjpeg_turbo_and_matches_pillow(tmp_path, workers):
    jpegs = [_jpeg(_photo((300 + 7 * k, 220 + 5 * k)), k % 3) for k in range(10)]
    records = _records(tmp_path, jpegs)
    tasks = [_task(records, 64, seed) for seed in range(3)]
    turbo = NativeEngine(records, EngineSpec(workers=workers))
    pillow = NativeEngine(records, EngineSpec(workers=0), cpu_decoder="pillow")
    assert turbo.cpu_decoder == "libjpeg-turbo"
    try:
        for task, (a, la), (b, lb) in zip(tasks, turbo.batches(tasks), pillow.batches(tasks)):
            assert a.shape == (10, 3, 64, 64) and a.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(la, lb) and torch.equal(la, torch.from_numpy(records.labels))
            jpegs = [records.raw(i) for i in task.indices]
            direct = np.zeros((10, 64, 64, 3), np.uint8)
            native._jpeg.decode_crops(jpegs, task.boxes, task.flips.astype(np.uint8), direct)
            assert np.array_equal(a.permute(0, 2, 3, 1).numpy(), direct)  # in order, in place
            expect = _pillow(None, task.boxes, task.flips, 64, jpegs)
            assert np.array_equal(b.permute(0, 2, 3, 1).numpy(), expect)
    finally:
        turbo.close()
        pillow.close()
    assert turbo.fallbacks == 0 and pillow.fallbacks == 30


@needs_ext
def test_engine_falls_back_to_pillow_for_cmyk_and_counts_it(tmp_path):
    jpegs = [_jpeg(_photo((200, 150))), _cmyk_jpeg(), _jpeg(_photo((150, 200)))]
    records = _records(tmp_path, jpegs)
    engine = NativeEngine(records, EngineSpec(workers=1))
    task = _task(records, 48)
    (images, _), = list(engine.batches([task]))
    engine.close()
    assert engine.fallbacks == 1 and "record 1" in engine.fallback_reasons[0]
    expect = pil_crop(jpegs[1], task.boxes[1], bool(task.flips[1]), 48)
    assert np.array_equal(images[1].permute(1, 2, 0).numpy(), expect)


@needs_ext
def test_engine_names_an_undecodable_record(tmp_path):
    good = _jpeg(_photo((200, 150)))
    records = _records(tmp_path, [good, good[: len(good) // 3]])
    engine = NativeEngine(records, EngineSpec(workers=2))
    with pytest.raises(DataError, match=r"train\.rec: record 1 cannot be decoded"):
        list(engine.batches([_task(records, 32)]))
    engine.close()


def _libjpeg_headers() -> bool:
    import subprocess
    try:
        return subprocess.run(["cc", "-E", "-x", "c", "-"], input=b"#include <stdio.h>\n"
                              b"#include <jpeglib.h>\n", capture_output=True).returncode == 0
    except OSError:
        return False


def test_the_extension_is_built_and_current_where_libjpeg_headers_exist():
    """The extension is optional, so a C error would only make every test above skip and the
    engine fall back to Pillow: where it can be built, it must be, from the current source."""
    if not _libjpeg_headers():
        pytest.skip("no libjpeg headers: the Pillow path is the expected one")
    assert native._jpeg is not None, "tricks.pipeline._jpeg failed to build (setup.py)"
    source = Path(native.__file__).parents[1] / "_jpeg.c"
    if source.is_file() and Path(native._jpeg.__file__).parent == source.parent:
        assert Path(native._jpeg.__file__).stat().st_mtime >= source.stat().st_mtime, \
            "tricks.pipeline._jpeg is older than _jpeg.c: rebuild (setup.py build_ext --inplace)"


def test_without_the_extension_the_engine_says_so_once_and_uses_pillow(tmp_path, monkeypatch):
    records = _records(tmp_path, [_jpeg(_photo((120, 90))) for _ in range(4)])
    monkeypatch.setattr(native, "_jpeg", None)
    monkeypatch.setattr(native, "_said_pillow", False)
    with pytest.warns(RuntimeWarning, match="decodes on the CPU with Pillow"):
        engine = NativeEngine(records, EngineSpec(workers=0))
    (images, _), = list(engine.batches([_task(records, 32)]))
    assert engine.cpu_decoder == "pillow" and engine.fallbacks == 4 and images.shape[0] == 4
    engine.close()
    with pytest.raises(OptionError, match="not built"):
        NativeEngine(records, EngineSpec(), cpu_decoder="libjpeg-turbo")
    with pytest.raises(OptionError, match="cpu_decoder"):
        NativeEngine(records, EngineSpec(), cpu_decoder="simd")


# ImageNet's constants as the stage computes them: x_u8 · scale + shift
_SCALE = [1 / (255 * s) for s in (0.229, 0.224, 0.225)]
_SHIFT = [-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]


def _normalized(u8: np.ndarray) -> np.ndarray:
    return u8.astype(np.float32) * np.float32(_SCALE) + np.float32(_SHIFT)


@needs_ext
@pytest.mark.parametrize("size", [64, 57])
def test_normalized_output_is_the_uint8_output_normalized(size):
    data = _jpeg(_photo((333, 251)), 2)
    boxes = _boxes(333, 251, 12, True, seed=5)
    flips = (np.arange(12) % 3 == 0).astype(np.uint8)
    u8 = _turbo(data, boxes, flips, size)
    f32 = np.full((12, size, size, 3), np.nan, np.float32)
    failed = native._jpeg.decode_crops([data] * 12, boxes.astype(np.float32), flips, f32,
                                       threads=2, normalize=_SCALE + _SHIFT)
    assert failed == []
    np.testing.assert_allclose(f32, _normalized(u8), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="float32"):  # a uint8 buffer is 4× too small
        native._jpeg.decode_crops([data] * 12, boxes.astype(np.float32), flips, u8,
                                  normalize=_SCALE + _SHIFT)
    with pytest.raises(ValueError, match="6 floats"):
        native._jpeg.decode_crops([data] * 12, boxes.astype(np.float32), flips, f32,
                                  normalize=_SCALE)


@needs_ext
def test_engine_normalizes_in_the_decode_threads_pillow_fallback_included(tmp_path):
    jpegs = [_jpeg(_photo((200, 150))), _cmyk_jpeg(), _jpeg(_photo((150, 200)), 0)]
    records = _records(tmp_path, jpegs)
    task = _task(records, 48)
    plain = NativeEngine(records, EngineSpec(workers=2))
    folded = NativeEngine(records, EngineSpec(workers=2, normalize=tuple(_SCALE + _SHIFT)))
    (u8, _), = list(plain.batches([task]))
    (f32, _), = list(folded.batches([task]))
    plain.close(), folded.close()
    assert f32.dtype == torch.float32 and f32.is_contiguous(memory_format=torch.channels_last)
    assert folded.fallbacks == 1  # the CMYK image, through Pillow, normalized the same way
    np.testing.assert_allclose(f32.permute(0, 2, 3, 1).numpy(),
                               _normalized(u8.permute(0, 2, 3, 1).numpy()), rtol=0, atol=1e-6)
    # a CUDA target keeps uint8 (4× fewer bytes to copy); so does the Pillow decoder
    assert not NativeEngine.capabilities(torch.device("meta"), decode="workers").normalizes
    assert not NativeEngine.capabilities(torch.device("cpu"), cpu_decoder="pillow").normalizes
    assert NativeEngine.capabilities(torch.device("cpu")).normalizes
