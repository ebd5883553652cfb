"""Checksums and field checks of the record format (issue 24, fault 2): a damaged record, header
or index is named in one line, at open or by `tricks verify`, never trained on silently."""
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from tricks.pipeline import Engine, Loader
from tricks.errors import DataError, RecordError
from tricks.pipeline.records import (HEADER_SIZE, INDEX_DTYPE, RecordFile, RecordWriter,
                                     checksum, pack_header)
from tricks.pipeline.verify import verify

from conftest import subprocess_env


@pytest.fixture
def dataset(shapes_records, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(shapes_records, out)
    return out


def _header(path):
    raw = path.read_bytes()[:HEADER_SIZE]
    _, _, _, count, index_offset, _, file_id, index_crc = \
        struct.unpack("<8sIIQQQ16sI4x", raw)
    return count, index_offset, file_id, index_crc


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _flip_bytes_of_record(path, i, count=3):
    rf = RecordFile(path)
    off = int(rf.index[i]["offset"]) + int(rf.index[i]["length"]) // 2
    del rf
    raw = bytearray(path.read_bytes()[off:off + count])
    _patch(path, off, bytes(b ^ 0x5A for b in raw))


def _rewrite_index(path, change):
    """Change index rows and write the index and header CRCs again (a consistent file whose
    fields are wrong: only the field checks can catch it)."""
    count, index_offset, file_id, _ = _header(path)
    blob = bytearray(path.read_bytes())
    index = np.frombuffer(bytes(blob[index_offset:]), INDEX_DTYPE).copy()
    change(index)
    blob[index_offset:] = index.tobytes()
    blob[:HEADER_SIZE] = pack_header(count, index_offset, file_id, checksum(index.tobytes()))
    path.write_bytes(bytes(blob))


def _loader(root, split="val", workers=1, engine_options=None, **kw):
    return Loader(root, split, kw.pop("batch_size", 10), image_size=32,
                  engine=Engine("native", workers=workers, **(engine_options or {})), **kw)


@pytest.mark.parametrize("cpu_decoder", ["libjpeg-turbo", "pillow"])
def test_flipped_bytes_in_a_record_stop_the_epoch_naming_it(dataset, cpu_decoder):
    _flip_bytes_of_record(dataset / "val.rec", 7)
    loader = _loader(dataset, engine_options={"cpu_decoder": cpu_decoder}, workers=0)
    with pytest.raises(RecordError) as e:
        list(loader)
    loader.close()
    assert "val.rec: record 7: checksum mismatch" in str(e.value) and e.value.index == 7


def test_verify_names_the_damaged_record_and_fails(dataset):
    total, problems = verify(dataset, progress=False)
    assert total == 500 and problems == []
    _flip_bytes_of_record(dataset / "train.rec", 123)
    total, problems = verify(dataset, progress=False)
    assert [(p.record, p.reason) for p in problems] == [(123, "checksum mismatch")]
    out = subprocess.run([sys.executable, "-m", "tricks.train.cli", "verify", str(dataset),
                          "--no-progress"], capture_output=True, text=True, env=subprocess_env())
    assert out.returncode == 1, out.stderr
    assert "train.rec: record 123: checksum mismatch" in out.stdout and "1 bad" in out.stdout


def test_a_lowered_record_count_is_refused_at_open(dataset):
    path = dataset / "val.rec"
    count, index_offset, file_id, index_crc = _header(path)
    _patch(path, 16, struct.pack("<Q", count - 3))  # the header's CRC no longer matches
    with pytest.raises(DataError, match="header checksum mismatch"):
        RecordFile(path)
    _patch(path, 0, pack_header(count - 3, index_offset, file_id, index_crc))  # CRC fixed too
    with pytest.raises(DataError, match=f"header says {count - 3} records") as e:
        _loader(dataset)
    assert "\n" not in str(e.value) and "val.rec" in str(e.value)


def test_a_corrupt_header_offset_is_named(dataset):
    path = dataset / "val.rec"
    count, index_offset, file_id, index_crc = _header(path)
    _patch(path, 24, struct.pack("<Q", index_offset + 40))
    with pytest.raises(DataError, match="header checksum mismatch"):
        RecordFile(path)
    _patch(path, 0, pack_header(count, index_offset - 40, file_id, index_crc))
    with pytest.raises(DataError, match="says 100 records"):
        RecordFile(path)


@pytest.mark.parametrize("field,value", [("label", 3), ("height", 9), ("width", 99)])
def test_a_changed_index_field_fails_the_index_checksum(dataset, field, value):
    path = dataset / "val.rec"
    _, index_offset, _, _ = _header(path)
    row = RecordFile(path).index[4].copy()
    row[field] = value
    _patch(path, index_offset + 4 * INDEX_DTYPE.itemsize, row.tobytes())
    with pytest.raises(DataError, match="index checksum mismatch"):
        _loader(dataset)


def test_a_label_outside_the_class_list_is_refused_at_open_naming_the_record(dataset):
    _rewrite_index(dataset / "val.rec", lambda ix: ix["label"].__setitem__(17, 16))
    with pytest.raises(DataError) as e:
        _loader(dataset)
    msg = str(e.value)
    assert "val.rec: record 17: label outside the 10 classes" in msg and "\n" not in msg


@pytest.mark.parametrize("field,what", [("height", "height 0"), ("width", "width 0")])
def test_a_zero_size_is_refused_at_open(dataset, field, what):
    _rewrite_index(dataset / "val.rec", lambda ix: ix[field].__setitem__(3, 0))
    with pytest.raises(DataError, match=f"record 3: {what}"):
        RecordFile(dataset / "val.rec")


def test_an_offset_past_the_data_region_is_refused(dataset):
    _rewrite_index(dataset / "val.rec", lambda ix: ix["length"].__setitem__(99, 10**9))
    with pytest.raises(DataError, match="record 99: offset \\+ length past the data region"):
        RecordFile(dataset / "val.rec")


def test_a_format_1_file_asks_to_convert_again(tmp_path):
    path = tmp_path / "old.rec"
    path.write_bytes(struct.pack("<8sI4xQQQ24x", b"TRICKREC", 1, 0, 64, 64))
    with pytest.raises(DataError, match="record format version 1.*convert the dataset again"):
        RecordFile(path)


def test_a_damaged_class_list_is_one_line(dataset):
    (dataset / "classes.json").write_text('{"classes": ["a", ')
    with pytest.raises(DataError, match="classes.json: not a class list"):
        _loader(dataset)


def test_a_record_file_replaced_under_a_reader_is_refused_on_reopen(dataset, tmp_path):
    import pickle
    rf = RecordFile(dataset / "val.rec")
    clone = pickle.loads(pickle.dumps(rf))  # what a worker process gets
    src = RecordFile(dataset / "val.rec")
    with RecordWriter(tmp_path / "other.rec") as w:
        for i in range(len(src)):
            w.add(src.raw(i).tobytes(), int(src.labels[i]), 64, 64)
    shutil.copy(tmp_path / "other.rec", dataset / "val.rec")
    with pytest.raises(DataError, match="was replaced while this run read it"):
        clone.raw(0)


def test_the_extension_crc_is_zlibs():
    import os
    import zlib
    jpeg = pytest.importorskip("tricks.pipeline._jpeg")
    for n in (0, 1, 3, 4, 5, 1000, 65537):
        data = os.urandom(n)
        assert jpeg.crc32(data) == zlib.crc32(data)

