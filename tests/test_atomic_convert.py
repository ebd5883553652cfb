"""A conversion is visible whole or not at all (issue 24, faults 1, 4 and 6): kill -9 mid-way,
a full disk during the second split, a read-only destination; resumed after a kill."""
import errno
import importlib
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tricks.pipeline.convert import convert

convert_mod = importlib.import_module("tricks.pipeline.convert")
from tricks.errors import DataError, DiskError
from tricks.pipeline.records import RecordFile, read_classes

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def _tree(root: Path, classes=("cat", "dog"), n=6, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    for split, count in (("train", n), ("val", 2)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                a = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"{k}.jpg", quality=90)
    return root


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.is_file()}


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _run_killed(src: Path, dst: Path, tmp_path: Path, chunks: int = 2, workers: int = 0,
                delay: float = 0.02) -> list[int]:
    """Convert in a subprocess slowed to ``delay`` seconds a file, kill -9 it once ``chunks``
    chunks are journaled; returns the pids of its worker processes at that moment."""
    script = textwrap.dedent(f"""
        import time
        import importlib
        c = importlib.import_module("tricks.pipeline.convert")
        c.CHUNK, c.SYNC_EVERY_S = 4, 0.0
        slow = c.inspect_and_encode
        def encode(*a, **k):
            time.sleep({delay})
            return slow(*a, **k)
        c.inspect_and_encode = encode
        c.convert({str(src)!r}, {str(dst)!r}, workers={workers}, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=subprocess_env())
    journal = convert_mod.atomic.partial_dir(dst) / convert_mod.JOURNAL
    entry = convert_mod._ENTRY.size
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if journal.is_file() and journal.stat().st_size > chunks * (entry + 100):
                break
            assert proc.poll() is None, "the conversion ended before it could be killed"
            time.sleep(0.01)
        else:
            pytest.fail("no journal entries within 60 s")
        children = _children(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return children


def test_kill_9_during_a_reconversion_leaves_the_old_dataset_whole(tmp_path):
    src = _tree(tmp_path / "src")
    dst = tmp_path / "out"
    convert(src, dst, workers=0, progress=False)
    before = _digest(dst)
    _tree(tmp_path / "src", classes=("cat", "dog", "emu"), n=12, seed=1)  # the tree changed
    _run_killed(src, dst, tmp_path)
    assert _digest(dst) == before  # not a byte of the old dataset changed: no mix
    assert read_classes(dst) == ["cat", "dog"]


def test_a_killed_first_conversion_is_named_with_its_temporary_folder(tmp_path):
    from tricks.pipeline import Loader
    src = _tree(tmp_path / "src", n=12)
    dst = tmp_path / "out"
    _run_killed(src, dst, tmp_path)
    with pytest.raises(DataError) as e:
        Loader(dst, "train", 2)
    msg = str(e.value)
    assert "interrupted" in msg and "out.converting" in msg and "\n" not in msg
    from tricks.pipeline.source import resolve_dataset
    with pytest.raises(DataError, match="interrupted.*out.converting"):
        resolve_dataset(str(dst), log=lambda m: None)
    with pytest.raises(DataError, match="temporary folder of an interrupted conversion"):
        resolve_dataset(str(tmp_path / "out.converting"), log=lambda m: None)


def test_the_workers_of_a_killed_conversion_die_with_it(tmp_path):
    """Orphaned workers went on writing into the temporary files (and printed BrokenPipe
    tracebacks) after kill -9 of their parent, while a resumed conversion could already own
    those files."""
    src, dst = _tree(tmp_path / "src", n=24), tmp_path / "dst"
    # 0.3 s a file: a worker left alive would still be encoding its chunk (4 files) for a while
    workers = _run_killed(src, dst, tmp_path, chunks=1, workers=2, delay=0.3)
    assert len(workers) == 2
    deadline = time.monotonic() + 0.25
    while any(map(_alive, workers)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(map(_alive, workers))


def test_a_killed_conversion_resumes_where_it_stopped(tmp_path, monkeypatch):
    src = _tree(tmp_path / "src", n=12)
    monkeypatch.setattr(convert_mod, "CHUNK", 4)  # as the killed run
    dst = tmp_path / "out"
    _run_killed(src, dst, tmp_path)
    logs = []
    report = convert(src, dst, workers=0, progress=False, log=logs.append)
    assert any("resuming" in m for m in logs), logs
    fresh = convert(src, tmp_path / "fresh", workers=0, progress=False)
    assert report["splits"]["train"]["written"] == fresh["splits"]["train"]["written"] == 24
    a, b = RecordFile(dst / "train.rec"), RecordFile(tmp_path / "fresh" / "train.rec")
    assert [a.raw(i).tobytes() for i in range(len(a))] == \
        [b.raw(i).tobytes() for i in range(len(b))]
    assert (a.labels == b.labels).all()
    assert not convert_mod.atomic.partial_dir(dst).exists()


def _full_disk_on(split_name):
    real = convert_mod._pwrite

    def pwrite(fd, data, offset):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(f"{split_name}.rec.tmp"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data, offset)
    return pwrite


@pytest.mark.parametrize("workers", [0, 2])
def test_a_full_disk_during_the_second_split_leaves_the_old_dataset_and_no_temporary_file(
        tmp_path, monkeypatch, workers):
    src = _tree(tmp_path / "src")
    dst = tmp_path / "out"
    convert(src, dst, workers=0, progress=False)
    before = _digest(dst)
    _tree(tmp_path / "src", classes=("cat", "dog", "emu"), seed=1)
    monkeypatch.setattr(convert_mod, "_pwrite", _full_disk_on("val"))
    with pytest.raises(DiskError) as e:
        convert(src, dst, workers=workers, progress=False)
    assert "no space left on the device" in str(e.value) and "\n" not in str(e.value)
    assert "out.converting/val.rec.tmp" in str(e.value)
    assert _digest(dst) == before and read_classes(dst) == ["cat", "dog"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.lock", "out", "src"]


def test_a_read_only_destination_is_one_line(tmp_path, monkeypatch):
    """Writes under ``ro/`` fail with EROFS (injected: the tests may run as root, and mounting
    a read-only file system needs privileges)."""
    src = _tree(tmp_path / "src")
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = os.open

    def ro_open(path, flags, *a, **k):
        if str(path).startswith(str(ro)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)
    monkeypatch.setattr(os, "open", ro_open)
    with pytest.raises(DiskError, match="read-only file system") as e:
        convert(src, ro / "out", workers=0, progress=False)
    assert "\n" not in str(e.value) and str(ro) in str(e.value)
    monkeypatch.undo()
    assert list(ro.iterdir()) == []


@pytest.mark.slow
def test_a_conversion_cli_on_a_full_disk_prints_one_line(tmp_path):
    """The CLI end to end in a subprocess whose writes of the second split fail (ENOSPC)."""
    src = _tree(tmp_path / "src")
    script = textwrap.dedent(f"""
        import errno, os, sys
        import importlib
        c = importlib.import_module("tricks.pipeline.convert")
        real = c._pwrite
        def pwrite(fd, data, offset):
            if os.readlink(f"/proc/self/fd/{{fd}}").endswith("val.rec.tmp"):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(fd, data, offset)
        c._pwrite = pwrite
        from tricks.train.cli import main
        sys.exit(main(["convert", {str(src)!r}, {str(tmp_path / 'out')!r}, "--workers", "0"]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert out.returncode == 1
    lines = [ln for ln in out.stderr.splitlines() if "error" in ln.lower() or "Trace" in ln]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no space left" in lines[0]
    assert "val.rec.tmp" in lines[0]


def test_a_folder_left_by_an_older_killed_conversion_is_named_with_its_temporary_files(tmp_path):
    """What an older tricks left after kill -9: the destination holding only ``train.rec.tmp``
    (issue 24, fault 6: it was taken for an empty ImageFolder tree)."""
    from tricks.pipeline.source import resolve_dataset
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "train.rec.tmp").write_bytes(b"\0" * 300_000)
    with pytest.raises(DataError) as e:
        resolve_dataset(str(dst), log=lambda m: None)
    msg = str(e.value)
    assert "interrupted conversion" in msg and "train.rec.tmp" in msg and "300 kB" in msg


def test_a_destination_holding_other_files_is_refused_not_replaced(tmp_path):
    src = _tree(tmp_path / "src")
    dst = tmp_path / "mine"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="holds files a conversion does not write \\(notes.txt\\)"):
        convert(src, dst, workers=0, progress=False)
    assert (dst / "notes.txt").read_text() == "keep me"
