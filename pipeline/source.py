"""Where a Loader's data comes from: a folder made by ``tricks convert`` as it is, an ImageFolder
tree (class folders, or ``train/``, ``val/``, … each with class folders) converted once into the
cache and reused while the tree is unchanged, or nothing: the embedded synthetic dataset."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from .convert import CONVERT_VERSION, convert, format_report
from tricks.errors import DataError
from .records import CLASSES_FILE
from .synthetic import make_dataset


def cache_dir() -> Path:
    base = os.environ.get("TRICKS_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tricks"
    return Path(base)


def embedded_dataset(log=print) -> Path:
    """The default dataset (synthetic shapes), made and converted once into the cache."""
    root = cache_dir() / "shapes-v1"
    records = root / "records"
    if not (records / CLASSES_FILE).is_file():
        log(f"making the embedded dataset (once) in {root}")
        make_dataset(root / "images")
        convert(root / "images", records, workers=0, progress=False)
    return records


SOURCE_FILE = "source-fingerprint.txt"  # in a cached conversion: the tree it was made from


def tree_fingerprint(src: Path) -> str:
    """A hash of every file under ``src``: its relative path, size and modification time
    (nanoseconds), so an added, removed, renamed or rewritten file changes it; one ``stat``
    a file, as ImageFolder lists the tree on every run."""
    h = hashlib.sha1()
    stack = [src]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                if e.is_dir(follow_symlinks=True):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=True):
                    st = e.stat(follow_symlinks=True)
                    rel = os.path.relpath(e.path, src)
                    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def resolve_dataset(path: str | None, max_side: int | None = None, quality: int = 90,
                    log=print) -> Path:
    """A converted folder as is; an ImageFolder tree converted into the cache, once, and again
    whenever a file under it was added, removed or changed since (``tree_fingerprint``).

    Raises ``DataError`` for a missing path or one that is neither a folder nor converted."""
    if path is None:
        return embedded_dataset(log)
    src = Path(path).expanduser()
    if not src.exists():
        raise DataError(f"no such dataset: {src}")
    if (src / CLASSES_FILE).is_file():
        return src
    if not src.is_dir():
        raise DataError(f"{src}: not a folder (data.path takes a converted dataset folder or "
                        f"an ImageFolder tree)")
    key = hashlib.sha1(f"{src.resolve()}|{max_side}|{quality}|v{CONVERT_VERSION}".encode()
                       ).hexdigest()[:12]
    dst = cache_dir() / "converted" / f"{src.name}-{key}"
    fingerprint = tree_fingerprint(src)
    stamp = dst / SOURCE_FILE
    if (dst / CLASSES_FILE).is_file() and stamp.is_file() and \
            stamp.read_text().strip() == fingerprint:
        return dst
    if dst.exists():
        log(f"{src} changed since it was converted into {dst}: converting it again")
        shutil.rmtree(dst)  # our own cache folder: no stale split or class may survive
    else:
        log(f"converting {src} into {dst} (once; `tricks convert` does this ahead of time)")
    log(format_report(convert(src, dst, max_side=max_side, quality=quality)))
    stamp.write_text(fingerprint + "\n")
    return dst
