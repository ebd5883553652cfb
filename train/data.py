"""Turning ``data.path`` into a converted dataset folder, and building the loaders."""
from __future__ import annotations

from pathlib import Path

import torch

from tricks.errors import ConfigError, DataError, OptionError
from tricks.pipeline import (CenterCrop, Engine, Loader, Output, PadCrop, RandomResizedCrop,
                             Sampling)
from tricks.pipeline.ops import make_op
from tricks.pipeline.records import list_splits

from .config import Config

VAL_SPLITS = ("val", "validation", "test")


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
        "randaugment": dict(num_ops=a.randaugment_ops, magnitude=a.randaugment_magnitude),
        "grayscale": dict(p=a.grayscale_p),
        "blur": dict(kernel_size=a.blur_kernel, sigma=tuple(a.blur_sigma), p=a.blur_p),
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


def loader_engine(cfg: Config) -> Engine:
    """The config's engine choice (``data.engine``, ``data.workers``, ``data.prefetch``,
    ``data.decode``, ``data.engine_options``) as the Loader's ``Engine``."""
    d = cfg.data
    options = dict(d.engine_options)
    if d.decode != "auto":
        if d.engine != "native":
            raise ConfigError(f"data.decode={d.decode} applies to the native engine only "
                              f"(data.engine={d.engine} decodes its own way)")
        options["decode"] = d.decode
    try:
        return Engine(d.engine, workers=d.workers, prefetch=d.prefetch, **options)
    except OptionError as e:
        raise ConfigError(f"data: {e}") from None


def _loader_options(cfg: Config, device, dtype, rank: int, world_size: int) -> dict:
    """What the training and validation loaders share: device, output, engine, and the shard
    (``train.batch`` is the global batch)."""
    return dict(device=device, output=Output(dtype, cfg.train.channels_last),
                engine=loader_engine(cfg),
                sampling=Sampling(seed=cfg.train.seed, rank=rank, world_size=world_size,
                                  global_batch=True),
                on_bad_record=cfg.data.on_bad_record,
                bad_record_budget=cfg.data.bad_record_budget)


def make_val_loader(cfg: Config, root: Path, split: str, device: torch.device,
                    dtype: torch.dtype, rank: int = 0, world_size: int = 1, batch=None,
                    workers=None) -> Loader:
    """Resize + centre crop at the validation size, in order, every sample once."""
    d = cfg.data
    options = _loader_options(cfg, device, dtype, rank, world_size)
    if workers is not None:
        e = options["engine"]
        options["engine"] = Engine(e.name, workers=workers, prefetch=e.prefetch, **e.options)
    return Loader(root, split, batch or cfg.train.batch, train=False,
                  image_size=d.val_image_size or d.image_size,
                  crop=CenterCrop(d.crop_ratio), **options)


def train_crop(cfg: Config):
    d = cfg.data
    if d.crop == "pad":
        return PadCrop(d.pad, d.pad_fill, d.pad_mode)
    return RandomResizedCrop(tuple(d.scale), tuple(d.ratio))


def make_loaders(cfg: Config, root: Path, device: torch.device, dtype: torch.dtype,
                 rank: int = 0, world_size: int = 1) -> tuple[Loader, Loader | None]:
    d = cfg.data
    augment, mix = build_ops(cfg)
    train = Loader(root, d.train_split, cfg.train.batch, train=True, image_size=d.image_size,
                   crop=train_crop(cfg), augment=augment, mix=mix,
                   **_loader_options(cfg, device, dtype, rank, world_size))
    val_split = pick_val_split(root, d.val_split)
    val = None
    if val_split is not None:
        val = make_val_loader(cfg, root, val_split, device, dtype, rank, world_size)
    return train, val
