"""The FFCV engine, run in subprocesses (``import ffcv`` sets torch's threads process-wide)."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

# find_spec, not importorskip: importing ffcv here would set this process's torch threads to 1
if importlib.util.find_spec("ffcv") is None:
    pytest.skip("FFCV is not installed", allow_module_level=True)

from conftest import colour_of, subprocess_env  # noqa: E402
from tricks.pipeline import Engine, Loader  # noqa: E402
from tricks.pipeline.beton import write_beton  # noqa: E402
from tricks.pipeline.convert import convert  # noqa: E402
from tricks.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = subprocess_env(ROOT, ROOT / "tests")


@pytest.fixture(scope="module")
def beton_root(coloured, tmp_path_factory):
    records, label_of = coloured
    root = tmp_path_factory.mktemp("ffcv")
    for f in ("classes.json", "train.rec", "val.rec"):
        shutil.copy(records / f, root / f)
    for split in ("train", "val"):
        write_beton(root / f"{split}.rec", workers=2)
    return root, label_of


def _read(root, *splits, epochs=2):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "ffcv_worker.py"), str(root),
                          str(epochs), *splits], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def read_back(beton_root):
    """One subprocess (numba compiles FFCV's pipeline once): two epochs of train and of val."""
    root, label_of = beton_root
    return _read(root, "train", "val"), label_of


def test_validation_reads_every_sample_once_with_its_label(read_back):
    got, label_of = read_back
    for pairs in got["val"]:
        assert sorted(map(tuple, pairs)) == sorted((k, label_of[k]) for k in range(37, 48))
    assert got["val"][0] == got["val"][1]  # deterministic


def test_training_epochs_have_no_sample_twice_and_reshuffle(read_back):
    got, label_of = read_back
    for pairs in got["train"]:
        ids = [i for i, _ in pairs]
        assert len(pairs) == 32 and len(set(ids)) == 32  # 37 images, batch 8, drop last
        assert all(label_of[i] == y for i, y in pairs)
    assert got["train"][0] != got["train"][1]


def test_batch_contract_equals_the_native_engines(beton_root, read_back):
    root, _ = beton_root
    got, _ = read_back
    threads = got["threads"]
    got = got["train_contract"]
    native = next(iter(Loader(root, "train", 8, image_size=24, engine=Engine(workers=0))))
    assert got["shape"] == list(native.images.shape) and got["dtype"] == str(native.images.dtype)
    assert got["stride"] == list(native.images.stride()) and got["channels_last"]
    assert got["label_dtype"] == "torch.int64"
    assert threads == torch.get_num_threads()  # import ffcv did not pin it to 1


def test_convert_to_beton_reports_broken_files_and_leaves_them_out(tmp_path):
    tree = tmp_path / "tree"
    for k in range(9):
        (tree / "val" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (30, 20), colour_of(k)).save(tree / "val" / f"c{k % 2}" / f"{k}.jpg")
    (tree / "val" / "c0" / "bad.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    report = convert(tree, tmp_path / "out", workers=0, progress=False, beton={})
    split = report["splits"]["val"]
    assert split["written"] == 9 and split["skipped"][0]["path"].endswith("bad.jpg")
    assert Path(split["beton"]).is_file()
    got = _read(tmp_path / "out", "val", epochs=1)
    assert sorted(i for i, _ in got["val"][0]) == list(range(9))


def test_missing_ffcv_is_a_one_line_install_hint(beton_root, monkeypatch):
    root, _ = beton_root
    monkeypatch.setitem(sys.modules, "ffcv", None)
    with pytest.raises(UserError, match=r"pip install 'tricks\[ffcv\]'"):
        Loader(root, "train", 8, engine="ffcv")


def test_missing_beton_is_a_clear_error(coloured):
    records, _ = coloured
    with pytest.raises(Exception, match="--format beton"):
        Loader(records, "train", 8, engine="ffcv")


def test_sharded_evaluation_counts_every_image_once(tmp_path):
    # 5 images, global batch 2, 2 ranks: FFCV's DistributedSampler pads rank 1's share with a
    # repeat of image 0; the engine cuts it
    for k in range(5):
        folder = tmp_path / "tree" / "val" / "c"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), colour_of(k)).save(folder / f"{k}.jpg", quality=95)
    convert(tmp_path / "tree", tmp_path / "rec", workers=0, progress=False)
    write_beton(tmp_path / "rec" / "val.rec", workers=1)
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "ffcv_shard_worker.py"), str(tmp_path / "rec"),
         "val", "2", str(rank), "2", str(tmp_path / "init")], cwd=ROOT, env=ENV,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        ids += json.loads(out.strip().splitlines()[-1])
    assert sorted(ids) == [0, 1, 2, 3, 4]


CLOSE_TWO_SIZES = """
import sys
from tricks.pipeline import Engine, Loader
loaders = []
for size in (24, 16):  # a second compiled pipeline, for another output size
    loader = Loader(sys.argv[1], "train", 8, image_size=size, engine=Engine("ffcv", workers=1))
    for epoch in range(2):
        loader.set_epoch(epoch)
        for batch in loader:
            pass
    loaders.append(loader)
for loader in loaders:
    loader.close()
import gc
gc.collect()  # the program goes on, and its garbage is collected
print("closed", flush=True)
"""


def test_closing_loaders_prints_no_numba_finalizer_traceback(beton_root):
    """numba's dispatcher finalizer raised KeyError ("Exception ignored in: <finalize object …>"
    and a traceback on stderr) when FFCV loaders of two output sizes were collected."""
    root, _ = beton_root
    out = subprocess.run([sys.executable, "-c", CLOSE_TWO_SIZES, str(root)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "closed" in out.stdout, out.stderr[-3000:]
    assert "Exception ignored" not in out.stderr and "Traceback" not in out.stderr, \
        out.stderr[-3000:]
