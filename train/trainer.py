"""The training loop: a short step function, per-iteration LR, evaluation, checkpoints, resume,
DDP under torchrun, gradient accumulation, distillation, EMA, signal-safe stops."""
from __future__ import annotations

import hashlib
import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from tricks.errors import ConfigError, UserError
from tricks.models import create_model, load_torchvision_state_dict
from tricks.models.torchvision_weights import load_weights
from tricks.pipeline import atomic
from tricks.pipeline.source import resolve_dataset

from . import distributed
from .checkpoint import (load_checkpoint, read_state_dict, rng_state, save_checkpoint,
                         set_rng_state)
from .compiler import require_compiler
from .config import Config, dump_config
from .data import make_loaders
from .distill import DistillationLoss
from .ema import ExponentialMovingAverage
from .loss import SoftTargetCrossEntropy
from .observe import Observer
from .optim import build_optimizer, fp16_sync_note
from .rundir import environment, make_run_dir
from .schedule import lr_at, scaled_lr, schedule_args

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# the signals that stop a run with a checkpoint (SIGHUP: not on Windows)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP")
                     if hasattr(signal, name))


class Stopped(Exception):
    """Training stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint):
        super().__init__(f"stopped by signal {signum}; checkpoint: {checkpoint}")
        self.signum = signum


def select_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use fp32 (or bf16) on the CPU")


def _load_weights(model: nn.Module, path: str, what: str, strict: bool = True,
                  log=print) -> None:
    """Load one of our checkpoints (its model) or a torchvision state dict into ``model``
    (read safely: ``checkpoint.read_state_dict``); ``strict=False`` leaves out a classifier of
    another shape, said in one line. Raises ``UserError`` (one line) for a missing or
    unreadable file, ``ConfigError`` for weights that do not fit."""
    weights, ours = read_state_dict(path, what)
    try:
        left_out = load_weights(model, weights, strict) if ours \
            else load_torchvision_state_dict(model, weights, strict)
    except ValueError as e:
        raise ConfigError(f"{what}={path}: {e}") from None
    if left_out:
        saved = weights[left_out[0]]
        log(f"{what}={path}: loaded all but the classifier ({', '.join(left_out)}: "
            f"{saved.shape[0]} outputs in the weights, {model.state_dict()[left_out[0]].shape[0]}"
            " classes here), which starts from its initialization")


def build_model(cfg: Config, num_classes: int, log=print) -> nn.Module:
    """The configured model for ``num_classes``, with ``model.weights`` loaded (whole, or all
    but the classifier with ``model.weights_strict=false``)."""
    m = cfg.model
    try:
        model = create_model(m.name, num_classes=num_classes, cifar_stem=m.cifar_stem,
                             width=m.width, zero_init_last=m.zero_init_last, init=m.init)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if m.weights:
        _load_weights(model, m.weights, "model.weights", m.weights_strict, log)
    return model


def build_teacher(cfg: Config, num_classes: int) -> nn.Module:
    """The teacher: our checkpoint (its own model settings) or a torchvision state dict."""
    t = cfg.teacher
    weights, ours = read_state_dict(t.checkpoint, "teacher.checkpoint")
    mcfg = dict(ours["config"]["model"]) if ours else {}
    name = t.model or mcfg.get("name")
    if name is None:
        raise ConfigError("teacher.model: name the teacher's model (the checkpoint is not ours)")
    try:
        model = create_model(name, num_classes=num_classes,
                             cifar_stem=mcfg.get("cifar_stem", False), width=mcfg.get("width", 64))
    except ValueError as e:
        raise ConfigError(f"teacher: {e}") from None
    try:
        if ours:
            model.load_state_dict(weights)
        else:
            load_torchvision_state_dict(model, weights)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"teacher.checkpoint={t.checkpoint} does not fit {name} with "
                          f"{num_classes} classes ({str(e).splitlines()[0]})") from None
    model.eval().requires_grad_(False)
    return model


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Correct top-k predictions, as device tensors (no host sync)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, :k].any(dim=1).sum() for k in ks]


def train_step(model, images, targets, criterion, optimizer, scaler, autocast, accumulate=1,
               teacher=None):
    """One optimizer step over ``accumulate`` micro-batches of the batch; gradients are
    all-reduced by DDP on the last micro-batch only. Returns the mean loss (a 0-dim device
    tensor) and the logits (N×K, detached).

    Under CUDA graphs (``torch.compile`` with ``reduce-overhead`` or ``max-autotune``) only
    ``accumulate=1`` is correct: a later micro-batch's replay overwrites the gradients the
    earlier one left in graph-owned memory (pytorch/pytorch#169545, #96693), so the config
    refuses the combination (``train/config.py``). With one micro-batch the logits returned are
    graph outputs, valid until the model's next call."""
    optimizer.zero_grad(set_to_none=True)
    total, all_logits = 0.0, []
    chunks = list(zip(images.tensor_split(accumulate), targets.tensor_split(accumulate)))
    for i, (x, t) in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = model.no_sync() if not last and hasattr(model, "no_sync") else nullcontext()
        with sync:
            with autocast:
                logits = model(x)
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = teacher(x)
                    loss = criterion(logits, t, teacher_logits)
                else:
                    loss = criterion(logits, t)
            scaler.scale(loss / accumulate).backward()
        total = total + loss.detach() / accumulate
        all_logits.append(logits.detach())
    scaler.step(optimizer)
    scaler.update()
    return total, all_logits[0] if accumulate == 1 else torch.cat(all_logits)


@torch.no_grad()
def evaluate(model, loader, criterion, autocast, progress: bool = False, prefix: str = "val"
             ) -> dict:
    """Top-1/top-5 and loss over this rank's shard, summed over ranks (shards are disjoint).

    Under DDP (every rank calls it) the model's BatchNorm running statistics are first averaged
    over the ranks, in place (the trainer's DDP does not broadcast buffers, so each rank's
    follow its own shard): every rank then evaluates, and rank 0 checkpoints, the same model."""
    distributed.average_buffers(model)
    model.eval()
    device = loader.device
    sums = torch.zeros(4, device=device, dtype=torch.float64)  # loss, top-1, top-5, count
    loader.set_epoch(0)
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
        with autocast:
            logits = model(images)
            loss = criterion(logits, labels)
        a1, a5 = accuracy_counts(logits, labels)
        # the count by a fill kernel: ``torch.tensor(n, device=…)`` is a blocking copy a batch
        sums += torch.stack([loss.double() * len(labels), a1.double(), a5.double(),
                             torch.full((), len(labels), device=device, dtype=torch.float64)])
    loss, c1, c5, n = distributed.all_reduce_sum(sums).tolist()
    return {f"{prefix}_loss": loss / n, f"{prefix}_top1": c1 / n, f"{prefix}_top5": c5 / n,
            f"{prefix}_images": int(n)}


def dataset_identity(loader) -> dict:
    """What a training position depends on in the data: the record count, the class list and a
    cheap fingerprint of the record index (offsets, lengths, labels, sizes: changes when any
    image is added, removed, relabelled or re-encoded), not a hash of the pixels."""
    digest = hashlib.blake2b(np.ascontiguousarray(loader.records.index).tobytes(),
                             digest_size=8)
    digest.update(json.dumps(loader.classes).encode())
    return {"records": len(loader.records), "classes": len(loader.classes),
            "index": digest.hexdigest()}


def resume_key(cfg: Config, loader) -> dict:
    """What a checkpoint's position (iteration, epoch, batch in the epoch) means: the global
    batch it counts in, the dataset it indexes and the model it holds. A resume with any of
    these changed is refused (``Trainer._check_resumable``)."""
    m = cfg.model
    return {"train.batch": cfg.train.batch, "dataset": dataset_identity(loader),
            "model": {"name": m.name, "width": m.width, "cifar_stem": m.cifar_stem}}


def progressive_size(schedule: list, epoch: int, default: int) -> int:
    """The training resolution of ``epoch``: the last [start_epoch, size] that has begun."""
    size = default
    for start, s in schedule:
        if epoch >= start:
            size = s
    return size


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, progress: bool = True,
                 log=print):
        self.cfg = cfg
        t = cfg.train
        state = load_checkpoint(resume) if resume else None
        device_type = select_device(t.device).type
        self.dist = distributed.init(device_type)
        self.main = self.dist.is_main
        self.log = log if self.main else (lambda *a, **k: None)
        self.progress = progress and self.main
        self.device = select_device(t.device, self.dist.local_rank)
        check_precision(t.precision, self.device)
        if t.sync_bn and self.device.type != "cuda":
            raise ConfigError("train.sync_bn needs CUDA: torch has no SyncBatchNorm on the CPU")
        world = self.dist.world_size
        if t.batch % (world * t.accumulate):
            raise ConfigError(f"train.batch={t.batch} must divide by world size ({world}) × "
                              f"train.accumulate ({t.accumulate})")
        torch.manual_seed(t.seed)
        self.dtype = DTYPES[t.precision]

        # the main rank converts (or re-converts a changed tree) first; the others then find
        # the cache current: no two ranks write or delete the same cache folder at once
        if not self.main:
            distributed.barrier()
        self.data_root = resolve_dataset(cfg.data.path, cfg.data.max_side, cfg.data.quality,
                                         self.log)
        if self.main:
            distributed.barrier()
        self.train_loader, self.val_loader = make_loaders(cfg, self.data_root, self.device,
                                                          self.dtype, self.dist.rank, world)
        self.num_classes = self.train_loader.num_classes
        if self.val_loader is None:
            self.log(f"no validation split in {self.data_root} (it has only "
                     f"{cfg.data.train_split!r}): training without evaluation")
        model = build_model(cfg, self.num_classes, self.log)
        if t.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = model.to(self.device)
        if t.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.net = model
        if self.dist.enabled:
            # broadcast_buffers=False: no broadcast of every BN buffer before each forward; each
            # rank's running statistics follow its own shard and ``evaluate`` averages them
            # over the ranks first (timm's distribute_bn, "reduce"). gradient_as_bucket_view:
            # the gradients are the all-reduce buckets (no copy, one gradient-sized buffer
            # less). static_graph only without accumulation: with no_sync() it crashes or stops
            # all-reducing (pytorch/pytorch#187732, huggingface/accelerate#3679).
            self.net = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, gradient_as_bucket_view=True,
                static_graph=t.accumulate == 1)
        torch.backends.cudnn.benchmark = t.cudnn_benchmark
        if t.compile:
            require_compiler(self.device.type)  # one line now, not a traceback in step 1
            self.net = torch.compile(self.net, mode=t.compile_mode)
        # our EMA, not AveragedModel: no blocking copy of its update count per step
        self.ema = ExponentialMovingAverage(model, t.ema_decay) if t.ema_decay else None
        self.teacher = None
        base = SoftTargetCrossEntropy(self.num_classes, t.label_smoothing)
        self.criterion = base
        if cfg.teacher.checkpoint:
            teacher = build_teacher(cfg, self.num_classes).to(self.device)
            self.teacher = teacher.to(memory_format=torch.channels_last) if t.channels_last \
                else teacher
            self.criterion = DistillationLoss(base, cfg.teacher.temperature, cfg.teacher.weight)
        self.eval_criterion = SoftTargetCrossEntropy(self.num_classes)
        o = cfg.optim
        self.peak_lr = scaled_lr(o.lr, t.batch, o.lr_scaling)
        self.optimizer = build_optimizer(model, o.name, self.peak_lr, o.momentum, o.nesterov,
                                         o.weight_decay, o.no_bias_decay, o.final_lr, o.gamma,
                                         o.betas, o.eps, o.fused)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        note = fp16_sync_note(self.optimizer, o.name) if self.scaler.is_enabled() else None
        if note:
            self.log(note)
        self.autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                         if t.precision != "fp32" else nullcontext())
        self.steps_per_epoch = len(self.train_loader)
        s = cfg.schedule
        self.schedule = schedule_args(s.name, s.warmup_epochs, s.step_epochs, s.step_gamma,
                                      self.peak_lr, self.steps_per_epoch, t.epochs)
        self.total_steps = self.schedule["total"]
        self.step, self.epoch, self.position = 0, 0, 0
        self.best_top1 = 0.0
        self._acc: dict | None = None   # the current epoch's accumulators (see train_epoch)
        self._restored_acc: dict | None = None
        self._signal: int | None = None
        self._first_bad = torch.full((), math.inf, device=self.device, dtype=torch.float64)

        self.run_dir = Path(state["path"]).parent if state else None
        if state is not None:
            self._restore(state)
        elif self.main:
            self.run_dir = make_run_dir(t.out, t.name)
        if self.main:
            atomic.write_text(self.run_dir / "config.yaml", dump_config(cfg))
            atomic.write_text(self.run_dir / "env.json", json.dumps(
                {**environment(self.device, t.seed, str(self.data_root)),
                 "world_size": world}, indent=1))
        self.checkpoint_path = self.run_dir / "checkpoint.pt" if self.run_dir else None
        self.metrics_path = self.run_dir / "metrics.jsonl" if self.run_dir else None
        self.log_path = self.run_dir / "train_log.jsonl" if self.run_dir else None
        if state is not None and self.main:
            self._truncate_logs(state)
        self.observer = Observer(self.run_dir if self.main else None, t.tensorboard,
                                 self.total_steps, self.step, self.log)

    def lr(self, i: int) -> float:
        return lr_at(i, **self.schedule)

    # --- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "ema": self.ema.state_dict() if self.ema is not None else None,
                "step": self.step, "epoch": self.epoch, "position": self.position,
                "best_top1": self.best_top1, "rng": rng_state(),
                "classes": self.train_loader.classes, "world_size": self.dist.world_size,
                "resume_key": resume_key(self.cfg, self.train_loader)}

    def _epoch_accumulators(self) -> dict | None:
        """Mid-epoch: this epoch's sums so far, over all ranks (a collective: every rank calls
        it), so a resumed epoch reports the same metrics as an uninterrupted one."""
        a = self._acc
        if a is None or self.position >= self.steps_per_epoch:
            return None
        sums = distributed.all_reduce_sum(torch.cat([
            a["loss_sum"].reshape(1), a["correct"].double().reshape(1),
            torch.tensor([float(a["seen"]), float(a["labelled"])], dtype=torch.float64,
                         device=self.device)]))
        loss_sum, correct, seen, labelled = sums.tolist()
        return {"epoch": self.epoch, "loss_sum": loss_sum, "correct": int(correct),
                "seen": int(seen), "labelled": int(labelled),
                "wait": self.train_loader.wait_time - a["wait0"],
                "time": time.perf_counter() - a["t0"]}

    def save(self) -> None:
        """Rank 0 writes the checkpoint, never one that holds a non-finite step."""
        self._check_finite()
        acc = self._epoch_accumulators()
        if self.main:
            save_checkpoint(self.checkpoint_path, {**self._state(), "epoch_accumulators": acc})

    def _check_finite(self, bad: float | None = None) -> None:
        """Raise if a step's loss was not finite; ``bad``: ``_first_bad`` already read back."""
        bad = float(self._first_bad) if bad is None else bad
        if math.isfinite(bad):
            last = f"last good checkpoint: {self.checkpoint_path}" \
                if self.checkpoint_path and self.checkpoint_path.exists() else "no checkpoint yet"
            raise UserError(f"the loss became NaN or infinite at iteration {int(bad)}; {last}")

    def _check_resumable(self, state: dict) -> None:
        """Refuse, in one line naming it, a resume whose position would mean something else."""
        saved, now = state.get("resume_key"), resume_key(self.cfg, self.train_loader)
        if saved is None:
            return  # a checkpoint from before the key was recorded: nothing to compare
        where = state["path"]
        if saved["train.batch"] != now["train.batch"]:
            raise UserError(f"cannot resume {where}: train.batch changed from "
                            f"{saved['train.batch']} to {now['train.batch']} (the position and "
                            "the schedule are counted in global batches); resume with "
                            f"train.batch={saved['train.batch']}")
        if saved["dataset"] != now["dataset"]:
            diff = ", ".join(f"{k} {saved['dataset'][k]} → {now['dataset'][k]}"
                             for k in saved["dataset"] if saved["dataset"][k] != now["dataset"][k])
            raise UserError(f"cannot resume {where}: the training data changed ({diff}) at "
                            f"{self.data_root}; resume with the dataset the run started on")
        if saved["model"] != now["model"]:
            diff = ", ".join(f"model.{k} {saved['model'][k]} → {now['model'][k]}"
                             for k in saved["model"] if saved["model"][k] != now["model"][k])
            raise UserError(f"cannot resume {where}: the model changed ({diff})")

    def _restore(self, state: dict) -> None:
        self._check_resumable(state)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best_top1 = state.get("best_top1", 0.0)
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        acc = state.get("epoch_accumulators")
        if acc is not None and acc["epoch"] == self.epoch and self.position > 0:
            self._restored_acc = acc
        set_rng_state(state["rng"])
        # epochs and batches counted from 1, as in the log and metrics.jsonl
        self.log(f"resumed from {state['path']} in epoch {self.epoch + 1} after batch "
                 f"{self.position} of {self.steps_per_epoch} (iteration {self.step})")

    def _truncate_logs(self, state: dict) -> None:
        """Drop log lines written after the checkpoint (by a run that was then killed)."""
        done = self.epoch  # epochs completed at the checkpoint
        for path, keep in ((self.metrics_path, lambda r: r["epoch"] <= done),
                           (self.log_path, lambda r: r["step"] <= state["step"])):
            if path.exists():
                rows = [ln for ln in path.read_text().splitlines()
                        if ln.strip() and keep(json.loads(ln))]
                atomic.write_text(path, "".join(r + "\n" for r in rows))

    # --- signals -------------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if self._signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self._signal = signum

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal. One process: the flag itself, no device work.
        Under DDP every rank must stop at the same step: the flags are summed over the ranks
        and read back (one host sync per log window; the flag is made by a fill kernel, not
        copied from the host)."""
        if not self.dist.enabled:
            return self._signal is not None
        flag = torch.full((1,), float(self._signal is not None), device=self.device)
        return bool(distributed.all_reduce_sum(flag).item() > 0)

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
        """Train to ``train.epochs``. SIGTERM, SIGINT and SIGHUP (a closed terminal or SSH
        session), to the process or its whole group (``scancel``, Ctrl-C), save a checkpoint at
        the next step and raise ``Stopped``; the decode engines' worker processes ignore them
        and are shut down by ``close()``."""
        handlers = {}
        try:
            for sig in STOP_SIGNALS:
                handlers[sig] = signal.signal(sig, self._on_signal)
        except ValueError:  # not the main thread: no handlers, no signal-safe stop
            for sig, h in handlers.items():
                signal.signal(sig, h)
            handlers = {}
        self.observer.start(self.step)
        try:
            return self._fit()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)
            self.observer.close()  # curves.png, also for a stopped run

    def _fit(self) -> dict:
        cfg = self.cfg
        last: dict = {}
        if self.epoch >= cfg.train.epochs:
            self.log(f"nothing to do: the run already finished {cfg.train.epochs} epochs")
        while self.epoch < cfg.train.epochs:
            record = self.train_epoch()
            if self.val_loader is not None and ((self.epoch + 1) % cfg.train.eval_every == 0
                                                or self.epoch + 1 == cfg.train.epochs):
                record.update(evaluate(self.model, self.val_loader, self.eval_criterion,
                                       self.autocast, self.progress))
                if self.ema is not None:
                    record.update(evaluate(self.ema.module, self.val_loader,
                                           self.eval_criterion, self.autocast, self.progress,
                                           prefix="ema"))
                self.best_top1 = max(self.best_top1, record["val_top1"])
                ema = f", EMA top-1 {100 * record['ema_top1']:.2f}%" if self.ema else ""
                self.log(f"epoch {self.epoch + 1}/{cfg.train.epochs}: "
                         f"val top-1 {100 * record['val_top1']:.2f}%, "
                         f"top-5 {100 * record['val_top5']:.2f}%{ema}, "
                         f"train loss {record['train_loss']:.4f}, "
                         f"{record['images_per_s']:.0f} img/s, "
                         f"data wait {100 * record['data_wait']:.0f}%")
            elif self.val_loader is None:
                self.log(f"epoch {self.epoch + 1}/{cfg.train.epochs}: "
                         f"train loss {record['train_loss']:.4f}, "
                         f"{record['images_per_s']:.0f} img/s, "
                         f"data wait {100 * record['data_wait']:.0f}%")
            if self.main:
                atomic.append_line(self.metrics_path, json.dumps(record))
                self.observer.epoch(record)
            self.position = self.steps_per_epoch
            self.save()
            self.epoch, self.position = self.epoch + 1, 0
            last = record
        return last

    def train_epoch(self) -> dict:
        cfg, loader = self.cfg, self.train_loader
        t = cfg.train
        self.net.train()
        size = progressive_size(cfg.data.progressive, self.epoch, cfg.data.image_size)
        loader.set_image_size(size)
        loader.set_epoch(self.epoch, self.position)
        loader.set_mix(self.epoch < t.epochs - cfg.mix.off_last_epochs)
        dev = self.device
        # the epoch's accumulators; a resumed epoch starts from the checkpoint's sums (on rank 0:
        # they are totals over the ranks), its time and data wait from those already spent
        prior = self._restored_acc or {"loss_sum": 0.0, "correct": 0, "seen": 0,
                                       "labelled": 0, "wait": 0.0, "time": 0.0}
        if not self.main:
            prior = {**prior, "loss_sum": 0.0, "correct": 0, "seen": 0, "labelled": 0}
        self._restored_acc = None
        acc = self._acc = {
            "loss_sum": torch.full((), prior["loss_sum"], device=dev, dtype=torch.float64),
            "correct": torch.full((), prior["correct"], device=dev, dtype=torch.long),
            "seen": prior["seen"], "labelled": prior["labelled"],
            "wait0": loader.wait_time - prior["wait"], "t0": time.perf_counter() - prior["time"]}
        loss_sum, correct = acc["loss_sum"], acc["correct"]
        window = torch.zeros((), device=dev, dtype=torch.float64)
        in_window = 0
        wait0, t0 = acc["wait0"], acc["t0"]
        fallbacks0 = loader.fallbacks
        bar = tqdm(total=self.steps_per_epoch, initial=self.position, leave=False,
                   desc=f"epoch {self.epoch + 1}/{t.epochs} ({size}px)", unit="it",
                   disable=not self.progress, mininterval=1.0)
        for images, targets in loader:
            if self.step == 0:
                self.observer.first_batch(images, targets, loader, self.step)
            self.step += 1
            lr = self.lr(self.step)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            loss, logits = train_step(self.net, images, targets, self.criterion, self.optimizer,
                                      self.scaler, self.autocast, t.accumulate, self.teacher)
            if self.ema is not None:
                self.ema.update_parameters(self.model)
            self.position = loader.position
            self._first_bad = torch.minimum(self._first_bad, torch.where(
                torch.isfinite(loss), math.inf, float(self.step)))
            loss_sum += loss.double() * len(images)
            window += loss.double()
            acc["seen"] += len(images)
            in_window += 1
            if targets.ndim == 1:
                correct += accuracy_counts(logits, targets, ks=(1,))[0]
                acc["labelled"] += len(images)
            bar.update()
            if self.step % t.log_every == 0:
                self._log_window(window, in_window, lr, bar, acc["seen"],
                                 loader.wait_time - wait0, t0)
                window.zero_()
                in_window = 0
                if self._stop_requested():
                    self._stop()
            elif not self.dist.enabled and self._signal is not None:
                self._stop()
            if t.checkpoint_every and self.step % t.checkpoint_every == 0 \
                    and self.position < self.steps_per_epoch:
                self.save()
        bar.close()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        elapsed = time.perf_counter() - t0
        self._acc = None
        self._check_finite()
        totals = distributed.all_reduce_sum(torch.stack([
            loss_sum, torch.tensor(float(acc["seen"]), device=dev, dtype=torch.float64),
            correct.double(),
            torch.tensor(float(acc["labelled"]), device=dev, dtype=torch.float64)]))
        loss_total, seen_all, correct_all, labelled_all = totals.tolist()
        record = {"epoch": self.epoch + 1, "step": self.step, "lr": self.lr(self.step),
                  "image_size": size, "train_loss": loss_total / max(seen_all, 1),
                  "train_top1": correct_all / labelled_all if labelled_all else None,
                  "images_per_s": seen_all / elapsed,
                  "data_wait": (loader.wait_time - wait0) / elapsed, "epoch_time_s": elapsed}
        return {**record, **self._data_faults(loader, fallbacks0)}

    def _data_faults(self, loader, fallbacks0: int) -> dict:
        """This epoch's bad records (named once: pipeline.bad_records) and Pillow fallbacks,
        said in the log and returned for metrics.jsonl when there were any."""
        out = {}
        bad = loader.bad_records.take_new()
        if bad:
            out["bad_records"] = bad
        fallbacks = loader.fallbacks - fallbacks0
        if fallbacks:
            reasons = getattr(loader.engine, "fallback_reasons", [])[:1]
            self.log(f"epoch {self.epoch + 1}: {fallbacks} image(s) libjpeg-turbo could not "
                     f"decode were decoded by Pillow{' (' + reasons[0] + ')' if reasons else ''}")
            out["pillow_fallbacks"] = fallbacks
        return out

    def _log_window(self, window, steps, lr, bar, seen, waited, t0) -> None:
        """The one host sync every ``log_every`` steps: the window's loss and the first
        non-finite step, read back together."""
        total, bad = torch.stack([distributed.all_reduce_sum(window.clone()),
                                  self._first_bad]).tolist()
        mean = total / (steps * self.dist.world_size)
        self._check_finite(bad)
        if self.main:
            atomic.append_line(self.log_path, json.dumps(
                {"step": self.step, "epoch": self.epoch + 1, "lr": lr, "loss": mean}))
        elapsed = time.perf_counter() - t0
        img_s, wait = seen * self.dist.world_size / elapsed, waited / elapsed
        self.observer.window(self.step, mean, lr, img_s, wait)
        bar.set_postfix(loss=f"{mean:.3f}", lr=f"{lr:.3g}", img_s=f"{img_s:.0f}",
                        wait=f"{100 * wait:.0f}%", run_eta=self.observer.eta(self.step))

    def _stop(self) -> None:
        self.save()
        raise Stopped(self._signal or signal.SIGTERM, self.checkpoint_path)

    def close(self) -> None:
        self.observer.close()
        self.train_loader.close()
        if self.val_loader is not None:
            self.val_loader.close()
