"""Real photos: CIFAR-10 JPEGs from ../shared/data (skipped when absent)."""
import json
import time
from pathlib import Path

import pytest

from tricks.benchmarks.cifar10 import extract_subset
from conftest import SHARED_DATA
from tricks.pipeline.convert import convert
from tricks.train.cli import main

TARBALL = SHARED_DATA / "cifar10-jpg.tar.gz"
PER_CLASS = {"train": 500, "test": 100}


@pytest.fixture(scope="module")
def cifar_subset(tmp_path_factory) -> Path:
    """5,000 training and 1,000 test images (the first of each class in file-name order)."""
    if not TARBALL.is_file():
        pytest.skip(f"{TARBALL} not present")
    tree = extract_subset(TARBALL, tmp_path_factory.mktemp("cifar") / "tree",
                          PER_CLASS["train"], PER_CLASS["test"])
    out = tmp_path_factory.mktemp("cifar-rec")
    convert(tree, out, workers=2, progress=False)
    return out


@pytest.mark.slow
def test_resnet18d_cifar_stem_learns_real_photos(cifar_subset, tmp_path, capsys):
    start = time.perf_counter()
    code = main(["train", "--no-progress", "-c", "cifar", f"data.path={cifar_subset}",
                 "data.workers=2", "model.width=16", "train.epochs=4", "train.batch=128",
                 f"train.out={tmp_path}", "train.name=cifar"])
    elapsed = time.perf_counter() - start
    assert code == 0
    last = json.loads((tmp_path / "cifar" / "metrics.jsonl").read_text().splitlines()[-1])
    print(f"CIFAR-10 subset: top-1 {last['val_top1']:.3f} in {elapsed:.0f} s")
    assert last["val_images"] == 1000
    assert last["val_top1"] >= 0.30, last
