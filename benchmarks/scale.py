"""ImageNet-scale costs of the data path (issue 24), side by side in one run:

- **convert**: images/s and CPU-ms an image of ``tricks convert`` (stored copies, ``--max-side
  256`` and ``512``, area filter) against FFCV's ``DatasetWriter`` (``RGBImageField`` in jpg mode
  at the same ``max_resolution``, fed PIL images by torchvision's ImageFolder, as ffcv-imagenet's
  ``write_imagenet.py`` does) on the same tree of real photographs, the same worker count,
  interleaved repetitions; each run in its own process, its CPU time (itself and its workers)
  from ``getrusage(RUSAGE_CHILDREN)``; the converting process's own peak RSS.
- **startup**: seconds for ``resolve_dataset`` of an unchanged ImageFolder tree of
  ``--startup-files`` files (1,000 class folders) against those of its converted folder, and
  against the full stat walk every start made before (``tree_fingerprint``, reproduced here);
  the discovery's memory per file (tracemalloc).
- **plan**: seconds to make one epoch's crops (``EpochPlan.tasks``) for ``--plan-records``
  records, batch 256, with torch's default threads and with one, against the per-batch torch
  version it replaced (reproduced here).
- **hotpath**: a batch decode (``_jpeg.decode_crops``, 64 photos at 224 px, the loader's
  threads) with and without the per-record CRC-32 check, interleaved windows.

The tree: ``--images`` photographs made from the photos installed packages ship
(``benchmarks/photos.py``): 80 % at 500 px on the longer side (ImageNet's typical size), 20 % at
600 px (over 512: they exercise ``--max-side 512``). Run it niced on a shared machine; the load
(``os.getloadavg``) before and after each section is in the JSON.

    python -m tricks.benchmarks.scale                       # all sections
    python -m tricks.benchmarks.scale --sections plan,hotpath
"""
from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .photos import photo_sources
from .results import OUT_HELP, IMAGENET_TRAIN, entry, write_results

SECTIONS = ("convert", "startup", "plan", "hotpath")


def make_tree(root: Path, count: int, classes: int = 10, seed: int = 0) -> Path:
    """``count`` JPEGs (quality 90) of random 85–100 % crops of the installed photographs, 80 %
    at 500 px on the longer side, 20 % at 600 px; reused when complete."""
    if (root / ".complete").is_file():
        return root
    photos = [Image.open(p).convert("RGB") for p in photo_sources()]
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = photos[i % len(photos)]
        w, h = img.size
        f = rng.uniform(0.85, 1.0) ** 0.5
        cw, ch = int(w * f), int(h * f)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        side = 600 if i % 5 == 4 else 500
        s = min(1.0, side / max(cw, ch)) if side == 600 else side / max(cw, ch)
        crop = crop.resize((max(1, round(cw * s)), max(1, round(ch * s))),
                           Image.Resampling.LANCZOS)
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:06d}.jpg", quality=90)
    (root / ".complete").touch()
    return root


# --- convert -----------------------------------------------------------------------------------

# each child reports, after its imports: wall s, CPU s (itself and its reaped workers), its
# resident memory before the work and its peak (kB)
_CLOCK = """
import resource, sys, time
def cpu():
    return sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF,
               resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() // 1024
def peak():  # VmHWM: the peak since the reset below (the imports' transient peak excluded)
    return int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmHWM")))
open("/proc/self/clear_refs", "w").write("5")
"""

OURS = _CLOCK + """
from tricks.pipeline.convert import convert
src, dst, side, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t, c, r = time.perf_counter(), cpu(), rss()
convert(src, dst, max_side=None if side == "none" else int(side), workers=workers,
        progress=False)
print(time.perf_counter() - t, c, r, peak(), flush=True)
import os
os._exit(0)  # no interpreter teardown in the CPU time
"""

FFCV = _CLOCK + """
from tricks.pipeline.engines.ffcv import import_ffcv
fields, _, _, _ = import_ffcv()
from ffcv.writer import DatasetWriter
from torchvision.datasets import ImageFolder
src, dst, side, workers = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
t, c, r = time.perf_counter(), cpu(), rss()
ds = ImageFolder(src + "/train")
w = DatasetWriter(dst, {"image": fields.RGBImageField(
    write_mode="jpg", max_resolution=None if side == "none" else int(side), jpeg_quality=90),
    "label": fields.IntField()}, num_workers=workers)
w.from_indexed_dataset(ds)
print(time.perf_counter() - t, c, r, peak(), flush=True)
import os
os._exit(0)  # no interpreter teardown in the CPU time
"""


