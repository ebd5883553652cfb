"""No host-device synchronisation on the hot path: every augment and mix op, the stages, a
training step and the EMA, run on the ``meta`` device (standing in for CUDA) under
``SyncCounter``; and the same on a GPU under ``torch.cuda.set_sync_debug_mode("error")``."""
from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from sync_harness import HostSync, SyncCounter, meta_fused
from tricks.models import create_model
from tricks.pipeline.ops import AUGMENT_OPS, MIX_OPS
from tricks.pipeline.sampling import keyed_generator
from tricks.pipeline.stages import Stages
from tricks.pipeline.transfer import to_device
from tricks.train.ema import ExponentialMovingAverage
from tricks.train.loss import SoftTargetCrossEntropy
from tricks.train.optim import build_optimizer, scaler_reads_back
from tricks.train.trainer import train_step

from conftest import cuda

META = torch.device("meta")
N, K, S = 8, 10, 32
# every op in its heaviest configuration: all branches that can run on the device do
HEAVY = {"jitter": dict(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                        random_order=True),
         "cutout": dict(holes=3, size=12), "erasing": dict(p=1.0, fill="random"),
         "autoaugment": {}, "lighting": {}}


def _batch(device):
    images = torch.zeros(N, 3, S, S, dtype=torch.uint8, device=device)
    labels = torch.zeros(N, dtype=torch.long, device=device)
    return images.contiguous(memory_format=torch.channels_last), labels


def _all_augments():
    return [AUGMENT_OPS[name](**HEAVY.get(name, {})) for name in AUGMENT_OPS]


def _count(fn, *args, warm: int = 1):
    """Run ``fn`` ``warm`` times (constants move once), then once under the counter."""
    for _ in range(warm):
        fn(*args)
    with SyncCounter() as s:
        fn(*args)
    return s


def test_harness_sees_blocking_copies_and_reads():
    x = torch.zeros(4, device=META)
    with SyncCounter() as s:
        torch.ones(4).to(META)                                  # pageable, blocking
        torch.ones(4).to(META, non_blocking=True)               # pageable: still blocking
        torch.tensor([1.0, 2.0], device=META)                   # built on the host
        to_device([torch.ones(4), torch.arange(3)], META)       # the one allowed kind
        x.copy_(torch.ones(4))
    assert [e[1] for e in s.events] == ["to", "to", "torch.tensor", "copy_"]
    assert s.copies == 1
    for read in (lambda: x.sum().item(), lambda: bool(x.any()), lambda: x.nonzero(),
                 lambda: x[x > 0], lambda: x.cpu()):
        with pytest.raises(HostSync), SyncCounter():
            read()


@pytest.mark.parametrize("name", sorted(AUGMENT_OPS))
def test_augment_op_does_not_sync(name):
    op = AUGMENT_OPS[name](**HEAVY.get(name, {}))
    stages = Stages(torch.float16, K, [op])
    images, labels = _batch(META)
    gen = keyed_generator(0, 1)
    s = _count(stages, images, labels, gen)
    assert s.events == []
    assert s.copies <= 1  # its draws, in one copy


@pytest.mark.parametrize("name", sorted(MIX_OPS))
def test_mix_op_does_not_sync(name):
    stages = Stages(torch.bfloat16, K, [], MIX_OPS[name]())
    images, labels = _batch(META)
    s = _count(stages, images, labels, keyed_generator(0, 2))
    assert s.events == []
    assert s.copies <= 1


def test_every_op_in_one_stage_stack_does_not_sync():
    stages = Stages(torch.float16, K, _all_augments(), MIX_OPS["mixup"]())
    images, labels = _batch(META)
    s = _count(stages, images, labels, keyed_generator(0, 3))
    assert s.events == []
    assert s.copies <= len(AUGMENT_OPS) + 1


