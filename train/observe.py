"""What a run shows besides its JSON lines: TensorBoard scalars and a grid of the first training
batch, the whole run's ETA for the progress bar, and ``curves.png`` in the run directory.

The trainer calls a few hooks with values it has already read back to the host (once per
``train.log_every`` iterations, and per epoch), so observing adds no host sync to the step.
"""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

from tqdm import tqdm

from tricks.pipeline.atomic import disk_error

# metrics.jsonl keys → TensorBoard tags (per epoch; the x axis of every tag is the iteration)
EPOCH_TAGS = {"train_loss": "epoch/train_loss", "train_top1": "epoch/train_top1",
              "val_loss": "val/loss", "val_top1": "val/top1", "val_top5": "val/top5",
              "ema_loss": "ema/loss", "ema_top1": "ema/top1", "ema_top5": "ema/top5",
              "images_per_s": "epoch/images_per_s", "data_wait": "epoch/data_wait",
              "epoch_time_s": "epoch/time_s", "lr": "epoch/lr"}


def run_eta(elapsed_s: float, done: int, remaining: int) -> float | None:
    """Seconds left for ``remaining`` iterations at the mean pace of the ``done`` ones so far
    (``elapsed_s`` wall-clock, evaluation included); None before the first."""
    return elapsed_s / done * remaining if done > 0 else None


class Observer:
    """TensorBoard event file, first-batch grid, run ETA and ``curves.png`` of one run.

    ``run_dir`` None (ranks other than 0) makes every hook a no-op except :meth:`eta`.
    TensorBoard is written when ``tensorboard`` is true and the package is importable
    (``torch.utils.tensorboard.SummaryWriter``); otherwise one line says why not.
    """

    def __init__(self, run_dir: Path | None, tensorboard: bool, total_steps: int, step: int = 0,
                 log=print):
        self.run_dir = run_dir
        self.total_steps = total_steps
        self.log = log
        self.writer = None
        self.start(step)
        if run_dir is None or not tensorboard:
            return
        if importlib.util.find_spec("tensorboard") is None:
            log("tensorboard is not installed: no event file (pip install tensorboard, "
                "or train.tensorboard=false to silence this)")
            return
        from torch.utils.tensorboard import SummaryWriter
        # a resumed run drops the events a killed run wrote after its checkpoint
        try:
            self.writer = SummaryWriter(str(run_dir), purge_step=step + 1 if step else None)
        except OSError as e:  # a full disk or read-only run directory: the run goes on
            log(f"no TensorBoard events: {disk_error(e, run_dir, 'cannot write')}")

    def start(self, step: int) -> None:
        """The ETA's clock starts here, at iteration ``step``."""
        self._t0, self._step0 = time.perf_counter(), step
        self._closed = False

    def eta(self, step: int) -> str:
        """The whole run's remaining time as ``h:mm:ss`` (``?`` before the first iteration)."""
        left = run_eta(time.perf_counter() - self._t0, step - self._step0,
                       self.total_steps - step)
        return "?" if left is None else tqdm.format_interval(left)

    def first_batch(self, images, targets, loader, step: int) -> None:
        """A captioned grid of (up to 16 of) the first training batch, as TensorBoard image
        ``train/first_batch``: one device→host copy, once per run."""
        if self.writer is None:
            return
        import numpy as np

        from tricks.pipeline.preview import grid_image
        output = loader.output
        grid = grid_image(images[:16].cpu(), targets[:16].cpu(), loader.classes, output.mean, output.std,
                          cell=128)
        self.writer.add_image("train/first_batch", np.asarray(grid), step, dataformats="HWC")

    def window(self, step: int, loss: float, lr: float, images_per_s: float,
               data_wait: float) -> None:
        """The values of one log window (host floats already read by the trainer)."""
        if self.writer is None:
            return
        for tag, value in (("train/loss", loss), ("train/lr", lr),
                           ("train/images_per_s", images_per_s), ("train/data_wait", data_wait)):
            self.writer.add_scalar(tag, value, step)

    def epoch(self, record: dict) -> None:
        """One metrics.jsonl record: losses, top-1/top-5 (and EMA's), images/s, data-wait
        fraction, epoch time, at the epoch's last iteration."""
        if self.writer is None:
            return
        for key, tag in EPOCH_TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], record["step"])
        self.writer.flush()

    def close(self) -> None:
        """Flush the event file and draw ``curves.png`` beside the metrics. A plotting failure
        is reported, never raised: the run's results are already written. Once per start."""
        if self._closed:
            return
        self._closed = True
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                self.log(f"TensorBoard events not all written: "
                         f"{disk_error(e, self.run_dir, 'cannot write')}")
            self.writer = None
        if self.run_dir is None or not any(
                (self.run_dir / f).is_file() for f in ("metrics.jsonl", "train_log.jsonl")):
            return  # stopped before its first logged step: nothing to plot, nothing to say
        from .plot import plot_runs
        try:
            plot_runs([self.run_dir], self.run_dir / "curves.png")
        except Exception as e:  # noqa: BLE001 (a figure must not turn a finished run into a failure)
            self.log(f"curves.png not written: {e}")
