"""``data.path`` as an ImageFolder tree: converted into the cache, and again when it changes."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tricks.errors import DataError
from tricks.train.data import resolve_dataset


def _images(folder, n, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            folder / f"{k}.jpg")


def _classes(root):
    return json.loads((root / "classes.json").read_text())["classes"]


def test_a_changed_tree_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("TRICKS_CACHE", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    for cls in ("cat", "dog"):
        _images(tree / "train" / cls, 3)
    logs = []
    first = resolve_dataset(str(tree), log=logs.append)
    assert _classes(first) == ["cat", "dog"] and any("converting" in m for m in logs)
    logs.clear()
    assert resolve_dataset(str(tree), log=logs.append) == first and logs == []  # unchanged
    _images(tree / "train" / "bird", 2)  # a class added after the first conversion
    again = resolve_dataset(str(tree), log=logs.append)
    assert again == first and _classes(again) == ["bird", "cat", "dog"]
    assert any("changed since it was converted" in m for m in logs)
    report = json.loads((again / "report.json").read_text())
    assert report["splits"]["train"]["written"] == 8
    # a file rewritten in place (same name and size, new content) counts as a change too
    logs.clear()
    img = tree / "train" / "cat" / "0.jpg"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    resolve_dataset(str(tree), log=logs.append)
    assert any("changed since it was converted" in m for m in logs)


def test_a_file_as_data_path_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TRICKS_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "notes.txt"
    f.write_text("x")
    logs = []
    with pytest.raises(DataError, match="notes.txt: not a folder"):
        resolve_dataset(str(f), log=logs.append)
    assert logs == []  # no "converting …" line before the error
