"""``tricks convert``: an ImageFolder tree → one packed record file per split.

Every record is a baseline (SOF0), 8-bit, 3-channel, upright JPEG that nvJPEG decodes: files
that are already such JPEGs (and within ``max_side``) are stored byte for byte; other formats,
other modes (see ``to_rgb``), progressive, arithmetic-coded, lossless, hierarchical and
extended-sequential JPEGs (any frame but SOF0, read from the file's markers: ``jpeg_frame``),
images with an EXIF orientation other than 1 and over-sized images are re-encoded. 12-bit JPEGs
are skipped with that reason (Pillow decodes only 8-bit samples). Every engine and source reads
these records, so all of them see the same upright 8-bit RGB picture. Undecodable files are
skipped, counted and reported.

Very large images follow one policy (instead of Pillow's ``DecompressionBombWarning``): an image
of more than ``Image.MAX_IMAGE_PIXELS`` pixels (Pillow's limit, 89,478,485 by default) is stored
downscaled to fit it, so no engine ever decodes more; one of more than ``BOMB_FACTOR`` times that
is skipped as a likely decompression bomb.

How a conversion runs (``convert``):

- **Whole or nothing.** It is built in ``<dst>.converting/`` beside the destination and swapped
  in by one rename (``atomic.publish_folder``) only when every split, ``classes.json``,
  ``report.json`` and the source manifest are written: an interrupted or failed conversion
  never leaves ``dst`` half-written or mixed with an older one.
- **Parallel writers.** Worker processes take chunks of ``CHUNK`` files, validate and encode
  them, reserve a byte range of the split's file (a shared counter) and ``pwrite`` their bytes
  there themselves; the main process only collects each chunk's compact index rows (its memory
  grows with the index, ~60 bytes a file, not with the images).
- **Resumable.** Each finished chunk's rows are appended to a journal in the temporary folder
  (after an fsync of the data they point to); a killed conversion run again with the same
  source and options redoes only the chunks not in the journal.
- **Incremental.** The converted folder keeps a manifest of its sources (relative path, size,
  modification time per record; each folder's modification time). Converting the same tree
  with the same options into it again copies the records of unchanged files from the old
  folder instead of decoding and encoding them again.
- **Resize.** ``--max-side`` shrinks with an area filter: JPEG DCT-domain scaling (Pillow's
  ``draft``: libjpeg's 1/2, 1/4, 1/8 decode) to at most twice the target, then Pillow's ``BOX``
  filter (area averaging; OpenCV's INTER_AREA, which FFCV's writer uses, is the same filter);
  ``resize="lanczos"`` decodes at full size and uses Pillow's Lanczos instead.
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import struct
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from . import atomic
from tricks.errors import DataError, OptionError
from .records import (CLASSES_FILE, HEADER_SIZE, INDEX_DTYPE, RecordFile, checksum,
                      finish_file, split_path)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm"}
SPLIT_NAMES = ("train", "val", "validation", "test")
TRAIN_SPLIT = "train"
# what convert stores changed (2: upright per EXIF, modes by value range, large-image policy;
# 3: checksummed record format, only SOF0 8-bit JPEGs kept, area-filter resize):
# conversions cached by an older tricks are made again
CONVERT_VERSION = 3
BOMB_FACTOR = 4       # over this many times Pillow's MAX_IMAGE_PIXELS: skipped, not decoded
ORIENTATION_TAG = 0x0112  # EXIF/TIFF "Orientation"; 1 is upright
RESIZE_FILTERS = ("area", "lanczos")
CHUNK = 64            # files per worker task: one byte-range reservation, one journal entry
SOURCE_FILE = "source.json"      # in a converted folder: the tree, options, folder mtimes
JOURNAL = "journal.bin"          # in the temporary folder: the chunks done so far
SYNC_EVERY_S = 5.0               # data fsync + journal append at most this often


@dataclass
class SplitSource:
    name: str
    files: list[str]                               # paths relative to the source, stable order
    classes: list[str]                             # the class of each file
    empty_classes: list[str] = field(default_factory=list)
    ignored: int = 0                               # hidden and non-image files
    unlabelled: list[str] = field(default_factory=list)
    links_skipped: list[str] = field(default_factory=list)  # folder links already read, cycles

    @property
    def items(self) -> list[tuple[str, str]]:
        return list(zip(self.files, self.classes))


def _visible(name: str) -> bool:
    return not name.startswith(".")


def _folder_id(path: str | os.PathLike) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


class _Walk:
    """The folders read during discovery: their modification times (ns), keyed by path
    relative to the source, taken before each is listed (a file added while converting then
    shows as a change next time)."""

    def __init__(self, src: Path):
        self.src = src
        self.folders: dict[str, int] = {}

    def listing(self, folder: str | os.PathLike) -> list[os.DirEntry]:
        rel = os.path.relpath(folder, self.src)
        self.folders[rel] = os.stat(folder).st_mtime_ns
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)


def _images_under(walk: _Walk, folder: str, seen: set | None = None, links: list | None = None
                  ) -> tuple[list[str], int]:
    """Image files below ``folder`` (recursively, sorted, following links) as paths relative
    to the source, and how many other files were ignored. A folder already in ``seen`` (by
    device and inode: a link to an ancestor, i.e. a cycle, or to a folder read elsewhere) is
    not entered again but listed in ``links``."""
    seen = {_folder_id(folder)} if seen is None else seen
    links = [] if links is None else links
    images, ignored = [], 0
    stack = [folder]
    while stack:
        current = stack.pop()
        subdirs = []
        for e in walk.listing(current):
            if e.is_dir(follow_symlinks=True):
                if not _visible(e.name):
                    continue
                key = _folder_id(e.path)
                if key in seen:
                    links.append(e.path)
                else:
                    seen.add(key)
                    subdirs.append(e.path)
            elif _visible(e.name) and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS:
                images.append(os.path.relpath(e.path, walk.src))
            else:
                ignored += 1
        stack.extend(reversed(subdirs))  # depth first, in name order
    return images, ignored


def _class_split(walk: _Walk, name: str, folder: Path, seen: set) -> SplitSource:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and _visible(d.name))
    if not classes:
        loose, _ = _images_under(_Walk(walk.src), str(folder))
        if loose:
            raise DataError(f"{folder} holds images but no class sub-folders "
                            "(for ImageNet's flat validation folder, pass --val-labels FILE)")
        raise DataError(atomic.interrupted_conversion(folder) or
                        f"{folder} is empty: no class sub-folders and no images")
    split = SplitSource(name, [], [])
    walk.listing(folder)
    for c in classes:
        files, ignored = _images_under(walk, str(folder / c), seen, split.links_skipped)
        split.ignored += ignored
        if not files:
            split.empty_classes.append(c)
        split.files += files
        split.classes += [c] * len(files)
    return split


def _read_labels(path: Path) -> dict[str, str]:
    """``file class`` per line, or ImageNet's ``LOC_val_solution.csv`` (ImageId,PredictionString):
    a map from file stem to class name."""
    if not path.is_file():
        raise DataError(f"label file not found: {path}")
    labels = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#") or line.lower().startswith("imageid,"):
            continue
        parts = line.split(",", 1) if "," in line else line.split(None, 1)
        if len(parts) != 2 or not parts[1].split():
            raise DataError(f"{path}:{n}: expected 'file class', got {line!r}")
        labels[Path(parts[0].strip()).stem] = parts[1].split()[0]
    return labels


def _flat_split(walk: _Walk, name: str, folder: Path, labels_file: Path, seen: set
                ) -> SplitSource:
    labels = _read_labels(labels_file)
    split = SplitSource(name, [], [])
    files, split.ignored = _images_under(walk, str(folder), seen, split.links_skipped)
    for f in files:
        stem = Path(f).stem
        if stem in labels:
            split.files.append(f)
            split.classes.append(labels[stem])
        else:
            split.unlabelled.append(str(walk.src / f))
    return split


def discover(src: str | os.PathLike, val_labels: str | os.PathLike | None = None,
             walk: _Walk | None = None) -> tuple[list[SplitSource], list[str]]:
    """Find the splits and the class list (shared by all splits) of an ImageFolder tree."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"no such folder: {src}")
    if not src.is_dir():
        raise DataError(f"not a folder: {src}")
    walk = _Walk(src) if walk is None else walk
    walk.listing(src)
    split_dirs = [src / n for n in SPLIT_NAMES if (src / n).is_dir()]
    # every split and class folder counts as read before any walk starts, so a link into one of
    # them (a cycle, or a class linked into another class or split) is not followed
    seen = {_folder_id(d) for d in [src, *split_dirs]}
    seen |= {_folder_id(c) for d in (split_dirs or [src]) for c in d.iterdir()
             if c.is_dir() and _visible(c.name)}
    if not split_dirs:
        splits = [_class_split(walk, TRAIN_SPLIT, src, seen)]
    else:
        splits = []
        for d in split_dirs:
            has_classes = any(c.is_dir() and _visible(c.name) for c in d.iterdir())
            if not has_classes and val_labels is not None and d.name != TRAIN_SPLIT:
                walk.listing(d)
                splits.append(_flat_split(walk, d.name, d, Path(val_labels), seen))
            else:
                splits.append(_class_split(walk, d.name, d, seen))
    classes = sorted({c for s in splits for c in set(s.classes) | set(s.empty_classes)})
    if not any(s.files for s in splits):
        raise DataError(f"no images found under {src}")
    return splits, classes


