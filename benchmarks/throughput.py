"""Training throughput, as in the paper's Table 3: baseline (batch 256, FP32) against efficient
(batch 1024, FP16 + channels-last, linear-scaled LR with warmup), per model, with synthetic
input on the device and, with ``--data``, fed by a real engine.

Every timed step is the trainer's own ``train_step`` (same loss, optimizer, scaler, autocast).
Each configuration warms up (absorbing cuDNN autotuning and compilation), then runs several
windows of steps between device synchronizations; images/s per window are kept, the median is
reported. Results: JSON (raw windows), a Markdown table and a PNG bar chart under
``benchmarks/results/<device>/``.

``--stack`` adds the mode ``efficient-stack``: efficient with the trick stack of the efficient
recipe's augment and mix stages on the device (colour jitter, PCA lighting, random erasing,
mixup), for every input (synthetic uint8 batches go through the same stages).

Both modes let cuDNN pick its algorithms (``cudnn.benchmark``), as the trainer does; the
efficient mode also steps a fused SGD (with a gradient scaler, the fused step reads the
inf/NaN flag on the device: no host sync per step).

    tricks bench train                                   # the five models of Table 3
    tricks bench train --models resnet50d --data /data/imagenet-rec --compile
"""
from __future__ import annotations

import argparse
import gc
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from tricks.errors import exit_on_user_error
from tricks.models import create_model, default_input_size
from tricks.pipeline import Engine, Loader, Output
from tricks.pipeline.augment import ColorJitter, Lighting, RandomErasing
from tricks.pipeline.mix import Mixup
from tricks.pipeline.records import read_classes
from tricks.pipeline.sampling import keyed_generator
from tricks.pipeline.stages import Stages
from tricks.train.loss import SoftTargetCrossEntropy
from tricks.train.optim import build_optimizer
from tricks.train.schedule import lr_at, scaled_lr
from tricks.train.trainer import DTYPES, train_step

from .report import render
from .results import (IMAGENET_TRAIN, OUT_HELP, Timer, entry, parse_models, resolve_device,
                      write_results)

DEFAULT_MODELS = "resnet50,resnet50d,inception_v3,mobilenet_v1,resnet18"
# optional efficient variants → torch.compile mode (reduce-overhead replays CUDA graphs)
COMPILE_MODES = {"efficient-compile": "default", "efficient-graphs": "reduce-overhead"}


def trick_stack() -> tuple[list, Mixup]:
    """The augment ops and the mix op of ``efficient-stack``."""
    return [ColorJitter(), Lighting(), RandomErasing()], Mixup(0.2)


def _precision(name: str, device: torch.device) -> str:
    # FP16 autocast needs CUDA; the efficient mode falls back to BF16 on the CPU (stated)
    return "bf16" if name == "fp16" and device.type != "cuda" else name


def _engine(args, name: str) -> Engine:
    options = {"decode": args.decode} if name == "native" else {}
    return Engine(name, workers=args.workers, **options)


class Feed:
    """Endless (images, labels): one synthetic batch on the device, or a real engine's batches
    epoch after epoch; ``wait_time`` is the time spent blocked on the engine."""

    def __init__(self, args, device, dtype, channels_last, batch, size, stack=False):
        self.loader, self.stages, self.n = None, None, 0
        augment, mix = trick_stack() if stack else ([], None)
        if args.input == "synthetic":
            g = torch.Generator(device).manual_seed(0)
            labels = torch.randint(0, 1000, (batch,), device=device, generator=g)
            if stack:  # uint8 engine output, through the stages every step
                x = torch.randint(0, 256, (batch, 3, size, size), device=device, generator=g,
                                  dtype=torch.uint8)
                self.stages = Stages(dtype, 1000, augment, mix, channels_last=channels_last)
            else:
                x = torch.randn(batch, 3, size, size, device=device, generator=g).to(dtype)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            self.batch = x, labels
        else:
            self.loader = Loader(args.data, "train", batch, image_size=size, device=device,
                                 output=Output(dtype, channels_last),
                                 engine=_engine(args, args.input), augment=augment, mix=mix)
            self.epoch, self.it = 0, iter(self.loader)

    @property
    def wait_time(self) -> float:
        return self.loader.wait_time if self.loader else 0.0

    def __next__(self):
        if self.loader is None:
            if self.stages is not None:
                self.n += 1
                return self.stages(*self.batch, keyed_generator(0, self.n, "bench"))
            return self.batch
        try:
            return next(self.it)
        except StopIteration:
            self.epoch += 1
            self.loader.set_epoch(self.epoch)
            self.it = iter(self.loader)
            return next(self.it)

    def close(self):
        if self.loader is not None:
            self.loader.close()


