import os
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from tricks.pipeline.convert import convert
from tricks.pipeline.synthetic import make_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def subprocess_env(*paths, **extra) -> dict:
    """``os.environ`` for a test's subprocess with ``paths`` put ahead on ``PYTHONPATH``, the
    caller's entries kept (where the source tree runs without an install, as on the GPU
    machine, ``tricks`` is importable only through them: ``scripts/srcpath.sh``), and ``extra``
    variables set."""
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, **extra, "PYTHONPATH": os.pathsep.join([*map(str, paths), *keep])}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # the embedded dataset and on-the-fly conversions go to a per-session temporary cache
    monkeypatch.setenv("TRICKS_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def shapes_tree(tmp_path_factory) -> Path:
    """A small embedded-style dataset: 10 classes, 40 train / 10 val images each, 64²."""
    return make_dataset(tmp_path_factory.mktemp("shapes") / "tree", train_per_class=40,
                        val_per_class=10)


@pytest.fixture(scope="session")
def shapes_records(shapes_tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes-rec")
    convert(shapes_tree, out, workers=0, progress=False)
    return out


def cuda(test):
    """A test that needs CUDA: skipped without it; `pytest -m gpu` runs just these."""
    needs = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    return pytest.mark.gpu(needs(test))


STEP = 24  # colour levels between ids: survives JPEG, crop and resize


def colour_of(i: int) -> tuple[int, int, int]:
    return (16 + STEP * (i % 10), 16 + STEP * (i // 10 % 10), 16 + STEP * (i // 100))


def ids_of(images: torch.Tensor) -> list[int]:
    """Each constant-colour image's id, read back from its mean colour."""
    m = images.float().mean(dim=(2, 3))
    d = ((m - 16) / STEP).round().long()
    return (d[:, 0] + 10 * d[:, 1] + 100 * d[:, 2]).tolist()


@pytest.fixture(scope="session")
def coloured(tmp_path_factory) -> tuple[Path, dict[int, int]]:
    """37 train and 11 val images of 3 classes, each a unique constant colour; one broken file."""
    root = tmp_path_factory.mktemp("dali") / "tree"
    label_of = {}
    k = 0
    for split, n in (("train", 37), ("val", 11)):
        for j in range(n):
            cls = j % 3
            folder = root / split / f"c{cls}"
            folder.mkdir(parents=True, exist_ok=True)
            size = (40 + j % 7 * 5, 30 + j % 5 * 6)
            Image.new("RGB", size, colour_of(k)).save(folder / f"{k:03d}.jpg", quality=95)
            label_of[k] = cls
            k += 1
    (root / "train" / "c1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path_factory.mktemp("dali-rec")
    report = convert(root, out, workers=0, progress=False)
    assert [s["path"].endswith("broken.jpg") for s in report["splits"]["train"]["skipped"]] == [True]
    return out, label_of


def wait_for(predicate, proc, timeout: float = 120) -> bool:
    """Poll ``predicate()`` every 20 ms until it holds (True), ``proc`` (a Popen) ends or
    ``timeout`` seconds pass (False)."""
    start = time.time()
    while time.time() - start < timeout:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False
