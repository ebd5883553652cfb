"""``tricks convert``: an ImageFolder tree → one packed record file per split.

Every record is a baseline, 3-channel JPEG that nvJPEG decodes: files that are already such JPEGs
(and within ``max_side``) are stored byte for byte; other formats, grayscale, CMYK, progressive,
RGBA and over-sized images are re-encoded. Undecodable files are skipped, counted and reported.
"""
from __future__ import annotations

import io
import json
import multiprocessing as mp
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from .errors import DataError
from .records import CLASSES_FILE, RecordWriter, split_path

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                    ".ppm", ".pgm", ".pbm"}
SPLIT_NAMES = ("train", "val", "validation", "test")


@dataclass
class SplitSource:
    name: str
    items: list[tuple[Path, str]]                 # (file, class name), in a stable order
    empty_classes: list[str] = field(default_factory=list)
    ignored: int = 0                               # hidden and non-image files
    unlabelled: list[str] = field(default_factory=list)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _images_under(folder: Path) -> tuple[list[Path], int]:
    """Image files below ``folder`` (recursively, sorted), and how many other files were ignored."""
    images, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _visible(p) and p.suffix.lower() in IMAGE_EXTENSIONS:
                images.append(p)
            else:
                ignored += 1
    return images, ignored


def _class_split(name: str, folder: Path) -> SplitSource:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and _visible(d))
    if not classes:
        loose, _ = _images_under(folder)
        if loose:
            raise DataError(f"{folder} holds images but no class sub-folders "
                            "(for ImageNet's flat validation folder, pass --val-labels FILE)")
        raise DataError(f"{folder} is empty: no class sub-folders and no images")
    split = SplitSource(name, [])
    for c in classes:
        files, ignored = _images_under(folder / c)
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


def _flat_split(name: str, folder: Path, labels_file: Path) -> SplitSource:
    labels = _read_labels(labels_file)
    files, ignored = _images_under(folder)
    split = SplitSource(name, [], ignored=ignored)
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
    if not split_dirs:
        splits = [_class_split("train", src)]
    else:
        splits = []
        for d in split_dirs:
            has_classes = any(c.is_dir() and _visible(c) for c in d.iterdir())
            if not has_classes and val_labels is not None and d.name != "train":
                splits.append(_flat_split(d.name, d, Path(val_labels)))
            else:
                splits.append(_class_split(d.name, d))
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


def inspect_and_encode(data: bytes, max_side: int | None = None, quality: int = 90) -> Encoded:
    """Validate one file's bytes; return them unchanged when they are a baseline RGB JPEG within
    ``max_side``, else a re-encoded baseline RGB JPEG; or the reason it cannot be used."""
    if not data:
        return Encoded(None, error="empty file")
    try:
        img = Image.open(io.BytesIO(data))
        fmt = img.format
        img.load()  # full decode: catches truncated and corrupt files
    except Exception as e:  # PIL raises many types for bad input
        return Encoded(None, error=f"not a decodable image ({type(e).__name__}: {e})")
    reasons = []
    if fmt != "JPEG":
        reasons.append(f"format {fmt}")
    else:
        if img.mode != "RGB":
            reasons.append(f"mode {img.mode}")
        if img.info.get("progressive") or img.info.get("progression"):
            reasons.append("progressive")
    if max_side and max(img.size) > max_side:
        reasons.append("over max side")
    if not reasons:
        return Encoded(data, img.height, img.width)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # flatten transparency onto white, not onto black
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    elif img.mode != "RGB":
        img = img.convert("RGB")
    if max_side and max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
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
            beton: dict | None = None) -> dict:
    """Convert ``src`` into record files under ``dst``; returns the report (also written to
    ``dst/report.json``). With ``beton`` (FFCV writer options, possibly empty), also write
    ``dst/<split>.beton`` from the validated records."""
    splits, classes = discover(src, val_labels)
    dst = Path(dst)
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
            with RecordWriter(split_path(dst, split.name)) as writer, \
                    open(dst / f"{split.name}.files.txt", "w") as listing:
                for (path, cls), enc in zip(split.items, results):
                    bar.update()
                    if enc.data is None:
                        if strict:
                            raise DataError(f"{path}: {enc.error}")
                        skipped.append({"path": str(path), "reason": enc.error})
                        continue
                    writer.add(enc.data, class_index[cls], enc.height, enc.width)
                    listing.write(f"{path}\t{class_index[cls]}\n")
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
                "unlabelled": split.unlabelled}
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


def format_report(report: dict, limit: int = 20) -> str:
    lines = [f"converted {report['source']} -> {report['dest']} ({report['classes']} classes)"]
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
        if s["unlabelled"]:
            lines.append(f"    {len(s['unlabelled'])} files without a label, skipped "
                         "(listed in report.json)")
    lines.append(f"report: {Path(report['dest']) / 'report.json'}")
    return "\n".join(lines)