def _subreaper() -> None:
    """Become the parent of orphaned descendants (Linux ``PR_SET_CHILD_SUBREAPER``), so the
    CPU time of a writer's worker processes that their parent never waited for is counted."""
    import ctypes
    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)


def _timed(script: str, args: list[str]) -> tuple[float, float, int, int]:
    """(wall s, CPU s of the process and all its descendants minus its imports, its RSS after
    the imports and its peak after them, kB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True,
                         text=True, env=os.environ.copy())
    while True:  # orphaned workers, now ours: wait for them (their CPU time counts)
        try:
            os.wait()
        except ChildProcessError:
            break
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    wall, imports, rss0, peak = out.stdout.split()[-4:]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return float(wall), cpu - float(imports), int(rss0), int(peak)


def bench_convert(work: Path, images: int, reps: int, workers: int) -> list[dict]:
    _subreaper()
    tree = make_tree(work / f"photos-{images}", images)
    sides = ["none", "256", "512"]
    raw: dict[tuple[str, str], list] = {}
    for rep in range(reps):
        for side in sides:
            for name, script in (("tricks", OURS), ("ffcv", FFCV)):
                out = work / "out"
                shutil.rmtree(out, ignore_errors=True)
                (work / "out.beton").unlink(missing_ok=True)
                dst = str(out) if name == "tricks" else str(work / "out.beton")
                raw.setdefault((name, side), []).append(
                    _timed(script, [str(tree), dst, side, str(workers)]))
                print(f"convert rep {rep} {name} max_side={side}: wall "
                      f"{raw[(name, side)][-1][0]:.2f} s, CPU {raw[(name, side)][-1][1]:.2f} s",
                      flush=True)
    entries = []
    for (name, side), runs in raw.items():
        settings = {"writer": name, "max_side": None if side == "none" else int(side),
                    "images": images, "workers": workers,
                    "filter": "area (DCT draft + BOX)" if name == "tricks" else
                    "OpenCV INTER_AREA", "mode": "records" if name == "tricks" else "jpg"}
        entries.append(entry(f"convert-{name}-{side}", settings,
                             [images / r[0] for r in runs], "images/s"))
        entries.append(entry(f"convert-{name}-{side}-cpu", settings,
                             [1e3 * r[1] / images for r in runs], "CPU-ms/image"))
        entries.append(entry(f"convert-{name}-{side}-rss-growth", settings,
                             [(r[3] - r[2]) / 1024 for r in runs],
                             "MiB (main process: peak RSS minus RSS after imports)"))
    return entries


# --- start-up ----------------------------------------------------------------------------------

def _old_fingerprint(src: Path) -> str:
    """What every start did before: a stat of every file (train/data.py's tree_fingerprint)."""
    h = hashlib.sha1()
    stack = [src]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                if e.is_dir(follow_symlinks=True):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=True):
                    st = e.stat(follow_symlinks=True)
                    rel = os.path.relpath(e.path, src)
                    h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def big_tree(root: Path, files: int, classes: int = 1000) -> Path:
    """``files`` tiny distinct JPEGs in ``classes`` class folders (start-up cost is per file,
    not per byte)."""
    if (root / ".complete").is_file():
        return root
    base = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    import io
    for c in range(classes):
        d = root / "train" / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for k in range(files // classes):
            px = base.copy()
            px[0, 0] = (c % 256, k % 256, (c * 7 + k) % 256)
            buf = io.BytesIO()
            Image.fromarray(px).save(buf, "JPEG", quality=90)
            (d / f"{k:06d}.JPEG").write_bytes(buf.getvalue())
    (root / ".complete").touch()
    return root


def bench_startup(work: Path, files: int, reps: int) -> list[dict]:
    from tricks.pipeline.convert import discover
    from tricks.pipeline.source import resolve_dataset
    os.environ["TRICKS_CACHE"] = str(work / "cache")
    tree = big_tree(work / f"tree-{files}", files)
    t = time.perf_counter()
    converted = resolve_dataset(str(tree), log=lambda m: None)
    first = time.perf_counter() - t
    raw = {"tree": [], "converted": [], "old-stat-walk": []}
    for _ in range(reps):
        for name in raw:
            t = time.perf_counter()
            if name == "tree":
                assert resolve_dataset(str(tree), log=lambda m: None) == converted
            elif name == "converted":
                resolve_dataset(str(converted), log=lambda m: None)
            else:
                _old_fingerprint(tree)
            raw[name].append(time.perf_counter() - t)
    tracemalloc.start()
    splits, _ = discover(tree)
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    n = sum(len(s.files) for s in splits)
    settings = {"files": files, "classes": 1000, "first_resolve_s": first,  # converts if uncached
                "discover_bytes_per_file": held / n}
    out = [entry(f"startup-{k}", settings, v, "s") for k, v in raw.items()]
    out.append(entry("startup-tree-minus-converted", settings,
                     [a - b for a, b in zip(raw["tree"], raw["converted"])], "s"))
    return out


# --- plan --------------------------------------------------------------------------------------

def _old_plan(plan, epoch, heights, widths, size):
    """EpochPlan.tasks before (torch, one batch at a time)."""
    from tricks.pipeline.sampling import epoch_order, keyed_generator, random_resized_boxes
    order = epoch_order(plan.n, plan.seed, epoch, plan.shuffle)
    for b in range(len(plan)):
        glob = order[b * plan.batch_size:(b + 1) * plan.batch_size]
        h = torch.from_numpy(heights[glob.numpy()].astype(np.int64))
        w = torch.from_numpy(widths[glob.numpy()].astype(np.int64))
        gen = keyed_generator(plan.seed, epoch, b)
        boxes = random_resized_boxes(h, w, gen, plan.scale, plan.ratio)
        flips = torch.rand(len(glob), generator=gen) < 0.5
        yield glob.numpy(), boxes.numpy(), flips.numpy()


def bench_plan(records: int, reps: int) -> list[dict]:
    from tricks.pipeline.sampling import EpochPlan
    rng = np.random.default_rng(0)
    heights = rng.integers(100, 600, records).astype(np.uint32)
    widths = rng.integers(100, 600, records).astype(np.uint32)
    plan = EpochPlan(records, 256, 0, True, True, True)
    default = torch.get_num_threads()
    raw: dict[str, list] = {}
    for _ in range(reps):
        for threads in (default, 1):
            torch.set_num_threads(threads)
            for name, make in (("new", lambda: plan.tasks(0, heights, widths, 224)),
                               ("old", lambda: _old_plan(plan, 0, heights, widths, 224))):
                t, c = time.perf_counter(), time.process_time()
                for _ in make():
                    pass
                raw.setdefault((name, threads), []).append(time.perf_counter() - t)
                raw.setdefault((name, threads, "cpu"), []).append(time.process_time() - c)
    torch.set_num_threads(default)
    return [entry(f"plan-{key[0]}-threads{key[1]}{'-cpu' if len(key) == 3 else ''}",
                  {"records": records, "batch": 256, "torch_threads": key[1]}, v,
                  "CPU s (this process, all threads)" if len(key) == 3 else "s")
            for key, v in raw.items()]


# --- hot path ----------------------------------------------------------------------------------

def bench_hotpath(work: Path, windows: int, threads: int) -> list[dict]:
    from tricks.pipeline import _jpeg
    from tricks.pipeline.convert import convert
    from tricks.pipeline.records import RecordFile
    from tricks.pipeline.sampling import random_resized_boxes
    tree = make_tree(work / "photos-hot", 256)
    out = work / "hot-rec"
    if not (out / "classes.json").is_file():
        convert(tree, out, progress=False)
    rf = RecordFile(out / "train.rec")
    n, size = 64, 224
    gen = torch.Generator().manual_seed(0)
    raw = {"no-crc": [], "crc": []}
    buf = np.empty((n, size, size, 3), np.uint8)
    batches = []
    for b in range(len(rf) // n):
        idx = np.arange(b * n, (b + 1) * n)
        h = torch.from_numpy(rf.index["height"][idx].astype(np.int64))
        w = torch.from_numpy(rf.index["width"][idx].astype(np.int64))
        boxes = random_resized_boxes(h, w, gen, (0.08, 1.0), (3 / 4, 4 / 3)).numpy()
        batches.append(([rf.raw(int(i)) for i in idx], boxes, np.zeros(n, np.uint8),
                        np.ascontiguousarray(rf.index["crc"][idx], dtype="<u4")))
    for _ in range(windows):
        for name in raw:
            t = time.perf_counter()
            for jpegs, boxes, flips, crcs in batches:
                failed = _jpeg.decode_crops(jpegs, boxes, flips, buf, threads=threads,
                                            crcs=crcs if name == "crc" else None)
                assert not failed
            raw[name].append(len(batches) * n / (time.perf_counter() - t))
    # the same cost without the noise of a shared machine's threads: one thread decoding and
    # one computing the CRC of the same records, microseconds an image
    one = {"decode-1-thread-us": [], "crc-only-us": []}
    for _ in range(windows):
        t = time.perf_counter()
        for jpegs, boxes, flips, crcs in batches:
            _jpeg.decode_crops(jpegs, boxes, flips, buf, threads=1)
        one["decode-1-thread-us"].append(1e6 * (time.perf_counter() - t) / (len(batches) * n))
        t = time.perf_counter()
        for jpegs, boxes, flips, crcs in batches:
            for j in jpegs:
                _jpeg.crc32(j)
        one["crc-only-us"].append(1e6 * (time.perf_counter() - t) / (len(batches) * n))
    settings = {"images": len(batches) * n, "batch": n, "size": size, "threads": threads,
                "mean_record_bytes": float(rf.index["length"].mean()),
                "crc": "zlib" if getattr(_jpeg, "CRC_ZLIB", 0) else "own table"}
    out_entries = [entry(f"hotpath-{k}", settings, v) for k, v in raw.items()]
    ratios = [c / o for c, o in zip(raw["crc"], raw["no-crc"])]
    out_entries.append(entry("hotpath-crc-over-no-crc", settings, ratios, "ratio"))
    out_entries += [entry(f"hotpath-{k}", settings, v, "us/image") for k, v in one.items()]
    out_entries.append(entry("hotpath-crc-share-of-decode", settings,
                             [c / d for c, d in zip(one["crc-only-us"],
                                                    one["decode-1-thread-us"])], "ratio"))
    return out_entries


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tricks bench scale", description=__doc__.split("\n")[0])
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--images", type=int, default=3000, help="photos in the convert tree")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--startup-files", type=int, default=200_000)
    p.add_argument("--plan-records", type=int, default=IMAGENET_TRAIN)
    p.add_argument("--windows", type=int, default=9, help="hot-path windows")
    p.add_argument("--work", default=None, help="scratch folder (default: the tricks cache)")
    p.add_argument("--out", default=None, help=OUT_HELP)
    args = p.parse_args(argv)
    from tricks.pipeline.source import cache_dir
    work = Path(args.work) if args.work else cache_dir() / "bench-scale"
    work.mkdir(parents=True, exist_ok=True)
    entries, load = [], {}
    for section in args.sections.split(","):
        load[f"{section}-before"] = os.getloadavg()
        print(f"--- {section} (load {os.getloadavg()[0]:.2f})", flush=True)
        if section == "convert":
            entries += bench_convert(work, args.images, args.reps, args.workers)
        elif section == "startup":
            entries += bench_startup(work, args.startup_files, args.reps)
        elif section == "plan":
            entries += bench_plan(args.plan_records, args.reps)
        elif section == "hotpath":
            entries += bench_hotpath(work, args.windows, args.workers)
        else:
            p.error(f"unknown section {section!r}; choose from {', '.join(SECTIONS)}")
        load[f"{section}-after"] = os.getloadavg()
        for e in entries:
            if e["name"].startswith(section[:4]) and "median" in e:
                print(f"  {e['name']}: {e['median']:.4g} {e['unit']}", flush=True)
    settings = {"sections": args.sections, "reps": args.reps, "workers": args.workers,
                "cpu_count": os.cpu_count(), "load_average_1_5_15": load,
                "nice": os.nice(0)}
    path = write_results("scale", torch.device("cpu"), settings, entries, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
