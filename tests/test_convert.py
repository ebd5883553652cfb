import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from tricks.pipeline.convert import convert, format_report, inspect_and_encode
from tricks.pipeline.errors import DataError
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
    with pytest.raises(ValueError, match="bad magic"):
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
    report = convert(messy_tree, out, workers=2, progress=False)
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
    listing = (out / "train.files.txt").read_text().splitlines()
    assert len(listing) == 9 and all("\t" in ln for ln in listing)


def test_strict_fails_on_the_first_bad_file_naming_it(messy_tree, tmp_path):
    with pytest.raises(DataError, match=r"empty\.jpg: empty file"):
        convert(messy_tree, tmp_path / "out", workers=0, strict=True, progress=False)


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
