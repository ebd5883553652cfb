"""Every installed engine keeps the engine contract across processes (issue 25, items 1–3; the
one-process conformance checks are tests/test_engine_contract.py), each checked in subprocesses
(``promises_worker.py``):

- two processes with one seed give bitwise-equal batches, and an epoch interrupted at batch K
  and resumed with ``set_epoch(e, start_batch=K)`` gives the uninterrupted epoch's batches;
- every batch holds its samples' own pixels and labels, the images 1×1, 1×7 and 7×1 among them,
  in training and in evaluation (FFCV's centre crop of a 1-pixel side was empty: OpenCV aborted
  the interpreter);
- 20 abandoned epochs (``break``, an exception) leave no thread and no batch memory behind.
"""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import colour_of, ids_of, subprocess_env
from tricks.pipeline.convert import convert

ROOT = Path(__file__).resolve().parents[1]
ENV = subprocess_env(ROOT, ROOT / "tests")
HAS_DALI = importlib.util.find_spec("nvidia") is not None and \
    importlib.util.find_spec("nvidia.dali") is not None
HAS_FFCV = importlib.util.find_spec("ffcv") is not None
ENGINES = {  # the engine's name and its own options
    "native": ({"name": "native"}, True),
    "native-pillow": ({"name": "native", "cpu_decoder": "pillow"}, True),
    "native-device": ({"name": "native", "decode": "device"}, True),
    "dali": ({"name": "dali"}, HAS_DALI),
    "ffcv": ({"name": "ffcv"}, HAS_FFCV),
}
TINY = [(1, 1), (1, 7), (7, 1)]  # width × height


def _picture(k: int, width: int, height: int) -> Image.Image:
    """Colour id ``k`` (``colour_of``) plus ramps of ±8 levels, left to right in red and top to
    bottom in blue: every crop and flip changes the pixels, while any crop's mean colour stays
    within 8 levels of the id's (``ids_of`` reads it back)."""
    x = np.linspace(-8, 8, width)[None, :] if width > 1 else np.zeros((1, 1))
    y = np.linspace(-8, 8, height)[:, None] if height > 1 else np.zeros((1, 1))
    img = np.empty((height, width, 3))
    img[:] = colour_of(k)
    img[..., 0] += x
    img[..., 2] += y
    return Image.fromarray(img.round().astype(np.uint8))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """JPEGs of 3 classes, each its own colour id (``_picture``): 18 + the three tiny ones for
    training (5 batches of 4), 6 + the tiny ones for validation; FFCV betons beside them."""
    tree = tmp_path_factory.mktemp("contract") / "tree"
    label_of, k = {}, 0
    for split, n in (("train", 18), ("val", 6)):
        sizes = [(40 + j % 5 * 7, 30 + j % 4 * 9) for j in range(n)] + TINY
        for j, size in enumerate(sizes):
            folder = tree / split / f"c{j % 3}"
            folder.mkdir(parents=True, exist_ok=True)
            _picture(k, *size).save(folder / f"{k:03d}.jpg", quality=95)
            label_of[k] = j % 3
            k += 1
    out = tmp_path_factory.mktemp("contract-rec")
    report = convert(tree, out, workers=0, progress=False)
    assert report["splits"]["train"]["written"] == 21
    if HAS_FFCV:  # in a subprocess: FFCV's writer forks
        code = ("import sys; from tricks.pipeline.beton import write_beton\n"
                "for s in ('train', 'val'): write_beton(f'{sys.argv[1]}/{s}.rec', workers=1)")
        run = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    return out, label_of


def _worker(root, spec, role, out):
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "promises_worker.py"), str(root),
                          json.dumps(spec), role, str(out)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, (run.returncode, run.stderr[-3000:])
    return torch.load(out), json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module", params=list(ENGINES))
def runs(request, data, tmp_path_factory):
    spec, installed = ENGINES[request.param]
    if not installed:
        pytest.skip(f"{request.param} is not installed")
    root, label_of = data
    tmp = tmp_path_factory.mktemp(request.param)
    a, counts = _worker(root, spec, "a", tmp / "a.pt")
    b, _ = _worker(root, spec, "b", tmp / "b.pt")
    return request.param, a, b, counts, label_of


def _same(x, y) -> bool:
    return len(x) == len(y) and all(torch.equal(i, j) and torch.equal(u, v)
                                    for (i, u), (j, v) in zip(x, y))


@pytest.mark.slow
def test_one_seed_gives_bitwise_equal_batches_in_two_processes_and_after_a_resume(runs):
    name, a, b, _, _ = runs
    assert _same(a["epoch0"], b["epoch0"]), name
    assert not _same(a["epoch0"], a["epoch1"])  # a new epoch, new order and crops
    assert _same(a["epoch1"][:2], b["prefix"])
    assert _same(a["epoch1"][2:], b["resumed"]), name


@pytest.mark.slow
def test_every_sample_has_its_own_pixels_and_label_tiny_images_included(runs):
    name, a, _, _, label_of = runs
    for key in ("epoch0", "epoch1"):
        ids = [i for images, _ in a[key] for i in ids_of(images)]
        labels = [int(y) for _, ys in a[key] for y in ys]
        assert len(ids) == len(set(ids)) == 20 and all(i < 21 for i in ids), (name, key, ids)
        assert labels == [label_of[i] for i in ids], (name, key)
    ids = [i for images, _ in a["val"] for i in ids_of(images)]
    assert sorted(ids) == list(range(21, 30)), (name, ids)  # the tiny three: 27, 28, 29
    assert [int(y) for _, ys in a["val"] for y in ys] == [label_of[i] for i in ids]


@pytest.mark.slow
def test_abandoned_epochs_leave_no_thread_or_memory_behind(runs):
    name, _, _, counts, _ = runs
    python, os_threads, rss = zip(*counts["abandoned"])
    # no Python thread gained (one may still be ending at "before": the closed validation
    # loader's Pillow pool hands its threads back asynchronously)
    assert max(python) <= counts["before"][0] and python[-1] <= python[0], (name, python)
    # OS threads (numba's and FFCV's native ones included): one may be starting or ending at a
    # count (seen once in CI: 5 … 5, 6 for FFCV); a leak of one an epoch adds ~10 over the
    # last ten epochs
    assert max(os_threads[10:]) <= max(os_threads[:10]) + 1, (name, os_threads)
    assert rss[-1] - rss[1] < 40, (name, rss)  # MB: FFCV's leak was ~5 MB an epoch here
    assert counts["closed"][0] <= counts["before"][0], (name, counts)
