"""Full disks, read-only folders and two runs at once (issue 24, faults 4 and 5): one line naming
the path, no temporary file left, nothing another run reads deleted."""
import errno
import json
import multiprocessing as mp
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tricks.pipeline import atomic
from tricks.errors import DiskError
from tricks.train.checkpoint import load_checkpoint, save_checkpoint
from tricks.train.rundir import make_run_dir

from conftest import subprocess_env


class FullDisk:
    """A file object whose writes fail with ENOSPC once ``room`` bytes are written (the bytes
    that fit are written first, as a real full disk does)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data):
        data = memoryview(data).cast("B")
        if len(data) > self.room:
            self.f.write(data[:self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)


def _full_after(room, suffix=""):
    def wrap(f, path):
        return FullDisk(f, room) if str(path).endswith(suffix) else f
    return wrap


def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_temporary_file(
        tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "weights": torch.zeros(1000)})
    monkeypatch.setattr(atomic, "_wrap", _full_after(2000))
    with pytest.raises(DiskError) as e:
        save_checkpoint(path, {"step": 2, "weights": torch.ones(100_000)})
    msg = str(e.value)
    assert msg == f"cannot write the checkpoint {path}: no space left on the device"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert load_checkpoint(path)["step"] == 1  # the last good one


def test_a_full_disk_for_curves_keeps_the_old_png_and_leaves_no_temporary_file(
        tmp_path, monkeypatch):
    from tricks.train.observe import Observer
    from tricks.train.plot import plot_runs
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(
        {"epoch": 1, "step": 10, "train_loss": 1.0, "val_top1": 0.5}) + "\n")
    (run / "train_log.jsonl").write_text(json.dumps(
        {"step": 5, "epoch": 1, "lr": 0.1, "loss": 1.2}) + "\n")
    plot_runs([run], run / "curves.png")
    good = (run / "curves.png").read_bytes()
    monkeypatch.setattr(atomic, "_wrap", _full_after(100))
    with pytest.raises(DiskError, match="curves.png: no space left on the device"):
        plot_runs([run], run / "curves.png")
    logs = []
    Observer(run, False, 10, log=logs.append).close()
    assert len(logs) == 1 and "no space left" in logs[0] and "\n" not in logs[0]
    assert (run / "curves.png").read_bytes() == good
    assert sorted(p.name for p in run.iterdir()) == ["curves.png", "metrics.jsonl",
                                                     "train_log.jsonl"]


def _claim(base, barrier, tries, results):
    got = []
    for k in range(tries):
        barrier.wait()
        try:
            got.append(str(make_run_dir(str(base / str(k)), "run")))
        except FileExistsError as e:
            got.append(f"error {e}")
    results.put(got)


def test_two_processes_creating_a_run_directory_at_once_get_two(tmp_path):
    ctx = mp.get_context("fork")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_claim, args=(tmp_path, barrier, 100, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    a, b = results.get(timeout=60), results.get(timeout=60)
    for p in procs:
        p.join()
    assert not [x for x in a + b if x.startswith("error")]
    for x, y in zip(a, b):
        assert {Path(x).name, Path(y).name} == {"run", "run-2"}


def test_a_run_directory_taken_at_the_moment_it_is_made_is_not_an_error(tmp_path,
                                                                        monkeypatch):
    """Another process creates ``run`` between this one's choice of the name and its mkdir
    (the race, made certain): this one takes ``run-2``."""
    import pathlib
    real = pathlib.Path.mkdir
    raced = []

    def mkdir(self, *a, **k):
        if self.name == "run" and not raced:
            raced.append(self)
            real(self)  # the other process, first
        return real(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    assert make_run_dir(str(tmp_path), "run").name == "run-2"


def test_an_unwritable_run_folder_is_one_line(tmp_path, monkeypatch):
    import pathlib
    real = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    with pytest.raises(DiskError, match="cannot create the run directory .*ro.*: read-only"):
        make_run_dir(str(tmp_path / "ro"), "x")


@pytest.mark.slow
def test_training_on_a_full_disk_prints_one_line_and_leaves_no_partial_checkpoint(
        tmp_path, shapes_records):
    script = textwrap.dedent(f"""
        import errno, os, sys
        from tricks.pipeline import atomic
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_disk_faults import FullDisk
        atomic._wrap = lambda f, path: FullDisk(f, 5000) if str(path).endswith(
            "checkpoint.pt.tmp") else f
        from tricks.train.cli import main
        sys.exit(main(["train", "--no-progress", "train.epochs=1", "model.width=8",
                       "data.image_size=24", "train.batch=100", "train.out={tmp_path}",
                       "data.path={shapes_records}", "data.workers=1",
                       "train.name=r", "train.tensorboard=false"]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=subprocess_env(), timeout=300)
    assert out.returncode == 1, out.stderr[-2000:]
    errors = [ln for ln in out.stderr.splitlines() if "error" in ln.lower() or "Trace" in ln]
    assert errors == [f"error: cannot write the checkpoint {tmp_path / 'r' / 'checkpoint.pt'}: "
                      "no space left on the device"], out.stderr[-2000:]
    left = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert ".checkpoint.pt.tmp" not in left and "checkpoint.pt" not in left


# --- two runs on one unconverted tree ------------------------------------------------------------

def _tree(root: Path, n=8, classes=("a", "b")):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / "train" / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                root / "train" / c / f"{k}.jpg")
    return root


