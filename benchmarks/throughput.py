"""Training throughput, as in the paper's Table 3: baseline (batch 256, FP32) against efficient
(batch 1024, FP16 + channels-last, linear-scaled LR with warmup), per model, with synthetic
input on the device and, with ``--data``, fed by a real engine. Precision, autocast and loss
scaling come from ``train.build`` as for ``tricks train``; the efficient modes run the device's
half precision (``half_precision``: FP16 on CUDA, BF16 on a CPU), named in every row.

Every timed step is the trainer's own ``train_step`` (same loss, optimizer, scaler, autocast).
Each configuration warms up (absorbing cuDNN autotuning and compilation), then runs several
windows of steps between device synchronizations; images/s per window are kept, the median is
reported. Results: JSON (raw windows; rewritten after every configuration, so an interrupted
run keeps what it measured), a Markdown table and a PNG bar chart under
``benchmarks/results/<device>/``; the side-by-side table is printed at the end.

Modes: ``baseline`` (FP32 with torch's defaults: on Ampere and later cuDNN runs FP32
convolutions in TF32), ``baseline-strict`` (FP32 with TF32 off, in cuDNN and cuBLAS: the FP32 of
the paper's V100s), ``efficient``; optional ``efficient-stack`` (the trick stack of the
efficient recipe's augment and mix stages on the device: colour jitter, PCA lighting, random
erasing, mixup), ``efficient-compile``, ``efficient-graphs`` (CUDA graphs), ``efficient-bf16``.

Data-fed windows never contain an engine restart: a window starts only where the rest of the
epoch holds all its steps, else a new epoch begins and a few untimed steps refill the engine's
queue first (the JSON records batches per epoch and each window's epoch). An ImageNet epoch at
batch 1,024 has 1,251 batches, so its one restart is noise; a small benchmark set's would not be.

Both modes let cuDNN pick its algorithms (``cudnn.benchmark``), as the trainer does; the
efficient mode also steps a fused SGD (with a gradient scaler, the fused step reads the
inf/NaN flag on the device: no host sync per step).

    tricks bench train                                   # the five models of Table 3
    tricks bench train --models resnet50d --data /data/imagenet-rec --compile
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

from tricks.errors import exit_on_user_error
from tricks.models import create_model, default_input_size
from tricks.pipeline import Engine, Loader, Output
from tricks.pipeline.records import read_classes
from tricks.pipeline.sampling import keyed_generator
from tricks.pipeline.stages import Stages
from tricks.train.build import half_precision, place_model, resolve_precision
from tricks.train.compiler import missing_compiler
from tricks.train.loss import SoftTargetCrossEntropy
from tricks.train.optim import build_optimizer
from tricks.train.schedule import lr_at, scaled_lr
from tricks.train.trainer import train_step

from .report import render
from .stack import trick_stack
from .results import (IMAGENET_TRAIN, OUT_HELP, Timer, entry, parse_models, resolve_device,
                      write_results)

DEFAULT_MODELS = "resnet50,resnet50d,inception_v3,mobilenet_v1,resnet18"
DEFAULT_MODES = ("baseline", "baseline-strict", "efficient")
# optional efficient variants → torch.compile mode (reduce-overhead replays CUDA graphs)
COMPILE_MODES = {"efficient-compile": "default", "efficient-graphs": "reduce-overhead"}
MODES = (*DEFAULT_MODES, "efficient-stack", *COMPILE_MODES, "efficient-bf16")
REFILL_STEPS = 2  # untimed steps after an engine restart, before a window may start


@contextmanager
def fp32_precision(strict: bool):
    """TF32 off in cuDNN's convolutions and cuBLAS's matmuls (``strict``), or torch's defaults
    (cuDNN on, cuBLAS off), for the configuration inside; the settings before are put back."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    if strict:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _engine(args, name: str) -> Engine:
    options = {"decode": args.decode} if name == "native" else {}
    return Engine(name, workers=args.workers, **options)


class Feed:
    """Endless (images, labels): one synthetic batch on the device, or a real engine's batches
    epoch after epoch; ``wait_time`` is the time spent blocked on the engine. For an engine,
    ``ready_for(steps)`` makes sure the current epoch still holds ``steps`` batches (else it
    starts the next epoch and takes ``REFILL_STEPS`` untimed steps through ``step``), so a timed
    window never contains a restart."""

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
            self.batches_per_epoch = len(self.loader)
            self.epoch, self.left, self.it = 0, self.batches_per_epoch, iter(self.loader)

    @property
    def wait_time(self) -> float:
        return self.loader.wait_time if self.loader else 0.0

    def __next__(self):
        if self.loader is None:
            if self.stages is not None:
                self.n += 1
                return self.stages(*self.batch, keyed_generator(0, self.n, "bench"))
            return self.batch
        if self.left == 0:
            self._restart()
        self.left -= 1
        return next(self.it)

    def _restart(self):
        self.epoch += 1
        self.loader.set_epoch(self.epoch)
        self.it, self.left = iter(self.loader), self.batches_per_epoch

    def ready_for(self, steps: int, step) -> None:
        if self.loader is None or self.left >= steps:
            return
        self._restart()
        for _ in range(REFILL_STEPS):
            step()

    def close(self):
        if self.loader is not None:
            self.loader.close()


