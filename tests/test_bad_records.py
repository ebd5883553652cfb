"""The bad-record policy (issue 24, fault 3): stop naming the record, or skip it (counted, named
once, batches still full and deterministic) up to a budget."""
import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tricks.pipeline import Engine, Loader, Sampling
from tricks.errors import DataError, RecordError
from tricks.pipeline.records import RecordFile, RecordWriter


def _dataset(shapes_records, tmp_path, bad=(5,), flip=()):
    """The shapes train split with records ``bad`` replaced by undecodable bytes (whose CRC
    matches: written so) and records ``flip`` damaged after writing (CRC mismatch)."""
    root = tmp_path / "bad"
    root.mkdir()
    shutil.copy(shapes_records / "classes.json", root)
    src = RecordFile(shapes_records / "train.rec")
    with RecordWriter(root / "train.rec") as w:
        for i in range(64):
            data = src.raw(i).tobytes() if i not in bad else b"\xff\xd8\xff\xdbgarbage"
            w.add(data, int(src.labels[i]), int(src.index[i]["height"]),
                  int(src.index[i]["width"]))
    for i in flip:
        rf = RecordFile(root / "train.rec")
        off = int(rf.index[i]["offset"]) + 200
        del rf
        with open(root / "train.rec", "r+b") as f:
            f.seek(off)
            b = f.read(3)
            f.seek(off)
            f.write(bytes(x ^ 0xFF for x in b))
    return root


def _loader(root, workers=1, engine_options=None, **kw):
    return Loader(root, "train", 16, image_size=24, sampling=Sampling(seed=3),
                  engine=Engine("native", workers=workers, **(engine_options or {})), **kw)


def _epoch(loader, epoch=0, start=0):
    loader.set_epoch(epoch, start)
    return [(b.images.clone(), b.targets.clone()) for b in loader]


def test_stop_names_the_record_and_the_option(shapes_records, tmp_path):
    loader = _loader(_dataset(shapes_records, tmp_path))
    with pytest.raises(RecordError) as e:
        _epoch(loader)
    msg = str(e.value)
    assert "train.rec: record 5 cannot be decoded" in msg and "on_bad_record=skip" in msg
    assert "\n" not in msg


@pytest.mark.parametrize("cpu_decoder", ["libjpeg-turbo", "pillow"])
def test_skip_keeps_batches_full_names_each_record_once_and_is_deterministic(
        shapes_records, tmp_path, cpu_decoder):
    root = _dataset(shapes_records, tmp_path, bad=(5,), flip=(40,))
    logs = []
    opts = dict(on_bad_record="skip", engine_options={"cpu_decoder": cpu_decoder},
                workers=0 if cpu_decoder == "pillow" else 1)
    loader = _loader(root, **opts)
    loader.bad_records.log = logs.append
    first = _epoch(loader)
    assert len(first) == 4 and all(len(t) == 16 for _, t in first)
    assert sorted(loader.bad_records.bad) == [5, 40]
    assert sorted(r["record"] for r in loader.bad_records.take_new()) == [5, 40]
    second = _epoch(loader, 1)
    assert len(logs) == 2 and loader.bad_records.take_new() == []  # named once
    assert "record 40" in " ".join(logs) and "checksum mismatch" in " ".join(logs)
    # another process (a fresh loader) makes the same batches, and resumes at batch 2 the same
    other = _loader(root, **opts)
    other.bad_records.log = lambda m: None
    for (a, ta), (b, tb) in zip(first, _epoch(other)):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    resumed = _loader(root, **opts)
    resumed.bad_records.log = lambda m: None
    for (a, ta), (b, tb) in zip(second[2:], _epoch(resumed, 1, 2)):
        assert torch.equal(a, b) and torch.equal(ta, tb)
    for x in (loader, other, resumed):
        x.close()