@pytest.mark.parametrize("mix", ["none", *sorted(MIX_OPS)])
def test_full_step_does_not_sync(mix):
    """loader output → stages (every augment op and ``mix``; "none": integer labels, the loss's
    fast path) → train_step (SGD-Nesterov, label smoothing, two micro-batches) → EMA, the
    second step counted."""
    stages = Stages(torch.float32, K, _all_augments(), MIX_OPS[mix]() if mix != "none" else None)
    model = create_model("resnet18", num_classes=K, cifar_stem=True, width=8)
    model = model.to(META).to(memory_format=torch.channels_last)
    ema = ExponentialMovingAverage(model, 0.99)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                weight_decay=1e-4)
    criterion = SoftTargetCrossEntropy(K, 0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    first_bad = torch.full((), float("inf"), device=META, dtype=torch.float64)

    def step(i):
        nonlocal first_bad
        x, t = stages(*_batch(META), keyed_generator(0, 4, i))
        for g in optimizer.param_groups:
            g["lr"] = 0.1 / (i + 1)
        loss, logits = train_step(model, x, t, criterion, optimizer, scaler,
                                  torch.autocast("cpu", enabled=False), accumulate=2)
        ema.update_parameters(model)
        first_bad = torch.minimum(first_bad, torch.where(torch.isfinite(loss), float("inf"),
                                                         float(i)))
        return loss

    step(0)
    with SyncCounter() as s:
        step(1)
    assert s.events == []
    assert ema.n_updates == 2


# the optimizers the trainer builds (optim.name, optim.fused)
OPTIMIZERS = {"sgd-fused": dict(name="sgd", fused=True), "sgd": dict(name="sgd"),
              "adabound": dict(name="adabound"), "amsbound": dict(name="amsbound")}


@pytest.mark.parametrize("config", sorted(OPTIMIZERS))
def test_fp16_scaler_syncs_exactly_where_scaler_reads_back_says(config):
    """FP16's gradient scaler (enabled, on ``meta``) with each optimizer the trainer builds: a
    step (stages with mixup, ``train_step`` with two micro-batches) reads the inf flag back to the
    host exactly when ``scaler_reads_back`` says so (the trainer's start-up note and the README
    rest on it), and fused SGD's step has no sync of any kind."""
    model = create_model("resnet18", num_classes=K, cifar_stem=True, width=8)
    model = model.to(META).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, lr=0.1, weight_decay=1e-4, no_bias_decay=True,
                                **OPTIMIZERS[config])
    if optimizer.defaults.get("fused"):
        meta_fused(optimizer)
    scaler = torch.amp.GradScaler("meta")
    assert scaler.is_enabled()
    stages = Stages(torch.float32, K, [], MIX_OPS["mixup"]())
    criterion = SoftTargetCrossEntropy(K, 0.1)

    def step(i):
        x, t = stages(*_batch(META), keyed_generator(0, 6, i))
        return train_step(model, x, t, criterion, optimizer, scaler, nullcontext(), accumulate=2)

    stages(*_batch(META), keyed_generator(0, 6, 99))  # its constants move to the device once
    read = None
    for i in range(2):  # the first step and one with the optimizer's state made
        with SyncCounter() as s:
            try:
                step(i)
            except HostSync as e:
                read = str(e)
                break
        assert s.events == []
    assert (read is not None) == scaler_reads_back(optimizer), read
    assert read is None or config != "sgd-fused", read
    if read is not None:
        assert "_local_scalar_dense" in read and "scaler.step(optimizer)" in read


def test_ema_keeps_the_decay_and_the_checkpoint_format_of_averaged_model():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
    torch.manual_seed(0)
    model = create_model("resnet18", num_classes=K, cifar_stem=True, width=8)
    ours = ExponentialMovingAverage(model, 0.9)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    for _ in range(3):
        model(torch.randn(4, 3, 16, 16))  # moves the BN running statistics
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(model)
        theirs.update_parameters(model)
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    fresh = ExponentialMovingAverage(model, 0.9)
    fresh.load_state_dict(b)
    assert fresh.n_updates == 3


@cuda
def test_full_step_does_not_sync_on_cuda():
    dev = torch.device("cuda")
    stages = Stages(torch.float16, K, _all_augments(), MIX_OPS["mixup"]())
    model = create_model("resnet18", num_classes=K, cifar_stem=True, width=8)
    model = model.to(dev).to(memory_format=torch.channels_last)
    ema = ExponentialMovingAverage(model, 0.99)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                                fused=True)
    criterion = SoftTargetCrossEntropy(K, 0.1)
    scaler = torch.amp.GradScaler("cuda")
    autocast = torch.autocast("cuda", dtype=torch.float16)

    def step(i):
        x, t = stages(*_batch(dev), keyed_generator(0, 5, i))
        loss, _ = train_step(model, x, t, criterion, optimizer, scaler, autocast, 2)
        ema.update_parameters(model)
        return loss

    step(0)  # cuDNN and allocator warm-up may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 3):
            step(i)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with SyncCounter() as s:  # the same step, now with real pinned buffers
        step(3)
    assert s.events == []


