"""Checkpoints: written atomically (temporary file, fsync, rename), with a format version."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from tricks.errors import UserError
from tricks.pipeline.atomic import atomic_write, disk_error

FORMAT_VERSION = 1


def rng_state() -> dict:
    """The host generators' states and, with CUDA, every visible device's (a list, device 0
    first: ``torch.cuda.get_rng_state_all``)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``. CUDA states are restored for the devices that exist here: a
    checkpoint from a host with more GPUs restores devices 0..n−1 and drops the rest (torch's
    ``set_rng_state_all`` would index a device that is not there: IndexError at CUDA's lazy
    init), one from a host with fewer leaves the others as seeded. Only the device a rank trains
    on draws anything (rank r uses device r, and its state was saved by rank 0's process, so
    this is exact for one process and as before for DDP)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (with the format version) to ``path`` whole or not at all: a temporary
    ``.<name>.tmp`` beside it, fsync, rename (``atomic.atomic_write``). A full disk, read-only
    folder or missing permission is a one-line ``DiskError`` naming the file, and the temporary
    file is removed (it would hold the space that ran out); ``path`` keeps the last good one."""
    path = Path(path)
    what = "cannot write the checkpoint"
    try:
        with atomic_write(path, what=what) as f:
            torch.save({"format_version": FORMAT_VERSION, **state}, f)
    except RuntimeError as e:
        # torch's zip writer reports its file object's OSError as a RuntimeError (the file is
        # already removed by atomic_write): say what it was
        cause = e.__context__ if isinstance(e.__context__, OSError) else None
        if cause is not None and not isinstance(disk_error(cause, path, what), OSError):
            raise disk_error(cause, path, what) from None
        raise


def load_checkpoint(path: str | os.PathLike) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(state, dict) or "format_version" not in state:
        raise UserError(f"{path}: not a tricks checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {state['format_version']}, this tricks "
                        f"reads {FORMAT_VERSION}")
    state["path"] = str(path)
    return state
