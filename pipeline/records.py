"""The packed record file: one memory-mapped file per split, read with offsets.

Layout (little-endian):
    header   64 bytes: magic b"TRICKREC", format version u32, 4 pad, count u64, index offset u64,
             data offset u64, 24 reserved
    data     the JPEG bytes of every record, back to back
    index    ``count`` rows of INDEX_DTYPE (64-bit offsets and lengths, label, height, width)

Reading a record is two array lookups and a slice of the mapping: no per-file ``open()``.
The class list shared by all splits lives beside the files, in ``classes.json``.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"TRICKREC"
VERSION = 1
_HEADER = struct.Struct("<8sI4xQQQ24x")
HEADER_SIZE = _HEADER.size  # 64
INDEX_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u8"), ("label", "<i8"),
                        ("height", "<u4"), ("width", "<u4")])
SUFFIX = ".rec"
CLASSES_FILE = "classes.json"


class RecordWriter:
    """Appends JPEG records to ``path`` (via a temporary file renamed on ``close``)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._f = open(self._tmp, "wb")
        self._f.write(b"\0" * HEADER_SIZE)
        self._rows: list[tuple[int, int, int, int, int]] = []
        self._pos = HEADER_SIZE

    def add(self, jpeg: bytes, label: int, height: int, width: int) -> None:
        self._f.write(jpeg)
        self._rows.append((self._pos, len(jpeg), label, height, width))
        self._pos += len(jpeg)

    def close(self) -> None:
        index = np.array(self._rows, dtype=INDEX_DTYPE)
        index_offset = self._pos
        self._f.write(index.tobytes())
        self._f.seek(0)
        self._f.write(_HEADER.pack(MAGIC, VERSION, len(index), index_offset, HEADER_SIZE))
        self._f.flush()
        os.fsync(self._f.fileno())
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
    """Read-only view of a record file. Cheap to open; safe to reopen in each worker process
    (the mapping is made lazily, so a pickled instance carries only the path)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"record file not found: {self.path}")
        with open(self.path, "rb") as f:
            raw = f.read(HEADER_SIZE)
        if len(raw) < HEADER_SIZE or raw[:8] != MAGIC:
            raise ValueError(f"{self.path} is not a tricks record file (bad magic)")
        _, version, count, index_offset, data_offset = _HEADER.unpack(raw)
        if version != VERSION:
            raise ValueError(f"{self.path}: record format version {version}, this tricks reads "
                             f"{VERSION}; convert the dataset again")
        self.count = count
        self._index_offset = index_offset
        self._map: np.memmap | None = None
        self._index: np.ndarray | None = None

    def _open(self) -> None:
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        end = self._index_offset + self.count * INDEX_DTYPE.itemsize
        if len(self._map) < end:
            raise ValueError(f"{self.path} is truncated: index ends at byte {end}, "
                             f"file has {len(self._map)}")
        self._index = self._map[self._index_offset:end].view(INDEX_DTYPE)

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

    def close(self) -> None:
        """Drop the mapping (arrays already taken from ``raw`` keep it alive until they go)."""
        self._map = self._index = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_map"] = state["_index"] = None
        return state


def split_path(root: str | os.PathLike, split: str) -> Path:
    return Path(root) / f"{split}{SUFFIX}"


def read_classes(root: str | os.PathLike) -> list[str]:
    path = Path(root) / CLASSES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{root} is not a converted dataset (no {CLASSES_FILE}); "
                                f"run `tricks convert SRC {root}` first")
    return json.loads(path.read_text())["classes"]


def list_splits(root: str | os.PathLike) -> list[str]:
    return sorted(p.name[:-len(SUFFIX)] for p in Path(root).glob(f"*{SUFFIX}"))