def test_the_substitute_is_the_next_good_record_with_its_own_crop(shapes_records, tmp_path):
    root = _dataset(shapes_records, tmp_path, bad=(5, 6))
    loader = _loader(root, on_bad_record="skip")
    loader.bad_records.log = lambda m: None
    _epoch(loader)
    assert loader.bad_records.substitute(5) == 7 and loader.bad_records.substitute(6) == 7
    task = next(loader.plan.tasks(0, loader._heights, loader._widths, 24))
    screened = loader.bad_records.screen(task)
    hit = np.isin(task.indices, [5, 6])
    assert (screened.indices[hit] == 7).all()
    assert (screened.indices[~hit] == task.indices[~hit]).all()
    loader.close()


def test_past_the_budget_the_run_stops_in_one_line(shapes_records, tmp_path):
    loader = _loader(_dataset(shapes_records, tmp_path, bad=(5, 9, 30)), on_bad_record="skip",
                     bad_record_budget=2)
    loader.bad_records.log = lambda m: None
    with pytest.raises(DataError) as e:
        _epoch(loader)
    assert "3 bad records, over data.bad_record_budget=2" in str(e.value)
    assert "\n" not in str(e.value)


def _cmyk_jpeg(h=40, w=48) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 60)).convert("CMYK").save(out, "JPEG")
    return out.getvalue()


def test_training_reports_bad_records_and_pillow_fallbacks_per_epoch(shapes_records, tmp_path):
    from tricks.train.config import load_config
    from tricks.train.trainer import Trainer
    root = tmp_path / "ds"
    root.mkdir()
    shutil.copy(shapes_records / "classes.json", root)
    src = RecordFile(shapes_records / "train.rec")
    with RecordWriter(root / "train.rec") as w:
        for i in range(32):  # 0: CMYK (libjpeg-turbo refuses, Pillow reads); 5: undecodable
            data = _cmyk_jpeg() if i == 0 else b"\xff\xd8\xff\xdbgarbage" if i == 5 else \
                src.raw(i).tobytes()
            h, w_ = (40, 48) if i == 0 else (int(src.index[i]["height"]),
                                             int(src.index[i]["width"]))
            w.add(data, int(src.labels[i]), h, w_)
    cfg = load_config([], ["model.name=resnet18d", "model.width=8", "data.image_size=24",
                           "data.workers=1", "train.batch=16", "train.epochs=2",
                           f"data.path={root}", "data.on_bad_record=skip",
                           f"train.out={tmp_path / 'runs'}", "train.name=r"])
    logs = []
    t = Trainer(cfg, progress=False, log=logs.append)
    t.train_loader.bad_records.log = logs.append
    t.fit()
    t.close()
    rows = [json.loads(x) for x in (tmp_path / "runs" / "r" / "metrics.jsonl").read_text()
            .splitlines()]
    assert [r.get("pillow_fallbacks") for r in rows] == [1, 1]
    assert [[b["record"] for b in r.get("bad_records", [])] for r in rows] == [[5], []]
    assert sum("decoded by Pillow" in m for m in logs) == 2
    assert sum("skipped bad record 5" in m for m in logs) == 1


def test_a_run_stopped_by_a_bad_record_says_only_that(shapes_records, tmp_path):
    """No 'curves.png not written' before the one line: a run stopped before its first logged
    step has nothing to plot (found by a new user)."""
    from tricks.train.config import load_config
    from tricks.train.trainer import Trainer
    root = _dataset(shapes_records, tmp_path)
    cfg = load_config([], ["model.name=resnet18d", "model.width=8", "data.image_size=24",
                           "data.workers=1", "train.batch=16", "train.epochs=1",
                           f"data.path={root}", f"train.out={tmp_path / 'runs'}",
                           "train.name=r", "train.tensorboard=false"])
    logs = []
    t = Trainer(cfg, progress=False, log=logs.append)
    with pytest.raises(RecordError):
        t.fit()
    t.close()
    assert not [m for m in logs if "curves.png" in m], logs