def run_config(args, model_name: str, mode: str, batch: int, device: torch.device) -> dict:
    precision = _precision("fp32" if mode == "baseline" else
                           ("bf16" if mode == "efficient-bf16" else "fp16"), device)
    channels_last = mode != "baseline"
    compile_mode = COMPILE_MODES.get(mode)
    size = args.size or default_input_size(model_name)
    dtype = DTYPES[precision]
    # mixed targets are N × the dataset's classes: the model's head matches them
    classes = 1000 if args.input == "synthetic" else len(read_classes(Path(args.data)))
    model = create_model(model_name, num_classes=classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    net = torch.compile(model, mode=compile_mode) if compile_mode else model
    peak = scaled_lr(0.1, batch)
    fused = mode != "baseline"  # the baseline keeps torch's default (foreach) update
    opt = build_optimizer(model, "sgd", peak, weight_decay=1e-4,
                          no_bias_decay=mode != "baseline", fused=fused)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = torch.autocast(device.type, dtype=dtype) if precision != "fp32" else nullcontext()
    criterion = SoftTargetCrossEntropy(classes)
    warmup_steps = 5 * 100 if mode != "baseline" else 0  # a warmup, as the recipe has
    data = Feed(args, device, dtype, channels_last, batch, size, stack=mode == "efficient-stack")
    step = 0

    def one():
        nonlocal step
        step += 1
        lr = lr_at(step, peak=peak, total=10**6, warmup=warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = next(data)
        train_step(net, x, y, criterion, opt, scaler, autocast)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    windows = []
    try:
        for _ in range(args.warmup):
            one()
        waited, timed = data.wait_time, 0.0
        for _ in range(args.windows):
            with Timer(device) as t:
                for _ in range(args.steps):
                    one()
            windows.append(batch * args.steps / t.seconds)
            timed += t.seconds
        waited = data.wait_time - waited
    finally:  # the loader's workers and threads, also after an out-of-memory error
        data.close()
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    settings = {"model": model_name, "mode": mode, "input": args.input, "batch": batch,
                "precision": precision, "channels_last": channels_last,
                "compile": compile_mode, "fused_sgd": fused, "image_size": size,
                "trick_stack": "jitter, lighting, erasing, mixup" if mode == "efficient-stack"
                else None,
                "peak_memory_mb": peak_mb, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "data_wait": waited / timed if args.input != "synthetic" else None,
                "decode": data.loader.engine.decode if args.input == "native" else None,
                "tf32": bool(torch.backends.cudnn.allow_tf32) if device.type == "cuda" else None}
    e = entry(f"{model_name} {mode} {args.input}", settings, windows)
    e["imagenet_epoch_minutes"] = IMAGENET_TRAIN / e["median"] / 60
    return e


def fit_batch(args, model_name, mode, batch, device) -> dict:
    """Run at ``batch``; on CUDA out-of-memory, halve it (the largest power of two that fits)."""
    while True:
        try:
            return run_config(args, model_name, mode, batch, device)
        except torch.cuda.OutOfMemoryError:
            if batch <= 1:
                raise
        # outside the except block: the traceback no longer holds the failed run's tensors
        gc.collect()
        torch.cuda.empty_cache()
        batch //= 2
        print(f"  {model_name} {mode}: out of memory, retrying at batch {batch}")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tricks bench train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=DEFAULT_MODELS)
    p.add_argument("--baseline-batch", type=int, default=None, help="default 256 (CPU: 8)")
    p.add_argument("--efficient-batch", type=int, default=None, help="default 1024 (CPU: 16)")
    p.add_argument("--compile", action="store_true", help="also efficient + torch.compile")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also efficient + torch.compile(mode='reduce-overhead'): CUDA graphs")
    p.add_argument("--bf16", action="store_true", help="also efficient with BF16")
    p.add_argument("--stack", action="store_true",
                   help="also efficient with jitter, lighting, erasing and mixup on")
    p.add_argument("--modes", default=None,
                   help="exactly these modes, comma-separated (baseline, efficient, "
                        "efficient-stack, efficient-compile, efficient-graphs, efficient-bf16)")
    p.add_argument("--strict-fp32", action="store_true",
                   help="no TF32 in the baseline's convolutions and matmuls")
    p.add_argument("--data", help="a converted dataset: also time the real loader(s)")
    p.add_argument("--engines", default="native", help="engines for --data, comma-separated")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--decode", default="auto", choices=("auto", "workers", "device"),
                   help="the native engine's decode (auto: device on CUDA, workers on a CPU)")
    p.add_argument("--size", type=int, default=None, help="input side (default: the model's)")
    p.add_argument("--warmup", type=int, default=None, help="steps (default 10; CPU: 1)")
    p.add_argument("--windows", type=int, default=None, help="timed windows (default 5; CPU 3)")
    p.add_argument("--steps", type=int, default=None, help="steps per window (default 10; CPU 2)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help=OUT_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    models = parse_models(args.models)
    if models is None:
        return 1
    torch.backends.cudnn.benchmark = True
    if args.strict_fp32 and cuda:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.windows = args.windows or (5 if cuda else 3)
    args.steps = args.steps or (10 if cuda else 2)
    batches = {"baseline": args.baseline_batch or (256 if cuda else 8),
               "efficient": args.efficient_batch or (1024 if cuda else 16)}
    modes = ["baseline", "efficient"] + (["efficient-stack"] if args.stack else []) + \
        (["efficient-compile"] if args.compile else []) + \
        (["efficient-graphs"] if args.cuda_graphs else []) + \
        (["efficient-bf16"] if args.bf16 else [])
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",")]
        known = ("baseline", "efficient", "efficient-stack", *COMPILE_MODES, "efficient-bf16")
        bad = [m for m in modes if m not in known]
        if bad:
            print(f"error: --modes: unknown {', '.join(bad)}; known: {', '.join(known)}",
                  file=sys.stderr)
            return 1
    inputs = ["synthetic"] + ([e.strip() for e in args.engines.split(",")] if args.data else [])
    if args.data and not Path(args.data).is_dir():
        print(f"error: no such dataset folder: {args.data}", file=sys.stderr)
        return 1
    for engine in inputs[1:]:  # a bad engine, file or a too small dataset fails now, not later
        Loader(args.data, "train", max(batches.values()), image_size=32, device=device,
               engine=_engine(args, engine)).close()
    entries = []
    for model_name in models:
        for inp in inputs:
            args.input = inp
            for mode in modes:
                e = fit_batch(args, model_name, mode,
                              batches["baseline" if mode == "baseline" else "efficient"], device)
                entries.append(e)
                s = e["settings"]
                print(f"{model_name:14s} {mode:18s} {inp:10s} batch {s['batch']:5d} "
                      f"{s['precision']}: {e['median']:9.1f} images/s "
                      f"({e['imagenet_epoch_minutes']:.1f} min per ImageNet epoch)")
                if cuda:
                    torch.cuda.empty_cache()
    settings = {"models": models, "modes": modes, "inputs": inputs, "warmup_steps": args.warmup,
                "windows": args.windows, "steps_per_window": args.steps,
                "strict_fp32": args.strict_fp32, "data": args.data}
    path = write_results("train", device, settings, entries, args.out)
    doc_summary, md, png = render(path)
    for row in doc_summary["rows"]:
        if row["ratio"] is not None:
            print(f"{row['model']} ({row['input']}): efficient / baseline = {row['ratio']:.2f}×")
    print(f"results: {path}\ntable:   {md}\nchart:   {png}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
