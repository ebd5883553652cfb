"""Where a Loader's data comes from: a folder made by ``tricks convert`` as it is, an ImageFolder
tree (class folders, or ``train/``, ``val/``, … each with class folders) converted into the cache
(once, and again, incrementally, when it changed: ``resolve_dataset``), a list of
``(path, label)`` pairs (``pairs_tree``: linked into an ImageFolder tree in the cache, then as a
tree), or nothing: the embedded synthetic dataset."""
from __future__ import annotations

import fcntl
import hashlib
import numbers
import os
import shutil
from pathlib import Path

import numpy as np

from tricks.errors import DataError, DiskError

from . import atomic
from .convert import (CONVERT_VERSION, IMAGE_EXTENSIONS, SPLIT_NAMES, convert, format_report,
                      source_changes)
from .records import CLASSES_FILE
from .synthetic import make_dataset


def cache_dir() -> Path:
    base = os.environ.get("TRICKS_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tricks"
    return Path(base)


def _cache_folder(path: Path) -> Path:
    """``path`` under the cache, made if missing; an unwritable cache is one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not os.access(path, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(path))
    except OSError as e:
        err = atomic.disk_error(e, path, "cannot write the dataset cache")
        if not isinstance(err, DiskError):
            raise
        raise DiskError(f"{err} (TRICKS_CACHE={cache_dir()}): set TRICKS_CACHE to a writable "
                        "folder, or convert ahead with `tricks convert SRC DST` and set "
                        "data.path=DST") from None
    return path


def embedded_dataset(log=print) -> Path:
    """The default dataset (synthetic shapes), made and converted once into the cache."""
    root = cache_dir() / "shapes-v1"
    records = root / "records"
    if not (records / CLASSES_FILE).is_file():
        _cache_folder(root)
        with atomic.FileLock(root / ".lock", log, "making the embedded dataset"):
            if not (records / CLASSES_FILE).is_file():
                log(f"making the embedded dataset (once) in {root}")
                images = root / "images"
                if not (images / ".complete").is_file():
                    shutil.rmtree(images, ignore_errors=True)
                    make_dataset(images)
                    (images / ".complete").touch()
                convert(images, records, workers=0, progress=False)
    return records


def pairs_tree(pairs, split: str, log=print) -> Path:
    """An ImageFolder tree in the cache holding ``pairs``, for ``resolve_dataset``.

    Args:
        pairs: a sequence of ``(path, label)``: an image file (absolute, or relative to the
            current directory) and its label, every label an ``int`` ≥ 0 or every label a
            ``str`` (as read from a CSV). Integer labels are kept as the targets: class folders
            ``000000``, ``000001``, … up to the largest label, so label k is target k (in
            training every label up to the largest needs an image; an evaluation list may
            leave some out). String labels are class names, numbered in sorted order
            (as ImageFolder does); give the same set of names to every split.
        split: the split the pairs form (``train``, ``val``, ``validation`` or ``test``).

    Returns:
        ``<cache>/pairs/<key>``, holding ``<split>/<class>/<n><ext>``: one symbolic link per
        pair, to the resolved file. The key is a hash of the split and the pairs, so the same
        list finds the same tree (and its conversion) again. A file rewritten in place is seen
        as a change only with ``TRICKS_RECHECK=1`` (see ``resolve_dataset``).

    Raises:
        OptionError: not a sequence of pairs, mixed or negative labels, a training label
            without an image below the largest, an unknown split, a file of another extension
            than the converter reads.
        DataError: files that do not exist (the count and the first one named).
    """
    from tricks.errors import OptionError
    if split not in SPLIT_NAMES:
        raise OptionError(f"Loader(split={split!r}): a list of (path, label) pairs forms one "
                          f"split named {', '.join(SPLIT_NAMES)}")
    try:
        rows = [(os.path.abspath(os.fspath(p)), label) for p, label in pairs]
    except (TypeError, ValueError):
        raise OptionError("Loader(source=…): a list must hold (path, label) pairs") from None
    if not rows:
        raise OptionError("Loader(source=[]): the list of (path, label) pairs is empty")
    bad_ext = [p for p, _ in rows if os.path.splitext(p)[1].lower() not in IMAGE_EXTENSIONS]
    if bad_ext:
        raise OptionError(f"Loader(source=…): {len(bad_ext)} file(s) without an image extension "
                          f"({', '.join(sorted(IMAGE_EXTENSIONS))}), first {bad_ext[0]}")
    missing = [p for p, _ in rows if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} of the {len(rows)} listed image(s) do not exist, first "
                        f"{missing[0]}")
    labels = [label for _, label in rows]
    if all(isinstance(y, numbers.Integral) and not isinstance(y, (bool, np.bool_))
           for y in labels):  # numpy's integers too (a pandas column)
        labels = [int(y) for y in labels]
        if min(labels) < 0:
            raise OptionError(f"Loader(source=…): label {min(labels)} is negative")
        unused = sorted(set(range(max(labels) + 1)) - set(labels))
        if unused and split == "train":
            more = " …" if len(unused) > 5 else ""
            raise OptionError(f"Loader(source=…): label(s) {', '.join(map(str, unused[:5]))}"
                              f"{more} have no training image, and integer labels are the "
                              f"targets 0..{max(labels)}: every one needs an image (or give "
                              "class names, numbered in sorted order)")
        width = max(6, len(str(max(labels))))
        names = [f"{y:0{width}d}" for y in labels]
        classes = [f"{y:0{width}d}" for y in range(max(labels) + 1)]
    elif all(isinstance(y, str) and y and "/" not in y and not y.startswith(".")
             for y in labels):  # numpy's str_ is a str
        names, classes = labels, sorted(set(labels))
    else:
        raise OptionError("Loader(source=…): labels must all be integers ≥ 0 or all be class "
                          "names (non-empty strings without '/' or a leading '.')")
    digest = hashlib.sha1(split.encode())
    for (p, _), name in zip(rows, names):
        digest.update(f"\0{p}\0{name}".encode())
    root = _cache_folder(cache_dir() / "pairs") / digest.hexdigest()[:16]
    if (root / ".complete").is_file():
        return root
    part = root.with_name(f"{root.name}.{os.getpid()}.part")
    shutil.rmtree(part, ignore_errors=True)
    log(f"linking {len(rows)} listed images into {root}")
    try:
        for c in classes:
            (part / split / c).mkdir(parents=True)
        for k, ((p, _), name) in enumerate(zip(rows, names)):
            os.symlink(p, part / split / name / f"{k:08d}{os.path.splitext(p)[1].lower()}")
        (part / ".complete").touch()
        os.rename(part, root)  # whole, in one step; another process may have won the race
    except OSError as e:
        shutil.rmtree(part, ignore_errors=True)
        if (root / ".complete").is_file():
            return root
        raise atomic.disk_error(e, root, "cannot write the dataset cache") from None
    return root


CURRENT = "current"   # in a cache folder: a link to the newest complete conversion (g<N>)
IN_USE = ".in-use"    # in a conversion: shared-locked by every process that reads it
_held: dict[str, int] = {}  # conversions this process reads: path → fd holding the shared lock


def _hold(root: Path) -> Path | None:
    """Mark ``root`` as read by this process (a shared ``flock`` kept until it exits), so no
    other process deletes it as an old conversion. None when it was deleted meanwhile (another
    process converted a changed tree and collected it before the lock was taken)."""
    key = str(root)
    if key not in _held:
        try:
            fd = os.open(root / IN_USE, os.O_RDONLY | os.O_CREAT, 0o644)
        except FileNotFoundError:
            return None
        except OSError:
            return root  # a read-only cache: nothing deletes from it either
        fcntl.flock(fd, fcntl.LOCK_SH)
        if not (root / CLASSES_FILE).is_file():
            os.close(fd)
            return None
        _held[key] = fd
    return root


def _collect(base: Path, keep: Path) -> None:
    """Delete the conversions in ``base`` other than ``keep`` that no process reads."""
    for old in base.glob("g*"):
        if old == keep or not old.is_dir() or old.name.endswith(atomic.PARTIAL_SUFFIX):
            continue
        try:
            fd = os.open(old / IN_USE, os.O_RDONLY | os.O_CREAT, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue  # another run still reads it; a later conversion removes it
        shutil.rmtree(old, ignore_errors=True)
        os.close(fd)


def _current(base: Path) -> Path | None:
    link = base / CURRENT
    try:
        target = base / os.readlink(link)
    except OSError:
        return None
    return target if (target / CLASSES_FILE).is_file() else None


def resolve_dataset(path: str | None, max_side: int | None = None, quality: int = 90,
                    log=print, recheck: bool | None = None) -> Path:
    """A converted folder as is (trusted: ``tricks convert`` made it); an ImageFolder tree
    converted into the cache, once, and again, incrementally, when it changed since.

    The cache holds one folder per tree and options, with the conversions in it as ``g<N>/``
    and ``current`` linking to the newest. Whether the tree changed is judged by its folders'
    modification times (a stat a folder, not a file: a file added, removed or renamed changes
    its folder's), or with ``recheck`` (default: the ``TRICKS_RECHECK`` environment variable
    set to 1) by every file's size and time too (a file rewritten in place). A changed tree is
    said so in one line and converted into a new ``g<N+1>`` that copies the records of
    unchanged files; runs still reading an older one keep it (a shared lock) until they end.
    One process converts at a time (a lock); the others wait and use its result.

    Raises ``DataError`` for a missing path, one that is neither a folder nor converted, or an
    interrupted conversion (named with its temporary folder); ``DiskError`` for an unwritable
    cache."""
    if path is None:
        return embedded_dataset(log)
    src = Path(path).expanduser()
    interrupted = atomic.interrupted_conversion(src)
    if not src.exists() or src.name.endswith(atomic.PARTIAL_SUFFIX):
        raise DataError(interrupted or f"no such dataset: {src}")
    if (src / CLASSES_FILE).is_file():
        if interrupted:
            log(f"note: {interrupted}; training on the previous, complete conversion")
        return src
    if interrupted:
        raise DataError(interrupted)
    if not src.is_dir():
        raise DataError(f"{src}: not a folder (data.path takes a converted dataset folder or "
                        f"an ImageFolder tree)")
    if recheck is None:
        recheck = os.environ.get("TRICKS_RECHECK", "") == "1"
    key = hashlib.sha1(f"{src.resolve()}|{max_side}|{quality}|v{CONVERT_VERSION}".encode()
                       ).hexdigest()[:12]
    base = cache_dir() / "converted" / f"{src.name}-{key}"
    current = _current(base)
    if current is not None and source_changes(src, current, recheck) == [] and \
            _hold(current) is not None:
        return current
    _cache_folder(base)
    with atomic.FileLock(base / ".lock", log, f"converting {src}"):
        current = _current(base)  # another process may have converted it meanwhile
        changes = source_changes(src, current, recheck) if current is not None else None
        if changes == [] and _hold(current) is not None:  # under the lock: not collected
            return current
        n = max([int(p.name[1:]) for p in base.glob("g*")
                 if p.name[1:].isdigit()], default=0) + 1
        new = base / f"g{n}"
        if changes:
            more = " …" if len(changes) > 3 else ""
            log(f"{src} changed since its conversion into {current} ({len(changes)} "
                f"folder(s) or file(s): {', '.join(changes[:3])}{more}): converting it again "
                f"into {new}, copying the records of unchanged files")
        else:
            log(f"converting {src} into {new} (once; `tricks convert` does this ahead of time)")
        log(format_report(convert(src, new, max_side=max_side, quality=quality, log=log,
                                  reuse_from=current)))
        tmp = base / f".{CURRENT}.tmp"
        try:
            tmp.unlink(missing_ok=True)
            os.symlink(new.name, tmp)
            os.replace(tmp, base / CURRENT)  # the new conversion, in one rename
        except OSError as e:
            raise atomic.disk_error(e, base / CURRENT, "cannot write the dataset cache") \
                from None
        _hold(new)
        _collect(base, new)
    return new
