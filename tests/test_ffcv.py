"""The FFCV engine, run in subprocesses (``import ffcv`` sets torch's threads process-wide)."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# find_spec, not importorskip: importing ffcv here would set this process's torch threads to 1
if importlib.util.find_spec("ffcv") is None:
    pytest.skip("FFCV is not installed", allow_module_level=True)

from conftest import colour_of, cuda, subprocess_env  # noqa: E402
from tricks.pipeline import Engine, Loader, Output, Sampling  # noqa: E402
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


def _read(root, *splits, epochs=2, options=()):
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "ffcv_worker.py"), str(root),
                          str(epochs), *splits, *options], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
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


# --- the engine contract (issue 25): the plan's order, crops and flips ------------------------

def _native(root, split, size, epochs, seed=3):
    """The native engine's uint8 crops and labels of ``epochs`` epochs, per batch, and the
    plan's tasks (boxes, flips) behind them."""
    loader = Loader(root, split, 8, image_size=size, engine=Engine(workers=0),
                    sampling=Sampling(seed=seed), output=Output(mean=(0, 0, 0), std=(1 / 255,) * 3))
    out = []
    for e in range(epochs):
        loader.set_epoch(e)
        tasks = list(loader.plan.tasks(e, loader._heights, loader._widths, size))
        batches = [(b.images.round().to(torch.uint8), b.targets) for b in loader]
        out.append(list(zip(batches, tasks)))
    loader.close()
    return out


def test_batches_are_the_plans_records_and_pixels_those_of_the_native_engine(beton_root,
                                                                             tmp_path):
    """Constant-colour images: the same records in the same batches, in order, and the same
    pixels up to the beton's own JPEG re-encode (FFCV's writer stores them at quality 90)."""
    root, _ = beton_root
    _read(root, "train", "val", options=["--save", str(tmp_path / "b.pt")])
    got = torch.load(tmp_path / "b.pt")
    for split, epochs in (("train", 2), ("val", 1)):
        for e, native in enumerate(_native(root, split, 24, epochs)):
            assert len(got[split][e]) == len(native)
            for (images, labels), ((want, want_labels), _) in zip(got[split][e], native):
                assert torch.equal(labels, want_labels)
                assert (images.int() - want.int()).abs().max() <= 4


@pytest.fixture(scope="module")
def ramps(tmp_path_factory):
    """Images whose red level is 2·x and green 2·y (x, y: the pixel's column and row), stored
    raw in the beton (no JPEG of FFCV's own), 64–126 px a side: any crop's mean red tells its
    centre, its right half minus its left half its width and its flip."""
    tree = tmp_path_factory.mktemp("ramps") / "tree"
    for split, n in (("train", 16), ("val", 8)):
        for k in range(n):
            w, h = 64 + k * 31 % 63, 64 + k * 17 % 63
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 0] = 2 * np.arange(w)[None, :]
            img[..., 1] = 2 * np.arange(h)[:, None]
            img[..., 2] = 128
            (tree / split / "c").mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(tree / split / "c" / f"{k}.png")
    root = tmp_path_factory.mktemp("ramps-rec")
    convert(tree, root, workers=0, progress=False, quality=98)
    code = ("import sys; from tricks.pipeline.beton import write_beton\n"
            "for s in ('train', 'val'): write_beton(f'{sys.argv[1]}/{s}.rec', workers=1, "
            "write_mode='raw')")
    run = subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return root


def _geometry(crops: torch.Tensor) -> np.ndarray:
    """Per uint8 N×3×S×S crop of a ramp image: the box's centre x, centre y (source pixel
    edges) and its signed width (negative: mirrored), read back from the levels."""
    c = crops.double() / 2
    half = c.shape[-1] // 2
    cx = c[:, 0].mean(dim=(1, 2)) + 0.5
    cy = c[:, 1].mean(dim=(1, 2)) + 0.5
    width = 2 * (c[:, 0, :, half:].mean(dim=(1, 2)) - c[:, 0, :, :half].mean(dim=(1, 2)))
    return torch.stack([cx, cy, width], dim=1).numpy()


