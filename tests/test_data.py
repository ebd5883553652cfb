"""``data.path`` as an ImageFolder tree: converted into the cache, and again when it changes."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tricks.errors import DataError
from tricks.pipeline.source import resolve_dataset


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
    assert _classes(again) == ["bird", "cat", "dog"]
    assert any("changed since its conversion" in m for m in logs)
    report = json.loads((again / "report.json").read_text())
    assert report["splits"]["train"]["written"] == 8
    assert report["splits"]["train"]["reused"] == 6  # only the new files were encoded
    assert _classes(first) == ["cat", "dog"]  # the old one stays while this process reads it


def test_a_file_touched_in_place_is_found_on_request_and_only_it_converted(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("TRICKS_CACHE", str(tmp_path / "cache"))
    tree = tmp_path / "tree"
    for cls in ("cat", "dog"):
        _images(tree / "train" / cls, 3)
    first = resolve_dataset(str(tree), log=lambda m: None)
    img = tree / "train" / "cat" / "0.jpg"
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new time
    logs = []
    # the start-up check reads folders only: a file rewritten in place keeps its folder's time
    assert resolve_dataset(str(tree), log=logs.append) == first and logs == []
    again = resolve_dataset(str(tree), log=logs.append, recheck=True)
    assert again != first and any("1 folder(s) or file(s): train/cat/0.jpg" in m for m in logs)
    report = json.loads((again / "report.json").read_text())
    assert report["splits"]["train"]["reused"] == 5 and report["splits"]["train"]["written"] == 6
    assert (first / "classes.json").is_file()  # not deleted: this process still reads it


def test_an_unwritable_cache_is_one_line(tmp_path, monkeypatch):
    """TRICKS_CACHE in a folder that cannot be written (issue 25, item 7): as root the
    permission is injected (root writes anywhere)."""
    import errno
    import pathlib
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRICKS_CACHE", str(cache))
    tree = tmp_path / "tree"
    _images(tree / "train" / "cat", 2)
    real = pathlib.Path.mkdir

    def mkdir(self, *a, **k):
        if str(self).startswith(str(cache)):
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    from tricks.errors import UserError
    with pytest.raises(UserError) as e:
        resolve_dataset(str(tree), log=lambda m: None)
    msg = str(e.value)
    assert "permission denied" in msg and "TRICKS_CACHE" in msg and "\n" not in msg


def test_a_file_as_data_path_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TRICKS_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "notes.txt"
    f.write_text("x")
    logs = []
    with pytest.raises(DataError, match="notes.txt: not a folder"):
        resolve_dataset(str(f), log=logs.append)
    assert logs == []  # no "converting …" line before the error