def run_config(args, model_name: str, mode: str, batch: int, device: torch.device) -> dict:
    """One configuration, TF32 off for ``baseline-strict`` and as torch's defaults otherwise."""
    with fp32_precision(strict=mode == "baseline-strict"):
        return _run_config(args, model_name, mode, batch, device)


def _run_config(args, model_name: str, mode: str, batch: int, device: torch.device) -> dict:
    baseline = mode.startswith("baseline")
    # the efficient modes run the device's half precision: FP16 on CUDA, BF16 elsewhere
    # (train.build's policy; the precision is in every row and the JSON)
    precision = resolve_precision("fp32" if baseline else "bf16" if mode == "efficient-bf16"
                                  else half_precision(device), device, f"mode {mode}")
    channels_last = not baseline
    compile_mode = COMPILE_MODES.get(mode)
    size = args.size or default_input_size(model_name)
    dtype = precision.dtype
    # mixed targets are N × the dataset's classes: the model's head matches them
    classes = 1000 if args.input == "synthetic" else len(read_classes(Path(args.data)))
    model = place_model(create_model(model_name, num_classes=classes), device, channels_last)
    net = torch.compile(model, mode=compile_mode) if compile_mode else model
    peak = scaled_lr(0.1, batch)
    fused = not baseline  # the baseline keeps torch's default (foreach) update
    opt = build_optimizer(model, "sgd", peak, weight_decay=1e-4, no_bias_decay=not baseline,
                          fused=fused)
    scaler, autocast = precision.grad_scaler(), precision.autocast()
    criterion = SoftTargetCrossEntropy(classes)
    warmup_steps = 0 if baseline else 5 * 100  # a warmup, as the recipe has
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
    windows, window_epochs, waited, timed = [], [], 0.0, 0.0
    try:
        for _ in range(args.warmup):
            one()
        for _ in range(args.windows):
            data.ready_for(args.steps, one)
            w0 = data.wait_time
            with Timer(device) as t:
                for _ in range(args.steps):
                    one()
            windows.append(batch * args.steps / t.seconds)
            window_epochs.append(data.epoch if data.loader is not None else None)
            timed += t.seconds
            waited += data.wait_time - w0
    finally:  # the loader's workers and threads, also after an out-of-memory error
        data.close()
    peak_mb = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    settings = {"model": model_name, "mode": mode, "input": args.input, "batch": batch,
                "precision": precision.name, "channels_last": channels_last,
                "compile": compile_mode, "fused_sgd": fused, "image_size": size,
                "trick_stack": "jitter, lighting, erasing, mixup" if mode == "efficient-stack"
                else None,
                "peak_memory_mb": peak_mb, "cudnn_benchmark": torch.backends.cudnn.benchmark,
                "data_wait": waited / timed if args.input != "synthetic" else None,
                "decode": data.loader.engine.decode if args.input == "native" else None,
                "batches_per_epoch": data.batches_per_epoch if data.loader else None,
                "refill_steps": REFILL_STEPS if data.loader else None,
                "window_epochs": window_epochs if data.loader else None,
                "tf32": ({"cudnn": torch.backends.cudnn.allow_tf32,
                          "matmul": torch.backends.cuda.matmul.allow_tf32}
                         if device.type == "cuda" else None)}
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
                   help=f"exactly these modes, comma-separated (default {','.join(DEFAULT_MODES)}"
                        f"; known: {', '.join(MODES)})")
    p.add_argument("--data", help="a converted dataset: also time the real loader(s)")
    p.add_argument("--engines", default="native", help="engines for --data, comma-separated")
    p.add_argument("--synthetic-from", metavar="JSON",
                   help="with --data: take the synthetic-input rows (the reference of the data-fed "
                        "ones) from this earlier results file of the same device instead of "
                        "measuring them again")
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


def table3(summary: dict, device: str, torch_version: str) -> list[str]:
    """The paper's Table 3 as printed at the end: per model and input, images/s of the baseline
    (FP32 as torch runs it), of strict FP32 (TF32 off) and of the efficient mode, and the
    efficient mode's speed-up over each ("—" where a mode was not run)."""
    def rate(v):
        return "—" if v is None else f"{v:,.1f}" if v < 100 else f"{v:,.0f}"

    def ratio(a, b):
        return "—" if a is None or b is None else f"{a / b:.2f}×"

    rows = summary["rows"]
    base_b = next((r["baseline_batch"] for r in rows if r["baseline_batch"]), None)
    eff = next((r for r in rows if r["efficient_batch"]), None)
    head = ["model", "input", f"baseline FP32 (batch {base_b or '—'})", "strict FP32 (no TF32)",
            f"efficient {eff['efficient_precision'].upper() if eff else ''} (batch "
            f"{eff['efficient_batch'] if eff else '—'})", "efficient / baseline",
            "efficient / strict FP32"]
    body = [[r["model"], r["input"], rate(r["baseline"]),
             rate(r["extra"].get("baseline-strict")), rate(r["efficient"]),
             ratio(r["efficient"], r["baseline"]),
             ratio(r["efficient"], r["extra"].get("baseline-strict"))] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))
    return [f"Table 3 (He et al. 2018): training images/s on {device}, torch {torch_version}",
            line(head), line(["-" * w for w in widths]), *map(line, body),
            "The paper's efficient / baseline: 3.0× (ResNet-50, 8 V100s, whose FP32 has no TF32)."]


