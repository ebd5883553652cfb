"""Checkpoints: written atomically (temporary file, fsync, rename), with a format version; every
file a user hands in (a checkpoint to resume or evaluate, ``model.weights``, a teacher) is read by
``read_torch_file`` with ``weights_only=True``: it never runs code from the file."""
from __future__ import annotations

import os
import pickle
import random
import re
import warnings
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


# What our checkpoints hold beyond tensors and plain containers: numpy's MT19937 state (a uint32
# array, ``rng_state``). Allowed exactly, for ``weights_only=True``; nothing else is.
# (numpy 2 moved ``numpy.core`` to ``numpy._core``; a checkpoint names the module it was
# written under, so both names are allowed for the one function)
_reconstruct = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct
_NUMPY_RNG_GLOBALS = [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"),
                      (_reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray,
                      np.dtype, type(np.dtype(np.uint32))]


def read_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> object:
    """The object in the ``torch.save`` file ``path``, loaded to the CPU with
    ``torch.load(weights_only=True)`` (tensors, plain containers and numbers, and the numpy RNG
    state our checkpoints hold): a pickle that would build any other object (run code) is
    refused, and the code is not run.

    ``what`` names the file's role in the errors (``model.weights``, ``teacher.checkpoint``).
    Raises ``UserError`` (one line naming the file): not found; empty or truncated; not a torch
    file; needs to run code (with the global it asked for)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: file not found: {path}")
    try:
        # torch warns about a foreign pickle's protocol before refusing it: the one line below
        # says what matters
        with torch.serialization.safe_globals(_NUMPY_RNG_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            asked = re.search(r"GLOBAL (\S+)|got <class '([^']+)'>", str(e))
            name = f" ({asked.group(1) or asked.group(2)})" if asked else ""
            raise UserError(f"{what}={path}: refused: loading it would run code from the file"
                            f"{name}; only tensors and plain data are read") from None
        reason = "not a torch checkpoint file"
    except EOFError:
        reason = "empty or truncated"
    except Exception as e:  # noqa: BLE001: torch's reader raises many types for a bad file
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = ("truncated or damaged" if "zip archive" in text or isinstance(e, OSError)
                  else f"not a torch checkpoint file ({text})")
    raise UserError(f"{what}={path}: cannot read it: {reason}")


def is_ours(state: object) -> bool:
    """Whether a loaded file is one of our checkpoints (``save_checkpoint``: a dict with
    ``format_version``), the one test of it; else it may be a bare state dict."""
    return isinstance(state, dict) and "format_version" in state


def read_state_dict(path: str | os.PathLike, what: str) -> tuple[dict, dict | None]:
    """The model weights in ``path``: ``(state_dict, checkpoint)`` for one of our checkpoints,
    ``(state_dict, None)`` for a bare state dict (torchvision's). Raises ``UserError`` (one line
    naming the file) for an unreadable file (``read_torch_file``) or one that is neither."""
    state = read_torch_file(path, what)
    if is_ours(state):
        return state["model"], state
    if isinstance(state, dict) and state and all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        return state, None
    raise UserError(f"{what}={path}: neither a tricks checkpoint nor a model state dict "
                    "(names → tensors)")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """One of our checkpoints (a run folder means its ``checkpoint.pt``), read safely
    (``read_torch_file``), with ``path`` added. Raises ``UserError`` (one line naming the file)
    for a missing, unreadable or foreign file or another format version."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    state = read_torch_file(path)
    if not is_ours(state):
        raise UserError(f"{path}: not a tricks checkpoint")
    if state["format_version"] != FORMAT_VERSION:
        raise UserError(f"{path}: checkpoint format {state['format_version']}, this tricks "
                        f"reads {FORMAT_VERSION}")
    state["path"] = str(path)
    return state
