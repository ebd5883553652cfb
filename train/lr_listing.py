"""`tricks lr`: the LR every update of a run will use, for every schedule × warmup combination,
as a text listing and a PNG, before any GPU time is spent.

The values come from ``schedule.lr_at`` with ``schedule.schedule_args``: the very function and
arguments the trainer calls each update, so what is listed is what runs.
"""
from __future__ import annotations

from pathlib import Path

from .config import Config
from .schedule import lr_at, schedule_args, scaled_lr

PAPER_WARMUP_EPOCHS = 5  # He et al. 2018 §3.1: warmup over the first 5 epochs


def combinations(cfg: Config) -> list[tuple[str, float]]:
    """(schedule, warmup epochs): cosine, linear and step, each without and with warmup (the
    configured length, or the paper's 5 epochs when the config has none); the configured one
    first."""
    s = cfg.schedule
    w = s.warmup_epochs or PAPER_WARMUP_EPOCHS
    combos = [(s.name, s.warmup_epochs)]
    for kind in ("cosine", "linear", "step"):
        for warm in (0.0, w):
            if (kind, warm) not in combos:
                combos.append((kind, warm))
    return combos


def label(kind: str, warmup_epochs: float) -> str:
    return f"{kind}+warmup{warmup_epochs:g}" if warmup_epochs else kind


def lr_columns(cfg: Config, steps_per_epoch: int) -> dict[str, list[float]]:
    """{label: [LR of update 1, …, LR of update total]} for every combination (the configured
    one first), with the config's peak (linear scaling), epochs, milestones and γ."""
    s, o = cfg.schedule, cfg.optim
    peak = scaled_lr(o.lr, cfg.train.batch, o.lr_scaling)
    out = {}
    for kind, warm in combinations(cfg):
        kw = schedule_args(kind, warm, s.step_epochs, s.step_gamma, peak, steps_per_epoch,
                           cfg.train.epochs)
        out[label(kind, warm)] = [lr_at(i, **kw) for i in range(1, kw["total"] + 1)]
    return out


def listed_updates(total: int, steps_per_epoch: int, every: int | None) -> list[int]:
    """Every ``every``-th update (and the last); by default every update of a short run, else
    the first and last update of each epoch."""
    if every is None and total <= 1000:
        every = 1
    if every:
        return sorted(set(range(1, total + 1, every)) | {total})
    return sorted({u for e in range(total // steps_per_epoch)
                   for u in (e * steps_per_epoch + 1, (e + 1) * steps_per_epoch)})


def format_listing(columns: dict[str, list[float]], steps_per_epoch: int,
                   every: int | None = None) -> str:
    """One line per listed update: update, epoch, batch within the epoch, then each LR."""
    names = list(columns)
    total = len(columns[names[0]])
    head = ["update", "epoch", "batch"] + [n + (" (config)" if k == 0 else "")
                                           for k, n in enumerate(names)]
    widths = [max(8, len(h)) for h in head]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    for u in listed_updates(total, steps_per_epoch, every):
        e, b = divmod(u - 1, steps_per_epoch)
        row = [str(u), str(e + 1), str(b + 1)] + [f"{columns[n][u - 1]:.6g}" for n in names]
        lines.append("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


def plot_png(columns: dict[str, list[float]], steps_per_epoch: int, path: str | Path,
             title: str = "") -> Path:
    """LR against update (and epoch, on the top axis), one line per combination."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, (name, lrs) in enumerate(columns.items()):
        ax.plot(range(1, len(lrs) + 1), lrs, lw=2.5 if k == 0 else 1.2,
                label=name + (" (config)" if k == 0 else ""))
    ax.set_xlabel("update")
    ax.set_ylabel("learning rate")
    top = ax.secondary_xaxis("top", functions=(lambda u: u / steps_per_epoch,
                                               lambda e: e * steps_per_epoch))
    top.set_xlabel("epoch")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
