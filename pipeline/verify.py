"""``tricks verify``: every record of a converted dataset checked against its checksum.

The files' headers and indexes are checked when opened (``records.RecordFile``); then each
record's bytes are read and their CRC-32 compared with the index's, in threads (zlib's CRC
releases the GIL), with a progress bar. ``decode=True`` also decodes each record (libjpeg-turbo
through Pillow, the inverse DCT at 1/8: every coefficient is still entropy-decoded), which finds
a record written damaged (its checksum then matches its damage).
"""
from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from tricks.errors import DataError
from .records import SUFFIX, RecordFile, list_splits, read_classes, split_path

CHUNK = 1024  # records per thread task


@dataclass
class Problem:
    file: str
    record: int | None   # None: the file itself (header, index, class list)
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: record {self.record}: {self.reason}" if self.record is not None \
            else self.reason


def _decodes(data) -> str | None:
    try:
        img = Image.open(io.BytesIO(bytes(data)))
        img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
    except Exception as e:  # Pillow raises many types for bad input
        return f"cannot be decoded ({type(e).__name__}: {e})"
    return None


def _check_chunk(records: RecordFile, lo: int, hi: int, decode: bool) -> list[Problem]:
    bad = []
    for i in range(lo, hi):
        why = records.check(i) or (_decodes(records.raw(i)) if decode else None)
        if why:
            bad.append(Problem(str(records.path), i, why))
    return bad


def verify(path: str | os.PathLike, progress: bool = True, decode: bool = False,
           workers: int | None = None) -> tuple[int, list[Problem]]:
    """Check a converted folder (its class list and every split) or one ``.rec`` file.
    Returns (records checked, problems). Raises ``DataError`` for a path that is neither."""
    path = Path(path)
    problems: list[Problem] = []
    if path.is_file() and path.suffix == SUFFIX:
        files, classes = [path], None
    elif path.is_dir():
        try:
            classes = read_classes(path)
        except DataError as e:
            return 0, [Problem(str(path), None, str(e))]
        files = [split_path(path, s) for s in list_splits(path)]
        if not files:
            return 0, [Problem(str(path), None, f"{path}: no record files (*{SUFFIX})")]
    else:
        raise DataError(f"{path}: neither a converted dataset folder nor a {SUFFIX} file")
    opened = []
    for f in files:
        try:
            opened.append(RecordFile(f, None if classes is None else len(classes)))
        except DataError as e:
            problems.append(Problem(str(f), None, str(e)))
    total = sum(len(r) for r in opened)
    workers = workers or min(8, os.cpu_count() or 1)
    with tqdm(total=total, desc="verify", unit="rec", leave=False,
              disable=None if progress else True) as bar, \
            ThreadPoolExecutor(workers) as pool:
        for r in opened:
            jobs = [pool.submit(_check_chunk, r, lo, min(lo + CHUNK, len(r)), decode)
                    for lo in range(0, len(r), CHUNK)]
            for lo, job in zip(range(0, len(r), CHUNK), jobs):
                problems += job.result()
                bar.update(min(CHUNK, len(r) - lo))
    return total, problems
