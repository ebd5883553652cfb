"""Learning curves of one or more runs, read from their ``train_log.jsonl`` (loss and LR every
``train.log_every`` iterations) and ``metrics.jsonl`` (per epoch: losses, top-1), overlaid on
one PNG: loss, top-1 and learning rate against epochs (``tricks plot``)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tricks.errors import UserError


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; none when it does not exist yet."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class Curves:
    """One run's curves, x in epochs (fractional within an epoch for per-window values)."""
    name: str
    loss: tuple[list, list] = field(default_factory=lambda: ([], []))       # train, per window
    lr: tuple[list, list] = field(default_factory=lambda: ([], []))         # per window
    val_loss: tuple[list, list] = field(default_factory=lambda: ([], []))   # per epoch
    train_top1: tuple[list, list] = field(default_factory=lambda: ([], []))  # %, per epoch
    val_top1: tuple[list, list] = field(default_factory=lambda: ([], []))   # %, per epoch
    ema_top1: tuple[list, list] = field(default_factory=lambda: ([], []))   # %, per epoch


def load_run(run_dir: str | Path) -> Curves:
    """A run directory's curves. Window positions are step / iterations per epoch, the latter
    read from the first epoch's record (or, before one exists, the last window of epoch 1).
    Raises UserError when the folder holds neither log."""
    run = Path(run_dir)
    log, metrics = read_jsonl(run / "train_log.jsonl"), read_jsonl(run / "metrics.jsonl")
    if not log and not metrics:
        raise UserError(f"{run}: not a run directory (no train_log.jsonl or metrics.jsonl)")
    if metrics:
        per_epoch = metrics[0]["step"] / metrics[0]["epoch"]
    else:
        per_epoch = max(r["step"] for r in log if r["epoch"] == log[0]["epoch"]) / log[0]["epoch"]
    c = Curves(run.name)
    for r in log:
        c.loss[0].append(r["step"] / per_epoch)
        c.loss[1].append(r["loss"])
        c.lr[0].append(r["step"] / per_epoch)
        c.lr[1].append(r["lr"])
    for r in metrics:
        for key, series, scale in (("val_loss", c.val_loss, 1), ("train_top1", c.train_top1, 100),
                                   ("val_top1", c.val_top1, 100), ("ema_top1", c.ema_top1, 100)):
            if r.get(key) is not None:
                series[0].append(r["epoch"])
                series[1].append(scale * r[key])
    return c


def plot_runs(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Overlay the runs' loss, top-1 and LR against epochs (one colour per run) in a PNG at
    ``out``. Matplotlib's object API (no pyplot: no global figure state, no GUI backend)."""
    from matplotlib.figure import Figure

    runs = [load_run(r) for r in run_dirs]
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax_loss, ax_top1, ax_lr = fig.subplots(1, 3)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for c, colour in zip(runs, colours):
        ax_loss.plot(*c.loss, color=colour, lw=1, label=f"{c.name} train")
        if c.val_loss[0]:
            ax_loss.plot(*c.val_loss, "o--", color=colour, ms=3, label=f"{c.name} val")
        if c.val_top1[0]:
            ax_top1.plot(*c.val_top1, "o-", color=colour, ms=3, label=f"{c.name} val")
        if c.ema_top1[0]:
            ax_top1.plot(*c.ema_top1, "s:", color=colour, ms=3, label=f"{c.name} EMA")
        if c.train_top1[0]:
            ax_top1.plot(*c.train_top1, "^--", color=colour, ms=3, alpha=0.6,
                         label=f"{c.name} train")
        ax_lr.plot(*c.lr, color=colour, lw=1, label=c.name)
    for ax, title, ylabel in ((ax_loss, "loss", "cross-entropy"), (ax_top1, "top-1", "%"),
                              (ax_lr, "learning rate", "LR")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out
