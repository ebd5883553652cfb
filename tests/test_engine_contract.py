"""The engine contract (pipeline/engines/base.py), checked for every registered engine that is
installed, with the same tasks: the tasks' records in the tasks' order (ids read back from the
pictures), each with its task's crop box and flip (read back from gradient pictures: red
grows with x, green with y), resized to the task's side, uint8 channels-last, int64 labels; and
where an engine normalizes itself, exactly the stage's arithmetic on its own uint8 pixels."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import subprocess_env
from tricks.pipeline.convert import convert
from tricks.pipeline.engines.base import EngineSpec, engine_class, engine_names
from tricks.pipeline.records import RecordFile
from tricks.pipeline.sampling import BatchTask

ROOT = Path(__file__).resolve().parents[1]
W, H, S = 96, 64, 24
IDS = 10


def _installed(module: str) -> bool:
    top = module.split(".")[0]
    return importlib.util.find_spec(top) is not None and \
        importlib.util.find_spec(module) is not None


# (engine, options, runs in a subprocess, installed)
PATHS = {
    "native-turbo": ("native", {"decode": "workers", "cpu_decoder": "libjpeg-turbo"}, False,
                     importlib.util.find_spec("tricks.pipeline._jpeg") is not None),
    "native-pillow": ("native", {"decode": "workers", "cpu_decoder": "pillow"}, False, True),
    "native-device": ("native", {"decode": "device"}, False, True),
    "dali": ("dali", {}, False, _installed("nvidia.dali")),
    "ffcv": ("ffcv", {}, True, _installed("ffcv")),
}


def test_every_registered_engine_is_checked_here():
    assert {p[0] for p in PATHS.values()} == set(engine_names())


@pytest.fixture(scope="module")
def gradients(tmp_path_factory):
    """IDS pictures, W×H: red = x, green = y (0..255 across), blue = 20 + 20·id; label id % 3.
    Converted to records (and a .beton beside them when FFCV is installed)."""
    tree = tmp_path_factory.mktemp("contract") / "tree"
    x = np.linspace(0, 255, W)[None, :].repeat(H, 0)
    y = np.linspace(0, 255, H)[:, None].repeat(W, 1)
    for k in range(IDS):
        folder = tree / "val" / f"c{k % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        rgb = np.stack([x, y, np.full((H, W), 20 + 20 * k)], -1).round().astype(np.uint8)
        # 4:4:4, quality 98: the colour gradients survive storage to a level or two
        Image.fromarray(rgb).save(folder / f"{k}.jpg", quality=98, subsampling=0)
    out = tmp_path_factory.mktemp("contract-rec")
    convert(tree, out, workers=0, progress=False)
    if PATHS["ffcv"][3]:
        code = ("from tricks.pipeline.beton import write_beton; "
                f"write_beton({str(out / 'val.rec')!r}, workers=1, write_mode='raw')")
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, env=subprocess_env(ROOT, ROOT / "tests"), timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    return out


def _tasks(records: RecordFile) -> list[BatchTask]:
    """Three batches over the records in a scrambled order; boxes of every kind: the whole
    picture, a corner, a thin strip, a region smaller than the output (enlarged), fractional
    coordinates; flips mixed."""
    order = np.array([7, 2, 9, 0, 5, 3, 8, 1, 6, 4])
    boxes = np.array([[0, 0, W, H], [0, 0, 40, 30], [56, 34, 96, 64], [10, 20, 90, 28],
                      [30, 10, 46, 26], [12.5, 7.25, 70.75, 50.5], [40, 0, 60, 64],
                      [0, 16, 96, 48], [5, 5, 85, 59], [20, 12, 76, 52]], np.float32)
    flips = np.array([0, 1, 0, 1, 1, 0, 1, 0, 0, 1], bool)
    cuts = [(0, 4), (4, 7), (7, 10)]
    return [BatchTask(0, b, order[i:j].astype(np.int64), boxes[i:j], flips[i:j], S)
            for b, (i, j) in enumerate(cuts)]


def _run(path, records_root, tmp_path):
    name, options, subprocess_run, installed = PATHS[path]
    if not installed:
        pytest.skip(f"{path} is not installed")
    records = RecordFile(records_root / "val.rec")
    tasks = _tasks(records)
    if subprocess_run:
        tasks_file, out = tmp_path / "tasks.pt", tmp_path / "out.pt"
        torch.save(tasks, tasks_file)
        run = subprocess.run([sys.executable, str(ROOT / "tests" / "engine_worker.py"),
                              str(records.path), name, json.dumps(options), str(tasks_file),
                              str(out)], cwd=ROOT, env=subprocess_env(ROOT, ROOT / "tests"),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        batches = torch.load(out, weights_only=False)["batches"]
    else:
        cls = engine_class(name)
        engine = cls(records, EngineSpec("cpu", workers=2, prefetch=2, batch_size=4), **options)
        batches = list(engine.batches(tasks))
        engine.close()
    return records, tasks, batches


@pytest.mark.parametrize("path", PATHS)
def test_an_engine_yields_the_tasks_records_crops_and_flips(path, gradients, tmp_path):
    records, tasks, batches = _run(path, gradients, tmp_path)
    assert len(batches) == len(tasks)
    for task, (images, labels) in zip(tasks, batches):
        n = len(task.indices)
        assert images.shape == (n, 3, S, S) and images.dtype == torch.uint8
        assert images.is_contiguous(memory_format=torch.channels_last)
        assert labels.dtype == torch.int64 and labels.shape == (n,)
        assert labels.tolist() == records.labels[task.indices].tolist()
        img = images.double()
        for k in range(n):
            blue = float(img[k, 2].mean())
            # which picture: the blue level of the record the task named
            want_id = _picture_id(records, int(task.indices[k]))
            assert abs(blue - (20 + 20 * want_id)) < 6, (path, task.batch, k, blue)
            x0, y0, x1, y1 = (float(v) for v in task.boxes[k])
            red, green = img[k, 0], img[k, 1]
            # the box's centre, read back from the mean of the gradients (pixel centres); FFCV
            # crops whole pixels: a fractional box moves by ≤ ½ pixel, 1.3 levels here
            cx = ((x0 + x1) / 2 - 0.5) * 255 / (W - 1)
            cy = ((y0 + y1) / 2 - 0.5) * 255 / (H - 1)
            assert abs(float(red.mean()) - cx) < 5, (path, task.batch, k, float(red.mean()), cx)
            assert abs(float(green.mean()) - cy) < 5, (path, task.batch, k)
            left, right = float(red[:, :S // 4].mean()), float(red[:, -S // 4:].mean())
            assert (left > right) == bool(task.flips[k]), (path, task.batch, k, left, right)


def _picture_id(records: RecordFile, i: int) -> int:
    """The id picture record ``i`` holds (its blue level, from a plain decode)."""
    import io
    with Image.open(io.BytesIO(records.raw(i).tobytes())) as im:
        return round((np.asarray(im)[..., 2].mean() - 20) / 20)


@pytest.mark.parametrize("path", [p for p in PATHS if p.startswith("native")] + ["dali"])
def test_an_engine_that_normalizes_writes_the_stages_arithmetic(path, gradients):
    name, options, _, installed = PATHS[path]
    if not installed:
        pytest.skip(f"{path} is not installed")
    cls = engine_class(name)
    if not cls.capabilities(torch.device("cpu"), **options).normalizes:
        pytest.skip(f"{path} leaves normalize to the stages (capabilities)")
    records = RecordFile(gradients / "val.rec")
    scale = tuple(1 / (255 * s) for s in (0.229, 0.224, 0.225))
    shift = tuple(-m / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    plain = cls(records, EngineSpec("cpu", 2, 2, 4), **options)
    folded = cls(records, EngineSpec("cpu", 2, 2, 4, normalize=scale + shift), **options)
    for (u8, _), (f32, _) in zip(plain.batches(_tasks(records)),
                                 folded.batches(_tasks(records))):
        want = u8.float() * torch.tensor(scale).view(1, 3, 1, 1) + \
            torch.tensor(shift).view(1, 3, 1, 1)
        assert f32.dtype == torch.float32
        torch.testing.assert_close(f32, want, rtol=0, atol=1e-5)
    plain.close(), folded.close()
