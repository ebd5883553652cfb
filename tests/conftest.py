import os
from pathlib import Path

import pytest
import torch

from pipeline.convert import convert
from pipeline.synthetic import make_dataset

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
