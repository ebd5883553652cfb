"""The training loop: a short step function, per-iteration LR, evaluation, checkpoints, resume,
DDP under torchrun, gradient accumulation, distillation, EMA, signal-safe stops."""
from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from tricks.errors import ConfigError, UserError
from tricks.pipeline import atomic
from tricks.pipeline.source import resolve_dataset

from . import distributed
from .build import (build_model, build_teacher, place_model, resolve_precision,
                    select_device, wrap_model)
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, dump_config
from .data import make_loaders
from .distill import DistillationLoss
from .ema import ExponentialMovingAverage
from .loss import SoftTargetCrossEntropy
from .meter import EpochMeter, accuracy_counts
from .observe import Observer
from .optim import build_optimizer, fp16_sync_note
from .progress import progress_enabled
from .resume import check_resumable, resume_key, truncate_logs
from .rundir import environment, make_run_dir
from .schedule import lr_at, scaled_lr, schedule_args

# the signals that stop a run with a checkpoint (SIGHUP: not on Windows)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP")
                     if hasattr(signal, name))


class Stopped(Exception):
    """Training stopped by a signal after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint):
        super().__init__(f"stopped by signal {signum}; checkpoint: {checkpoint}")
        self.signum = signum


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


def progressive_size(schedule: list, epoch: int, default: int) -> int:
    """The training resolution of ``epoch``: the last [start_epoch, size] that has begun."""
    size = default
    for start, s in schedule:
        if epoch >= start:
            size = s
    return size


class Trainer:
    """A run: built from ``cfg`` (or resumed from the checkpoint ``resume`` at the exact
    iteration it stopped), trained by ``fit``. ``model`` is the bare module (what checkpoints,
    EMA and evaluation use); ``wrapped`` is what the step calls (``model`` under DDP and/or
    ``torch.compile``, or ``model`` itself)."""

    def __init__(self, cfg: Config, resume: str | None = None, progress: bool = True,
                 log=print):
        self.cfg = cfg
        state = load_checkpoint(resume) if resume else None
        self._set_up_process(progress, log)
        torch.manual_seed(cfg.train.seed)
        # the order below is the order the seeded generator is drawn from: keep it
        self._build_data()
        self._build_model()
        self._build_optimization()
        self.step, self.epoch, self.position = 0, 0, 0
        self.best_top1 = 0.0
        self._meter: EpochMeter | None = None  # the current epoch's sums (train_epoch)
        self._resumed_sums: dict | None = None  # a resumed epoch's sums so far (_restore)
        self._signal: int | None = None
        self._first_bad = torch.full((), math.inf, device=self.device, dtype=torch.float64)
        self._open_run(state)

    # --- set-up --------------------------------------------------------------------------------
    def _set_up_process(self, progress: bool, log) -> None:
        """This process's rank, device and precision; settings the machine cannot run refused."""
        t = self.cfg.train
        self.dist = distributed.init(select_device(t.device).type)
        self.main = self.dist.is_main
        self.log = log if self.main else (lambda *a, **k: None)
        self.progress = progress_enabled(progress) and self.main
        self.device = select_device(t.device, self.dist.local_rank)
        self.precision = resolve_precision(t.precision, self.device)
        if t.sync_bn and self.device.type != "cuda":
            raise ConfigError("train.sync_bn needs CUDA: torch has no SyncBatchNorm on the CPU")
        world = self.dist.world_size
        if t.batch % (world * t.accumulate):
            raise ConfigError(f"train.batch={t.batch} must divide by world size ({world}) × "
                              f"train.accumulate ({t.accumulate})")
        self.dtype = self.precision.dtype

    def _build_data(self) -> None:
        cfg = self.cfg
        # the main rank converts (or re-converts a changed tree) first; the others then find
        # the cache current: no two ranks write or delete the same cache folder at once
        if not self.main:
            distributed.barrier()
        self.data_root = resolve_dataset(cfg.data.path, cfg.data.max_side, cfg.data.quality,
                                         self.log)
        if self.main:
            distributed.barrier()
        self.train_loader, self.val_loader = make_loaders(
            cfg, self.data_root, self.device, self.dtype, self.dist.rank, self.dist.world_size)
        self.num_classes = self.train_loader.num_classes
        self.steps_per_epoch = len(self.train_loader)
        if self.val_loader is None:
            self.log(f"no validation split in {self.data_root} (it has only "
                     f"{cfg.data.train_split!r}): training without evaluation")

    def _build_model(self) -> None:
        """The model, what the step calls, the EMA, the teacher and the losses."""
        cfg, t = self.cfg, self.cfg.train
        model = build_model(cfg, self.num_classes, self.log)
        if t.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.model = place_model(model, self.device, t.channels_last)
        self.wrapped = wrap_model(self.model, self.device, self.dist.enabled, t)
        # our EMA, not AveragedModel: no blocking copy of its update count per step
        self.ema = ExponentialMovingAverage(self.model, t.ema_decay) if t.ema_decay else None
        self.teacher = None
        self.criterion = SoftTargetCrossEntropy(self.num_classes, t.label_smoothing)
        if cfg.teacher.checkpoint:
            self.teacher = place_model(build_teacher(cfg, self.num_classes), self.device,
                                       t.channels_last)
            self.criterion = DistillationLoss(self.criterion, cfg.teacher.temperature,
                                              cfg.teacher.weight)
        self.eval_criterion = SoftTargetCrossEntropy(self.num_classes)

    def _build_optimization(self) -> None:
        """The optimizer at the scaled peak LR, the loss scaler, autocast and the schedule."""
        cfg, o = self.cfg, self.cfg.optim
        self.peak_lr = scaled_lr(o.lr, cfg.train.batch, o.lr_scaling)
        self.optimizer = build_optimizer(self.model, o.name, self.peak_lr, o.momentum,
                                         o.nesterov, o.weight_decay, o.no_bias_decay, o.final_lr,
                                         o.gamma, o.betas, o.eps, o.fused)
        self.scaler = self.precision.grad_scaler()
        note = fp16_sync_note(self.optimizer, o.name) if self.scaler.is_enabled() else None
        if note:
            self.log(note)
        self.autocast = self.precision.autocast()
        s = cfg.schedule
        self.schedule = schedule_args(s.name, s.warmup_epochs, s.step_epochs, s.step_gamma,
                                      self.peak_lr, self.steps_per_epoch, cfg.train.epochs)
        self.total_steps = self.schedule["total"]

    def _open_run(self, state: dict | None) -> None:
        """The run folder (a new one, or the resumed run's, restored to its checkpoint), its
        config and environment, its files and the observer."""
        t = self.cfg.train
        self.run_dir = Path(state["path"]).parent if state else None
        if state is not None:
            self._restore(state)
        elif self.main:
            self.run_dir = make_run_dir(t.out, t.name)
        if self.main:
            atomic.write_text(self.run_dir / "config.yaml", dump_config(self.cfg))
            atomic.write_text(self.run_dir / "env.json", json.dumps(
                {**environment(self.device, t.seed, str(self.data_root)),
                 "world_size": self.dist.world_size}, indent=1))
        self.checkpoint_path = self.run_dir / "checkpoint.pt" if self.run_dir else None
        self.metrics_path = self.run_dir / "metrics.jsonl" if self.run_dir else None
        self.log_path = self.run_dir / "train_log.jsonl" if self.run_dir else None
        if state is not None and self.main:
            truncate_logs(self.metrics_path, self.log_path, self.epoch, state["step"])
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

    def _sums_so_far(self) -> dict | None:
        """Mid-epoch: this epoch's sums so far, over all ranks (a collective: every rank calls
        it), so a resumed epoch reports the same metrics as an uninterrupted one."""
        if self._meter is None or self.position >= self.steps_per_epoch:
            return None
        return self._meter.sums_so_far(self.epoch)

    def save(self) -> None:
        """Rank 0 writes the checkpoint, never one that holds a non-finite step."""
        self._check_finite()
        sums = self._sums_so_far()
        if self.main:
            # "epoch_accumulators": the key checkpoints have always held these sums under
            save_checkpoint(self.checkpoint_path, {**self._state(), "epoch_accumulators": sums})

    def _check_finite(self, bad: float | None = None) -> None:
        """Raise if a step's loss was not finite; ``bad``: ``_first_bad`` already read back."""
        bad = float(self._first_bad) if bad is None else bad
        if math.isfinite(bad):
            last = f"last good checkpoint: {self.checkpoint_path}" \
                if self.checkpoint_path and self.checkpoint_path.exists() else "no checkpoint yet"
            raise UserError(f"the loss became NaN or infinite at iteration {int(bad)}; {last}")

    def _restore(self, state: dict) -> None:
        """Continue from ``state`` (``resume.py``: what is restored, and what is refused)."""
        check_resumable(state, resume_key(self.cfg, self.train_loader), self.data_root)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best_top1 = state.get("best_top1", 0.0)
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        sums = state.get("epoch_accumulators")
        if sums is not None and sums["epoch"] == self.epoch and self.position > 0:
            self._resumed_sums = sums
        set_rng_state(state["rng"])
        # epochs and batches counted from 1, as in the log and metrics.jsonl
        self.log(f"resumed from {state['path']} in epoch {self.epoch + 1} after batch "
                 f"{self.position} of {self.steps_per_epoch} (iteration {self.step})")

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
        cfg, loader, t = self.cfg, self.train_loader, self.cfg.train
        self.wrapped.train()
        size = progressive_size(cfg.data.progressive, self.epoch, cfg.data.image_size)
        loader.set_image_size(size)
        loader.set_epoch(self.epoch, self.position)
        loader.set_mix(self.epoch < t.epochs - cfg.mix.off_last_epochs)
        meter = self._meter = EpochMeter(loader, self.device, self._resumed_sums, self.main)
        self._resumed_sums = None
        fallbacks0 = loader.fallbacks
        bar = tqdm(total=self.steps_per_epoch, initial=self.position, leave=False,
                   desc=f"epoch {self.epoch + 1}/{t.epochs} ({size}px)", unit="it",
                   disable=not self.progress, mininterval=1.0)
        with bar:  # closed (its line cleared) also when a stop leaves the loop
            for images, targets in loader:
                self._train_step(images, targets, meter)
                bar.update()
                if self.step % t.log_every == 0:
                    self._log_window(meter, bar)
                    if self._stop_requested():
                        self._stop()
                elif not self.dist.enabled and self._signal is not None:
                    self._stop()
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 \
                        and self.position < self.steps_per_epoch:
                    self.save()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - meter.t0
        self._meter = None
        self._check_finite()
        loss_total, seen_all, correct_all, labelled_all = meter.totals()
        record = {"epoch": self.epoch + 1, "step": self.step, "lr": self.lr(self.step),
                  "image_size": size, "train_loss": loss_total / max(seen_all, 1),
                  "train_top1": correct_all / labelled_all if labelled_all else None,
                  "images_per_s": seen_all / elapsed,
                  "data_wait": meter.waited() / elapsed, "epoch_time_s": elapsed}
        return {**record, **self._data_faults(loader, fallbacks0)}

    def _train_step(self, images, targets, meter: EpochMeter) -> None:
        """One iteration: its LR, the step, the EMA, the position and the sums."""
        if self.step == 0:
            self.observer.first_batch(images, targets, self.train_loader, self.step)
        self.step += 1
        lr = self.lr(self.step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        loss, logits = train_step(self.wrapped, images, targets, self.criterion, self.optimizer,
                                  self.scaler, self.autocast, self.cfg.train.accumulate,
                                  self.teacher)
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.position = self.train_loader.position
        self._first_bad = torch.minimum(self._first_bad, torch.where(
            torch.isfinite(loss), math.inf, float(self.step)))
        meter.add(loss, logits, targets)

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

    def _log_window(self, meter: EpochMeter, bar) -> None:
        """The one host sync every ``log_every`` steps: the window's loss and the first
        non-finite step, read back together; the window then starts again."""
        total, bad = torch.stack([distributed.all_reduce_sum(meter.window.clone()),
                                  self._first_bad]).tolist()
        mean = total / (meter.in_window * self.dist.world_size)
        meter.reset_window()
        self._check_finite(bad)
        lr = self.lr(self.step)
        if self.main:
            atomic.append_line(self.log_path, json.dumps(
                {"step": self.step, "epoch": self.epoch + 1, "lr": lr, "loss": mean}))
        elapsed = time.perf_counter() - meter.t0
        img_s = meter.seen * self.dist.world_size / elapsed
        wait = meter.waited() / elapsed
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
