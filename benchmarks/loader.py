"""Loader throughput: the native, DALI and FFCV engines against torchvision ImageFolder +
DataLoader.

Both read the same JPEGs (the records hold the tree's bytes unchanged), make the same training
batches (random-resized crop + flip, uint8 → normalized, channels-last, on the device) with the
same worker count, and are timed per epoch after one warm-up epoch; the median is reported.

    python -m tricks.benchmarks.loader                        # 512 generated ~450 px JPEGs
    python -m tricks.benchmarks.loader --data /data/imagenet/train --images 10000
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tricks.pipeline import Loader
from tricks.pipeline.convert import convert
from tricks.pipeline.stages import IMAGENET_MEAN, IMAGENET_STD
from tricks.train.data import cache_dir

from .results import OUT_HELP, Timer, entry, resolve_device, resolve_dtype, write_results


def _make_jpeg(args: tuple[Path, int, int, int]) -> None:
    root, i, seed, classes = args
    rng = np.random.default_rng((seed, i))
    w, h = int(rng.integers(400, 501)), int(rng.integers(300, 401))
    low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
    noise = rng.normal(0, 12, (h, w, 3))
    arr = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
    folder = root / f"class{i % classes}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(folder / f"{i:06d}.jpg", quality=90)


def make_jpegs(root: Path, count: int, seed: int = 0, classes: int = 8,
               workers: int = 1) -> Path:
    """``count`` smooth, photo-like JPEGs of 400–500 × 300–400 px (≈ ImageNet's typical size)."""
    done = root / ".complete"
    if done.is_file():
        return root
    jobs = [(root, i, seed, classes) for i in range(count)]
    if workers > 1:
        with mp.get_context("fork").Pool(workers) as pool:
            pool.map(_make_jpeg, jobs, chunksize=64)
    else:
        for job in jobs:
            _make_jpeg(job)
    done.touch()
    return root


def _subset_tree(src: Path, dst: Path, count: int) -> Path:
    """The first ``count`` images of an ImageFolder tree, as symlinks (round-robin by class)."""
    if (dst / ".complete").is_file():
        return dst
    classes = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {c: sorted(p for p in c.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
             for c in classes}
    picked, k = 0, 0
    while picked < count and any(k < len(f) for f in files.values()):
        for c, f in files.items():
            if k < len(f) and picked < count:
                (dst / c.name).mkdir(parents=True, exist_ok=True)
                link = dst / c.name / f[k].name
                if not link.exists():
                    link.symlink_to(f[k].resolve())
                picked += 1
        k += 1
    (dst / ".complete").touch()
    return dst


def trick_stack():
    """The full trick stack of the target: jitter, lighting, erasing (augment) and mixup."""
    from tricks.pipeline.augment import ColorJitter, Lighting, RandomErasing
    from tricks.pipeline.mix import Mixup
    return dict(augment=[ColorJitter(), Lighting(), RandomErasing()], mix=Mixup())


def bench_engine(records: Path, args, device, dtype, engine: str, options: dict,
                 stack: bool) -> tuple[list[float], dict]:
    loader = Loader(records, "train", args.batch, image_size=args.size, device=device,
                    dtype=dtype, workers=args.workers, decode=args.decode if engine == "native"
                    else "auto", seed=0, engine=engine, engine_options=options,
                    **(trick_stack() if stack else {}))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    windows = []
    for epoch in range(args.runs + 1):
        loader.set_epoch(epoch)
        n = 0
        with Timer(device) as t:
            for images, _ in loader:
                n += len(images)
        if epoch:  # the first epoch warms up workers and caches
            windows.append(n / t.seconds)
    memory = {}
    if device.type == "cuda":  # torch's peak, and the whole device's use (DALI's pools too)
        free, total = torch.cuda.mem_get_info(device)
        memory = {"torch_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20,
                  "device_used_mb": (total - free) / 2**20}
    loader.close()
    return windows, memory


def records_to_tree(records: Path, dst: Path) -> Path:
    """The records' stored JPEGs written back as an ImageFolder tree (for torchvision)."""
    from tricks.pipeline.records import RecordFile, read_classes
    if (dst / ".complete").is_file():
        return dst
    classes = read_classes(records)
    rf = RecordFile(records / "train.rec")
    for i in range(len(rf)):
        folder = dst / classes[int(rf.index["label"][i])]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i:06d}.jpg").write_bytes(rf.raw(i).tobytes())
    (dst / ".complete").touch()
    return dst


def bench_torchvision(tree: Path, args, device, dtype) -> list[float]:
    from torchvision import datasets
    from torchvision.transforms import v2

    tf = v2.Compose([v2.RandomResizedCrop(args.size, antialias=True), v2.RandomHorizontalFlip(),
                     v2.PILToTensor()])
    ds = datasets.ImageFolder(str(tree), transform=tf)
    dl = torch.utils.data.DataLoader(ds, args.batch, shuffle=True, drop_last=True,
                                     num_workers=args.workers, pin_memory=device.type == "cuda",
                                     persistent_workers=args.workers > 0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    windows = []
    for epoch in range(args.runs + 1):
        n = 0
        with Timer(device) as t:
            for images, labels in dl:
                x = images.to(device, non_blocking=True).to(dtype)
                x = ((x - mean.to(dtype)) / std.to(dtype)).contiguous(
                    memory_format=torch.channels_last)
                labels.to(device, non_blocking=True)
                n += len(x)
        if epoch:
            windows.append(n / t.seconds)
    return windows


def _installed(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tricks bench loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="an ImageFolder tree (default: generated JPEGs)")
    p.add_argument("--images", type=int, default=512, help="how many images to read")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--max-side", type=int, default=None,
                   help="store the images re-encoded at this longer side (every engine reads "
                        "the same stored images)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--runs", type=int, default=5, help="timed epochs (after one warm-up)")
    p.add_argument("--decode", default="auto", help="native engine decode mode")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--engines", default=None,
                   help="comma-separated: native, dali, dali-files, ffcv, torchvision "
                        "(default: all that are installed)")
    p.add_argument("--stack", action="store_true",
                   help="also run native and DALI with jitter + lighting + erasing + mixup")
    p.add_argument("--out", help=OUT_HELP)
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    work = cache_dir() / "bench"
    if args.data:
        tree = _subset_tree(Path(args.data), work / f"subset-{Path(args.data).name}-{args.images}",
                            args.images)
    else:
        tree = make_jpegs(work / f"jpegs-{args.images}", args.images, workers=max(1, args.workers))
    side = f"-max{args.max_side}" if args.max_side else ""
    records = work / f"records-{tree.name}{side}"
    if not (records / "classes.json").is_file():
        convert(tree, records, max_side=args.max_side, quality=90, workers=args.workers,
                progress=False)
    if args.max_side:  # torchvision reads the same stored (re-encoded) images, as files
        tree = records_to_tree(records, work / f"tree-{tree.name}{side}")
    entries = []
    settings = {"images": args.images, "size": args.size, "batch": args.batch,
                "workers": args.workers, "dtype": str(dtype).replace("torch.", ""),
                "data": args.data or "generated ~450 px JPEGs, quality 90",
                "max_side": args.max_side,
                "warmup_epochs": 1, "timed_epochs": args.runs}
    engines = args.engines.split(",") if args.engines else \
        ["native"] + (["dali", "dali-files"] if _installed("nvidia.dali") else []) + \
        (["ffcv"] if _installed("ffcv") else []) + ["torchvision"]
    if "ffcv" in engines and not (records / "train.beton").is_file():
        from tricks.pipeline.beton import write_beton  # before any FFCV loader exists in this process
        write_beton(records / "train.rec", workers=max(1, args.workers), jpeg_quality=90)
    runs = [(e, False) for e in engines] + \
        [(e, True) for e in engines if args.stack and e != "torchvision"]
    for name, stack in runs:
        label = name + ("+stack" if stack else "")
        memory: dict = {}
        if name == "native":
            windows, memory = bench_engine(records, args, device, dtype, "native", {}, stack)
            extra = {"decode": args.decode if args.decode != "auto" else
                     ("device" if device.type == "cuda" else "workers")}
        elif name in ("dali", "dali-files"):
            source = "files" if name == "dali-files" else "records"
            windows, memory = bench_engine(records, args, device, dtype, "dali",
                                           {"source": source}, stack)
            extra = {"source": source, "threads": args.workers}
        elif name == "ffcv":
            windows, memory = bench_engine(records, args, device, dtype, "ffcv", {}, stack)
            extra = {"storage": ".beton, jpg mode, quality 90 (from the same records)",
                     "workers": args.workers, "note": "first epoch (numba compile) untimed"}
        elif name == "torchvision":
            windows = bench_torchvision(tree, args, device, dtype)
            extra = {"pipeline": "ImageFolder + DataLoader, v2 RandomResizedCrop + flip (PIL)"}
        else:
            print(f"error: unknown engine {name!r}; choose native, dali, dali-files, ffcv, "
                  "torchvision", file=sys.stderr)
            return 1
        extra.update(memory, stack="jitter+lighting+erasing+mixup" if stack else None)
        entries.append(entry(label, extra, windows))
        print(f"{label:18s} median {entries[-1]['median']:8.0f} images/s  "
              f"(windows: {', '.join(f'{w:.0f}' for w in windows)})")
    path = write_results("loader", device, settings, entries, args.out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":  # through the CLI: its one-line errors
    from tricks.train.cli import main as tricks
    sys.exit(tricks(["bench", "loader", *sys.argv[1:]]))
