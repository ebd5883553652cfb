"""The resume policy: what a checkpoint's position means, the changes that would make it mean
something else (refused, in one line), and the log lines a killed run wrote after it.

What is restored (``Trainer._restore``): the model, optimizer, loss scaler and EMA states; the
iteration, epoch and batch within it; the best top-1; the epoch's sums so far
(``meter.EpochMeter``); the host and device RNG states (``checkpoint.set_rng_state``). The config
is the checkpoint's, with the overrides given to ``--resume``; of those, a change of the global
batch, the training data or the model is refused here."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from tricks.errors import UserError
from tricks.pipeline import atomic

from .config import Config


def dataset_identity(loader) -> dict:
    """What a training position depends on in the data: the record count, the class list and a
    cheap fingerprint of the record index (offsets, lengths, labels, sizes: changes when any
    image is added, removed, relabelled or re-encoded), not a hash of the pixels."""
    digest = hashlib.blake2b(np.ascontiguousarray(loader.records.index).tobytes(),
                             digest_size=8)
    digest.update(json.dumps(loader.classes).encode())
    return {"records": len(loader.records), "classes": len(loader.classes),
            "index": digest.hexdigest()}


def resume_key(cfg: Config, loader) -> dict:
    """What a checkpoint's position (iteration, epoch, batch in the epoch) means: the global
    batch it counts in, the dataset it indexes and the model it holds. A resume with any of
    these changed is refused (``check_resumable``)."""
    m = cfg.model
    return {"train.batch": cfg.train.batch, "dataset": dataset_identity(loader),
            "model": {"name": m.name, "width": m.width, "cifar_stem": m.cifar_stem}}


def check_resumable(state: dict, now: dict, data_root) -> None:
    """Refuse (``UserError``, one line naming the checkpoint) a resume whose position would mean
    something else: ``now`` (``resume_key`` of this run) differs from the checkpoint's."""
    saved = state.get("resume_key")
    if saved is None:
        return  # a checkpoint from before the key was recorded: nothing to compare
    where = state["path"]
    if saved["train.batch"] != now["train.batch"]:
        raise UserError(f"cannot resume {where}: train.batch changed from "
                        f"{saved['train.batch']} to {now['train.batch']} (the position and "
                        "the schedule are counted in global batches); resume with "
                        f"train.batch={saved['train.batch']}")
    if saved["dataset"] != now["dataset"]:
        diff = ", ".join(f"{k} {saved['dataset'][k]} → {now['dataset'][k]}"
                         for k in saved["dataset"] if saved["dataset"][k] != now["dataset"][k])
        raise UserError(f"cannot resume {where}: the training data changed ({diff}) at "
                        f"{data_root}; resume with the dataset the run started on")
    if saved["model"] != now["model"]:
        diff = ", ".join(f"model.{k} {saved['model'][k]} → {now['model'][k]}"
                         for k in saved["model"] if saved["model"][k] != now["model"][k])
        raise UserError(f"cannot resume {where}: the model changed ({diff})")


def truncate_logs(metrics_path: Path, log_path: Path, epochs_done: int, step: int) -> None:
    """Drop the lines of ``metrics.jsonl`` after epoch ``epochs_done`` and of
    ``train_log.jsonl`` after iteration ``step``: written after the checkpoint by a run that
    was then killed."""
    for path, keep in ((metrics_path, lambda r: r["epoch"] <= epochs_done),
                       (log_path, lambda r: r["step"] <= step)):
        if path.exists():
            rows = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and keep(json.loads(ln))]
            atomic.write_text(path, "".join(r + "\n" for r in rows))
