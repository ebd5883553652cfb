"""Loader throughput, side by side in one run: every installed engine (native with libjpeg-turbo,
native with its Pillow fallback, DALI, FFCV) and torchvision ImageFolder + DataLoader read the same
stored JPEGs and make the same training batches (random-resized crop + flip, uint8 → normalized
fp32/fp16, channels-last, on the device).

The grid: storage (full size, and re-encoded at max side 256) × crop side × worker count. In each
cell every engine is built first, then timed in interleaved windows (one epoch of each engine in
turn, after one warm-up round), so a machine's drift hits all alike; the median window is
reported, as images/s and images/s per worker. A ``decode-ceiling`` row times a plain
libjpeg-turbo full decode (``tricks.pipeline._jpeg.decode``) of the same bytes in one thread,
times the workers: what the cores could give if decoding were all they did.

Images (``--source photos``, the default): real photographs shipped inside installed packages
(matplotlib's grace_hopper.jpg; scikit-image's sample photos when it is installed), re-encoded at
500 px on the longer side, quality 90, replicated as distinct random crops (benchmarks/photos.py).
``--source generated``: smooth-noise JPEGs (decode unlike photos). ``--data``: an ImageFolder tree.

    tricks bench loader                                   # the grid, photos, 1 and 2 workers
    tricks bench loader --workers 16 --engines native --decode workers   # a GPU host's CPU path
    tricks bench loader --data /data/imagenet/train --images 10000
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tricks.errors import exit_on_user_error
from tricks.pipeline import Engine, Loader, Output
from tricks.pipeline.convert import convert
from tricks.pipeline.options import IMAGENET_MEAN, IMAGENET_STD
from tricks.pipeline.source import cache_dir

from .results import OUT_HELP, Timer, entry, resolve_device, resolve_dtype, write_results
from .stack import trick_stack


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




class _LoaderRun:
    """One engine through ``tricks.pipeline.Loader``: ``epoch()`` → (images, seconds)."""

    def __init__(self, records: Path, args, size: int, workers: int, device, dtype,
                 engine: str, decode: str, options: dict, stack: bool):
        if engine == "native":
            options = {"decode": decode, **options}
        self.loader = Loader(records, "train", args.batch, image_size=size, device=device,
                             output=Output(dtype),
                             engine=Engine(engine, workers=workers, **options),
                             **(dict(zip(("augment", "mix"), trick_stack())) if stack else {}))
        self.device, self.epochs = device, 0

    def epoch(self) -> tuple[int, float]:
        self.loader.set_epoch(self.epochs)
        self.epochs += 1
        n = 0
        with Timer(self.device) as t:
            for images, _ in self.loader:
                n += len(images)
        return n, t.seconds

    def extra(self) -> dict:
        eng = self.loader.engine
        out = {}
        if hasattr(eng, "cpu_decoder"):
            out = {"decode": eng.decode, "cpu_decoder": eng.cpu_decoder,
                   "pillow_images": eng.fallbacks}
        if self.device.type == "cuda":  # torch's peak, and the whole device's use (DALI's too)
            free, total = torch.cuda.mem_get_info(self.device)
            out.update(torch_peak_mb=torch.cuda.max_memory_allocated(self.device) / 2**20,
                       device_used_mb=(total - free) / 2**20)
        return out

    def close(self) -> None:
        self.loader.close()


class _TorchvisionRun:
    """ImageFolder + DataLoader (PIL, v2 RandomResizedCrop + flip), normalized on the device."""

    def __init__(self, tree: Path, args, size: int, workers: int, device, dtype):
        from torchvision import datasets
        from torchvision.transforms import v2
        tf = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(),
                         v2.PILToTensor()])
        ds = datasets.ImageFolder(str(tree), transform=tf)
        self.dl = torch.utils.data.DataLoader(
            ds, args.batch, shuffle=True, drop_last=True, num_workers=workers,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        self.mean = (torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255).to(dtype)
        self.std = (torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255).to(dtype)
        self.device, self.dtype = device, dtype

    def epoch(self) -> tuple[int, float]:
        n = 0
        with Timer(self.device) as t:
            for images, labels in self.dl:
                x = images.to(self.device, non_blocking=True).to(self.dtype)
                x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
                labels.to(self.device, non_blocking=True)
                n += len(x)
        return n, t.seconds

    def extra(self) -> dict:
        return {"pipeline": "ImageFolder + DataLoader, v2 RandomResizedCrop + flip (PIL)"}

    def close(self) -> None:
        it = getattr(self.dl, "_iterator", None)
        if it is not None:
            it._shutdown_workers()


CEILING_IMAGES = 1024


class _CeilingRun:
    """A plain full decode to RGB of every stored JPEG in one thread: libjpeg-turbo through
    ``tricks.pipeline._jpeg.decode`` (accurate IDCT, fancy upsampling), or Pillow's
    ``Image.load`` when the extension is not built. ``epoch()`` scales the rate by ``workers``.
    A rate, so at most ``CEILING_IMAGES`` of the stored images are decoded per window: one
    thread would otherwise need ~5 s a window for the 4,096 photographs of the GPU script."""

    def __init__(self, records: Path, workers: int):
        from tricks.pipeline.records import RecordFile
        rf = RecordFile(records / "train.rec")
        self.jpegs = [rf.raw(i).tobytes() for i in range(min(len(rf), CEILING_IMAGES))]
        self.workers = workers
        try:
            from tricks.pipeline import _jpeg
            self.decode, self.how = _jpeg.decode, "libjpeg-turbo (tricks.pipeline._jpeg.decode)"
        except ImportError:
            import io

            def pil(b):
                with Image.open(io.BytesIO(b)) as img:
                    img.convert("RGB").load()
            self.decode, self.how = pil, "Pillow (the extension is not built)"

    def epoch(self) -> tuple[int, float]:
        with Timer(torch.device("cpu")) as t:
            for b in self.jpegs:
                self.decode(b)
        return len(self.jpegs) * self.workers, t.seconds

    def extra(self) -> dict:
        return {"decoder": self.how, "threads": 1,
                "note": f"one thread's full-decode rate × {self.workers} worker(s)"}

    def close(self) -> None:
        pass


def _installed(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _storages(text: str) -> list[int | None]:
    out = []
    for v in text.split(","):
        v = v.strip()
        if v in ("full", "0"):
            out.append(None)
        elif v.isdigit():
            out.append(int(v))
        else:
            raise argparse.ArgumentTypeError(f"storage: 'full' or a max side in pixels, got {v!r}")
    return out


ENGINES = ("native", "native-pillow", "dali", "ffcv", "torchvision")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tricks bench loader", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=("photos", "generated"), default="photos",
                   help="the images when no --data is given (see above)")
    p.add_argument("--data", help="an ImageFolder tree (overrides --source)")
    p.add_argument("--images", type=int, default=512, help="how many images to read")
    p.add_argument("--size", type=_ints, default=[224, 160],
                   help="crop side(s), comma-separated (default 224,160)")
    p.add_argument("--storage", type=_storages, default=[None, 256],
                   help="'full' and/or max sides to re-encode at, comma-separated (default "
                        "full,256); every engine reads the same stored images")
    p.add_argument("--max-side", type=int, default=None,
                   help="shorthand for --storage N (one storage only)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=_ints, default=[1, 2],
                   help="worker counts (native: decode threads; DALI: threads), comma-separated")
    p.add_argument("--runs", type=int, default=5, help="timed windows per engine (after one "
                   "warm-up round); each window is one epoch")
    p.add_argument("--decode", default="auto", help="native engine decode mode")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", help="auto: fp16 on CUDA, fp32 on the CPU")
    p.add_argument("--engines", default=None,
                   help=f"comma-separated, of {', '.join(ENGINES)} (default: all installed)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the decode-ceiling row")
    p.add_argument("--stack", action="store_true",
                   help="also run each engine (not torchvision) with jitter + lighting + erasing "
                        "+ mixup")
    p.add_argument("--out", help=OUT_HELP)
    p.add_argument("--name", default="loader",
                   help="file name of the results (NAME.json, .md, .png; default loader)")
    return p


def _prepare(tree: Path, work: Path, max_side: int | None, workers: int, ffcv: bool):
    side = f"-max{max_side}" if max_side else ""
    records = work / f"records-{tree.name}{side}"
    if not (records / "classes.json").is_file():
        convert(tree, records, max_side=max_side, quality=90, workers=workers, progress=False)
    files = records_to_tree(records, work / f"tree-{tree.name}{side}") if max_side else tree
    if ffcv and not (records / "train.beton").is_file():
        from tricks.pipeline.beton import write_beton  # before any FFCV loader exists here
        write_beton(records / "train.rec", workers=workers, jpeg_quality=90)
    return records, files


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    if args.max_side is not None:
        args.storage = [args.max_side]
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    work = cache_dir() / "bench"
    prep_workers = max(1, max(args.workers))
    if args.data:
        tree = _subset_tree(Path(args.data), work / f"subset-{Path(args.data).name}-{args.images}",
                            args.images)
        data = args.data
    elif args.source == "photos":
        from .photos import make_photo_set
        tree = make_photo_set(work / f"photos-{args.images}", args.images)
        data = ("photographs shipped in installed packages, re-encoded at 500 px, quality 90: "
                + ", ".join(Path(p).name for p in (tree / "SOURCES.txt").read_text().split()))
    else:
        tree = make_jpegs(work / f"jpegs-{args.images}", args.images, workers=prep_workers)
        data = "generated ~450 px JPEGs, quality 90"
    engines = args.engines.split(",") if args.engines else \
        ["native", "native-pillow"] + (["dali"] if _installed("nvidia.dali") else []) + \
        (["ffcv"] if _installed("ffcv") else []) + ["torchvision"]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        print(f"error: unknown engine(s) {', '.join(unknown)}; choose {', '.join(ENGINES)}",
              file=sys.stderr)
        return 1
    stores = {s: _prepare(tree, work, s, prep_workers, "ffcv" in engines) for s in args.storage}
    runs = [(e, False) for e in engines] + \
        [(e, True) for e in engines if args.stack and e != "torchvision"]
    entries = []
    settings = {"images": args.images, "sizes": args.size, "batch": args.batch,
                "workers": args.workers, "storages": ["full" if s is None else s
                                                      for s in args.storage],
                "dtype": str(dtype).replace("torch.", ""), "data": data,
                "warmup_rounds": 1, "timed_windows": args.runs,
                "timing": "interleaved: one epoch of each engine in turn, per window",
                "engine_versions": _engine_versions()}
    for max_side, (records, files) in stores.items():
        storage = f"max side {max_side}" if max_side else "full size"
        for size in args.size:
            for workers in args.workers:
                cell = {"storage": storage, "max_side": max_side, "size": size,
                        "workers": workers}
                runners = []
                for name, stack in runs:
                    label = name + ("+stack" if stack else "")
                    if name == "native":
                        r = _LoaderRun(records, args, size, workers, device, dtype, "native",
                                       args.decode, {}, stack)
                    elif name == "native-pillow":
                        r = _LoaderRun(records, args, size, workers, device, dtype, "native",
                                       "workers", {"cpu_decoder": "pillow"}, stack)
                    elif name == "dali":
                        r = _LoaderRun(records, args, size, workers, device, dtype, "dali",
                                       "auto", {}, stack)
                    elif name == "ffcv":
                        r = _LoaderRun(records, args, size, workers, device, dtype, "ffcv",
                                       "auto", {}, stack)
                    else:
                        r = _TorchvisionRun(files, args, size, workers, device, dtype)
                    runners.append((label, stack, r))
                if not args.no_ceiling:
                    runners.append(("decode-ceiling", False, _CeilingRun(records, workers)))
                windows: dict[str, list[float]] = {label: [] for label, _, _ in runners}
                # the machine's 1-minute load average around the cell's windows: on a shared
                # host it says how much other work the workers competed with
                load = [os.getloadavg()[0]]
                for round_ in range(args.runs + 1):  # round 0 warms up (workers, numba, caches)
                    for label, _, r in runners:
                        n, seconds = r.epoch()
                        if round_:
                            windows[label].append(n / seconds)
                load.append(os.getloadavg()[0])
                for label, stack, r in runners:
                    extra = dict(cell, load_average=[round(v, 2) for v in load], **r.extra())
                    extra["stack"] = "jitter+lighting+erasing+mixup" if stack else None
                    e = entry(label, extra, windows[label])
                    e["per_worker"] = e["median"] / workers
                    entries.append(e)
                    r.close()
                    print(f"{storage:>12s} {size:4d}² {workers:2d}w  {label:16s} "
                          f"{e['median']:8.0f} images/s  {e['per_worker']:7.0f}/worker  "
                          f"(windows: {', '.join(f'{w:.0f}' for w in windows[label])})",
                          flush=True)
                # written after each cell: a run stopped at a time limit keeps what it measured
                path = write_results(args.name, device, settings, entries, args.out)
    md, png = write_loader_report(path)
    print(f"results: {path}, {md.name}, {png.name}")
    return 0


def _engine_versions() -> dict:
    from importlib import metadata
    out = {}
    for dist in ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "ffcv", "opencv-python"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:
        from tricks.pipeline import _jpeg
        out["libjpeg (tricks.pipeline._jpeg)"] = _jpeg.LIBJPEG_VERSION
    except ImportError:
        out["libjpeg (tricks.pipeline._jpeg)"] = None
    return out


def write_loader_report(json_path: Path) -> tuple[Path, Path]:
    """Markdown tables (one per worker count: images/s and, in brackets, per worker; the native
    engine's ratios to the others) and a grouped bar chart, beside the JSON."""
    import json
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doc = json.loads(Path(json_path).read_text())
    res = [r for r in doc["results"]]
    cells = list(dict.fromkeys((r["settings"]["storage"], r["settings"]["size"],
                                r["settings"]["workers"]) for r in res))
    names = list(dict.fromkeys(r["name"] for r in res))
    med = {(r["settings"]["storage"], r["settings"]["size"], r["settings"]["workers"],
            r["name"]): r["median"] for r in res}
    load = {(r["settings"]["storage"], r["settings"]["size"], r["settings"]["workers"]):
            r["settings"]["load_average"] for r in res if "load_average" in r["settings"]}
    others = [n for n in ("ffcv", "dali", "torchvision", "decode-ceiling") if n in names]
    lines = [f"# Loader throughput ({doc['device']})", "",
             f"{doc['time']}, commit {doc['commit']}; batch {doc['settings']['batch']}, "
             f"{doc['settings']['images']} images ({doc['settings']['data']}); "
             f"{doc['settings']['dtype']} normalized output; median of "
             f"{doc['settings']['timed_windows']} interleaved windows. images/s (per worker)"
             + ("; load average: the machine's 1-minute load before and after the cell "
                "(these runs' own threads included)." if load else "."), ""]
    for workers in dict.fromkeys(c[2] for c in cells):
        lines += [f"## {workers} worker{'s' if workers > 1 else ''}", "",
                  "| crop, storage | " + " | ".join(names) + " | " +
                  " | ".join(f"native ÷ {o}" for o in others) +
                  (" | load average |" if load else " |"),
                  "|---" * (1 + len(names) + len(others) + bool(load)) + "|"]
        for storage, size, w in cells:
            if w != workers:
                continue
            row = [f"{size}², {storage}"]
            for n in names:
                v = med.get((storage, size, w, n))
                row.append("" if v is None else f"{v:,.0f} ({v / w:,.0f})")
            nat = med.get((storage, size, w, "native"))
            for o in others:
                v = med.get((storage, size, w, o))
                row.append(f"{nat / v:.2f}" if nat and v else "")
            if load:
                row.append("–".join(f"{v:.1f}" for v in load.get((storage, size, w), [])))
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    md = Path(json_path).with_suffix(".md")
    md.write_text("\n".join(lines))
    fig, ax = plt.subplots(figsize=(max(7, 1.3 * len(cells)), 4.2))
    width = 0.8 / max(1, len(names))
    for k, n in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(cells))]
        ax.bar(xs, [med.get((*c, n)) or 0 for c in cells], width, label=n)
    ax.set_xticks(range(len(cells)))
    ax.set_xticklabels([f"{s}²\n{st}\n{w} worker{'s' if w > 1 else ''}"
                        for st, s, w in cells], fontsize=8)
    ax.set_ylabel("images/s")
    ax.set_title(f"Loader throughput, {doc['device']}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    png = Path(json_path).with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return md, png


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
