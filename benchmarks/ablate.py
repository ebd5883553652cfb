"""``tricks ablate``: the paper's ablation tables (4, 5, 6) and an augmentation table, rebuilt
on any dataset, several seeds per configuration, with the change of each step and its 95%
interval (paired by seed, Student's t).

    tricks ablate --table 6 --data /data/cifar10 -c demo model.name=resnet18d --seeds 3
"""
from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tricks.errors import UserError

from tricks.train.config import load_config, preset_path
from tricks.pipeline.source import resolve_dataset

from .results import default_results_dir

# two-sided 97.5% quantiles of Student's t, by degrees of freedom (1..30)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042]

# the paper's ImageNet top-1 for each step (He et al. 2018, Tables 4-6), for the README
PAPER = {
    "4": {"reference": 75.87, "+ warmup": 76.03, "+ zero-γ": 76.19, "+ no bias decay": 76.16,
          "+ FP16": 76.21},
    "5": {"vanilla": 76.21, "B": 76.66, "C": 76.87, "D": 77.16},
    "6": {"cosine": 77.91, "+ label smoothing": 78.31, "+ distillation": 78.67,
          "+ mixup": 79.15, "+ distillation + mixup": 79.29},
}


@dataclass
class Row:
    name: str
    overrides: list[str]
    compare_to: int | None = None      # index of the row this one's change is measured against
    seeds: list[float] = field(default_factory=list)  # final val top-1 per seed
    curves: list[list[float]] = field(default_factory=list)
    images_per_s: list[float] = field(default_factory=list)
    wall_s: list[float] = field(default_factory=list)
    error: str | None = None


def table_rows(table: str, args) -> list[Row]:
    """Each table's configurations, as overrides on the base config (cumulative as in the
    paper: each row keeps the rows above it unless it says otherwise)."""
    if table == "4":
        ref, big, warm = args.ref_batch, args.large_batch, args.warmup_epochs
        off = ["schedule.warmup_epochs=0", "model.zero_init_last=false",
               "optim.no_bias_decay=false", "train.precision=fp32"]
        steps = [("batch {big}, linear scaling", []),
                 ("+ warmup", [f"schedule.warmup_epochs={warm}"]),
                 ("+ zero-γ", ["model.zero_init_last=true"]),
                 ("+ no bias decay", ["optim.no_bias_decay=true"]),
                 (f"+ {args.half.upper()}", [f"train.precision={args.half}"])]  # BF16 on a CPU
        rows = [Row(f"reference: batch {ref}, FP32", [f"train.batch={ref}", *off])]
        acc = [f"train.batch={big}", *off]
        for k, (name, extra) in enumerate(steps):
            acc = acc + extra
            rows.append(Row(name.format(big=big), list(acc), compare_to=k))
        return rows
    if table == "5":
        d = args.depth
        variants = [("vanilla", f"resnet{d}"), ("B", f"resnet{d}b"), ("C", f"resnet{d}c"),
                    ("D", f"resnet{d}d")]
        if d in (18, 34):  # basic blocks: no 1×1 conv, so vanilla is B
            variants = [v for v in variants if v[0] != "B"]
        common = ["model.cifar_stem=false", f"data.image_size={args.stem_size}"]
        return [Row(n, [f"model.name={m}", *common], compare_to=k - 1 if k else None)
                for k, (n, m) in enumerate(variants)]
    if table == "6":
        t = [f"teacher.checkpoint={args.teacher_checkpoint}", f"teacher.temperature={args.T}"]
        ls = ["train.label_smoothing=0.1"]
        mix = ["mix.name=mixup", f"mix.alpha={args.alpha}"]
        base = ["schedule.name=cosine", "train.label_smoothing=0", "mix.name=none",
                "teacher.checkpoint=null"]  # whatever the base config had, off
        return [Row("cosine", base),
                Row("+ label smoothing", [*base, *ls], 0),
                Row("+ distillation", [*base, *ls, *t], 1),
                Row("+ mixup", [*base, *ls, *mix], 1),
                Row("+ distillation + mixup", [*base, *ls, *t, *mix], 3)]
    if table == "augment":
        base = ["schedule.name=cosine", "augment.ops=[]", "mix.name=none"]
        return [Row("cosine (base)", base)] + [
            Row(name, base + extra, 0) for name, extra in (
                ("+ cutout", ["augment.ops=[cutout]"]),
                ("+ random erasing", ["augment.ops=[erasing]"]),
                ("+ RICAP", ["mix.name=ricap"]),
                ("+ CutMix", ["mix.name=cutmix"]),
                ("+ AutoAugment", ["augment.ops=[autoaugment]"]),
                ("+ jitter and lighting", ["augment.ops=[jitter, lighting]"]))]
    raise UserError(f"unknown table {table!r}; choose 4, 5, 6 or augment")


