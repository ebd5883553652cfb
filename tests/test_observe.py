"""TensorBoard events, curves.png, `tricks plot` and the run ETA (train/observe.py, train/plot.py)."""
import importlib.util
import json
from collections import Counter

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from tricks.train.cli import main
from tricks.train.config import load_config
from tricks.train.observe import Observer, run_eta
from tricks.train.plot import load_run
from tricks.train.trainer import Trainer

SMALL = ["model.name=resnet18d", "model.width=8", "data.image_size=32", "data.workers=0",
         "train.batch=32", "train.log_every=2", "data.scale=[0.35, 1]", "optim.lr=0.2",
         "train.epochs=2", "train.ema_decay=0.9"]


class _HostReads(TorchDispatchMode):
    """Counts tensor → Python number reads (each a host sync on a GPU) per training iteration."""

    def __init__(self, trainer):
        super().__init__()
        self.trainer, self.by_step = trainer, Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.by_step[self.trainer.step] += 1
        return func(*args, **(kwargs or {}))


def _train(records, out, name, *extra):
    cfg = load_config([], [*SMALL, f"data.path={records}", f"train.out={out}",
                           f"train.name={name}", *extra])
    t = Trainer(cfg, progress=False, log=lambda *a: None)
    reads = _HostReads(t)
    try:
        with reads:
            t.fit()
    finally:
        t.close()
    return t.run_dir, reads.by_step


@pytest.fixture(scope="module")
def runs(shapes_records, tmp_path_factory):
    out = tmp_path_factory.mktemp("observe")
    return {"on": _train(shapes_records, out, "tb-on"),
            "off": _train(shapes_records, out, "tb-off", "train.tensorboard=false")}


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_tensorboard_scalars_read_back_with_tensorboards_own_reader(runs):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (setup installs it)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, _ = runs["on"]
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    windows, metrics = _rows(run / "train_log.jsonl"), _rows(run / "metrics.jsonl")
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [w["step"] for w in windows]
    assert [e.value for e in loss] == pytest.approx([w["loss"] for w in windows], rel=1e-6)
    assert [e.value for e in events.Scalars("train/lr")] == \
        pytest.approx([w["lr"] for w in windows], rel=1e-6)
    for tag, key in (("val/top1", "val_top1"), ("val/top5", "val_top5"),
                     ("ema/top1", "ema_top1"), ("epoch/images_per_s", "images_per_s"),
                     ("epoch/data_wait", "data_wait"), ("epoch/time_s", "epoch_time_s")):
        got = events.Scalars(tag)
        assert [e.step for e in got] == [m["step"] for m in metrics], tag
        assert [e.value for e in got] == pytest.approx([m[key] for m in metrics], rel=1e-6), tag
    for tag in ("train/images_per_s", "train/data_wait"):
        assert len(events.Scalars(tag)) == len(windows) and tag in tags["scalars"]
    first, = events.Images("train/first_batch")
    assert first.step == 0 and first.width >= 4 * 128 and first.encoded_image_string


@pytest.mark.slow
def test_every_run_leaves_curves_png_and_tensorboard_can_be_turned_off(runs):
    for name in ("on", "off"):
        run, _ = runs[name]
        assert Image.open(run / "curves.png").size[0] > 500
    off, _ = runs["off"]
    assert not list(off.glob("events.out.tfevents.*"))
    if importlib.util.find_spec("tensorboard") is not None:
        assert list(runs["on"][0].glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_observing_adds_no_host_read_to_the_training_steps(runs):
    (_, on), (_, off) = runs["on"], runs["off"]
    # iteration 0 (before the first step) holds the first batch's grid; after it, the same reads
    on.pop(0, None), off.pop(0, None)
    assert on == off and sum(on.values()) > 0


@pytest.mark.slow
def test_tricks_plot_overlays_runs_against_epochs(runs, tmp_path, capsys):
    (on, _), (off, _) = runs["on"], runs["off"]
    out = tmp_path / "both.png"
    assert main(["plot", str(on), str(off), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out and Image.open(out).size[0] > 500
    curves = load_run(on)
    per_epoch = _rows(on / "metrics.jsonl")[0]["step"]
    assert curves.loss[0] == [w["step"] / per_epoch for w in _rows(on / "train_log.jsonl")]
    assert curves.val_top1[0] == [1, 2] and curves.ema_top1[0] == [1, 2]
    assert max(curves.loss[0]) == pytest.approx(2.0, abs=0.2)


def test_tricks_plot_of_a_folder_that_is_no_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}: not a run directory (no train_log.jsonl or metrics.jsonl)"


def test_run_eta_is_the_mean_pace_times_what_is_left(monkeypatch):
    assert run_eta(10.0, 5, 20) == 40.0 and run_eta(3.0, 0, 20) is None
    clock = iter([100.0, 190.0, 190.0])
    monkeypatch.setattr("tricks.train.observe.time.perf_counter", lambda: next(clock))
    obs = Observer(None, tensorboard=True, total_steps=1000, step=100)
    assert obs.eta(100) == "?"
    assert obs.eta(190) == "13:30"  # 90 s for 90 iterations, 810 left
