"""The builders every entry point shares (``tricks train``, ``tricks eval``, ``tricks bench
train``): the device, the precision with its autocast and gradient scaler, and the model with its
weights or a distillation teacher.

Precision policy: FP16 runs only on CUDA (autocast in FP16 and a ``GradScaler``, as torch's AMP
recipe for CUDA); asking for it on another device is a one-line ``ConfigError`` naming the
option, never a silent change of precision. BF16 and FP32 run on any device. A benchmark mode
that means "the device's half precision" asks ``half_precision(device)`` first (FP16 on CUDA,
BF16 elsewhere) and says the result in its output.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tricks.errors import ConfigError
from tricks.models import create_model, load_torchvision_state_dict
from tricks.models.torchvision_weights import load_weights

from .checkpoint import read_state_dict
from .compiler import require_compiler
from .config import Config

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Precision:
    """A resolved precision: ``name`` (fp32, fp16, bf16), the ``dtype`` of the loader's output
    and of autocast, and the device type they run on. Build with ``resolve_precision``."""

    name: str
    dtype: torch.dtype
    device_type: str

    def autocast(self):
        """The forward pass's context: ``torch.autocast`` in ``dtype`` (fp16, bf16) or nothing
        (fp32). Reusable: one object serves every step."""
        if self.name == "fp32":
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, on for FP16 only (BF16 has FP32's exponent range: no underflow to
        guard against), as ``torch.amp.GradScaler``."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")


def resolve_precision(name: str, device: torch.device, option: str = "train.precision",
                      fix: str = "use fp32 (or bf16) on the CPU") -> Precision:
    """``name`` (fp32, fp16, bf16) on ``device``, by the module's policy. ``option`` names
    where the value came from and ``fix`` what to do instead, in the error. Raises
    ``ConfigError`` (one line) for an unknown name or FP16 off CUDA."""
    if name not in DTYPES:
        raise ConfigError(f"{option}={name}: choose from {', '.join(DTYPES)}")
    if name == "fp16" and device.type != "cuda":
        raise ConfigError(f"{option}=fp16 needs a CUDA device; {fix}")
    return Precision(name, DTYPES[name], device.type)


def half_precision(device: torch.device) -> str:
    """The half precision autocast runs in on ``device``: fp16 on CUDA, bf16 elsewhere (the
    CPU's autocast is BF16 first)."""
    return "fp16" if device.type == "cuda" else "bf16"


def select_device(name: str, local_rank: int = 0) -> torch.device:
    """The device ``name`` names (``auto``: CUDA when there is one, else the CPU); a bare
    ``cuda`` is this rank's GPU, ``cuda:<local_rank>``. Raises ``ConfigError`` for CUDA on a
    machine without it."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device={name}: CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


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


def place_model(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``, in channels-last memory format when asked (NHWC: what cuDNN's
    tensor-core convolutions read without a transpose)."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def wrap_model(model: nn.Module, device: torch.device, distributed: bool, train) -> nn.Module:
    """What the training step calls: ``model`` under DDP (when ``distributed``) and/or
    ``torch.compile`` (``train.compile``, in ``train.compile_mode``), else ``model`` itself;
    ``train`` is the config's train section. Sets ``cudnn.benchmark`` from it."""
    wrapped = model
    if distributed:
        # broadcast_buffers=False: no broadcast of every BN buffer before each forward; each
        # rank's running statistics follow its own shard and ``evaluate`` averages them
        # over the ranks first (timm's distribute_bn, "reduce"). gradient_as_bucket_view:
        # the gradients are the all-reduce buckets (no copy, one gradient-sized buffer
        # less). static_graph only without accumulation: with no_sync() it crashes or stops
        # all-reducing (pytorch/pytorch#187732, huggingface/accelerate#3679).
        wrapped = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False, gradient_as_bucket_view=True,
            static_graph=train.accumulate == 1)
    torch.backends.cudnn.benchmark = train.cudnn_benchmark
    if train.compile:
        require_compiler(device.type)  # one line now, not a traceback in step 1
        wrapped = torch.compile(wrapped, mode=train.compile_mode)
    return wrapped
