"""The run directory and what it records about the environment."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision

from tricks.pipeline.atomic import disk_error


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {_cpu_model()} ({os.cpu_count()} cores)"


def environment(device: torch.device, seed: int | None = None, data: str | None = None) -> dict:
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": sys.argv,
            "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": np.__version__,
            "pillow": PIL.__version__, "cuda": torch.version.cuda,
            "device": device_name(device), "host": platform.node(), "commit": git_commit(),
            "seed": seed, "data": data}


def make_run_dir(out: str, name: str | None) -> Path:
    """A new run directory ``out/name`` (``name-2``, ``name-3``, … when taken; default name:
    the time). Claimed by ``mkdir`` itself, which fails for all but one process, so two runs
    started at once never share one (no check-then-create race). Raises ``DiskError`` (one
    line) where ``out`` cannot be written."""
    base = Path(out)
    name = name or time.strftime("%Y%m%d-%H%M%S")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, base, "cannot create the run directory") from None
    k = 1
    while True:
        path = base / (name if k == 1 else f"{name}-{k}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            k += 1
        except OSError as e:
            raise disk_error(e, path, "cannot create the run directory") from None
