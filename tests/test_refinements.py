"""Distillation, AdaBound, EMA, NaN stops, progressive resizing."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

import tricks.train.trainer as trainer_mod
from tricks.errors import UserError
from tricks.train.adabound import AdaBound
from tricks.train.checkpoint import load_checkpoint
from tricks.train.config import load_config
from tricks.train.distill import DistillationLoss, distillation_term
from tricks.train.loss import SoftTargetCrossEntropy
from tricks.train.trainer import Trainer

from test_train import SMALL, _run


# --- distillation ---------------------------------------------------------------------------

def test_distillation_loss_on_a_hand_computed_example():
    z = torch.tensor([[1.0, 0.0]])   # student
    r = torch.tensor([[0.0, 2.0]])   # teacher
    T, w = 2.0, 0.5
    p = [math.exp(0) / (math.exp(0) + math.exp(1)), math.exp(1) / (math.exp(0) + math.exp(1))]
    log_q = [0.5 - math.log(math.exp(0.5) + 1), 0 - math.log(math.exp(0.5) + 1)]
    want_term = -(p[0] * log_q[0] + p[1] * log_q[1]) * T * T
    assert distillation_term(z, r, T).item() == pytest.approx(want_term, rel=1e-6)
    ce = -math.log(math.exp(1) / (math.exp(1) + 1))  # label 0
    loss = DistillationLoss(SoftTargetCrossEntropy(2), T, w)(z, torch.tensor([0]), r)
    assert loss.item() == pytest.approx(ce + w * want_term, rel=1e-6)


def test_student_moves_toward_a_fixed_teacher():
    torch.manual_seed(0)
    x = torch.randn(64, 8)
    teacher = torch.nn.Linear(8, 5)
    student = torch.nn.Linear(8, 5)
    with torch.no_grad():
        r = teacher(x)
    loss_fn = DistillationLoss(SoftTargetCrossEntropy(5), temperature=4.0, weight=1.0)
    labels = r.argmax(1)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)

    def kl():
        return F.kl_div(F.log_softmax(student(x), 1), F.softmax(r, 1), reduction="batchmean")
    before = kl().item()
    for _ in range(30):
        opt.zero_grad()
        loss_fn(student(x), labels, r).backward()
        opt.step()
    assert kl().item() < 0.5 * before


def test_training_with_a_teacher_checkpoint(shapes_records, tmp_path, monkeypatch):
    teacher_cfg = load_config([], SMALL + [f"data.path={shapes_records}", "train.epochs=1",
                                           f"train.out={tmp_path}", "train.name=teacher",
                                           "model.name=resnet34d"])
    _run(teacher_cfg, monkeypatch)
    ckpt = tmp_path / "teacher" / "checkpoint.pt"
    cfg = load_config([], SMALL + [f"data.path={shapes_records}", "train.epochs=1",
                                   f"train.out={tmp_path}", f"teacher.checkpoint={ckpt}",
                                   "teacher.temperature=20", "mix.name=mixup"])
    t, losses = _run(cfg, monkeypatch)
    assert t.teacher is not None and not t.teacher.training
    assert all(not p.requires_grad for p in t.teacher.parameters())
    assert type(t.teacher.layer1[0]).__name__ == "BasicBlock" and len(t.teacher.layer1) == 3
    assert len(losses) == 12 and all(math.isfinite(v) for v in losses.values())


# --- AdaBound -------------------------------------------------------------------------------

@pytest.mark.parametrize("amsbound", [False, True])
def test_adabound_matches_the_update_rule_by_hand(amsbound):
    lr, final_lr, gamma, b1, b2, eps, wd = 0.01, 0.1, 1e-3, 0.9, 0.999, 1e-8, 0.01
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = AdaBound([p], lr=lr, betas=(b1, b2), final_lr=final_lr, gamma=gamma, eps=eps,
                   weight_decay=wd, amsbound=amsbound)
    grads = [[0.1, -0.3, 2.0], [0.5, 0.2, -1.0], [-0.2, 0.0, 0.3], [0.05, 0.9, 0.0]]
    w = [1.0, -2.0, 0.5]
    m, v, vmax = [0.0] * 3, [0.0] * 3, [0.0] * 3
    for t, g in enumerate(grads, 1):
        p.grad = torch.tensor(g)
        opt.step()
        for i in range(3):
            gi = g[i] + wd * w[i]
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            vmax[i] = max(vmax[i], v[i])
            denom = math.sqrt(vmax[i] if amsbound else v[i]) + eps
            step = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) / denom
            lower = final_lr * (1 - 1 / (gamma * t + 1))
            upper = final_lr * (1 + 1 / (gamma * t))
            w[i] -= min(max(step, lower), upper) * m[i]
        assert torch.allclose(p.detach(), torch.tensor(w), atol=1e-6), t


def test_adabound_final_lr_follows_the_schedule():
    # gamma so large that the bounds pin the step size to final_lr at once
    p = torch.nn.Parameter(torch.zeros(1))
    opt = AdaBound([p], lr=0.1, final_lr=0.05, gamma=1e3)
    opt.param_groups[0]["lr"] = 0.01  # the schedule lowered lr tenfold: final_lr → 0.005
    p.grad = torch.ones(1)
    opt.step()
    m = 0.1  # (1 − β1)·g
    assert p.item() == pytest.approx(-0.005 * m, rel=2e-3)


def test_adabound_is_a_config_choice(shapes_records, tmp_path, monkeypatch):
    cfg = load_config([], SMALL + [f"data.path={shapes_records}", "train.epochs=1",
                                   f"train.out={tmp_path}", "optim.name=amsbound",
                                   "optim.lr=0.004"])
    t, losses = _run(cfg, monkeypatch)
    assert isinstance(t.optimizer, AdaBound) and t.optimizer.defaults["amsbound"]
    assert losses[12] < losses[1]


# --- EMA, NaN, progressive resizing -------------------------------------------------------------

def test_ema_is_evaluated_and_checkpointed(shapes_records, tmp_path, monkeypatch):
    cfg = load_config([], SMALL + [f"data.path={shapes_records}", "train.epochs=2",
                                   f"train.out={tmp_path}", "train.name=r",
                                   "train.ema_decay=0.9"])
    t, _ = _run(cfg, monkeypatch)
    rec = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("ema_top1" in r and 0 <= r["ema_top1"] <= 1 for r in rec)
    state = load_checkpoint(tmp_path / "r")
    ema = state["ema"]
    assert ema is not None and int(ema["n_averaged"]) == 24
    w = state["model"]["fc.weight"]
    assert not torch.equal(ema["module.fc.weight"], w)


def test_a_nan_loss_stops_with_its_iteration_keeping_the_last_good_checkpoint(
        shapes_records, tmp_path, monkeypatch):
    real = trainer_mod.train_step
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        loss, logits = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 7 else loss), logits

    monkeypatch.setattr(trainer_mod, "train_step", poisoned)
    cfg = load_config([], SMALL + [f"data.path={shapes_records}", "train.epochs=1",
                                   f"train.out={tmp_path}", "train.name=r",
                                   "train.checkpoint_every=5", "train.log_every=4"])
    t = Trainer(cfg, progress=False, log=lambda *a: None)
    with pytest.raises(UserError, match=r"NaN or infinite at iteration 7; last good checkpoint"):
        t.fit()
    t.close()
    assert load_checkpoint(tmp_path / "r")["step"] == 5


def test_progressive_resizing_changes_train_size_not_val(shapes_records, tmp_path, monkeypatch):
    sizes = []
    real = trainer_mod.train_step

    def spy(model, images, *args, **kwargs):
        sizes.append(images.shape[-1])
        return real(model, images, *args, **kwargs)

    monkeypatch.setattr(trainer_mod, "train_step", spy)
    cfg = load_config([], SMALL + [f"data.path={shapes_records}", "train.epochs=3",
                                   f"train.out={tmp_path}", "train.name=r",
                                   "data.progressive=[[0, 24], [2, 40]]"])
    t = Trainer(cfg, progress=False, log=lambda *a: None)
    t.fit()
    t.close()
    assert sizes == [24] * 24 + [40] * 12
    rec = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["image_size"] for r in rec] == [24, 24, 40]
    assert t.val_loader.image_size == 32


@pytest.mark.parametrize("override,message", [
    ("data.progressive=[[2, 40], [0, 24]]", "increasing epochs"),
    ("train.accumulate=5", "must be ≥ 1 and divide train.batch=32"),
    ("train.ema_decay=1.0", "ema_decay must be in [0, 1)"),
    ("teacher.temperature=0", "teacher.temperature must be > 0"),
])
def test_bad_refinement_settings(override, message):
    from tricks.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        load_config([], SMALL + [override])
    assert message in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_sync_bn_on_the_cpu_is_a_clear_error(shapes_records):
    from tricks.errors import ConfigError
    cfg = load_config([], SMALL + [f"data.path={shapes_records}", "train.sync_bn=true",
                                   "train.device=cpu"])
    with pytest.raises(ConfigError, match="sync_bn needs CUDA"):
        Trainer(cfg, progress=False)


@pytest.mark.slow
def test_compiled_training_with_fused_sgd(shapes_records, tmp_path, monkeypatch):
    """train.compile (with its mode: reduce-overhead = CUDA graphs on CUDA, plain compile on
    the CPU), optim.fused and cudnn_benchmark are trainer options, not only benchmark ones."""
    cfg = load_config([], ["model.name=resnet18d", "model.width=4", "data.image_size=16",
                           "data.workers=0", "train.batch=100", f"data.path={shapes_records}",
                           "train.epochs=1", f"train.out={tmp_path}", "train.compile=true",
                           "train.compile_mode=reduce-overhead", "optim.fused=true",
                           "train.log_every=1", "train.cudnn_benchmark=false"])
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # restored afterwards
    t, losses = _run(cfg, monkeypatch)
    assert t.wrapped is not t.model and len(losses) == 4
    assert not torch.backends.cudnn.benchmark
    assert t.optimizer.defaults["fused"]
    assert all(math.isfinite(v) for v in losses.values())