def test_crops_are_the_plans_boxes_and_flips_on_gradient_images(ramps, tmp_path):
    """Every training and validation crop where the plan put it, as the native engine's: the
    box's centre within 0.75 source pixels (a fractional validation box is rounded to whole
    pixels: ≤ 0.5) and its width and flip within 1.5 pixels (both engines' area filters)."""
    _read(ramps, "train", "val", epochs=1, options=["--size", "16", "--save",
                                                      str(tmp_path / "b.pt")])
    got = torch.load(tmp_path / "b.pt")
    for split in ("train", "val"):
        (native,) = _native(ramps, split, 16, 1)
        for (images, _), ((reference, _), task) in zip(got[split][0], native):
            box = task.boxes.astype(np.float64)
            sign = np.where(task.flips, -1, 1)
            plan = np.stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2,
                             sign * (box[:, 2] - box[:, 0])], axis=1)
            for crops, what in ((images, "ffcv"), (reference, "native")):
                err = np.abs(_geometry(crops) - plan)
                assert err[:, :2].max() < 0.75 and err[:, 2].max() < 1.5, (split, what, err)
        assert any(t.flips.any() for _, t in native) or split == "val"


def test_whole_pixel_boxes_hold_at_least_one_pixel_inside_the_image():
    from tricks.pipeline.engines.ffcv import whole_pixel_boxes
    # validation's centre boxes of 1×1, 7×1 and 1×7 images (0.875 of the shorter side), a box
    # over the edge, and a plan box in a beton stored at half size
    boxes = np.array([[0.0625, 0.0625, 0.9375, 0.9375], [3.0625, 0.0625, 3.9375, 0.9375],
                      [0.0625, 3.0625, 0.9375, 3.9375], [-0.4, 5.2, 9.6, 7.0],
                      [10, 20, 30, 41]])
    w = np.array([1, 7, 1, 8, 20])
    h = np.array([1, 1, 7, 7, 25])
    scale = np.array([1, 1, 1, 1, 0.5])
    got = whole_pixel_boxes(boxes, scale, scale, w, h)
    assert got.tolist() == [[0, 0, 1, 1], [3, 0, 4, 1], [0, 3, 1, 4], [0, 5, 8, 7],
                            [5, 10, 15, 20]]


def test_ffcvs_own_order_is_refused_in_one_line(beton_root):
    root, _ = beton_root
    with pytest.raises(UserError, match="quasi_random order is FFCV's own"):
        Loader(root, "train", 8, engine=Engine("ffcv", order="quasi_random"))


def test_the_process_cache_reads_the_same_batches(beton_root, read_back):
    """os_cache=False: FFCV's own page cache, scheduled with the plan's batches."""
    root, _ = beton_root
    got, _ = read_back
    assert _read(root, "train", "val", options=["--no-os-cache"])["train"] == got["train"]


@cuda
def test_batches_stay_intact_while_the_gpu_lags_far_behind(beton_root):
    """FFCV on CUDA, the GPU held back by a sleep kernel after every batch, so the host runs many
    batches (and slots) ahead of it: each batch must still hold its own pixels (ids against
    labels) and every sample come once an epoch. FFCV's own loop rewrote a slot's pinned memory
    before the copy of the batch it held had run (a later batch seen twice, one lost)."""
    root, label_of = beton_root
    run = subprocess.run([sys.executable, "-c", GPU_LAG, str(root), "cuda"], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    epochs = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(epochs) == 2
    for pairs in epochs:
        assert len(pairs) == 36 and len({i for i, _ in pairs}) == 36
        assert all(label_of[i] == y for i, y in pairs)


# batches of 2 (18 an epoch) and prefetch 1 (3 slots): a slot comes round every third batch
GPU_LAG = """
import json, sys
import torch
from conftest import ids_of
from tricks.pipeline import Engine, Loader, Output
device = sys.argv[2]
loader = Loader(sys.argv[1], "train", 2, image_size=24, device=device,
                engine=Engine("ffcv", workers=2, prefetch=1),
                output=Output(mean=(0, 0, 0), std=(1 / 255,) * 3))
epochs = []
for e in range(2):
    loader.set_epoch(e)
    kept = []
    for images, labels in loader:
        if device == "cuda":
            torch.cuda._sleep(100_000_000)  # ~50 ms of GPU time queued before the batch is read
        kept.append((images.round().to(torch.uint8), labels))
    if device == "cuda":
        torch.cuda.synchronize()
    epochs.append([[i, int(y)] for x, t in kept for i, y in zip(ids_of(x.cpu()), t.cpu())])
loader.close()
print(json.dumps(epochs))
"""