def _reused_synthetic(path: str, models: list[str], device_name: str) -> list[dict]:
    """The synthetic-input entries of an earlier ``bench train`` results file, for ``models``;
    refused (ValueError, one line) when that file is another device's."""
    doc = json.loads(Path(path).read_text())
    if doc.get("benchmark") != "train" or doc.get("device") != device_name:
        raise ValueError(f"--synthetic-from {path}: a {doc.get('benchmark')} result from "
                         f"{doc.get('device')}, not a train result from {device_name}")
    return [{**e, "settings": {**e["settings"], "reused_from": str(path)}}
            for e in doc["results"]
            if e["settings"]["input"] == "synthetic" and e["settings"]["model"] in models]


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    models = parse_models(args.models)
    if models is None:
        return 1
    torch.backends.cudnn.benchmark = True
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.windows = args.windows or (5 if cuda else 3)
    args.steps = args.steps or (10 if cuda else 2)
    batches = {"baseline": args.baseline_batch or (256 if cuda else 8),
               "efficient": args.efficient_batch or (1024 if cuda else 16)}
    modes = list(DEFAULT_MODES) + (["efficient-stack"] if args.stack else []) + \
        (["efficient-compile"] if args.compile else []) + \
        (["efficient-graphs"] if args.cuda_graphs else []) + \
        (["efficient-bf16"] if args.bf16 else [])
    if args.modes:
        modes = [m.strip() for m in args.modes.split(",")]
        bad = [m for m in modes if m not in MODES]
        if bad:
            print(f"error: --modes: unknown {', '.join(bad)}; known: {', '.join(MODES)}",
                  file=sys.stderr)
            return 1
    why = missing_compiler(device.type) if set(modes) & set(COMPILE_MODES) else None
    if why:
        print(f"error: {', '.join(m for m in modes if m in COMPILE_MODES)}: {why}",
              file=sys.stderr)
        return 1
    inputs = ["synthetic"] + ([e.strip() for e in args.engines.split(",")] if args.data else [])
    if args.data and not Path(args.data).is_dir():
        print(f"error: no such dataset folder: {args.data}", file=sys.stderr)
        return 1
    if args.synthetic_from and not args.data:
        print("error: --synthetic-from is for data-fed runs (--data)", file=sys.stderr)
        return 1
    for engine in inputs[1:]:  # a bad engine, file or a too small dataset fails now, not later
        loader = Loader(args.data, "train", max(batches.values()), image_size=32,
                        device=device, engine=_engine(args, engine))
        per_epoch = len(loader)
        loader.close()
        if per_epoch < args.steps + REFILL_STEPS:
            print(f"error: {args.data}: {per_epoch} batches an epoch at batch "
                  f"{max(batches.values())}; a timed window of {args.steps} steps after "
                  f"{REFILL_STEPS} to refill the engine must fit in one epoch (fewer --steps, "
                  "or more images)", file=sys.stderr)
            return 1
    entries = []
    if args.synthetic_from:
        from tricks.train.rundir import device_name
        try:
            entries = _reused_synthetic(args.synthetic_from, models, device_name(device))
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        inputs = inputs[1:]
    settings = {"models": models, "modes": modes, "inputs": inputs, "warmup_steps": args.warmup,
                "windows": args.windows, "steps_per_window": args.steps,
                "refill_steps": REFILL_STEPS, "data": args.data,
                "synthetic_from": args.synthetic_from}
    path = None
    for model_name in models:
        for inp in inputs:
            args.input = inp
            for mode in modes:
                e = fit_batch(args, model_name, mode,
                              batches["baseline" if mode.startswith("baseline") else "efficient"],
                              device)
                entries.append(e)
                s = e["settings"]
                print(f"{model_name:14s} {mode:18s} {inp:10s} batch {s['batch']:5d} "
                      f"{s['precision']}: {e['median']:9.1f} images/s "
                      f"({e['imagenet_epoch_minutes']:.1f} min per ImageNet epoch)", flush=True)
                # written after every configuration: a kill or a timeout keeps what was measured
                path = write_results("train", device, settings, entries, args.out)
                if cuda:
                    torch.cuda.empty_cache()
    doc = json.loads(path.read_text())
    summary, md, png = render(path)
    print()
    print("\n".join(table3(summary, doc["device"], doc["versions"]["torch"])))
    print(f"\nresults: {path}\ntable:   {md}\nchart:   {png}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
