"""``tricks convert``: an ImageFolder tree → one packed record file per split.

Every record is a baseline, 3-channel, upright JPEG that nvJPEG decodes: files that are already
such JPEGs (and within ``max_side``) are stored byte for byte; other formats, other modes (see
``to_rgb``), progressive files, images with an EXIF orientation other than 1 and over-sized
images are re-encoded. Every engine and source reads these records, so all of them see the same
upright 8-bit RGB picture. Undecodable files are skipped, counted and reported.

Very large images follow one policy (instead of Pillow's ``DecompressionBombWarning``): an image
of more than ``Image.MAX_IMAGE_PIXELS`` pixels (Pillow's limit, 89,478,485 by default) is stored
downscaled to fit it, so no engine ever decodes more; one of more than ``BOMB_FACTOR`` times that
is skipped as a likely decompression bomb.
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing as mp
import os
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from tricks.errors import DataError
from .records import CLASSES_FILE, RecordWriter, split_path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm"}
SPLIT_NAMES = ("train", "val", "validation", "test")
TRAIN_SPLIT = "train"
# what convert stores changed (2: upright per EXIF, modes by value range, large-image policy):
# conversions cached by an older tricks are made again
CONVERT_VERSION = 2
BOMB_FACTOR = 4       # over this many times Pillow's MAX_IMAGE_PIXELS: skipped, not decoded
ORIENTATION_TAG = 0x0112  # EXIF/TIFF "Orientation"; 1 is upright


@dataclass
class SplitSource:
    name: str
    items: list[tuple[Path, str]]                 # (file, class name), in a stable order
    empty_classes: list[str] = field(default_factory=list)
    ignored: int = 0                               # hidden and non-image files
    unlabelled: list[str] = field(default_factory=list)
    links_skipped: list[str] = field(default_factory=list)  # folder links already read, cycles


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _folder_id(path: str | os.PathLike) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _images_under(folder: Path, seen: set | None = None, links: list | None = None
                  ) -> tuple[list[Path], int]:
    """Image files below ``folder`` (recursively, sorted, following links), and how many other
    files were ignored. A folder already in ``seen`` (by device and inode: a link to an ancestor,
    i.e. a cycle, or to a folder read elsewhere) is not entered again but listed in ``links``."""
    seen = {_folder_id(folder)} if seen is None else seen
    links = [] if links is None else links
    images, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        keep = []
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            key = _folder_id(os.path.join(dirpath, d))
            if key in seen:
                links.append(os.path.join(dirpath, d))
            else:
                seen.add(key)
                keep.append(d)
        dirnames[:] = keep
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(p)
            else:
                ignored += 1
    return images, ignored


def _class_split(name: str, folder: Path, seen: set) -> SplitSource:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and _visible(d))
    if not classes:
        loose, _ = _images_under(folder)
        if loose:
            raise DataError(f"{folder} holds images but no class sub-folders "
                            "(for ImageNet's flat validation folder, pass --val-labels FILE)")
        raise DataError(f"{folder} is empty: no class sub-folders and no images")
    split = SplitSource(name, [])
    for c in classes:
        files, ignored = _images_under(folder / c, seen, split.links_skipped)
        split.ignored += ignored
        if not files:
            split.empty_classes.append(c)
        split.items += [(f, c) for f in files]
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


def _flat_split(name: str, folder: Path, labels_file: Path, seen: set) -> SplitSource:
    labels = _read_labels(labels_file)
    split = SplitSource(name, [])
    files, split.ignored = _images_under(folder, seen, split.links_skipped)
    for f in files:
        if f.stem in labels:
            split.items.append((f, labels[f.stem]))
        else:
            split.unlabelled.append(str(f))
    return split


def discover(src: str | os.PathLike, val_labels: str | os.PathLike | None = None
             ) -> tuple[list[SplitSource], list[str]]:
    """Find the splits and the class list (shared by all splits) of an ImageFolder tree."""
    src = Path(src)
    if not src.exists():
        raise DataError(f"no such folder: {src}")
    if not src.is_dir():
        raise DataError(f"not a folder: {src}")
    split_dirs = [src / n for n in SPLIT_NAMES if (src / n).is_dir()]
    # every split and class folder counts as read before any walk starts, so a link into one of
    # them (a cycle, or a class linked into another class or split) is not followed
    seen = {_folder_id(d) for d in [src, *split_dirs]}
    seen |= {_folder_id(c) for d in (split_dirs or [src]) for c in d.iterdir()
             if c.is_dir() and _visible(c)}
    if not split_dirs:
        splits = [_class_split(TRAIN_SPLIT, src, seen)]
    else:
        splits = []
        for d in split_dirs:
            has_classes = any(c.is_dir() and _visible(c) for c in d.iterdir())
            if not has_classes and val_labels is not None and d.name != TRAIN_SPLIT:
                splits.append(_flat_split(d.name, d, Path(val_labels), seen))
            else:
                splits.append(_class_split(d.name, d, seen))
    classes = sorted({c for s in splits for c in
                      ([c for _, c in s.items] + s.empty_classes)})
    if not any(s.items for s in splits):
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


def inspect_and_encode(data: bytes, max_side: int | None = None, quality: int = 90) -> Encoded:
    """Validate one file's bytes; return them unchanged when they are an upright baseline RGB
    JPEG within ``max_side`` and Pillow's pixel limit, else a re-encoded one (upright per its
    EXIF orientation, 8-bit RGB per ``to_rgb``, downscaled to the limits), with height and
    width as stored; or the reason it cannot be used."""
    if not data:
        return Encoded(None, error="empty file")
    with _own_pixel_limit() as max_pixels:
        try:
            img = Image.open(io.BytesIO(data))
            fmt = img.format
            pixels = img.width * img.height
            if max_pixels and pixels > BOMB_FACTOR * max_pixels:
                return Encoded(None, error=f"{img.width}×{img.height} = {pixels:,} pixels, over "
                               f"{BOMB_FACTOR}× Pillow's limit of {max_pixels:,} (a likely "
                               "decompression bomb)")
            img.load()  # full decode: catches truncated and corrupt files
            orientation = img.getexif().get(ORIENTATION_TAG, 1)
        except Exception as e:  # PIL raises many types for bad input
            return Encoded(None, error=f"not a decodable image ({_reason(e)})")
    reasons = []
    if fmt != "JPEG":
        reasons.append(f"format {fmt}")
    else:
        if img.mode != "RGB":
            reasons.append(f"mode {img.mode}")
        if img.info.get("progressive") or img.info.get("progression"):
            reasons.append("progressive")
    if orientation in range(2, 9):  # other values are invalid: Pillow and browsers ignore them
        reasons.append("EXIF orientation")
    if max_side and max(img.size) > max_side:
        reasons.append("over max side")
    if max_pixels and pixels > max_pixels:
        reasons.append("over max pixels")
    if not reasons:
        return Encoded(data, img.height, img.width)
    img = to_rgb(ImageOps.exif_transpose(img))
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    if max_pixels and img.width * img.height > max_pixels:
        f = math.sqrt(max_pixels / (img.width * img.height))
        img = img.resize((max(1, int(img.width * f)), max(1, int(img.height * f))),
                         Image.Resampling.LANCZOS)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=quality, progressive=False, optimize=False)
    return Encoded(out.getvalue(), img.height, img.width, reencoded=", ".join(reasons))


def _work(args: tuple[str, int | None, int]) -> Encoded:
    path, max_side, quality = args
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return Encoded(None, error=f"unreadable ({e.strerror})")
    return inspect_and_encode(data, max_side, quality)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, max_side: int | None = None,
            quality: int = 90, workers: int | None = None, strict: bool = False,
            val_labels: str | os.PathLike | None = None, progress: bool = True,
            beton: dict | None = None, keep_empty_classes: bool = False) -> dict:
    """Convert ``src`` into record files under ``dst``; returns the report (also written to
    ``dst/report.json``). With ``beton`` (FFCV writer options, possibly empty), also write
    ``dst/<split>.beton`` from the validated records.

    Raises ``DataError`` for an unusable tree, and (unless ``keep_empty_classes``) when a class
    has no training image: an empty folder, a class only in another split, or one whose every
    file was skipped (the model would have an output that never trains; torchvision's
    ImageFolder refuses such a tree too)."""
    splits, classes = discover(src, val_labels)
    train = next((s for s in splits if s.name == TRAIN_SPLIT), None)
    if train is not None and not keep_empty_classes:
        _check_trained(classes, Counter(c for _, c in train.items))
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise DataError(f"{dst}: exists and is not a folder (the destination of a conversion)")
    dst.mkdir(parents=True, exist_ok=True)
    class_index = {c: i for i, c in enumerate(classes)}
    workers = (os.cpu_count() or 1) if workers is None else workers
    report = {"source": str(Path(src).resolve()), "dest": str(dst.resolve()),
              "max_side": max_side, "quality": quality, "classes": len(classes), "splits": {}}
    pool = mp.get_context("fork").Pool(workers) if workers > 0 else None
    try:
        for split in splits:
            jobs = [(str(p), max_side, quality) for p, _ in split.items]
            results = pool.imap(_work, jobs, chunksize=16) if pool else map(_work, jobs)
            written, skipped, reencoded = 0, [], Counter()
            bar = tqdm(total=len(jobs), desc=f"convert {split.name}", unit="img",
                       disable=not progress, leave=False)
            per_class = Counter()
            with RecordWriter(split_path(dst, split.name)) as writer:
                for (path, cls), enc in zip(split.items, results):
                    bar.update()
                    if enc.data is None:
                        if strict:
                            raise DataError(f"{path}: {enc.error}")
                        skipped.append({"path": str(path), "reason": enc.error})
                        continue
                    writer.add(enc.data, class_index[cls], enc.height, enc.width)
                    per_class[cls] += 1
                    written += 1
                    if enc.reencoded:
                        for reason in enc.reencoded.split(", "):
                            reencoded[reason] += 1
            bar.close()
            if strict and split.unlabelled:
                raise DataError(f"{split.unlabelled[0]}: no label in {val_labels}")
            report["splits"][split.name] = {
                "written": written, "skipped": skipped, "reencoded": dict(reencoded),
                "empty_classes": split.empty_classes, "ignored_files": split.ignored,
                "unlabelled": split.unlabelled, "links_skipped": split.links_skipped}
            if split is train:
                untrained = [c for c in classes if not per_class[c]]
                if not keep_empty_classes:
                    _check_trained(classes, per_class, " after skipping unusable files")
                report["classes_without_training_images"] = untrained
    finally:
        if pool:
            pool.terminate()
    (dst / CLASSES_FILE).write_text(json.dumps({"classes": classes}, indent=1))
    if beton is not None:
        from .beton import write_beton
        for split in splits:
            path = write_beton(split_path(dst, split.name), workers=workers or 1, **beton)
            report["splits"][split.name]["beton"] = str(path)
    (dst / "report.json").write_text(json.dumps(report, indent=1))
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
        lines.append(f"  {name}: {s['written']} written, {len(s['skipped'])} skipped, "
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
