"""The packed record file: one memory-mapped file per split, read with offsets.

Layout (little-endian), format version 2:
    header   64 bytes: magic b"TRICKREC", format version u32, header CRC u32, count u64,
             index offset u64, data offset u64, a 16-byte file id, index CRC u32, 4 reserved
    data     the JPEG bytes of every record (in any order; gaps allowed)
    index    ``count`` rows of INDEX_DTYPE (64-bit offsets and lengths, label, height, width,
             the record's CRC), ending the file

Checksums are zlib's CRC-32 (``zlib.crc32``: in Python's standard library, so every reader and
writer has it, and fast enough to check each record once per process, as benchmarks/scale.py
measures; CRC-32C would need hardware instructions or a new package, xxHash a new package). The
header CRC covers the header with its own field zeroed, the index CRC the whole index, each row's
CRC its record's bytes. Every header and index field is checked when a file is opened
(``RecordFile``): a damaged field is a one-line ``DataError`` naming the file (and record), never a
silent misread. The record bytes themselves are checked by ``tricks verify`` (every record) and by
the native engine's decode threads (each record it decodes).

Reading a record is two array lookups and a slice of the mapping: no per-file ``open()``.
The class list shared by all splits lives beside the files, in ``classes.json``.
"""
from __future__ import annotations

import json
import os
import struct
import uuid
import zlib
from pathlib import Path

import numpy as np

from tricks.errors import DataError

MAGIC = b"TRICKREC"
VERSION = 2
_HEADER = struct.Struct("<8sIIQQQ16sI4x")
HEADER_SIZE = _HEADER.size  # 64
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u8"), ("label", "<i8"),
                        ("height", "<u4"), ("width", "<u4"), ("crc", "<u4"), ("pad", "<u4")])
SUFFIX = ".rec"
CLASSES_FILE = "classes.json"


def checksum(data) -> int:
    """zlib CRC-32 of a bytes-like object (u32). Releases the GIL for large buffers."""
    return zlib.crc32(data) & 0xFFFFFFFF


def pack_header(count: int, index_offset: int, file_id: bytes, index_crc: int) -> bytes:
    """The 64-byte header, its CRC filled in."""
    raw = _HEADER.pack(MAGIC, VERSION, 0, count, index_offset, HEADER_SIZE, file_id, index_crc)
    crc = checksum(raw)
    return raw[:12] + struct.pack("<I", crc) + raw[16:]


def finish_file(f, rows: np.ndarray, data_end: int) -> None:
    """Write ``rows`` (INDEX_DTYPE) at ``data_end`` and the header at 0 of the open binary
    file ``f`` (whose data region is already written), truncate after the index, fsync."""
    rows = np.ascontiguousarray(rows, dtype=INDEX_DTYPE)
    index = rows.tobytes()
    f.seek(data_end)
    f.write(index)
    f.truncate(data_end + len(index))
    f.seek(0)
    f.write(pack_header(len(rows), data_end, uuid.uuid4().bytes, checksum(index)))
    f.flush()
    os.fsync(f.fileno())


