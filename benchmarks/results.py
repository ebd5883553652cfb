"""The one results format every benchmark writes: JSON with device, versions, commit, every
setting, the raw timing windows and their median."""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from tricks.train.rundir import device_name, environment
from tricks.train.build import DTYPES

OUT_HELP = ("results folder (default: ./benchmarks-results/<device>/; the committed results are "
            "written with --out benchmarks/results/<device>)")
IMAGENET_TRAIN = 1_281_167  # images in ImageNet-1k's training set


def default_results_dir() -> Path:
    """Where results go without ``--out``: ``./benchmarks-results/`` under the current
    directory, never the package (site-packages, or the committed ``benchmarks/results/`` of
    an editable install: a trial run must not overwrite the record)."""
    return Path.cwd() / "benchmarks-results"


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: FP16 on CUDA, FP32 on the CPU."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def parse_models(text: str) -> list[str] | None:
    """Comma-separated registered model names; None (and a one-line error) for unknown ones."""
    from tricks.models import list_models
    names = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in list_models()]
    if unknown:
        print(f"error: unknown model(s) {', '.join(unknown)}; known: {', '.join(list_models())}",
              file=sys.stderr)
        return None
    return names


def device_slug(device: torch.device) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()


def entry(name: str, settings: dict, windows: list[float], unit: str = "images/s") -> dict:
    """One measured configuration: raw windows kept, median reported."""
    return {"name": name, "settings": settings, "unit": unit, "windows": windows,
            "median": statistics.median(windows) if windows else None}


def write_results(benchmark: str, device: torch.device, settings: dict, entries: list[dict],
                  out_dir: str | Path | None = None) -> Path:
    """``<out>/<benchmark>.json`` with the device, versions, commit, ``settings`` and
    ``entries``, replaced atomically (a benchmark may call it after every configuration)."""
    env = environment(device)
    doc = {"benchmark": benchmark, "time": env["time"], "commit": env["commit"],
           "device": env["device"], "host": env["host"],
           "versions": {k: env[k] for k in ("python", "torch", "torchvision", "numpy",
                                            "pillow", "cuda")},
           "settings": settings, "results": entries}
    out = Path(out_dir) if out_dir else default_results_dir() / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{benchmark}.json"
    tmp = path.with_name(f".{path.name}.tmp")  # replaced whole: a reader never sees half a file
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    return path


class Timer:
    """Wall-clock window that first waits for queued CUDA work (so GPU time is counted)."""

    def __init__(self, device: torch.device):
        self.device = device

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self):
        self._sync()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.seconds = time.perf_counter() - self.t0
