"""The training loop: a short step function, per-iteration LR, evaluation, checkpoints, resume."""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from models import create_model, load_torchvision_state_dict
from pipeline.errors import UserError

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import Config, ConfigError, dump_config
from .data import make_loaders, resolve_dataset
from .loss import SoftTargetCrossEntropy
from .optim import build_optimizer
from .rundir import environment, make_run_dir
from .schedule import lr_at, scaled_lr

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name}: CUDA is not available on this machine")
    return device


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a CUDA device; use fp32 (or bf16) on the CPU")


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    m = cfg.model
    try:
        model = create_model(m.name, num_classes=num_classes, cifar_stem=m.cifar_stem,
                             width=m.width, zero_init_last=m.zero_init_last, init=m.init)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None
    if m.weights:
        if not Path(m.weights).is_file():
            raise ConfigError(f"model.weights: file not found: {m.weights}")
        state = torch.load(m.weights, map_location="cpu", weights_only=False)
        if isinstance(state, dict) and "format_version" in state:
            model.load_state_dict(state["model"])
        else:
            try:
                load_torchvision_state_dict(model, state)
            except ValueError as e:
                raise ConfigError(f"model.weights={m.weights}: {e}") from None
    return model


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Correct top-k predictions, as device tensors (no host sync)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, :k].any(dim=1).sum() for k in ks]


def train_step(model, images, targets, criterion, optimizer, scaler, autocast):
    with autocast:
        logits = model(images)
        loss = criterion(logits, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach(), logits.detach()


@torch.no_grad()
def evaluate(model, loader, criterion, autocast, progress: bool = False) -> dict:
    model.eval()
    device = loader.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    c1 = torch.zeros((), device=device, dtype=torch.long)
    c5 = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    loader.set_epoch(0)
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not progress):
        with autocast:
            logits = model(images)
            loss_sum += criterion(logits, labels).double() * len(labels)
        a1, a5 = accuracy_counts(logits, labels)
        c1 += a1
        c5 += a5
        n += len(labels)
    return {"val_loss": loss_sum.item() / n, "val_top1": c1.item() / n, "val_top5": c5.item() / n,
            "val_images": n}


