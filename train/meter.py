"""An epoch's training sums (loss, top-1, images, data wait, time), kept on the device so that
no step waits for the host: read back once per log window and once at the epoch's end."""
from __future__ import annotations

import time

import torch

from . import distributed

# the sums a checkpoint saves mid-epoch (``EpochMeter.sums_so_far``), for an epoch not begun
NO_SUMS = {"loss_sum": 0.0, "correct": 0, "seen": 0, "labelled": 0, "wait": 0.0, "time": 0.0}


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[torch.Tensor]:
    """Correct top-k predictions of ``logits`` (N×K) for integer ``labels`` (N), as 0-dim
    device tensors (no host sync)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    return [hit[:, :k].any(dim=1).sum() for k in ks]


class EpochMeter:
    """One epoch's sums on this rank: ``loss_sum`` (float64, loss × images) and ``correct``
    (int64, top-1 hits of unmixed batches) as device tensors; ``seen`` and ``labelled`` images
    as ints; the data wait and time since the epoch began (``loader.wait_time``, seconds); and
    the log window's loss sum (``window``, float64 on the device) over ``in_window`` steps.

    ``prior``: the sums a checkpoint saved mid-epoch (``sums_so_far``; totals over the ranks,
    so only rank 0 starts from them; time and data wait from those already spent, on every
    rank), for a resumed epoch that reports what an uninterrupted one would."""

    def __init__(self, loader, device: torch.device, prior: dict | None = None,
                 main: bool = True):
        prior = prior or NO_SUMS
        if not main:
            prior = {**prior, "loss_sum": 0.0, "correct": 0, "seen": 0, "labelled": 0}
        self.loader, self.device = loader, device
        self.loss_sum = torch.full((), prior["loss_sum"], device=device, dtype=torch.float64)
        self.correct = torch.full((), prior["correct"], device=device, dtype=torch.long)
        self.seen, self.labelled = prior["seen"], prior["labelled"]
        self.wait0 = loader.wait_time - prior["wait"]
        self.t0 = time.perf_counter() - prior["time"]
        self.window = torch.zeros((), device=device, dtype=torch.float64)
        self.in_window = 0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """One step: its mean ``loss`` (0-dim), ``logits`` (N×K) and ``targets`` (N labels, or
        N×K mixed: no top-1 for those)."""
        n = len(targets)
        self.loss_sum += loss.double() * n
        self.window += loss.double()
        self.seen += n
        self.in_window += 1
        if targets.ndim == 1:
            self.correct += accuracy_counts(logits, targets, ks=(1,))[0]
            self.labelled += n

    def reset_window(self) -> None:
        self.window.zero_()
        self.in_window = 0

    def waited(self) -> float:
        """Seconds this epoch spent blocked on the loader."""
        return self.loader.wait_time - self.wait0

    def sums_so_far(self, epoch: int) -> dict:
        """The sums over all ranks (a collective: every rank calls it), for a checkpoint."""
        sums = distributed.all_reduce_sum(torch.cat([
            self.loss_sum.reshape(1), self.correct.double().reshape(1),
            torch.tensor([float(self.seen), float(self.labelled)], dtype=torch.float64,
                         device=self.device)]))
        loss_sum, correct, seen, labelled = sums.tolist()
        return {"epoch": epoch, "loss_sum": loss_sum, "correct": int(correct),
                "seen": int(seen), "labelled": int(labelled), "wait": self.waited(),
                "time": time.perf_counter() - self.t0}

    def totals(self) -> tuple[float, float, float, float]:
        """The epoch's loss sum, images, top-1 hits and labelled images over all ranks (a
        collective)."""
        dev = self.device
        totals = distributed.all_reduce_sum(torch.stack([
            self.loss_sum, torch.tensor(float(self.seen), device=dev, dtype=torch.float64),
            self.correct.double(),
            torch.tensor(float(self.labelled), device=dev, dtype=torch.float64)]))
        return tuple(totals.tolist())
