import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

from tricks.pipeline.convert import convert, format_report, inspect_and_encode
from tricks.errors import DataError
from tricks.pipeline.records import RecordFile, RecordWriter, read_classes


def _jpeg(w=40, h=30, mode="RGB", fmt="JPEG", **kw) -> bytes:
    rng = np.random.default_rng(w * h)
    img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


def _is_baseline_rgb_jpeg(data: bytes):
    img = Image.open(io.BytesIO(data))
    return img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")


def test_record_file_round_trip(tmp_path):
    items = [(b"abc", 1, 10, 20), (b"", 0, 1, 1), (b"x" * 1000, 7, 3, 4)]
    with RecordWriter(tmp_path / "t.rec") as w:
        for it in items:
            w.add(*it)
    rf = RecordFile(tmp_path / "t.rec")
    assert len(rf) == 3
    for i, (data, label, h, wd) in enumerate(items):
        assert rf.raw(i).tobytes() == data
        assert (rf.index[i]["label"], rf.index[i]["height"], rf.index[i]["width"]) == (label, h, wd)
    assert rf.index["offset"].dtype == np.uint64


def test_record_file_rejects_other_files(tmp_path):
    (tmp_path / "x.rec").write_bytes(b"not a record file at all" * 4)
    with pytest.raises(DataError, match="bad magic"):
        RecordFile(tmp_path / "x.rec")


def test_good_jpeg_is_kept_byte_for_byte():
    data = _jpeg()
    enc = inspect_and_encode(data)
    assert enc.data == data and not enc.reencoded and (enc.height, enc.width) == (30, 40)


@pytest.mark.parametrize("kind,data,reason", [
    ("grayscale", lambda: _jpeg(mode="L"), "mode L"),
    ("cmyk", lambda: _jpeg(mode="CMYK"), "mode CMYK"),
    ("progressive", lambda: _jpeg(progressive=True), "progressive"),
    ("png", lambda: _jpeg(fmt="PNG"), "format PNG"),
    ("rgba-png", lambda: _jpeg(mode="RGBA", fmt="PNG"), "format PNG"),
    ("bmp", lambda: _jpeg(fmt="BMP"), "format BMP"),
])
def test_odd_formats_are_reencoded_to_baseline_rgb_jpeg(kind, data, reason):
    enc = inspect_and_encode(data(), quality=95)
    assert reason in enc.reencoded
    assert _is_baseline_rgb_jpeg(enc.data)
    decoded = decode_jpeg(torch.frombuffer(bytearray(enc.data), dtype=torch.uint8),
                          mode=ImageReadMode.UNCHANGED)
    assert decoded.shape == (3, 30, 40)


def test_max_side_resizes_keeping_aspect():
    enc = inspect_and_encode(_jpeg(200, 100), max_side=50)
    assert (enc.width, enc.height) == (50, 25) and "over max side" in enc.reencoded


@pytest.mark.parametrize("content,why", [
    (b"", "empty"), (b"hello, I am text\n", "not a decodable"), (bytes(range(256)) * 4,
                                                                  "not a decodable")])
def test_undecodable_bytes_are_rejected(content, why):
    enc = inspect_and_encode(content)
    assert enc.data is None and why in enc.error


