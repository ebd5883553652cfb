"""Whole-or-nothing files and folders, one-line disk errors, and inter-process locks.

- ``atomic_write``: a file appears whole (temporary file in the same folder, fsync, rename) or
  not at all; on any failure the temporary file is removed.
- ``publish_folder``: a folder built beside its destination is swapped in by one rename
  (``renameat2(RENAME_EXCHANGE)`` where the kernel has it, so a reader sees the old folder or
  the new one, never neither), the old one then deleted.
- ``disk_error``: ENOSPC, EDQUOT, EROFS, EACCES, EPERM as a one-line ``DiskError`` naming the
  path.
- ``FileLock``: an exclusive ``flock`` on a lock file (released by the kernel when the process
  dies, so a killed holder never leaves a stale lock).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import time
from contextlib import contextmanager
from pathlib import Path

from tricks.errors import DiskError

_DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.EFBIG: "file too large"}
PARTIAL_SUFFIX = ".converting"   # the folder a conversion is built in, beside its destination


def disk_error(e: OSError, path: str | os.PathLike, what: str = "cannot write") -> Exception:
    """``e`` as a one-line ``DiskError`` ("<what> <path>: no space left on the device") when it
    is a full disk, a read-only file system or a missing permission; else ``e`` itself."""
    reason = _DISK_ERRNOS.get(getattr(e, "errno", None))
    if reason is None:
        return e
    return DiskError(f"{what} {e.filename or path}: {reason}")


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _wrap(f, path: Path):
    """The file object writes go through (a hook for tests that inject faults)."""
    return f


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", what: str = "cannot write"):
    """``with atomic_write(path) as f: f.write(...)``: ``path`` is replaced whole on success
    (fsync, rename, fsync of the folder); on any error the temporary ``.<name>.tmp`` is removed
    and a disk error is raised as one line (``disk_error``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, mode) as raw:
            f = _wrap(raw, tmp)
            yield f
            f.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise disk_error(e, path, what) from None
        raise
    fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """``path.write_text(text)``, atomically (``atomic_write``)."""
    with atomic_write(path, "w") as f:
        f.write(text)


# --- folders -----------------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish_folder(tmp: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make the complete folder ``tmp`` visible as ``dst`` in one rename; an existing ``dst`` is
    swapped out atomically, then deleted (readers holding its files open keep reading them)."""
    tmp, dst = Path(tmp), Path(dst)
    fsync_dir(tmp)
    if dst.is_symlink() or not dst.exists():
        os.replace(tmp, dst)
    elif dst.is_dir() and not any(dst.iterdir()):
        os.rmdir(dst)
        os.replace(tmp, dst)
    elif _exchange(tmp, dst):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old folder
    else:  # no atomic exchange: a moment without dst, named by interrupted_conversion
        old = dst.with_name(f"{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(dst.parent)


def partial_dir(dst: str | os.PathLike) -> Path:
    """The folder a conversion into ``dst`` is built (and resumed) in."""
    dst = Path(dst)
    return dst.with_name(dst.name + PARTIAL_SUFFIX)


def _size(path: Path) -> int:
    total = 0
    for p in path.rglob("*") if path.is_dir() else [path]:
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            pass
    return total


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def interrupted_conversion(root: str | os.PathLike) -> str | None:
    """A one-line description when ``root`` is (or is the destination of) a conversion that was
    interrupted: its temporary folder, or temporary files left inside it by an older tricks;
    None otherwise."""
    root = Path(root)
    if root.name.endswith(PARTIAL_SUFFIX):
        dst = root.with_name(root.name[:-len(PARTIAL_SUFFIX)])
        return (f"{root} is the temporary folder of an interrupted conversion into {dst} "
                f"({_mb(_size(root))}): run the same `tricks convert … {dst}` again to resume "
                "it, or delete the folder")
    part = partial_dir(root)
    if part.is_dir():
        state = "holds the previous conversion" if (root / "classes.json").is_file() else \
            "is not a converted dataset yet"
        return (f"{root}: a conversion into it was interrupted ({state}); its temporary folder "
                f"{part} holds {_mb(_size(part))}: run the same `tricks convert … {root}` again "
                "to resume it, or delete that folder")
    olds = sorted(root.parent.glob(f"{root.name}.old-*")) if root.parent.is_dir() else []
    if olds and not root.exists():
        return (f"{root} is missing: a conversion was interrupted while swapping it in; the "
                f"previous dataset is in {olds[0]}")
    if root.is_dir():
        tmps = sorted(p.name for p in root.glob("*.tmp"))
        if tmps and not (root / "classes.json").is_file():
            return (f"{root} holds only the temporary files of an interrupted conversion "
                    f"({', '.join(tmps)}: {_mb(sum(_size(root / t) for t in tmps))}) and no "
                    "classes.json: convert it again (and delete those files)")
    return None


# --- locks -------------------------------------------------------------------------------------

class FileLock:
    """An exclusive advisory lock (``flock``) on ``path``, made if missing. ``log`` says once
    that it waits when another process holds it. Released on ``release``/exit, or by the
    kernel when the process dies."""

    def __init__(self, path: str | os.PathLike, log=None, what: str = "a conversion"):
        self.path, self.log, self.what = Path(path), log, what
        self._fd: int | None = None

    def acquire(self) -> "FileLock":
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise disk_error(e, self.path, "cannot create the lock file") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if self.log is not None:
                self.log(f"waiting for another process doing {self.what} (lock {self.path})")
            t0 = time.monotonic()
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            if self.log is not None:
                self.log(f"lock {self.path} acquired after {time.monotonic() - t0:.0f} s")
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *_):
        self.release()


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to a log file; a disk error is one line (``disk_error``)."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise disk_error(e, path, "cannot write") from None


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent(parent: int) -> None:
    """A pool initializer: this (forked) worker is killed when ``parent`` dies (Linux's
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)``), so a worker of a conversion killed with ``kill -9``
    never writes on into files a resumed conversion now owns. Where prctl is missing the worker
    merely outlives its parent, as before."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (AttributeError, OSError):
        return
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)