RESOLVE = """
import importlib, os, sys, time
c = importlib.import_module("tricks.pipeline.convert")
slow = c.inspect_and_encode
def encode(*a, **k):
    time.sleep(float(os.environ.get("SLOW", "0.05")))
    gate = os.environ.get("GATE")
    t = time.monotonic()
    while gate and not os.path.exists(gate) and time.monotonic() - t < 60:
        time.sleep(0.01)  # held until the test opens the gate
    return slow(*a, **k)
c.inspect_and_encode = encode
from tricks.pipeline.source import resolve_dataset
print("RESULT", resolve_dataset(sys.argv[1], log=lambda m: print("LOG", m, flush=True)))
"""


@pytest.mark.slow
def test_two_runs_on_one_unconverted_tree_convert_it_once(tmp_path):
    """The second run starts while the first converts (held at its first image until the
    second has said what it does)."""
    tree = _tree(tmp_path / "tree")
    gate = tmp_path / "go"
    env = subprocess_env(TRICKS_CACHE=str(tmp_path / "cache"))
    run = [sys.executable, "-c", RESOLVE, str(tree)]
    pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = subprocess.Popen(run, env={**env, "GATE": str(gate)}, **pipes)
    said1 = []
    for line in first.stdout:
        said1.append(line)
        if line.startswith("LOG converting"):
            break
    second = subprocess.Popen(run, env=env, **pipes)
    said2 = [second.stdout.readline()]  # its first word: waiting, or (before) converting itself
    gate.touch()
    out1, err1 = first.communicate(timeout=120)
    out2, err2 = second.communicate(timeout=120)
    assert (first.returncode, second.returncode) == (0, 0), (err1[-1500:], err2[-1500:])
    outs = ["".join(said1) + out1, "".join(said2) + out2]
    results = [ln for o in outs for ln in o.splitlines() if ln.startswith("RESULT")]
    assert len(results) == 2 and results[0] == results[1]
    logs = [ln for o in outs for ln in o.splitlines() if ln.startswith("LOG")]
    assert sum(ln.startswith("LOG converting") for ln in logs) == 1, logs
    # the second run only waited: it neither converted nor deleted anything
    said = [ln for ln in outs[1].splitlines() if ln.startswith("LOG")]
    assert said and all("waiting for another process" in ln or "acquired" in ln
                        for ln in said), said


def test_a_reconversion_never_deletes_what_another_run_reads(tmp_path, monkeypatch):
    from tricks.pipeline import Engine, Loader
    from tricks.pipeline.source import resolve_dataset
    monkeypatch.setenv("TRICKS_CACHE", str(tmp_path / "cache"))
    tree = _tree(tmp_path / "tree")
    mine = resolve_dataset(str(tree), log=lambda m: None)   # this run reads it
    loader = Loader(mine, "train", 4, image_size=16, engine=Engine("native", workers=0))
    _tree(tmp_path / "tree", classes=("a", "b", "c"))       # the tree changes
    env = subprocess_env(TRICKS_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", RESOLVE, str(tree)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-1500:]
    theirs = Path(out.stdout.split("RESULT ")[1].strip())
    assert theirs != mine and (mine / "classes.json").is_file()
    assert len(list(loader)) == 4  # still readable, all of it
    loader.close()