def test_truncated_jpeg_is_rejected():
    data = _jpeg(64, 64)
    assert inspect_and_encode(data[: len(data) // 2]).data is None


@pytest.fixture
def messy_tree(tmp_path):
    root = tmp_path / "messy"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for k in range(3):
                (root / split / c / f"{k}.jpg").write_bytes(_jpeg(30 + k, 20))
    t = root / "train"
    (t / "cat" / "empty.jpg").write_bytes(b"")
    (t / "cat" / "text.jpg").write_text("this is not an image")
    (t / "dog" / "trunc.jpg").write_bytes(_jpeg(64, 64)[:300])
    (t / "dog" / "png-named.jpg").write_bytes(_jpeg(fmt="PNG"))
    (t / "dog" / "gray.jpeg").write_bytes(_jpeg(mode="L"))
    (t / "dog" / "prog.JPG").write_bytes(_jpeg(progressive=True))
    (t / "dog" / "notes.txt").write_text("ignored")
    (t / "dog" / ".hidden.jpg").write_bytes(_jpeg())
    (t / "bird").mkdir()  # an empty class folder
    return root


def test_convert_reports_broken_files_and_reencodes_odd_ones(messy_tree, tmp_path):
    out = tmp_path / "out"
    report = convert(messy_tree, out, workers=2, progress=False, keep_empty_classes=True)
    tr = report["splits"]["train"]
    assert tr["written"] == 6 + 3
    assert sorted(s["path"].rsplit("/", 1)[1] for s in tr["skipped"]) == \
        ["empty.jpg", "text.jpg", "trunc.jpg"]
    assert tr["reencoded"] == {"format PNG": 1, "mode L": 1, "progressive": 1}
    assert tr["empty_classes"] == ["bird"]
    assert tr["ignored_files"] == 2
    assert read_classes(out) == ["bird", "cat", "dog"]
    assert json.loads((out / "report.json").read_text()) == report
    text = format_report(report)
    assert "3 skipped" in text and "empty class folders: bird" in text and "text.jpg" in text
    rf = RecordFile(out / "train.rec")
    for i in range(len(rf)):
        assert _is_baseline_rgb_jpeg(rf.raw(i).tobytes())
    assert sorted(rf.labels.tolist()) == [1] * 3 + [2] * 6
    assert len(RecordFile(out / "val.rec")) == 6


def test_strict_fails_on_the_first_bad_file_naming_it(messy_tree, tmp_path):
    with pytest.raises(DataError, match=r"empty\.jpg: empty file"):
        convert(messy_tree, tmp_path / "out", workers=0, strict=True, progress=False,
                keep_empty_classes=True)


def test_single_split_tree_becomes_train(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        (tmp_path / "src" / c / "1.jpg").write_bytes(_jpeg())
    report = convert(tmp_path / "src", tmp_path / "out", workers=0, progress=False)
    assert list(report["splits"]) == ["train"]


def test_flat_validation_folder_with_label_file(tmp_path):
    src = tmp_path / "in"
    for c in ("n01", "n02"):
        (src / "train" / c).mkdir(parents=True)
        (src / "train" / c / "t.jpg").write_bytes(_jpeg())
    (src / "val").mkdir()
    for k in range(3):
        (src / "val" / f"ILSVRC_val_{k}.JPEG").write_bytes(_jpeg())
    labels = tmp_path / "LOC_val_solution.csv"
    labels.write_text("ImageId,PredictionString\nILSVRC_val_0,n02 1 2 3 4\n"
                      "ILSVRC_val_1,n01 5 6 7 8 n01 1 1 1 1\n")
    report = convert(src, tmp_path / "out", workers=0, val_labels=labels, progress=False)
    val = report["splits"]["val"]
    assert val["written"] == 2 and len(val["unlabelled"]) == 1
    assert RecordFile(tmp_path / "out" / "val.rec").labels.tolist() == [1, 0]


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "no such folder"),
    (lambda p: p.mkdir(), "is empty"),
    (lambda p: (p.mkdir(), (p / "x.jpg").write_bytes(_jpeg())), "no class sub-folders"),
    (lambda p: (p.mkdir(), (p / "a").mkdir(), (p / "a" / "r.txt").write_text("")),
     "no images found"),
])
def test_bad_sources_are_one_line_errors(tmp_path, setup, message):
    src = tmp_path / "src"
    setup(src)
    with pytest.raises(DataError, match=message) as e:
        convert(src, tmp_path / "out", workers=0, progress=False)
    assert "\n" not in str(e.value)