class RecordWriter:
    """Appends JPEG records to ``path`` (via a temporary file renamed on ``close``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._f = open(self._tmp, "wb")
        self._f.write(b"\0" * HEADER_SIZE)
        self._rows: list[tuple] = []
        self._pos = HEADER_SIZE

    def add(self, jpeg: bytes, label: int, height: int, width: int) -> None:
        self._f.write(jpeg)
        self._rows.append((self._pos, len(jpeg), label, height, width, checksum(jpeg), 0))
        self._pos += len(jpeg)

    def close(self) -> None:
        finish_file(self._f, np.array(self._rows, dtype=INDEX_DTYPE), self._pos)
        self._f.close()
        os.replace(self._tmp, self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self._f.close()
            self._tmp.unlink(missing_ok=True)


class RecordFile:
    """Read-only view of a record file, checked on open: header CRC, sizes (the index must end
    the file exactly), index CRC, and every row (offset and length inside the data region,
    height and width > 0, label in ``0..num_classes-1`` when ``num_classes`` is given). Any
    failure is a one-line ``DataError`` naming the file and the first bad record.

    Cheap to reopen in each worker process: a pickled instance carries the path and the file's
    id; the mapping is made again lazily, and a file replaced in between (another conversion
    into the same folder) is an error, not a silent mix of two datasets."""

    def __init__(self, path: str | os.PathLike, num_classes: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"record file not found: {self.path}")
        self.num_classes = num_classes
        self._map: np.memmap | None = None
        self._index: np.ndarray | None = None
        self._checked = False
        self._verified: np.ndarray | None = None
        self._read_header()
        self._open()

    def _fail(self, what: str) -> DataError:
        return DataError(f"{self.path}: {what}")

    def _read_header(self) -> None:
        with open(self.path, "rb") as f:
            raw = f.read(HEADER_SIZE)
            size = os.fstat(f.fileno()).st_size
        if len(raw) < 12 or raw[:8] != MAGIC:
            raise self._fail("not a tricks record file (bad magic)")
        version = struct.unpack_from("<I", raw, 8)[0]
        if version != VERSION:
            raise self._fail(f"record format version {version}, this tricks reads {VERSION} "
                             "(records with checksums): convert the dataset again")
        if len(raw) < HEADER_SIZE:
            raise self._fail(f"truncated: {size} bytes, less than the {HEADER_SIZE}-byte header")
        _, _, crc, count, index_offset, data_offset, file_id, index_crc = _HEADER.unpack(raw)
        if checksum(raw[:12] + b"\0\0\0\0" + raw[16:]) != crc:
            raise self._fail("header checksum mismatch (the header is damaged)")
        row = INDEX_DTYPE.itemsize
        if data_offset != HEADER_SIZE or not data_offset <= index_offset <= size:
            raise self._fail(f"header offsets out of range (data at {data_offset}, index at "
                             f"{index_offset}, file of {size} bytes)")
        if index_offset + count * row != size:
            raise self._fail(f"header says {count} records, but the file's {size} bytes hold "
                             f"an index of {(size - index_offset) / row:g} rows after byte "
                             f"{index_offset} (truncated or damaged)")
        self.count, self._index_offset, self.file_id = count, index_offset, file_id
        self._index_crc, self._size = index_crc, size

    def _open(self) -> None:
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r") if self._size else None
        if self._map is None or len(self._map) != self._size or \
                bytes(self._map[40:56]) != self.file_id:
            raise self._fail("was replaced while this run read it (another conversion into the "
                             "same folder?): restart the run")
        index = self._map[self._index_offset:self._size].view(INDEX_DTYPE)
        if not self._checked:  # first open: check it all; a reopen checks the file id
            self._check_index(index)
            self._checked = True
        self._index = index

    def _check_index(self, index: np.ndarray) -> None:
        if checksum(index) != self._index_crc:
            raise self._fail("index checksum mismatch (the index is damaged)")
        checks = [
            (index["offset"] < HEADER_SIZE, "offset before the data region"),
            (index["length"] > self._index_offset - np.minimum(index["offset"],
                                                               self._index_offset),
             "offset + length past the data region"),
            (index["height"] == 0, "height 0"),
            (index["width"] == 0, "width 0"),
            (index["label"] < 0, "negative label"),
        ]
        if self.num_classes is not None:
            checks.append((index["label"] >= self.num_classes,
                           f"label outside the {self.num_classes} classes of {CLASSES_FILE}"))
        for bad, what in checks:
            if bad.any():
                i = int(np.argmax(bad))
                raise self._fail(f"record {i}: {what} (offset {int(index['offset'][i])}, "
                                 f"length {int(index['length'][i])}, label "
                                 f"{int(index['label'][i])}, {int(index['height'][i])}×"
                                 f"{int(index['width'][i])}); {int(bad.sum())} bad row(s)")

    @property
    def index(self) -> np.ndarray:
        if self._index is None:
            self._open()
        return self._index

    @property
    def labels(self) -> np.ndarray:
        return self.index["label"].astype(np.int64)

    def __len__(self) -> int:
        return self.count

    def raw(self, i: int) -> np.ndarray:
        """The JPEG bytes of record ``i`` as a zero-copy uint8 array over the mapping."""
        row = self.index[i]
        off = int(row["offset"])
        return self._map[off:off + int(row["length"])]

    @property
    def verified(self) -> np.ndarray:
        """Per record, whether this process already found its bytes to match their CRC (bool,
        writable: a decoder that checks CRCs itself marks them). The hot path checks each record
        once per process: the file is read-only, its bytes do not change under a run."""
        if self._verified is None:
            self._verified = np.zeros(self.count, bool)
        return self._verified

    def check(self, i: int) -> str | None:
        """Why record ``i``'s bytes are bad (``"checksum mismatch"``), or None if they are
        the bytes convert wrote (checked once per process, see ``verified``)."""
        if self.verified[i]:
            return None
        if checksum(self.raw(i)) != int(self.index[i]["crc"]):
            return "checksum mismatch"
        self._verified[i] = True
        return None

    def close(self) -> None:
        """Drop the mapping (arrays already taken from ``raw`` keep it alive until they go)."""
        self._map = self._index = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_map"] = state["_index"] = None  # mapped again lazily, the file id checked
        state["_verified"] = None
        return state


def split_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / f"{split}{SUFFIX}"


def read_classes(root: str | os.PathLike) -> list[str]:
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        from .atomic import interrupted_conversion
        raise DataError(interrupted_conversion(root) or
                        f"{root} is not a converted dataset (no {CLASSES_FILE}); "
                        f"run `tricks convert SRC {root}` first")
    try:
        classes = json.loads(path.read_text())["classes"]
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{path}: not a class list (damaged?): convert the dataset again") \
            from None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{path}: not a class list (damaged?): convert the dataset again")
    return classes


def list_splits(root: str | os.PathLike) -> list[str]:
    return sorted(p.name[:-len(SUFFIX)] for p in Path(root).glob(f"*{SUFFIX}"))