@dataclass
class Encoded:
    data: bytes | None        # None: skipped
    height: int = 0
    width: int = 0
    reencoded: str = ""       # why it was re-encoded ("" when stored as is)
    error: str = ""           # why it was skipped


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode Pillow opens → 8-bit RGB, each mode mapped by its value range:

    - 16-bit (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``): 0..65535 → 0..255 (v / 257, rounded);
    - 32-bit integer ``I``: the smallest of 0..255, 0..65535 and 0..2³²−1 that holds the image's
      maximum (files store 8- and 16-bit data in ``I``), negatives clipped to 0;
    - 32-bit float ``F``: 0..1 → 0..255 when every value lies in [0, 1], else taken as 0..255
      (Pillow's ``F``→``L`` convention) and clipped; NaN → 0;
    - transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, a palette or grey level marked
      transparent): composited onto white with the alpha as weight (a transparent pixel is
      white, as in a browser, not black);
    - everything else (``1``, ``L``, ``P``, ``CMYK`` (Pillow reads YCCK JPEGs as CMYK),
      ``YCbCr``, ``HSV``, ``LAB``, ``RGBX``) by Pillow's ``convert("RGB")``.

    Returns a new image (or ``img`` itself when it is already RGB without transparency)."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img)
        if mode == "F":
            a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
            scale = 255.0 if a.size and a.min() >= 0 and a.max() <= 1 else 1.0
            v = np.clip(np.rint(a * scale), 0, 255)
        else:
            a = np.clip(a.astype(np.int64), 0, None)
            top = int(a.max()) if a.size else 0
            full = 255 if mode == "I" and top <= 255 else \
                65535 if top <= 65535 else 2**32 - 1
            v = (a * 255 + full // 2) // full
        return Image.fromarray(v.astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img if mode == "RGB" else img.convert("RGB")


@contextmanager
def _own_pixel_limit():
    """Pillow's bomb check off (this module applies its own policy, see the module docstring)."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield limit
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _reason(e: Exception) -> str:
    """An exception as a short cause, without the reprs of in-memory files Pillow puts in it."""
    if isinstance(e, UnidentifiedImageError):
        return "not a format Pillow can identify"
    text = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e)).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


# JPEG frame markers (ITU-T T.81 Table B.1): SOF0 baseline is what every decoder takes
_SOF_KINDS = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive",
              0xC3: "lossless", 0xC5: "differential sequential", 0xC6: "differential progressive",
              0xC7: "differential lossless", 0xC9: "arithmetic-coded sequential",
              0xCA: "arithmetic-coded progressive", 0xCB: "arithmetic-coded lossless",
              0xCD: "arithmetic-coded differential sequential",
              0xCE: "arithmetic-coded differential progressive",
              0xCF: "arithmetic-coded differential lossless"}


def jpeg_frame(data: bytes) -> tuple[int, int] | None:
    """The first frame header of a JPEG: (SOF marker 0xC0..0xCF, sample precision in bits), read
    by walking the marker segments (ITU-T T.81 B.1.1); None when ``data`` is not a JPEG or has no
    frame header before its first scan."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:          # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # TEM, RSTn: no length
            pos += 2
            continue
        length = struct.unpack_from(">H", data, pos + 2)[0]
        if marker in _SOF_KINDS and pos + 5 <= n:
            return marker, data[pos + 4]
        if marker in (0xDA, 0xD9):  # start of scan or end of image before any frame
            return None
        pos += 2 + length
    return None


def _resize(img: Image.Image, size: tuple[int, int], resize: str) -> Image.Image:
    if img.size == size:
        return img
    return img.resize(size, Image.Resampling.BOX if resize == "area" else
                      Image.Resampling.LANCZOS)


def _fit(w: int, h: int, max_side: int | None, max_pixels: int | None) -> tuple[int, int]:
    """The stored size: within ``max_side`` (aspect kept, as Pillow's ``thumbnail`` rounds) and
    ``max_pixels``."""
    if max_side and max(w, h) > max_side:
        f = max_side / max(w, h)
        w, h = (max_side, max(1, round(h * f))) if w >= h else (max(1, round(w * f)), max_side)
    if max_pixels and w * h > max_pixels:
        f = math.sqrt(max_pixels / (w * h))
        w, h = max(1, int(w * f)), max(1, int(h * f))
    return w, h


def inspect_and_encode(data: bytes, max_side: int | None = None, quality: int = 90,
                       resize: str = "area") -> Encoded:
    """Validate one file's bytes; return them unchanged when they are an upright baseline 8-bit
    RGB JPEG within ``max_side`` and Pillow's pixel limit, else a re-encoded one (upright per its
    EXIF orientation, 8-bit RGB per ``to_rgb``, downscaled to the limits with ``resize``: "area"
    or "lanczos"), with height and width as stored; or the reason it cannot be used.

    A JPEG is validated by a full entropy decode (libjpeg reads every coefficient, so a truncated
    or corrupt file fails) with the inverse DCT scaled down as far as the stored size allows
    (1/8 for a file stored as it is): the cost of the check is mostly the Huffman decode."""
    if not data:
        return Encoded(None, error="empty file")
    frame = jpeg_frame(data)
    if frame is not None and frame[1] != 8:
        return Encoded(None, error=f"{frame[1]}-bit JPEG ({_SOF_KINDS[frame[0]]}): Pillow "
                       "decodes only 8-bit samples")
    with _own_pixel_limit() as max_pixels:
        try:
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            w0, h0 = img.size
            pixels = w0 * h0
            if max_pixels and pixels > BOMB_FACTOR * max_pixels:
                return Encoded(None, error=f"{w0}×{h0} = {pixels:,} pixels, over "
                               f"{BOMB_FACTOR}× Pillow's limit of {max_pixels:,} (a likely "
                               "decompression bomb)")
            orientation = img.getexif().get(ORIENTATION_TAG, 1)
            reasons = []
            if fmt != "JPEG":
                reasons.append(f"format {fmt}")
            else:
                if img.mode != "RGB":
                    reasons.append(f"mode {img.mode}")
                if frame is not None and frame[0] == 0xC2 or img.info.get("progressive") or \
                        img.info.get("progression"):
                    reasons.append("progressive")
                elif frame is not None and frame[0] != 0xC0:
                    reasons.append(f"{_SOF_KINDS[frame[0]]} JPEG")
            if orientation in range(2, 9):  # other values are invalid: Pillow and browsers ignore
                reasons.append("EXIF orientation")
            if max_side and max(w0, h0) > max_side:
                reasons.append("over max side")
            if max_pixels and pixels > max_pixels:
                reasons.append("over max pixels")
            target = _fit(w0, h0, max_side, max_pixels)
            if fmt == "JPEG" and (not reasons or resize == "area"):
                # stored as is: only validated, at 1/8; re-encoded: decoded at the smallest DCT
                # scale that keeps at least twice the target size (then an area filter)
                want = (max(1, w0 // 8), max(1, h0 // 8)) if not reasons else \
                    (min(w0, 2 * target[0]), min(h0, 2 * target[1]))
                img.draft(None, want)
            img.load()  # the decode: catches truncated and corrupt files
        except Exception as e:  # PIL raises many types for bad input
            return Encoded(None, error=f"not a decodable image ({_reason(e)})")
    if not reasons:
        return Encoded(data, h0, w0)
    img = to_rgb(ImageOps.exif_transpose(img))
    tw, th = target
    if orientation in (5, 6, 7, 8):  # a quarter turn: the stored size is the transposed one
        tw, th = th, tw
    img = _resize(img, (tw, th), resize)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality, progressive=False, optimize=False)
    return Encoded(out.getvalue(), img.height, img.width, reencoded=", ".join(reasons))


# --- the conversion ----------------------------------------------------------------------------

# a chunk's rows as a worker returns them (and the journal keeps them)
ROW_DTYPE = np.dtype([("item", "<i8"), ("offset", "<u8"), ("length", "<u8"), ("label", "<i8"),
                      ("height", "<u4"), ("width", "<u4"), ("crc", "<u4"), ("reused", "<u4"),
                      ("size", "<i8"), ("mtime", "<i8")])
_ENTRY = struct.Struct("<IIII")  # split, chunk, row bytes, JSON bytes
_G: dict = {}  # what the (forked) workers read: set in the parent before the pool starts


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    """``os.pwrite`` of all of ``data`` (a hook for tests that inject a full disk)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fd(path: str) -> int:
    fds = _G.setdefault("fds", {})
    if path not in fds:
        fds[path] = os.open(path, os.O_WRONLY)
    return fds[path]


def _reused(s: int, i: int, path: str) -> tuple[bytes, int, int, int, int] | None:
    """Record ``i``'s bytes from the previous conversion when its file is unchanged (same size
    and modification time, and the old record still matches its checksum)."""
    old = _G["reuse"][s]
    if old is None or old["record"][i] < 0:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    if st.st_size != old["size"][i] or st.st_mtime_ns != old["mtime"][i]:
        return None
    row = old["rec"].index[old["record"][i]]
    data = bytes(old["rec"].raw(int(old["record"][i])))
    if checksum(data) != int(row["crc"]):
        return None
    return data, int(row["height"]), int(row["width"]), st.st_size, st.st_mtime_ns


def _run_chunk(job: tuple[int, int]) -> tuple[int, int, bytes, bytes]:
    """Convert chunk ``c`` of split ``s``: encode (or reuse) each file, write the chunk's bytes
    into the split's file at a reserved range. Returns (s, c, rows, JSON of skips/reasons)."""
    s, c = job
    split, opts = _G["splits"][s], _G["options"]
    src = _G["src"]
    lo, hi = c * CHUNK, min((c + 1) * CHUNK, len(split.files))
    rows = np.zeros(hi - lo, ROW_DTYPE)
    parts, n, pos = [], 0, 0
    skipped, reasons = [], Counter()
    for i in range(lo, hi):
        path = os.path.join(src, split.files[i])
        got = _reused(s, i, path)
        if got is not None:
            data, h, w, size, mtime = got
            reused = 1
        else:
            reused = 0
            try:
                with open(path, "rb") as f:
                    st = os.fstat(f.fileno())
                    raw = f.read()
            except OSError as e:
                skipped.append({"path": path, "reason": f"unreadable ({e.strerror})"})
                continue
            enc = inspect_and_encode(raw, opts["max_side"], opts["quality"], opts["resize"])
            if enc.data is None:
                skipped.append({"path": path, "reason": enc.error})
                continue
            if enc.reencoded:
                reasons.update(enc.reencoded.split(", "))
            data, h, w, size, mtime = enc.data, enc.height, enc.width, st.st_size, st.st_mtime_ns
        rows[n] = (i, pos, len(data), _G["class_index"][split.classes[i]], h, w,
                   checksum(data), reused, size, mtime)
        parts.append(data)
        pos += len(data)
        n += 1
    rows = rows[:n]
    if n:
        cursor = _G["cursors"][s]
        with cursor.get_lock():
            base = cursor.value
            cursor.value += pos
        path = _G["data_paths"][s]
        try:
            _pwrite(_fd(path), b"".join(parts), base)
        except OSError as e:  # pwrite's error names no file
            raise OSError(e.errno, e.strerror, path) from None
        rows["offset"] += base
    extra = json.dumps({"skipped": skipped, "reencoded": dict(reasons)}).encode()
    return s, c, rows.tobytes(), extra


def _read_journal(path: Path) -> dict[tuple[int, int], tuple[np.ndarray, dict]]:
    """The chunks a journal records (a torn last entry, from a kill mid-append, is ignored)."""
    done = {}
    if not path.is_file():
        return done
    blob = path.read_bytes()
    pos = 0
    while pos + _ENTRY.size <= len(blob):
        s, c, nr, nj = _ENTRY.unpack_from(blob, pos)
        end = pos + _ENTRY.size + nr + nj
        if end > len(blob) or nr % ROW_DTYPE.itemsize:
            break
        rows = np.frombuffer(blob, ROW_DTYPE, nr // ROW_DTYPE.itemsize, pos + _ENTRY.size).copy()
        try:
            extra = json.loads(blob[pos + _ENTRY.size + nr:end])
        except ValueError:
            break
        done[(s, c)] = (rows, extra)
        pos = end
    return done


def _options(src: Path, max_side, quality, resize, val_labels, keep_empty_classes) -> dict:
    return {"source": str(src.resolve()), "max_side": max_side, "quality": quality,
            "resize": resize, "val_labels": str(Path(val_labels).resolve()) if val_labels else
            None, "keep_empty_classes": keep_empty_classes, "convert_version": CONVERT_VERSION}


def _manifest_path(root: Path, split: str) -> Path:
    return root / f"{split}.sources.npz"


def _save_manifest(root: Path, split: SplitSource, rows: np.ndarray, record: np.ndarray) -> None:
    """Per file of ``split``: its path, size, mtime and record number (-1: skipped)."""
    size = np.full(len(split.files), -1, np.int64)
    mtime = np.full(len(split.files), -1, np.int64)
    size[rows["item"]] = rows["size"]
    mtime[rows["item"]] = rows["mtime"]
    paths = np.frombuffer("\n".join(split.files).encode("utf-8", "surrogateescape"), np.uint8)
    with atomic.atomic_write(_manifest_path(root, split.name)) as f:
        np.savez(f, paths=paths, size=size, mtime=mtime, record=record)


def _load_reuse(old_root: Path, split: SplitSource) -> dict | None:
    """The previous conversion's records of ``split``, aligned with its current files."""
    man, rec = _manifest_path(old_root, split.name), split_path(old_root, split.name)
    if not man.is_file() or not rec.is_file():
        return None
    try:
        with np.load(man) as z:
            paths = bytes(z["paths"]).decode("utf-8", "surrogateescape").split("\n")
            size, mtime, record = z["size"], z["mtime"], z["record"]
        records = RecordFile(rec)
    except (OSError, ValueError, KeyError, DataError):
        return None
    where = {p: k for k, p in enumerate(paths)}
    n = len(split.files)
    out = {"rec": records, "record": np.full(n, -1, np.int64), "size": np.zeros(n, np.int64),
           "mtime": np.zeros(n, np.int64)}
    for i, p in enumerate(split.files):
        k = where.get(p)
        if k is not None and record[k] >= 0:
            out["record"][i], out["size"][i], out["mtime"][i] = record[k], size[k], mtime[k]
    return out if (out["record"] >= 0).any() else None


def _finish_split(part: Path, s: int, split: SplitSource, chunks: dict, class_index: dict,
                  strict: bool, val_labels) -> dict:
    """Write split ``s``'s index and header (records in file order: by item), rename it into
    place, save its manifest; return its report."""
    keys = sorted(c for (t, c) in chunks if t == s)
    rows = np.concatenate([chunks[(s, c)][0] for c in keys]) if keys else \
        np.zeros(0, ROW_DTYPE)
    rows = rows[np.argsort(rows["item"], kind="stable")]
    skipped, reencoded = [], Counter()
    for c in keys:
        extra = chunks[(s, c)][1]
        skipped += extra["skipped"]
        reencoded.update(extra["reencoded"])
    if strict and skipped:
        raise DataError(f"{skipped[0]['path']}: {skipped[0]['reason']}")
    if strict and split.unlabelled:
        raise DataError(f"{split.unlabelled[0]}: no label in {val_labels}")
    index = np.zeros(len(rows), INDEX_DTYPE)
    for k in ("offset", "length", "label", "height", "width", "crc"):
        index[k] = rows[k]
    tmp = part / f"{split.name}.rec.tmp"
    end = int((rows["offset"] + rows["length"]).max()) if len(rows) else HEADER_SIZE
    with open(tmp, "r+b") as f:
        finish_file(f, index, end)
    os.replace(tmp, split_path(part, split.name))
    record = np.full(len(split.files), -1, np.int64)
    record[rows["item"]] = np.arange(len(rows))
    _save_manifest(part, split, rows, record)
    counts = Counter(split.classes[i] for i in rows["item"].tolist())
    report = {"written": len(rows), "reused": int(rows["reused"].sum()), "skipped": skipped,
              "reencoded": dict(reencoded), "empty_classes": split.empty_classes,
              "ignored_files": split.ignored, "unlabelled": split.unlabelled,
              "links_skipped": split.links_skipped, "per_class": dict(counts)}
    atomic.write_text(part / f"{split.name}.report.json", json.dumps(report))
    return report


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, max_side: int | None = None,
            quality: int = 90, workers: int | None = None, strict: bool = False,
            val_labels: str | os.PathLike | None = None, progress: bool = True,
            beton: dict | None = None, keep_empty_classes: bool = False, resize: str = "area",
            log=None, reuse_from: str | os.PathLike | None = None, walk: _Walk | None = None
            ) -> dict:
    """Convert ``src`` into record files under ``dst``; returns the report (also written to
    ``dst/report.json``). With ``beton`` (FFCV writer options, possibly empty), also write
    ``dst/<split>.beton`` from the validated records.

    ``dst`` appears whole or not at all (an existing one is replaced by one rename, see the
    module docstring); the work is done in ``<dst>.converting/``, which a killed conversion
    leaves behind and the same call resumes. ``reuse_from``: a converted folder of the same
    tree whose records of unchanged files are copied (default: ``dst`` itself). ``log``: where
    to say that it waits for another conversion into ``dst`` or resumes one.

    Raises ``DataError`` for an unusable tree, and (unless ``keep_empty_classes``) when a class
    has no training image: an empty folder, a class only in another split, or one whose every
    file was skipped (the model would have an output that never trains; torchvision's
    ImageFolder refuses such a tree too); ``DiskError`` (one line, naming the path, the
    temporary folder removed) for a full disk, a read-only destination or a missing permission.
    """
    if resize not in RESIZE_FILTERS:
        raise OptionError(f"resize filter {resize!r}: choose one of {', '.join(RESIZE_FILTERS)}")
    if max_side is not None and (not isinstance(max_side, int) or max_side < 1):
        raise OptionError(f"max side must be a positive number of pixels, got {max_side!r}")
    if not (isinstance(quality, int) and 1 <= quality <= 100):
        raise OptionError(f"JPEG quality must be in 1..100, got {quality!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise OptionError(f"workers must be an integer ≥ 0 (0: in this process), got {workers!r}")
    src, dst = Path(src), Path(dst)
    if dst.resolve().is_relative_to(src.resolve()):
        raise DataError(f"{dst}: inside the source tree {src}, where it would be read as a "
                        "class (or split) the next time: convert into a folder outside it")
    walk = _Walk(src) if walk is None else walk
    splits, classes = discover(src, val_labels, walk)
    train = next((s for s in splits if s.name == TRAIN_SPLIT), None)
    if train is not None and not keep_empty_classes:
        _check_trained(classes, Counter(train.classes))
    if dst.exists() and not dst.is_dir():
        raise DataError(f"{dst}: exists and is not a folder (the destination of a conversion)")
    _check_replaceable(dst)
    if dst.name.endswith(atomic.PARTIAL_SUFFIX):
        raise DataError(f"{dst}: names a conversion's temporary folder; convert into "
                        f"{dst.name[:-len(atomic.PARTIAL_SUFFIX)]} instead")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise atomic.disk_error(e, dst.parent, "cannot create") from None
    options = _options(src, max_side, quality, resize, val_labels, keep_empty_classes)
    lock = atomic.FileLock(dst.with_name(f".{dst.name}.lock"), log,
                           f"a conversion into {dst}")
    with lock:
        part = atomic.partial_dir(dst)
        try:
            report = _convert_locked(src, dst, part, splits, classes, options, walk, workers,
                                     strict, progress, beton, keep_empty_classes, log,
                                     Path(reuse_from) if reuse_from else dst)
            atomic.publish_folder(part, dst)
        except OSError as e:
            shutil.rmtree(part, ignore_errors=True)  # the space it holds is what ran out
            raise atomic.disk_error(e, part, "cannot write") from None
        except DataError:
            shutil.rmtree(part, ignore_errors=True)
            raise
    return report


_OURS = (CLASSES_FILE, "report.json", SOURCE_FILE, ".in-use")
_OUR_SUFFIXES = (".rec", ".beton", ".sources.npz", ".tmp")


def _check_replaceable(dst: Path) -> None:
    """A destination that exists must be empty or a converted dataset (only files a conversion
    writes): it is replaced whole, and nothing else in it may be deleted with it."""
    if not dst.is_dir():
        return
    foreign = sorted(p.name for p in dst.iterdir()
                     if p.name not in _OURS and not p.name.endswith(_OUR_SUFFIXES))
    if foreign:
        raise DataError(f"{dst}: exists and holds files a conversion does not write "
                        f"({', '.join(foreign[:5])}{' …' if len(foreign) > 5 else ''}); it would "
                        "be replaced whole: convert into a new or empty folder")


def _prepare(part: Path, options: dict, log) -> dict:
    """The temporary folder, resumed when it holds a conversion with the same options."""
    marker = part / "converting.json"
    if part.is_dir():
        try:
            state = json.loads(marker.read_text())
            same = state["options"] == options and state["chunk"] == CHUNK
        except (OSError, ValueError, KeyError):
            same = False
        if same:
            done = _read_journal(part / JOURNAL)
            if log is not None:
                log(f"resuming the interrupted conversion in {part} ({len(done)} chunks of "
                    f"{CHUNK} files done)")
            return done
        shutil.rmtree(part)
    part.mkdir()
    atomic.write_text(marker, json.dumps({"options": options, "chunk": CHUNK,
                                             "pid": os.getpid()}))
    return {}


def _convert_locked(src, dst, part, splits, classes, options, walk, workers, strict, progress,
                    beton, keep_empty_classes, log, reuse_root) -> dict:
    done = _prepare(part, options, log)
    class_index = {c: i for i, c in enumerate(classes)}
    old_options = None
    try:
        old_options = json.loads((reuse_root / SOURCE_FILE).read_text()).get("options")
    except (OSError, ValueError):
        pass
    same_old = old_options == options
    nchunks = [math.ceil(len(s.files) / CHUNK) for s in splits]
    finished = {s: (part / f"{sp.name}.report.json").is_file() and
                split_path(part, sp.name).is_file() for s, sp in enumerate(splits)}
    data_paths, cursors = [], []
    for s, sp in enumerate(splits):
        path = part / f"{sp.name}.rec.tmp"
        if not finished[s] and not path.is_file():
            with open(path, "wb") as f:
                f.write(b"\0" * HEADER_SIZE)
        ends = [int((r["offset"] + r["length"]).max()) for (t, _), (r, _) in done.items()
                if t == s and len(r)]
        cursors.append(mp.get_context("fork").Value("Q", max(ends, default=HEADER_SIZE)))
        data_paths.append(str(path))
    _G.clear()
    _G.update(splits=splits, options=options, src=str(src), class_index=class_index,
              cursors=cursors, data_paths=data_paths,
              reuse=[_load_reuse(reuse_root, sp) if same_old and not finished[s] else None
                     for s, sp in enumerate(splits)])
    jobs = [(s, c) for s in range(len(splits)) if not finished[s]
            for c in range(nchunks[s]) if (s, c) not in done]
    total = sum(len(s.files) for s in splits)
    bar = tqdm(total=total, initial=total - sum(
        min(CHUNK, len(splits[s].files) - c * CHUNK) for s, c in jobs),
        # disable=None: no bar where stderr is not a terminal (no carriage returns in a log)
        desc=f"convert {src.name}", unit="img", disable=None if progress else True,
        smoothing=0.05,
        leave=False)
    workers = (os.cpu_count() or 1) if workers is None else workers
    pool = mp.get_context("fork").Pool(workers, atomic.die_with_parent, (os.getpid(),)) \
        if workers > 0 and jobs else None
    reports = {}
    try:
        journal = open(part / JOURNAL, "ab")
        pending, last_sync = [], time.monotonic()
        left = {s: sum(1 for t, _ in jobs if t == s) for s in range(len(splits))}

        def sync():
            for path in data_paths:
                if os.path.exists(path):
                    fd = os.open(path, os.O_RDONLY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
            journal.write(b"".join(pending))
            journal.flush()
            os.fsync(journal.fileno())
            pending.clear()

        results = pool.imap_unordered(_run_chunk, jobs) if pool else map(_run_chunk, jobs)
        for s in range(len(splits)):  # splits with nothing left to do (all chunks journaled)
            if not finished[s] and left[s] == 0:
                reports[splits[s].name] = _finish_split(part, s, splits[s], done, class_index,
                                                        strict, options["val_labels"])
                finished[s] = True
        for s, c, rows, extra in results:
            rows_a = np.frombuffer(rows, ROW_DTYPE)
            extra_d = json.loads(extra)
            if strict and extra_d["skipped"]:
                first = extra_d["skipped"][0]
                raise DataError(f"{first['path']}: {first['reason']}")
            done[(s, c)] = (rows_a, extra_d)
            pending.append(_ENTRY.pack(s, c, len(rows), len(extra)) + rows + extra)
            if time.monotonic() - last_sync > SYNC_EVERY_S:
                sync()
                last_sync = time.monotonic()
            bar.update(min(CHUNK, len(splits[s].files) - c * CHUNK))
            left[s] -= 1
            if left[s] == 0:
                sync()
                reports[splits[s].name] = _finish_split(part, s, splits[s], done, class_index,
                                                        strict, options["val_labels"])
                finished[s] = True
        sync()
        journal.close()
    finally:
        bar.close()
        if pool:
            pool.terminate()
        for fd in _G.get("fds", {}).values():
            os.close(fd)
        _G.clear()
    for sp in splits:
        if sp.name not in reports:
            reports[sp.name] = json.loads((part / f"{sp.name}.report.json").read_text())
    return _write_outputs(src, dst, part, splits, classes, options, walk, reports, beton,
                          keep_empty_classes, workers)


def _write_outputs(src, dst, part, splits, classes, options, walk, reports, beton,
                   keep_empty_classes, workers) -> dict:
    report = {"source": options["source"], "dest": str(dst.resolve()),
              "max_side": options["max_side"], "quality": options["quality"],
              "resize": options["resize"], "classes": len(classes), "splits": {}}
    for sp in splits:
        r = dict(reports[sp.name])
        per_class = Counter(r.pop("per_class", {}))
        report["splits"][sp.name] = r
        if sp.name == TRAIN_SPLIT:
            if not keep_empty_classes:
                _check_trained(classes, per_class, " after skipping unusable files")
            report["classes_without_training_images"] = [c for c in classes if not per_class[c]]
    atomic.write_text(part / CLASSES_FILE, json.dumps({"classes": classes}, indent=1))
    if beton is not None:
        from .beton import write_beton
        for sp in splits:
            path = write_beton(split_path(part, sp.name), workers=workers or 1, **beton)
            report["splits"][sp.name]["beton"] = str(dst / path.name)
    atomic.write_text(part / SOURCE_FILE, json.dumps(
        {"options": options, "folders": walk.folders}))
    atomic.write_text(part / "report.json", json.dumps(report, indent=1))
    for name in [JOURNAL, "converting.json"] + [f"{sp.name}.report.json" for sp in splits]:
        (part / name).unlink(missing_ok=True)
    return report


def _check_trained(classes: list[str], counts: Counter, when: str = "") -> None:
    missing = [c for c in classes if not counts[c]]
    if missing:
        raise DataError(f"{len(missing)} class(es) with no training image{when}: "
                        f"{', '.join(missing[:20])}{' …' if len(missing) > 20 else ''} "
                        "(add images, remove the folders, or convert with `tricks convert "
                        "--keep-empty-classes` to keep them as outputs that never train)")


def format_report(report: dict, limit: int = 20) -> str:
    lines = [f"converted {report['source']} -> {report['dest']} ({report['classes']} classes)"]
    untrained = report.get("classes_without_training_images")
    if untrained:
        lines.append(f"  {len(untrained)} classes without training images, kept (the model has "
                     f"an output for each that never trains): {', '.join(untrained[:limit])}")
    for name, s in report["splits"].items():
        re = ", ".join(f"{k}: {v}" for k, v in sorted(s["reencoded"].items())) or "none"
        reused = f" ({s['reused']} unchanged, copied from the previous conversion)" \
            if s.get("reused") else ""
        lines.append(f"  {name}: {s['written']} written{reused}, {len(s['skipped'])} skipped, "
                     f"re-encoded ({re}), {s['ignored_files']} non-image files ignored")
        if s["empty_classes"]:
            lines.append(f"    empty class folders: {', '.join(s['empty_classes'])}")
        for item in s["skipped"][:limit]:
            lines.append(f"    skipped {item['path']}: {item['reason']}")
        if len(s["skipped"]) > limit:
            lines.append(f"    … {len(s['skipped']) - limit} more in report.json")
        if s.get("links_skipped"):
            lines.append(f"    {len(s['links_skipped'])} folder links not followed (a cycle, or a "
                         f"folder read elsewhere): {', '.join(s['links_skipped'][:3])}"
                         f"{' …' if len(s['links_skipped']) > 3 else ''}")
        if s["unlabelled"]:
            lines.append(f"    {len(s['unlabelled'])} files without a label, skipped "
                         "(listed in report.json)")
    lines.append(f"report: {Path(report['dest']) / 'report.json'}")
    return "\n".join(lines)


def source_changes(src: str | os.PathLike, root: str | os.PathLike, full: bool = False
                   ) -> list[str] | None:
    """What changed in the tree ``src`` since it was converted into ``root``: the folders whose
    modification time differs (a file or folder added, removed or renamed in them), one stat a
    folder; with ``full``, also every file whose size or modification time differs from the
    manifest (one stat a file: a file rewritten in place keeps its folder's time). An empty list:
    unchanged; None: ``root`` was not converted from ``src`` by this version."""
    src, root = Path(src), Path(root)
    try:
        state = json.loads((root / SOURCE_FILE).read_text())
        folders = state["folders"]
        if state["options"]["convert_version"] != CONVERT_VERSION or \
                state["options"]["source"] != str(src.resolve()):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    changed = []
    for rel, mtime in folders.items():
        try:
            if os.stat(src / rel).st_mtime_ns != mtime:
                changed.append(rel)
        except OSError:
            changed.append(rel)
    if changed or not full:
        return changed
    val_labels = state["options"].get("val_labels")
    splits, _ = discover(src, val_labels)
    for split in splits:
        try:
            with np.load(_manifest_path(root, split.name)) as z:
                paths = bytes(z["paths"]).decode("utf-8", "surrogateescape").split("\n")
                size, mtime = z["size"], z["mtime"]
        except (OSError, ValueError, KeyError):
            return [split.name]
        if paths != split.files:
            return [split.name]
        for k, rel in enumerate(paths):
            if size[k] < 0:
                continue  # skipped at conversion: tried again only when its folder changes
            st = os.stat(src / rel)
            if st.st_size != size[k] or st.st_mtime_ns != mtime[k]:
                changed.append(rel)
    return changed