def test_a_file_as_destination_is_a_one_line_error(tmp_path):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    (src / "x.jpg").write_bytes(_jpeg())
    dst = tmp_path / "notes.txt"
    dst.write_text("keep me")
    with pytest.raises(DataError, match="notes.txt: exists and is not a folder") as e:
        convert(tmp_path / "src", dst, workers=0, progress=False)
    assert "\n" not in str(e.value) and dst.read_text() == "keep me"


def test_a_destination_inside_the_source_is_refused(tmp_path):
    """Converted into the tree it reads, the output would be a class (or split) of that tree the
    next time it is read (found by a new user: the tree then failed to convert at all)."""
    for c in ("a", "b"):
        (tmp_path / "src" / c).mkdir(parents=True)
        (tmp_path / "src" / c / "1.jpg").write_bytes(_jpeg())
    for dst in (tmp_path / "src" / "rec", tmp_path / "src" / "a" / "rec"):
        with pytest.raises(DataError, match="inside the source tree") as e:
            convert(tmp_path / "src", dst, workers=0, progress=False)
        assert "\n" not in str(e.value) and not dst.exists()


@pytest.mark.parametrize("options,message", [
    (dict(max_side=0), "max side must be a positive number of pixels, got 0"),
    (dict(max_side=-5), "max side must be a positive number of pixels, got -5"),
    (dict(quality=200), "JPEG quality must be in 1..100, got 200"),
    (dict(workers=-1), "workers must be an integer ≥ 0"),
])
def test_bad_convert_options_are_one_line_errors(tmp_path, options, message):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "1.jpg").write_bytes(_jpeg())
    from tricks.errors import OptionError
    with pytest.raises(OptionError, match=message):
        convert(tmp_path / "src", tmp_path / "out", progress=False, **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("options,message", [
    (dict(max_resolution=0), "beton max resolution must be a positive number of pixels, got 0"),
    (dict(jpeg_quality=0), "beton JPEG quality must be in 1..100"),
])
def test_bad_beton_options_are_refused_before_ffcv_runs(tmp_path, options, message):
    """FFCV's writer processes die on max_resolution=0 (an OpenCV assertion) and its parent
    waits for them forever: the value is refused first (FFCV need not be installed)."""
    from tricks.errors import OptionError
    from tricks.pipeline.beton import write_beton
    with pytest.raises(OptionError, match=message):
        write_beton(tmp_path / "train.rec", **options)


def test_a_conversion_writes_no_progress_bar_into_a_pipe(tmp_path):
    """No carriage returns when stderr is not a terminal (a log, a pipe), as tricks train."""
    import subprocess
    import sys
    (tmp_path / "src" / "a").mkdir(parents=True)
    for k in range(3):
        (tmp_path / "src" / "a" / f"{k}.jpg").write_bytes(_jpeg())
    code = ("import sys; from tricks.pipeline.convert import convert; "
            "convert(sys.argv[1], sys.argv[2], workers=0)")
    # bytes, not text: text mode would turn the carriage returns into newlines
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path / "src"),
                          str(tmp_path / "out")], capture_output=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert b"\r" not in run.stdout + run.stderr


# --- fidelity: orientation, modes, links, empty classes, large images (issue 13) ----------------

QUADRANTS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255))  # TL, TR, BL, BR


