"""Turning ``data.path`` into a converted dataset folder, and building the loaders."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import torch

from tricks.pipeline import Loader
from tricks.pipeline.convert import CONVERT_VERSION, convert, format_report
from tricks.pipeline.errors import DataError, OptionError
from tricks.pipeline.ops import make_op
from tricks.pipeline.records import CLASSES_FILE, list_splits
from tricks.pipeline.synthetic import make_dataset

from .config import Config, ConfigError

VAL_SPLITS = ("val", "validation", "test")


def cache_dir() -> Path:
    base = os.environ.get("TRICKS_CACHE") or \
        Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tricks"
    return Path(base)


def embedded_dataset(log=print) -> Path:
    """The default dataset (synthetic shapes), made and converted once into the cache."""
    root = cache_dir() / "shapes-v1"
    records = root / "records"
    if not (records / CLASSES_FILE).is_file():
        log(f"making the embedded dataset (once) in {root}")
        make_dataset(root / "images")
        convert(root / "images", records, workers=0, progress=False)
    return records


SOURCE_FILE = "source-fingerprint.txt"  # in a cached conversion: the tree it was made from


def tree_fingerprint(src: Path) -> str:
    """A hash of every file under ``src``: its relative path, size and modification time
    (nanoseconds), so an added, removed, renamed or rewritten file changes it; one ``stat``
    a file, as ImageFolder lists the tree on every run."""
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


def resolve_dataset(path: str | None, max_side: int | None = None, quality: int = 90,
                    log=print) -> Path:
    """A converted folder as is; an ImageFolder tree converted into the cache, once, and again
    whenever a file under it was added, removed or changed since (``tree_fingerprint``).

    Raises ``DataError`` for a missing path or one that is neither a folder nor converted."""
    if path is None:
        return embedded_dataset(log)
    src = Path(path).expanduser()
    if not src.exists():
        raise DataError(f"no such dataset: {src}")
    if (src / CLASSES_FILE).is_file():
        return src
    if not src.is_dir():
        raise DataError(f"{src}: not a folder (data.path takes a converted dataset folder or "
                        f"an ImageFolder tree)")
    key = hashlib.sha1(f"{src.resolve()}|{max_side}|{quality}|v{CONVERT_VERSION}".encode()
                       ).hexdigest()[:12]
    dst = cache_dir() / "converted" / f"{src.name}-{key}"
    fingerprint = tree_fingerprint(src)
    stamp = dst / SOURCE_FILE
    if (dst / CLASSES_FILE).is_file() and stamp.is_file() and \
            stamp.read_text().strip() == fingerprint:
        return dst
    if dst.exists():
        log(f"{src} changed since it was converted into {dst}: converting it again")
        shutil.rmtree(dst)  # our own cache folder: no stale split or class may survive
    else:
        log(f"converting {src} into {dst} (once; `tricks convert` does this ahead of time)")
    log(format_report(convert(src, dst, max_side=max_side, quality=quality)))
    stamp.write_text(fingerprint + "\n")
    return dst


def pick_val_split(root: Path, wanted: str | None) -> str | None:
    splits = list_splits(root)
    if wanted is not None:
        if wanted not in splits:
            raise DataError(f"{root} has no split {wanted!r} (has: {', '.join(splits)})")
        return wanted
    return next((s for s in VAL_SPLITS if s in splits), None)


def build_ops(cfg: Config) -> tuple[list, object | None]:
    """The augment ops (in config order) and the mix op, from the config."""
    a, m = cfg.augment, cfg.mix
    kwargs = {
        "jitter": dict(brightness=a.brightness, contrast=a.contrast, saturation=a.saturation,
                       hue=a.hue, random_order=a.jitter_random_order),
        "lighting": dict(std=a.lighting_std),
        "cutout": dict(holes=a.cutout_holes, size=a.cutout_size, p=a.cutout_p),
        "erasing": dict(p=a.erasing_p, area=tuple(a.erasing_area), ratio=a.erasing_ratio,
                        fill=a.erasing_fill),
        "autoaugment": dict(policy=a.autoaugment_policy),
    }
    mix_kwargs = {"mixup": dict(alpha=m.alpha, per_sample=m.per_sample),
                  "cutmix": dict(alpha=m.cutmix_alpha), "ricap": dict(beta=m.ricap_beta)}
    if "cutout" in a.ops:  # every size the run trains at, progressive resizing's included
        for key, size in [("data.image_size", cfg.data.image_size)] + [
                (f"data.progressive from epoch {e}", s) for e, s in cfg.data.progressive]:
            if a.cutout_size > size:
                raise ConfigError(f"augment.cutout_size={a.cutout_size} is larger than the "
                                  f"{size}² training image ({key})")
    try:
        augment = [make_op("augment", name, **kwargs.get(name, {})) for name in a.ops]
        mix = make_op("mix", m.name, **mix_kwargs[m.name]) if m.name != "none" else None
    except OptionError as e:
        raise ConfigError(f"augment/mix: {e}") from None
    return augment, mix


def _loader_options(cfg: Config, device, dtype, rank: int, world_size: int) -> dict:
    d = cfg.data
    return dict(device=device, dtype=dtype, channels_last=cfg.train.channels_last,
                engine=d.engine, decode=d.decode, workers=d.workers, prefetch=d.prefetch,
                seed=cfg.train.seed, rank=rank, world_size=world_size,
                engine_options=d.engine_options)


def make_val_loader(cfg: Config, root: Path, split: str, device: torch.device,
                    dtype: torch.dtype, rank: int = 0, world_size: int = 1, **overrides
                    ) -> Loader:
    """Resize + centre crop at the validation size, in order, every sample once."""
    d = cfg.data
    options = {**_loader_options(cfg, device, dtype, rank, world_size), **overrides}
    batch = options.pop("batch", None) or cfg.train.batch
    return Loader(root, split, batch, train=False, image_size=d.val_image_size or d.image_size,
                  crop_ratio=d.crop_ratio, **options)


def make_loaders(cfg: Config, root: Path, device: torch.device, dtype: torch.dtype,
                 rank: int = 0, world_size: int = 1) -> tuple[Loader, Loader | None]:
    d = cfg.data
    augment, mix = build_ops(cfg)
    train = Loader(root, d.train_split, cfg.train.batch, train=True, image_size=d.image_size,
                   scale=tuple(d.scale), ratio=tuple(d.ratio), augment=augment, mix=mix,
                   crop=d.crop, pad=d.pad, pad_fill=d.pad_fill, pad_mode=d.pad_mode,
                   **_loader_options(cfg, device, dtype, rank, world_size))
    val_split = pick_val_split(root, d.val_split)
    val = None
    if val_split is not None:
        val = make_val_loader(cfg, root, val_split, device, dtype, rank, world_size)
    return train, val