# --- the loader's and the trainer's other device paths ------------------------------------------

@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_translate_does_not_sync(mode):
    """Pad-and-crop (the cifar preset's crop): its shifts in one pinned copy, its fill a
    scalar (a ``torch.tensor(fill, device=…)`` was a blocking copy every batch)."""
    from tricks.pipeline.translate import draw_shifts, translate
    images, _ = _batch(META)
    shifts = draw_shifts(N, 4, keyed_generator(0, 7))
    s = _count(translate, images, shifts, 128, mode)
    assert s.events == []
    assert s.copies == 1


def test_evaluate_does_not_sync_per_batch(monkeypatch):
    """``evaluate`` reads its sums back once, at the end (here the all-reduce hands back host
    values, since meta tensors have none): no blocking copy per batch."""
    import tricks.train.trainer as trainer_mod

    class Loader:
        device = META

        def set_epoch(self, epoch):
            pass

        def __iter__(self):
            images, labels = _batch(META)
            return iter([(images.float(), labels)] * 3)

    monkeypatch.setattr(trainer_mod.distributed, "all_reduce_sum",
                        lambda sums: torch.tensor([1.0, 1.0, 1.0, 3.0 * N]))
    model = create_model("resnet18", num_classes=K, cifar_stem=True, width=8).to(META)
    with SyncCounter() as s:
        result = trainer_mod.evaluate(model, Loader(), SoftTargetCrossEntropy(K), nullcontext())
    assert s.events == []
    assert result["val_images"] == 3 * N


def test_stop_check_without_ddp_does_not_touch_the_device():
    """The stop-signal check every log window: one process has nothing to agree on with other
    ranks, so no tensor is made (it was a blocking copy per window)."""
    from tricks.train.distributed import Dist
    from tricks.train.trainer import Trainer
    trainer = Trainer.__new__(Trainer)
    trainer.device, trainer.dist = META, Dist()
    for signum, want in ((None, False), (15, True)):
        trainer._signal = signum
        with SyncCounter() as s:
            assert trainer._stop_requested() is want
        assert s.events == [] and s.copies == 0


@pytest.mark.parametrize("budget", [1 << 24, 2_000])
def test_device_crop_does_not_sync(budget):
    """The native engine's device decode path after the decode: the batch's sizes, boxes, flips
    and group order in one pinned copy (they were 4–5 blocking copies per group); ``budget``
    2,000 cuts the batch into several size groups."""
    from tricks.pipeline.engines.native import crop_resize_flip, size_groups
    shapes = [(40 + 7 * i, 60 - 3 * i) for i in range(N)]
    images = [torch.zeros(3, h, w, dtype=torch.uint8, device=META) for h, w in shapes]
    boxes = torch.tensor([[2.0, 3.0, w - 1.0, h - 2.0] for h, w in shapes])
    flips = torch.arange(N) % 2 == 0
    s = _count(crop_resize_flip, images, boxes, flips, 16, budget, warm=0)
    assert len(size_groups(shapes, budget)) == (1 if budget > 2_000 else N)
    assert s.events == []
    assert s.copies == 1


def test_device_batch_does_not_sync(monkeypatch, shapes_records):
    """The whole ``_device_batch`` (nvJPEG decode stood in by meta tensors of the images' sizes):
    crops and labels reach the device without a blocking copy."""
    import tricks.pipeline.engines.native as native
    from tricks.pipeline.records import RecordFile
    from tricks.pipeline.sampling import BatchTask
    records = RecordFile(shapes_records / "train.rec")
    monkeypatch.setattr(native, "decode_jpeg", lambda datas, mode, device: [
        torch.zeros(3, 64, 64, dtype=torch.uint8, device=device) for _ in datas])
    from tricks.pipeline.engines.base import EngineSpec
    engine = native.NativeEngine(records, EngineSpec(device=META, workers=1, batch_size=N),
                                 decode="device")
    idx = np.arange(N)
    task = BatchTask(epoch=0, batch=0, indices=idx, boxes=np.tile([[4.0, 4.0, 60.0, 60.0]], (N, 1)),
                     flips=idx % 2 == 0, size=16)
    with SyncCounter() as s:
        images, labels = engine._device_batch(task)
    assert images.shape == (N, 3, 16, 16) and labels.shape == (N,)
    assert s.events == []