def _quadrants(w=96, h=48) -> Image.Image:
    a = np.zeros((h, w, 3), np.uint8)
    a[:h // 2, :w // 2], a[:h // 2, w // 2:] = QUADRANTS[0], QUADRANTS[1]
    a[h // 2:, :w // 2], a[h // 2:, w // 2:] = QUADRANTS[2], QUADRANTS[3]
    return Image.fromarray(a)


def _quadrant_means(img: Image.Image) -> np.ndarray:
    a = np.asarray(img.convert("RGB")).astype(float)
    h, w = a.shape[:2]
    qs = [a[:h // 2, :w // 2], a[:h // 2, w // 2:], a[h // 2:, :w // 2], a[h // 2:, w // 2:]]
    return np.array([q[2:-2, 2:-2].mean(axis=(0, 1)) for q in qs])


def _decode(data) -> Image.Image:
    return Image.open(io.BytesIO(bytes(data)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_stored_upright(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    _quadrants().save(out, "JPEG", quality=95, exif=exif.tobytes())
    data = out.getvalue()
    upright = ImageOps.exif_transpose(_decode(data))  # Pillow's reading of the tag
    enc = inspect_and_encode(data)
    assert (enc.height, enc.width) == (upright.height, upright.width)
    stored = _decode(enc.data)
    assert stored.size == upright.size and stored.getexif().get(0x0112, 1) == 1
    assert np.abs(_quadrant_means(stored) - _quadrant_means(upright)).max() < 4
    assert ("EXIF orientation" in enc.reencoded) == (orientation != 1)


def _saved(img: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kw)
    return out.getvalue()


_RAMP = np.tile(np.arange(256), (8, 1))  # 8 rows of 0..255: the expected 8-bit values


def _mode_cases():
    r16 = (_RAMP * 257).astype(np.uint16)
    pal = Image.fromarray(_RAMP.astype(np.uint8), "L").convert("P")  # grey palette
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0  # index 0 (black) is transparent: flattened onto white
    want_t = _RAMP.copy()
    want_t[:, 0] = 255
    alpha = np.full(_RAMP.shape, 255, np.uint8)
    alpha[:, :128] = 0  # left half transparent
    half_white = np.where(alpha == 0, 255, _RAMP)
    la = Image.merge("LA", [Image.fromarray(_RAMP.astype(np.uint8)), Image.fromarray(alpha)])
    rgba = Image.merge("RGBA", [Image.fromarray(_RAMP.astype(np.uint8))] * 3 +
                       [Image.fromarray(alpha)])
    return {
        "I;16 png": (lambda: _saved(Image.fromarray(r16), "PNG"), _RAMP),
        "I;16B tiff": (lambda: _saved(Image.fromarray(r16.astype(">u2")), "TIFF"), _RAMP),
        "I 32-bit tiff": (lambda: _saved(Image.fromarray(r16.astype(np.int32), "I"), "TIFF"),
                          _RAMP),
        "F 0..1 tiff": (lambda: _saved(Image.fromarray((_RAMP / 255).astype(np.float32), "F"),
                                       "TIFF"), _RAMP),
        "P png": (lambda: _saved(pal, "PNG"), _RAMP),
        "P transparent png": (lambda: _saved(pal_t, "PNG", transparency=0), want_t),
        "LA png": (lambda: _saved(la, "PNG"), half_white),
        "P png with an alpha table": (lambda: _saved(pal, "PNG", transparency=bytes(
            [0] * 128 + [255] * 128)), half_white),
        "RGBA png": (lambda: _saved(rgba, "PNG"), half_white),
        "1 png": (lambda: _saved(Image.fromarray(_RAMP >= 128), "PNG"),
                  np.where(_RAMP >= 128, 255, 0)),
        "CMYK jpeg": (lambda: _saved(Image.fromarray(_RAMP.astype(np.uint8)).convert("CMYK"),
                                     "JPEG", quality=98), _RAMP),
        "YCbCr jpeg": (lambda: _saved(Image.fromarray(_RAMP.astype(np.uint8)).convert("YCbCr"),
                                      "JPEG", quality=98), _RAMP),
    }


@pytest.mark.parametrize("case", list(_mode_cases()))
def test_every_mode_maps_to_8bit_rgb_by_its_value_range(case):
    make, want = _mode_cases()[case]
    enc = inspect_and_encode(make(), quality=98)
    assert enc.data is not None, enc.error
    got = np.asarray(_decode(enc.data)).astype(float)
    assert got.shape == (*want.shape, 3) and _is_baseline_rgb_jpeg(enc.data)
    # JPEG rounding and ringing at the step edges aside, every level is where it should be
    err = np.abs(got - want[..., None])
    assert np.median(err) <= 2 and err.mean() < 4, (case, err.mean())


def test_half_scale_16bit_grey_is_mid_grey():
    enc = inspect_and_encode(_saved(Image.fromarray(np.full((16, 16), 32768, np.uint16)), "PNG"))
    assert abs(np.asarray(_decode(enc.data)).astype(float).mean() - 128) < 2


def _tree(root, spec):
    for rel in spec:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_jpeg(30, 20))
    return root


def test_a_link_to_an_ancestor_is_followed_once_and_reported(tmp_path):
    root = _tree(tmp_path / "src", ["train/a/1.jpg", "train/b/1.jpg", "train/b/2.jpg"])
    (root / "train" / "a" / "again").symlink_to(".", target_is_directory=True)
    (root / "train" / "a" / "b-too").symlink_to("../b", target_is_directory=True)
    report = convert(root, tmp_path / "out", workers=0, progress=False)
    tr = report["splits"]["train"]
    assert tr["written"] == 3  # each image once, under its own class
    assert RecordFile(tmp_path / "out" / "train.rec").labels.tolist() == [0, 1, 1]
    assert sorted(p.rsplit("/", 1)[1] for p in tr["links_skipped"]) == ["again", "b-too"]
    assert "links" in format_report(report)


def test_classes_without_training_images_are_refused_by_name(messy_tree, tmp_path):
    (messy_tree / "val" / "zebra").mkdir()
    (messy_tree / "val" / "zebra" / "z.jpg").write_bytes(_jpeg())
    with pytest.raises(DataError, match=r"no training image: bird, zebra.*keep-empty-classes"):
        convert(messy_tree, tmp_path / "out", workers=0, progress=False)
    report = convert(messy_tree, tmp_path / "out", workers=0, progress=False,
                     keep_empty_classes=True)
    assert read_classes(tmp_path / "out") == ["bird", "cat", "dog", "zebra"]
    assert report["classes_without_training_images"] == ["bird", "zebra"]
    assert "without training images, kept" in format_report(report)


def test_a_class_emptied_by_skipped_files_is_refused(tmp_path):
    root = _tree(tmp_path / "src", ["train/a/1.jpg", "val/a/1.jpg", "val/b/1.jpg"])
    (root / "train" / "b").mkdir()
    (root / "train" / "b" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=r"no training image after skipping unusable files: b "):
        convert(root, tmp_path / "out", workers=0, progress=False)


def test_very_large_images_follow_one_policy_without_pillow_warnings(tmp_path, monkeypatch):
    import warnings
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)  # Pillow's bomb limit, made small
    root = _tree(tmp_path / "src", ["train/a/small.jpg"])
    Image.new("RGB", (100, 80), (10, 200, 30)).save(root / "train" / "a" / "big.png")
    Image.new("RGB", (400, 400), (10, 200, 30)).save(root / "train" / "a" / "bomb.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any Pillow warning fails the test
        report = convert(root, tmp_path / "out", workers=0, progress=False)
        tr = report["splits"]["train"]
        assert tr["written"] == 2 and tr["reencoded"] == {"format PNG": 1, "over max pixels": 1}
        [bomb] = tr["skipped"]
        assert bomb["path"].endswith("bomb.png") and "pixels" in bomb["reason"]
        rf = RecordFile(tmp_path / "out" / "train.rec")
        assert all(int(r["height"]) * int(r["width"]) <= 64 * 64 for r in rf.index)
        from tricks.pipeline import Engine, Loader
        assert len(list(Loader(tmp_path / "out", "train", 2, image_size=16, engine=Engine(workers=0)))) == 1


@pytest.mark.parametrize("content", [b"hello, I am text\n", bytes(range(256)) * 4])
def test_skip_reasons_name_the_cause_not_an_object(content):
    enc = inspect_and_encode(content)
    assert "BytesIO" not in enc.error and " at 0x" not in enc.error
    assert "not a decodable image" in enc.error


# --- only baseline 8-bit JPEGs are stored as they are (issue 25, item 6) ------------------------

def _with_frame(data: bytes, marker: int, precision: int | None = None) -> bytes:
    """``data`` (a baseline JPEG) with its SOF0 marker changed to ``marker`` (and precision)."""
    pos = data.index(b"\xff\xc0")
    out = bytearray(data)
    out[pos + 1] = marker
    if precision is not None:
        out[pos + 4] = precision
    return bytes(out)


def test_jpeg_frame_reads_the_frame_marker_and_precision():
    from tricks.pipeline.convert import jpeg_frame
    base = _jpeg()
    assert jpeg_frame(base) == (0xC0, 8)
    assert jpeg_frame(_jpeg(progressive=True)) == (0xC2, 8)
    assert jpeg_frame(_with_frame(base, 0xC3)) == (0xC3, 8)
    assert jpeg_frame(_with_frame(base, 0xC1, 12)) == (0xC1, 12)
    assert jpeg_frame(_jpeg(fmt="PNG")) is None and jpeg_frame(b"\xff\xd8\xff") is None


def test_an_extended_sequential_jpeg_is_reencoded_to_baseline():
    # SOF1 with Huffman coding: the same entropy data as baseline, another frame marker
    enc = inspect_and_encode(_with_frame(_jpeg(), 0xC1))
    assert enc.reencoded == "extended sequential JPEG"
    from tricks.pipeline.convert import jpeg_frame
    assert jpeg_frame(enc.data) == (0xC0, 8)


def test_an_arithmetic_coded_jpeg_is_reencoded_to_baseline(tmp_path):
    import shutil
    import subprocess
    if shutil.which("jpegtran") is None:
        pytest.skip("jpegtran (libjpeg-turbo-progs) makes the arithmetic-coded file")
    (tmp_path / "b.jpg").write_bytes(_saved(_quadrants(64, 48), "JPEG", quality=95))
    data = subprocess.run(["jpegtran", "-arithmetic", str(tmp_path / "b.jpg")],
                          capture_output=True, check=True).stdout
    from tricks.pipeline.convert import jpeg_frame
    assert jpeg_frame(data) == (0xC9, 8)
    enc = inspect_and_encode(data)
    assert enc.reencoded == "arithmetic-coded sequential JPEG"
    assert jpeg_frame(enc.data) == (0xC0, 8) and (enc.height, enc.width) == (48, 64)
    assert np.abs(_quadrant_means(_decode(enc.data)) - np.array(QUADRANTS)).max() < 6


def test_a_12_bit_jpeg_is_skipped_with_its_reason():
    enc = inspect_and_encode(_with_frame(_jpeg(), 0xC1, 12))
    assert enc.data is None and enc.error.startswith("12-bit JPEG (extended sequential)")


def test_max_side_area_filter_keeps_the_picture_and_lanczos_is_an_option():
    big = np.zeros((400, 600, 3), np.uint8)
    big[:, :300] = (200, 40, 40)
    big[:, 300:] = (40, 40, 200)
    data = _saved(Image.fromarray(big), "JPEG", quality=95)
    for resize in ("area", "lanczos"):
        enc = inspect_and_encode(data, max_side=150, resize=resize)
        assert (enc.width, enc.height) == (150, 100) and "over max side" in enc.reencoded
        out = np.asarray(_decode(enc.data)).astype(int)
        assert np.abs(out[10:-10, 10:60] - (200, 40, 40)).mean() < 6
        assert np.abs(out[10:-10, 90:140] - (40, 40, 200)).mean() < 6
    from tricks.errors import OptionError
    with pytest.raises(OptionError, match="resize filter 'cubic'"):
        convert("x", "y", resize="cubic")