def interval(deltas: list[float]) -> tuple[float, float, float] | None:
    """Mean paired change and its 95% interval (Student's t); None with fewer than 2 seeds."""
    n = len(deltas)
    if n < 2:
        return None
    mean = statistics.fmean(deltas)
    half = _T975[min(n - 1, 30) - 1] * statistics.stdev(deltas) / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(ci: tuple[float, float, float] | None) -> str:
    """The paper's direction is an improvement for every step of these tables."""
    if ci is None:
        return "—"
    if ci[1] > 0:
        return "reproduced"
    if ci[2] < 0:
        return "opposite"
    return "not reproduced"


def run_one(base_overrides: list[str], row: Row, seed: int, out: Path, files: list) -> dict:
    from tricks.train.trainer import Trainer
    cfg = load_config(files, [*base_overrides, *row.overrides, f"train.seed={seed}",
                              f"train.out={out}", f"train.name={_slug(row.name)}-s{seed}"])
    start = time.perf_counter()
    trainer = Trainer(cfg, progress=False, log=lambda *a, **k: None)
    try:
        trainer.fit()
    finally:
        trainer.close()
    metrics = [json.loads(x) for x in trainer.metrics_path.read_text().splitlines()]
    return {"top1": metrics[-1]["val_top1"], "curve": [m.get("val_top1") for m in metrics],
            "images_per_s": statistics.fmean(m["images_per_s"] for m in metrics),
            "wall_s": time.perf_counter() - start}


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "row"


def write_outputs(table: str, rows: list[Row], out: Path, meta: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Table {table} on {meta['data']} — {meta['device']}, {meta['epochs']} epochs, "
             f"seeds {meta['seeds']}, {meta['model']}", "",
             "| configuration | top-1 (mean ± std) | change vs | change (95% interval) | "
             "verdict | images/s | wall time (s) |", "|---|---|---|---|---|---|---|"]
    doc_rows = []
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | failed: {r.error} | | | | | |")
            doc_rows.append({"name": r.name, "error": r.error})
            continue
        mean = statistics.fmean(r.seeds)
        std = statistics.stdev(r.seeds) if len(r.seeds) > 1 else 0.0
        ci, vs = None, ""
        if r.compare_to is not None and not rows[r.compare_to].error:
            other = rows[r.compare_to]
            ci = interval([100 * (a - b) for a, b in zip(r.seeds, other.seeds)])
            vs = other.name
        change = (f"{ci[0]:+.2f} [{ci[1]:+.2f}, {ci[2]:+.2f}]" if ci else "—")
        lines.append(f"| {r.name} | {100 * mean:.2f} ± {100 * std:.2f} | {vs} | {change} | "
                     f"{verdict(ci) if vs else ''} | {statistics.fmean(r.images_per_s):,.0f} | "
                     f"{statistics.fmean(r.wall_s):.0f} |")
        doc_rows.append({"name": r.name, "overrides": r.overrides, "top1": r.seeds,
                         "mean": mean, "std": std, "compare_to": vs or None,
                         "change": ci, "verdict": verdict(ci) if vs else None,
                         "curves": r.curves, "images_per_s": r.images_per_s,
                         "wall_s": r.wall_s})
    md = out / f"table{table}.md"
    md.write_text("\n".join(lines) + "\n")
    (out / f"table{table}.json").write_text(json.dumps({**meta, "table": table,
                                                          "rows": doc_rows}, indent=1))
    _plot(rows, out / f"table{table}.png", lines[0])
    return md