class Trainer:
    def __init__(self, cfg: Config, resume: str | None = None, progress: bool = True,
                 log=print):
        self.cfg, self.log, self.progress = cfg, log, progress
        state = load_checkpoint(resume) if resume else None
        self.device = select_device(cfg.train.device)
        check_precision(cfg.train.precision, self.device)
        torch.manual_seed(cfg.train.seed)
        self.dtype = DTYPES[cfg.train.precision]

        self.data_root = resolve_dataset(cfg.data.path, cfg.data.max_side, cfg.data.quality, log)
        self.train_loader, self.val_loader = make_loaders(cfg, self.data_root, self.device,
                                                          self.dtype)
        self.num_classes = self.train_loader.num_classes
        model = build_model(cfg, self.num_classes).to(self.device)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.criterion = SoftTargetCrossEntropy(self.num_classes, cfg.train.label_smoothing)
        self.eval_criterion = SoftTargetCrossEntropy(self.num_classes)
        o = cfg.optim
        self.peak_lr = scaled_lr(o.lr, cfg.train.batch, o.lr_scaling)
        self.optimizer = build_optimizer(model, o.name, self.peak_lr, o.momentum, o.nesterov,
                                         o.weight_decay, o.no_bias_decay)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=cfg.train.precision == "fp16")
        self.autocast = (torch.autocast(self.device.type, dtype=self.dtype)
                         if cfg.train.precision != "fp32" else nullcontext())
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = self.steps_per_epoch * cfg.train.epochs
        self.warmup_steps = round(cfg.schedule.warmup_epochs * self.steps_per_epoch)
        self.milestones = [e * self.steps_per_epoch for e in cfg.schedule.step_epochs]
        self.step, self.epoch, self.position = 0, 0, 0
        self.best_top1 = 0.0

        if state is not None:
            self.run_dir = Path(state["path"]).parent
            self._restore(state)
        else:
            self.run_dir = make_run_dir(cfg.train.out, cfg.train.name)
        (self.run_dir / "config.yaml").write_text(dump_config(cfg))
        (self.run_dir / "env.json").write_text(json.dumps(
            environment(self.device, cfg.train.seed, str(self.data_root)), indent=1))
        self.checkpoint_path = self.run_dir / "checkpoint.pt"
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def lr(self, i: int) -> float:
        s = self.cfg.schedule
        return lr_at(i, peak=self.peak_lr, total=self.total_steps, warmup=self.warmup_steps,
                     kind=s.name, milestones=self.milestones, gamma=s.step_gamma)

    # --- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict:
        return {"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "step": self.step, "epoch": self.epoch, "position": self.position,
                "best_top1": self.best_top1, "rng": rng_state(), "classes":
                self.train_loader.classes}

    def save(self) -> None:
        save_checkpoint(self.checkpoint_path, self._state())

    def _restore(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
        self.best_top1 = state.get("best_top1", 0.0)
        if self.position >= self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        set_rng_state(state["rng"])
        self.log(f"resumed from {state['path']} at epoch {self.epoch}, batch {self.position} "
                 f"(iteration {self.step})")

    # --- the loop ------------------------------------------------------------------------------
    def fit(self) -> dict:
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
                self.best_top1 = max(self.best_top1, record["val_top1"])
                self.log(f"epoch {self.epoch + 1}/{cfg.train.epochs}: "
                         f"val top-1 {100 * record['val_top1']:.2f}%, "
                         f"top-5 {100 * record['val_top5']:.2f}%, "
                         f"train loss {record['train_loss']:.4f}, "
                         f"{record['images_per_s']:.0f} img/s, "
                         f"data wait {100 * record['data_wait']:.0f}%")
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.position = self.steps_per_epoch
            self.save()
            self.epoch, self.position = self.epoch + 1, 0
            last = record
        return last

    def train_epoch(self) -> dict:
        cfg, loader, model = self.cfg, self.train_loader, self.model
        model.train()
        loader.set_epoch(self.epoch, self.position)
        loader.set_mix(self.epoch < cfg.train.epochs - cfg.mix.off_last_epochs)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = labelled = 0
        wait0, t0 = loader.wait_time, time.perf_counter()
        bar = tqdm(total=self.steps_per_epoch, initial=self.position, leave=False,
                   desc=f"epoch {self.epoch + 1}/{cfg.train.epochs}", unit="it",
                   disable=not self.progress, mininterval=1.0)
        for images, targets in loader:
            self.step += 1
            lr = self.lr(self.step)
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            loss, logits = train_step(model, images, targets, self.criterion, self.optimizer,
                                      self.scaler, self.autocast)
            self.position = loader.position
            loss_sum += loss.double() * len(images)
            seen += len(images)
            if targets.ndim == 1:
                correct += accuracy_counts(logits, targets, ks=(1,))[0]
                labelled += len(images)
            bar.update()
            if self.step % cfg.train.log_every == 0:
                mean_loss = loss_sum.item() / seen  # the one host sync, every log_every steps
                if not math.isfinite(mean_loss):
                    raise UserError(f"loss became {mean_loss} at iteration {self.step}; "
                                    f"last good checkpoint: {self.checkpoint_path}")
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.3g}",
                                img_s=f"{seen / elapsed:.0f}",
                                wait=f"{100 * (loader.wait_time - wait0) / elapsed:.0f}%")
            if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0 \
                    and self.position < self.steps_per_epoch:
                self.save()
        bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - t0
        return {"epoch": self.epoch + 1, "step": self.step, "lr": self.lr(self.step),
                "train_loss": loss_sum.item() / max(seen, 1),
                "train_top1": correct.item() / labelled if labelled else None,
                "images_per_s": seen / elapsed, "data_wait": (loader.wait_time - wait0) / elapsed,
                "epoch_time_s": elapsed}

    def close(self) -> None:
        self.train_loader.close()
        if self.val_loader is not None:
            self.val_loader.close()
