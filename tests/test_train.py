import json

import pytest
import torch

import tricks.train.trainer as trainer_mod
from conftest import cuda
from tricks.train.checkpoint import load_checkpoint
from tricks.train.cli import main
from tricks.train.config import load_config
from tricks.train.trainer import Trainer

SMALL = ["model.name=resnet18d", "model.width=8", "data.image_size=32", "data.workers=0",
         "train.batch=32", "train.log_every=1", "data.scale=[0.35, 1]", "optim.lr=0.2"]


def test_demo_job_shortened_trains_evaluates_and_reports(tmp_path, capsys):
    """The README's main job (embedded dataset, demo preset), for 3 epochs instead of 8."""
    assert main(["train", "--no-progress", "train.epochs=3", f"train.out={tmp_path}",
                 "train.name=demo"]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "demo"
    assert f"checkpoint: {run / 'checkpoint.pt'}" in out
    for name in ("config.yaml", "env.json", "metrics.jsonl", "checkpoint.pt"):
        assert (run / name).is_file()
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[-1]["val_top1"] >= 0.6, records[-1]
    assert 0 <= records[-1]["data_wait"] <= 1 and records[-1]["images_per_s"] > 0
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["seed"] == 0
    # `tricks eval` on the checkpoint reproduces the last validation
    data = load_checkpoint(run)["config"]
    assert main(["eval", str(run / "checkpoint.pt"),
                 str(tmp_path.parent / "cache" / "shapes-v1" / "records"), "--workers", "0"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_top1"] == pytest.approx(records[-1]["val_top1"])
    assert data["model"]["name"] == "resnet18d"


class _Stop(Exception):
    pass


def _run(cfg, monkeypatch, stop_at=None, resume=None, log=None):
    """Train, recording every step's loss; raise _Stop after iteration ``stop_at``."""
    losses = {}
    real_step = trainer_mod.train_step

    def recording_step(*args, **kwargs):
        loss, logits = real_step(*args, **kwargs)
        step = len(losses) + recording_step.offset + 1
        losses[step] = loss.item()
        if step == stop_at:
            raise _Stop
        return loss, logits

    monkeypatch.setattr(trainer_mod, "train_step", recording_step)
    t = Trainer(cfg, resume=resume, progress=False, log=log or (lambda *a: None))
    recording_step.offset = t.step
    try:
        t.fit()
    except _Stop:
        pass
    finally:
        t.close()
    return t, losses


def test_resume_mid_epoch_is_bitwise_identical(shapes_records, tmp_path, monkeypatch):
    overrides = SMALL + [f"data.path={shapes_records}", "train.epochs=3",
                         "schedule.warmup_epochs=1", "train.checkpoint_every=5",
                         "train.label_smoothing=0.1", "optim.no_bias_decay=true",
                         "model.zero_init_last=true"]
    full, full_losses = _run(load_config([], overrides + [f"train.out={tmp_path}/a"]),
                             monkeypatch)
    assert full.steps_per_epoch == 12 and len(full_losses) == 36
    cut, cut_losses = _run(load_config([], overrides + [f"train.out={tmp_path}/b"]),
                           monkeypatch, stop_at=18)
    state = load_checkpoint(cut.checkpoint_path)
    assert (state["step"], state["epoch"], state["position"]) == (15, 1, 3)  # mid-epoch 2
    cfg = load_config([], base=state["config"])
    said = []
    resumed, resumed_losses = _run(cfg, monkeypatch, resume=str(cut.checkpoint_path),
                                   log=said.append)
    assert min(resumed_losses) == 16 and max(resumed_losses) == 36
    for step, loss in resumed_losses.items():
        assert loss == full_losses[step], step  # bitwise, not approximately
    for (name, a), b in zip(full.model.state_dict().items(),
                            resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    # the resumed epoch's metrics are the whole epoch's, as in the uninterrupted run
    rows = [[json.loads(x) for x in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
            for run in (full, resumed)]
    assert [r["epoch"] for r in rows[1]] == [1, 2, 3]
    for a, b in zip(*rows):
        for key in ("train_loss", "train_top1", "val_loss", "val_top1", "val_images"):
            assert a[key] == b[key], (a["epoch"], key)
    # counted from 1, as the log and metrics.jsonl count: epoch 2 after batch 3
    assert any("in epoch 2 after batch 3 of 12" in line for line in said), said


@pytest.fixture(scope="module")
def started_run(shapes_records, tmp_path_factory):
    """A run's first checkpoint (before any step), for resume refusals."""
    out = tmp_path_factory.mktemp("started")
    cfg = load_config([], SMALL + [f"data.path={shapes_records}", "train.epochs=1",
                                   "model.name=resnet50", f"train.out={out}", "train.name=r"])
    t = Trainer(cfg, progress=False, log=lambda *a: None)
    t.save()
    t.close()
    return out / "r" / "checkpoint.pt"


def _other_records(tmp_path):
    from tricks.pipeline.convert import convert
    from tricks.pipeline.synthetic import make_dataset
    tree = make_dataset(tmp_path / "tree", train_per_class=39, val_per_class=2)
    convert(tree, tmp_path / "rec", workers=0, progress=False)
    return tmp_path / "rec"


@pytest.mark.parametrize("override,message", [
    (lambda p: "train.batch=16", r"train\.batch changed from 32 to 16"),
    (lambda p: "model.name=resnet50b", r"model changed \(model\.name resnet50 → resnet50b\)"),
    (lambda p: f"data.path={_other_records(p)}", r"training data changed \(records 400 → 390"),
])
def test_resume_is_refused_when_its_position_means_something_else(
        started_run, tmp_path, capsys, override, message):
    # resnet50 and resnet50b have the same parameters: only the recorded key tells them apart
    cfg = load_config([], [override(tmp_path)], base=load_checkpoint(started_run)["config"])
    with pytest.raises(trainer_mod.UserError, match=message) as e:
        Trainer(cfg, resume=str(started_run), progress=False, log=lambda *a: None)
    assert "\n" not in str(e.value) and str(started_run) in str(e.value)


def test_a_missing_validation_split_is_said_once_at_the_start(tmp_path, monkeypatch):
    from tricks.pipeline.convert import convert
    from tricks.pipeline.synthetic import make_dataset
    tree = make_dataset(tmp_path / "tree", train_per_class=8, val_per_class=1)
    import shutil
    shutil.rmtree(tree / "val")
    convert(tree, tmp_path / "rec", workers=0, progress=False)
    said = []
    cfg = load_config([], SMALL + [f"data.path={tmp_path / 'rec'}", "train.epochs=2",
                                   "train.batch=16", f"train.out={tmp_path}"])
    _run(cfg, monkeypatch, log=said.append)
    assert sum("no validation split" in line for line in said) == 1, said
    assert "no validation split" in said[0] and "without evaluation" in said[0]
    assert [line.split(":")[0] for line in said[1:]] == ["epoch 1/2", "epoch 2/2"]


def test_checkpoint_is_written_atomically(shapes_records, tmp_path, monkeypatch):
    cfg = load_config([], SMALL + [f"data.path={shapes_records}", "train.epochs=1",
                                   f"train.out={tmp_path}", "train.name=r"])
    t, _ = _run(cfg, monkeypatch)
    leftovers = [p.name for p in (tmp_path / "r").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    state = load_checkpoint(tmp_path / "r")
    assert state["format_version"] == 1 and state["step"] == 12
    assert set(state) >= {"model", "optimizer", "scaler", "rng", "config", "epoch", "position"}


def test_folder_tree_is_converted_on_the_fly(shapes_tree, tmp_path, monkeypatch):
    cfg = load_config([], SMALL + [f"data.path={shapes_tree}", "train.epochs=1",
                                   f"train.out={tmp_path}"])
    t, losses = _run(cfg, monkeypatch)
    assert len(losses) == 12 and "converted" in str(t.data_root)


def test_model_weights_option_loads_a_torchvision_state_dict(tmp_path):
    import torchvision

    from tricks.errors import ConfigError
    from tricks.train.build import build_model

    tv = torchvision.models.resnet18(num_classes=10).eval()
    torch.save(tv.state_dict(), tmp_path / "r18.pth")
    cfg = load_config([], ["model.name=resnet18", f"model.weights={tmp_path}/r18.pth"])
    ours = build_model(cfg, 10).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))
    cfg = load_config([], ["model.name=resnet18d", f"model.weights={tmp_path}/r18.pth"])
    with pytest.raises(ConfigError, match="do not match"):
        build_model(cfg, 10)


@pytest.mark.parametrize("mix", ["mixup", "cutmix", "ricap"])
def test_any_augment_and_mix_combination_is_a_config_switch(shapes_records, tmp_path,
                                                             monkeypatch, mix):
    cfg = load_config([], SMALL + [
        f"data.path={shapes_records}", "train.epochs=2", f"train.out={tmp_path}",
        "train.name=r", "augment.ops=[autoaugment, jitter, lighting, cutout, erasing]",
        "augment.cutout_size=8", "augment.hue=0.05", f"mix.name={mix}",
        "mix.off_last_epochs=1", "train.label_smoothing=0.1"])
    t, losses = _run(cfg, monkeypatch)
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(list(losses.values()))))
    metrics = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    # mixed targets have no train accuracy; the last epoch trains unmixed (off_last_epochs=1)
    assert metrics[0]["train_top1"] is None and metrics[1]["train_top1"] is not None


@pytest.mark.parametrize("override,message", [
    ("augment.ops=[sharpen]", "augment.ops: unknown 'sharpen'; choose from jitter, "),
    ("augment.erasing_p=1.5", "erasing p must be a probability in [0, 1], got 1.5"),
    ("mix.alpha=-0.2", "mixup alpha must be ≥ 0"),
    ("augment.cutout_size=64", "cutout_size=64 is larger than the 32² training image"),
    ("data.progressive=[[0,24],[1,32]]", "cutout_size=30 is larger than the 24² training "
     "image (data.progressive from epoch 0)"),
])
def test_bad_augment_settings_are_one_line_errors(shapes_records, capsys, override, message):
    extra = ["augment.ops=[cutout, erasing]"] if "ops" not in override else []
    extra += ["augment.cutout_size=30"] if "progressive" in override else []
    extra += ["mix.name=mixup"] if override.startswith("mix") else []
    code = main(["train", "--no-progress", f"data.path={shapes_records}", *SMALL, *extra,
                 override])
    err = capsys.readouterr().err.strip()
    assert code == 1 and message in err and "\n" not in err


@cuda
@pytest.mark.parametrize("fused", [True, False])
def test_efficient_step_makes_no_host_sync_with_fused_sgd(fused):
    """FP16 + gradient scaler + fused SGD: the inf/NaN check stays on the GPU, so a step queues
    without waiting for it. The unfused step reads the flag back (.item()); that it is caught
    shows the check can fail."""
    from tricks.models import create_model
    from tricks.train.loss import SoftTargetCrossEntropy
    from tricks.train.optim import build_optimizer

    dev = torch.device("cuda")
    model = create_model("resnet18d", num_classes=10, width=8).to(dev)
    model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model, "sgd", 0.1, weight_decay=1e-4, no_bias_decay=True, fused=fused)
    scaler = torch.amp.GradScaler("cuda")
    autocast = torch.autocast("cuda", dtype=torch.float16)
    crit = SoftTargetCrossEntropy(10)
    x = torch.randn(8, 3, 32, 32, device=dev, dtype=torch.float16)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,), device=dev)
    for _ in range(2):  # first steps: lazy state, cuDNN autotuning
        trainer_mod.train_step(model, x, y, crit, opt, scaler, autocast)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        if fused:
            trainer_mod.train_step(model, x, y, crit, opt, scaler, autocast)
        else:
            with pytest.raises(RuntimeError, match="synchroniz"):
                trainer_mod.train_step(model, x, y, crit, opt, scaler, autocast)
    finally:
        torch.cuda.set_sync_debug_mode(0)