def _plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        if r.error or not r.curves:
            continue
        n = min(len(c) for c in r.curves)
        mean = [100 * statistics.fmean(c[i] for c in r.curves) for i in range(n)]
        ax.plot(range(1, n + 1), mean, marker="o", label=r.name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation top-1 (%), mean over seeds")
    ax.set_title(title, fontsize=7)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tricks ablate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="the base configuration (every row starts from it)")
    p.add_argument("--table", required=True, choices=["4", "5", "6", "augment"])
    p.add_argument("-c", "--config", action="append", default=None, metavar="YAML")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", help="results folder (default: benchmarks/results/ablations/"
                                 "<dataset>/<device>/ in a source checkout, "
                                 "./benchmarks-results/ablations/… for an installed package)")
    p.add_argument("--ref-batch", type=int, default=256, help="table 4: the reference batch")
    p.add_argument("--large-batch", type=int, default=1024, help="table 4: the large batch")
    p.add_argument("--warmup-epochs", type=float, default=5, help="table 4: warmup length")
    p.add_argument("--depth", type=int, default=50, help="table 5: ResNet depth")
    p.add_argument("--stem-size", type=int, default=64,
                   help="table 5: input side (upsampled) so the ImageNet stem has work to do")
    p.add_argument("--teacher", default=None,
                   help="table 6: the teacher model, trained first with the base config "
                        "(default: a ResNet-D of twice the depth)")
    p.add_argument("--T", type=float, default=20.0, help="table 6: distillation temperature")
    p.add_argument("--alpha", type=float, default=0.2, help="table 6: mixup α")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    files = [preset_path(c) for c in (args.config or ["demo"])]
    base = load_config(files, args.overrides)
    device = "cuda" if base.train.device == "auto" and torch.cuda.is_available() else \
        base.train.device
    args.half = "fp16" if str(device).startswith("cuda") else "bf16"
    root = resolve_dataset(base.data.path, base.data.max_side, base.data.quality)
    from tricks.train.rundir import device_name
    dev_name = device_name(torch.device("cuda" if str(device).startswith("cuda") else "cpu"))
    out = Path(args.out) if args.out else (
        default_results_dir() / "ablations" / root.name / _slug(dev_name))
    runs = out / "runs"
    overrides = list(args.overrides) + [f"data.path={root}"]
    if args.table == "6":
        teacher = args.teacher or _teacher_name(base.model.name)
        print(f"training the teacher {teacher} (seed 0)")
        t_cfg_row = Row(f"teacher {teacher}", [f"model.name={teacher}"])
        run_one(overrides, t_cfg_row, 0, runs, files)
        args.teacher_checkpoint = runs / f"{_slug(t_cfg_row.name)}-s0" / "checkpoint.pt"
    rows = table_rows(args.table, args)
    for row in rows:
        for seed in range(args.seeds):
            try:
                r = run_one(overrides, row, seed, runs, files)
            except Exception as e:  # a failing configuration is reported in its row
                row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                traceback.print_exc()
                break
            row.seeds.append(r["top1"])
            row.curves.append(r["curve"])
            row.images_per_s.append(r["images_per_s"])
            row.wall_s.append(r["wall_s"])
            print(f"{row.name} seed {seed}: top-1 {100 * r['top1']:.2f}% "
                  f"({r['wall_s']:.0f} s)")
    meta = {"data": str(root), "device": dev_name, "epochs": base.train.epochs,
            "seeds": args.seeds, "model": base.model.name, "base_overrides": args.overrides}
    md = write_outputs(args.table, rows, out, meta)
    print(md.read_text())
    print(f"results: {md}")
    return 0


def _teacher_name(student: str) -> str:
    for small, big in (("18", "34"), ("34", "50"), ("50", "101"), ("101", "152")):
        if student.startswith(f"resnet{small}"):
            return f"resnet{big}d"
    return "resnet152d"
