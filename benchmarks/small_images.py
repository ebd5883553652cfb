"""Small images: the ``cifar`` preset against a plain PyTorch loop, side by side in one run.

Both sides train the same model (the preset's, built by the same constructor with the same
seed), for the same epochs and batch, with horizontal flips, and are evaluated on the same
whole test images. The plain loop is the reference a user would write in 30 lines
(``plain_loop`` below): torchvision ``ImageFolder`` + ``DataLoader``, flips only, SGD with the
preset's peak LR, momentum and weight decay, cosine annealing per epoch, cross-entropy. The
preset adds its pad-and-crop (``configs/cifar.yaml``: 2 pixels, reflected), label smoothing,
warmup, its schedule (linear decay, per update) and no bias decay (both sides build the same
model, Xavier init and zero-γ included, and normalize with the same mean and std).
``--plain-pad`` adds a "plain+pad" side: the plain loop with torchvision's ``RandomCrop`` at
the preset's padding, fill and mode, to tell the crop's effect from the rest of the recipe. Seeds
alternate between the sides (preset, plain, …). ``--variant NAME:KEY=V,…`` adds preset runs
with overrides (an ablation of those differences), run in the same interleaved order.

    python -m tricks.benchmarks.small_images --tarball ../shared/data/cifar10-jpg.tar.gz \\
        --train 500 --test 100 --epochs 5 --width 16 \\
        --variant no-smoothing:train.label_smoothing=0 --variant no-pad:data.pad=0
    python -m tricks.benchmarks.small_images --tree /data/fashion-mnist-jpg   # train/ test/

On a CPU shared with other jobs, set ``OMP_NUM_THREADS=1``: torch's threads wait on each other
(on two loaded cores a width-8 step took 3.9 s with two threads, 0.49 s with one).

Writes ``small_images-<dataset>-<epochs>ep.json`` (top-1 of every seed, their median, the
top-1 after every epoch, wall seconds) under ``benchmarks/results/<device>/``; both sides
evaluate after every epoch, so one run also gives the learning curves.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from tricks.errors import exit_on_user_error
from tricks.benchmarks.results import entry, resolve_device, write_results
from tricks.pipeline.convert import convert
from tricks.pipeline.stages import IMAGENET_MEAN, IMAGENET_STD
from tricks.train.config import preset_path as config_path
from tricks.train.config import Config, load_config
from tricks.train.schedule import scaled_lr
from tricks.train.build import build_model
from tricks.train.trainer import Trainer


def plain_loop(cfg: Config, tree: Path, device: torch.device, workers: int,
               pad: bool = False) -> list[float]:
    """The reference: a plain PyTorch training loop. Returns top-1 on ``tree/test`` after each
    epoch (the last is the result). ``pad``: add torchvision's ``RandomCrop(size, padding,
    fill, padding_mode)`` with the preset's padding, fill and mode (the "plain+pad" side: the
    same pad-and-crop, written by torchvision rather than by tricks)."""
    from torchvision import datasets, transforms as T

    torch.manual_seed(cfg.train.seed)
    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    size = cfg.data.image_size
    crop = [T.RandomCrop(size, padding=cfg.data.pad, fill=cfg.data.pad_fill,
                         padding_mode=cfg.data.pad_mode)] if pad else []
    train_tf = T.Compose([T.Resize((size, size)), *crop, T.RandomHorizontalFlip(), T.ToTensor(),
                          norm])
    test_tf = T.Compose([T.Resize((size, size)), T.ToTensor(), norm])
    train = datasets.ImageFolder(tree / "train", train_tf)
    test = datasets.ImageFolder(tree / "test", test_tf)
    b = cfg.train.batch
    train_dl = torch.utils.data.DataLoader(train, b, shuffle=True, drop_last=True,
                                           num_workers=workers, persistent_workers=workers > 0)
    test_dl = torch.utils.data.DataLoader(test, b, num_workers=workers,
                                          persistent_workers=workers > 0)
    # channels-last like the Trainer: the same arithmetic, twice as fast on the CPU
    model = build_model(cfg, len(train.classes)).to(device, memory_format=torch.channels_last)
    o = cfg.optim
    opt = torch.optim.SGD(model.parameters(), lr=scaled_lr(o.lr, b, o.lr_scaling),
                          momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.train.epochs)
    loss_fn = nn.CrossEntropyLoss()
    curve = []
    for _ in range(cfg.train.epochs):
        model.train()
        for x, y in train_dl:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        sched.step()
        model.eval()
        correct = seen = 0
        with torch.no_grad():
            for x, y in test_dl:
                correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
                seen += len(y)
        curve.append(correct / seen)
    return curve


def preset_run(cfg: Config) -> list[float]:
    """The preset through tricks' Trainer; top-1 on the validation split after each epoch."""
    trainer = Trainer(cfg, progress=False, log=lambda *a, **k: None)
    try:
        trainer.fit()
        rows = [json.loads(line) for line in trainer.metrics_path.read_text().splitlines()]
        return [r["val_top1"] for r in rows]
    finally:
        trainer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tricks.benchmarks.small_images",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tarball", help="the CIFAR-10 JPEG tarball (a class-balanced subset)")
    src.add_argument("--tree", help="an ImageFolder tree with train/ and test/")
    p.add_argument("--train", type=int, default=500, help="--tarball: train images per class")
    p.add_argument("--test", type=int, default=100, help="--tarball: test images per class")
    p.add_argument("--name", default=None, help="dataset name in the result file")
    p.add_argument("--preset", default="cifar")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=16, help="model.width of both sides")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds first-seed … first-seed + seeds − 1 (split seeds over processes)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=V[,KEY=V…]",
                   help="also run the preset with these overrides (an ablation: which of the "
                        "preset's differences from the plain loop costs or gains accuracy)")
    p.add_argument("--plain-pad", action="store_true",
                   help="also run the plain loop with torchvision's RandomCrop (the preset's "
                        "padding and fill): the \"plain+pad\" side")
    p.add_argument("--skip", action="append", default=[], choices=("preset", "plain"),
                   help="leave this side out (variants only, e.g. a second ablation run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="results folder (default: benchmarks/results/"
                   "<device>)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.tarball:
            from tricks.benchmarks.cifar10 import extract_subset
            tree = extract_subset(args.tarball, tmp / "tree", args.train, args.test)
            name = args.name or f"cifar10-{args.train * 10}"
        else:
            tree = Path(args.tree)
            name = args.name or tree.name
        records = tmp / "records"
        convert(tree, records, workers=args.workers, progress=False)
        overrides = [f"data.path={records}", f"data.workers={args.workers}",
                     f"data.image_size={args.image_size}", f"model.width={args.width}",
                     f"train.epochs={args.epochs}", f"train.batch={args.batch}",
                     f"train.device={device}", f"train.out={tmp / 'runs'}"]
        variants = dict(_variant(v) for v in args.variant)
        sides = [s for s in ("preset", "plain") if s not in args.skip] \
            + ["plain+pad"] * args.plain_pad + list(variants)
        top1 = {s: [] for s in sides}
        wall = {s: [] for s in sides}
        curves = {s: [] for s in sides}
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            cfg = load_config([config_path(args.preset)], [*overrides, f"train.seed={seed}",
                                                            f"train.name=s{seed}"])
            for side in sides:
                t0 = time.perf_counter()
                if side in ("plain", "plain+pad"):
                    curve = plain_loop(cfg, tree, device, args.workers, pad=side == "plain+pad")
                else:
                    extra = [*variants[side], f"train.name={side}-s{seed}"] \
                        if side in variants else []
                    curve = preset_run(load_config([config_path(args.preset)], [
                        *overrides, f"train.seed={seed}", f"train.name=s{seed}", *extra]))
                wall[side].append(time.perf_counter() - t0)
                curves[side].append(curve)
                acc = curve[-1]
                top1[side].append(acc)
                print(f"seed {seed} {side}: top-1 {100 * acc:.2f}% "
                      f"({wall[side][-1]:.0f} s)", flush=True)
                # written after each run: a stopped run keeps what it measured
                path = _write(args, name, cfg, device, top1, wall, curves, variants)
    med = {s: statistics.median(v) for s, v in top1.items()}
    print("median top-1: " + ", ".join(f"{s} {100 * m:.2f}%" for s, m in med.items())
          + f" → {path}")
    return 0


def _variant(text: str) -> tuple[str, list[str]]:
    """``NAME:KEY=V,KEY=V`` → (NAME, [KEY=V, …])."""
    name, sep, rest = text.partition(":")
    if not sep or not name or name in ("preset", "plain", "plain+pad") or "=" not in rest:
        raise SystemExit(f"error: --variant {text!r}: expected NAME:KEY=VALUE[,KEY=VALUE…]")
    return name, rest.split(",")


def _write(args, name: str, cfg: Config, device: torch.device, top1: dict, wall: dict,
           curves: dict, variants: dict) -> Path:
    settings = dict(dataset=name, preset=args.preset, epochs=args.epochs, batch=args.batch,
                    width=args.width, image_size=args.image_size, seeds=args.seeds,
                    first_seed=args.first_seed,
                    workers=args.workers, train_per_class=args.train if args.tarball else None,
                    test_per_class=args.test if args.tarball else None,
                    preset_config=cfg.to_dict(), variants=variants,
                    torch_threads=torch.get_num_threads(),
                    plain="ImageFolder + DataLoader, RandomHorizontalFlip, SGD (preset's peak "
                          "LR, momentum, Nesterov, weight decay), CosineAnnealingLR per epoch, "
                          "cross-entropy; whole-image evaluation after every epoch")
    entries = [entry(side, {"wall_s": wall[side], "overrides": variants.get(side, []),
                            "top1_per_epoch": curves[side]}, top1[side], unit="top-1")
               for side in top1]
    return write_results(f"small_images-{name}-{args.epochs}ep", device, settings, entries,
                         args.out)


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
