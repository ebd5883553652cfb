"""Cost of the augment and mix ops beside one training step, on the same device and batch.

Each op, and the full stack (jitter → lighting → erasing → normalize → mixup, as the augment
and mix stages run it), is timed per batch, beside one ResNet-50-D training step (channels-last,
FP16 autocast with a gradient scaler on CUDA). Median of several timed windows after warm-up.

    python -m tricks.benchmarks.augment                 # CUDA: batch 256 × 224², fp16
    python -m tricks.benchmarks.augment --batch 16      # the CPU default is small
"""
from __future__ import annotations

import argparse
import sys

import torch

from tricks.errors import exit_on_user_error
from tricks.models import create_model
from tricks.pipeline.augment import ColorJitter, Cutout, Lighting, RandomErasing
from tricks.pipeline.autoaugment import BatchAutoAugment
from tricks.pipeline.mix import CutMix, Mixup, Ricap
from tricks.pipeline.sampling import keyed_generator
from tricks.pipeline.stages import Stages

from tricks.train.build import place_model, resolve_precision

from .results import OUT_HELP, Timer, entry, resolve_device, write_results


def _time(fn, device, warmup: int, runs: int, iters: int) -> list[float]:
    """Milliseconds per call, one value per timed window."""
    for _ in range(warmup):
        fn()
    windows = []
    for _ in range(runs):
        with Timer(device) as t:
            for _ in range(iters):
                fn()
        windows.append(1000 * t.seconds / iters)
    return windows


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tricks bench augment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=None, help="default: 256 on CUDA, 16 on the CPU")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--dtype", default="auto", help="auto: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--device", default="auto")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--iters", type=int, default=None, help="calls per window (default 10/2)")
    p.add_argument("--no-train-step", action="store_true", help="skip the ResNet-50-D step")
    p.add_argument("--out", help=OUT_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    # auto: FP16 on CUDA, FP32 on the CPU; the policy (FP16 needs CUDA) is train.build's
    precision = resolve_precision(("fp16" if cuda else "fp32") if args.dtype == "auto"
                                  else args.dtype, device, "--dtype")
    dtype = precision.dtype
    batch = args.batch or (256 if cuda else 16)
    iters = args.iters or (10 if cuda else 2)
    n_classes = 1000
    gen_images = torch.Generator(device).manual_seed(0)
    u8 = torch.randint(0, 256, (batch, 3, args.size, args.size), device=device,
                       dtype=torch.uint8, generator=gen_images)
    u8 = u8.contiguous(memory_format=torch.channels_last)
    x01 = (u8.to(dtype) / 255).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, n_classes, (batch,), device=device)
    key = iter(range(10**9))
    gen = lambda: keyed_generator("bench", next(key))  # noqa: E731

    ops = {"jitter": ColorJitter(), "jitter+hue": ColorJitter(hue=0.1), "lighting": Lighting(),
           "cutout": Cutout(1, 16), "erasing": RandomErasing(p=0.5),
           "autoaugment": BatchAutoAugment()}
    mixes = {"mixup": Mixup(), "cutmix": CutMix(), "ricap": Ricap()}
    entries = []
    timing = dict(warmup=2, runs=args.runs, iters=iters)

    def report(name, windows, settings):
        entries.append(entry(name, settings, windows, unit="ms/batch"))
        e = entries[-1]
        print(f"{name:24s} {e['median']:9.2f} ms/batch  {batch / e['median'] * 1000:12.0f} img/s")

    for name, op in ops.items():
        report(name, _time(lambda: op(x01, gen()), device, **timing), {"kind": "augment"})
    for name, op in mixes.items():
        report(name, _time(lambda: op(x01, labels, n_classes, gen()), device, **timing),
               {"kind": "mix"})
    stack = Stages(dtype, n_classes, [ops["jitter"], ops["lighting"], ops["erasing"]],
                   mixes["mixup"])
    report("stack: jitter+lighting+erasing+normalize+mixup",
           _time(lambda: stack(u8, labels, gen()), device, **timing), {"kind": "stack"})
    plain = Stages(dtype, n_classes)
    report("normalize only", _time(lambda: plain(u8, labels, None), device, **timing),
           {"kind": "stack"})

    if not args.no_train_step:
        model = place_model(create_model("resnet50d", num_classes=n_classes), device,
                            channels_last=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
        scaler, autocast = precision.grad_scaler(), precision.autocast()
        xin, _ = plain(u8, labels, None)

        def step():
            with autocast:
                loss = torch.nn.functional.cross_entropy(model(xin), labels)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        report("train step: resnet50d", _time(step, device, warmup=3, runs=args.runs,
                                              iters=max(1, iters // 2)), {"kind": "train"})
        ratio = entries[-3]["median"] / entries[-1]["median"]
        print(f"full stack / training step: {100 * ratio:.1f}%")

    settings = {"batch": batch, "size": args.size, "dtype": str(dtype).replace("torch.", ""),
                "classes": n_classes, "warmup_calls": 2, "windows": args.runs,
                "calls_per_window": iters}
    path = write_results("augment", device, settings, entries, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
