"""Tables and charts from a throughput results file: Table 3's layout, and a bar chart."""
from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .results import IMAGENET_TRAIN  # noqa: E402


def summarize(entries: list[dict]) -> dict:
    """Per (model, input): baseline and efficient medians, their ratio, minutes per ImageNet
    epoch; per (model, mode, engine): the engine's rate as a fraction of synthetic input.
    Medians are recomputed from the raw windows."""
    med = {(e["settings"]["model"], e["settings"]["mode"], e["settings"]["input"]):
           (statistics.median(e["windows"]), e["settings"]) for e in entries}
    rows = []
    for model, inp in dict.fromkeys((m, i) for m, _, i in med):
        base = med.get((model, "baseline", inp))
        eff = med.get((model, "efficient", inp))
        extra = {mode: med[(model, mode, inp)][0] for (m, mode, i) in med
                 if m == model and i == inp and mode not in ("baseline", "efficient")}
        rows.append({
            "model": model, "input": inp,
            "baseline": base[0] if base else None,
            "baseline_batch": base[1]["batch"] if base else None,
            "efficient": eff[0] if eff else None,
            "efficient_batch": eff[1]["batch"] if eff else None,
            "efficient_precision": eff[1]["precision"] if eff else None,
            "ratio": eff[0] / base[0] if base and eff else None,
            "baseline_epoch_min": IMAGENET_TRAIN / base[0] / 60 if base else None,
            "efficient_epoch_min": IMAGENET_TRAIN / eff[0] / 60 if eff else None,
            "extra": extra})
    loader = [{"model": m, "mode": mode, "input": i, "rate": v[0],
               "synthetic": med[(m, mode, "synthetic")][0],
               "fraction": v[0] / med[(m, mode, "synthetic")][0]}
              for (m, mode, i), v in med.items()
              if i != "synthetic" and (m, mode, "synthetic") in med]
    return {"rows": rows, "loader": loader}


def _fmt(v, spec=",.0f"):
    return "—" if v is None else format(v, spec)


def write_markdown(json_path: Path, summary: dict, title: str = "") -> Path:
    lines = [f"{title}", ""] if title else []
    lines += ["| Model | Input | Baseline img/s (batch, FP32) | Efficient img/s (batch, precision) "
             "| Efficient / baseline | min/epoch baseline | min/epoch efficient | other modes |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        extra = ", ".join(f"{k}: {v:,.0f}" for k, v in r["extra"].items()) or ""
        lines.append(
            f"| {r['model']} | {r['input']} | {_fmt(r['baseline'])} ({r['baseline_batch']}) | "
            f"{_fmt(r['efficient'])} ({r['efficient_batch']}, {r['efficient_precision']}) | "
            f"{_fmt(r['ratio'], '.2f')}× | {_fmt(r['baseline_epoch_min'], '.1f')} | "
            f"{_fmt(r['efficient_epoch_min'], '.1f')} | {extra} |")
    if summary["loader"]:
        lines += ["", "| Model | Mode | Engine | img/s | synthetic img/s | engine / synthetic |",
                  "|---|---|---|---|---|---|"]
        for r in summary["loader"]:
            lines.append(f"| {r['model']} | {r['mode']} | {r['input']} | {_fmt(r['rate'])} | "
                         f"{_fmt(r['synthetic'])} | {100 * r['fraction']:.0f}% |")
    path = Path(json_path).with_suffix(".md")
    path.write_text("\n".join(lines) + "\n")
    return path


def write_chart(json_path: Path, summary: dict, title: str = "") -> Path:
    rows = summary["rows"]
    precision = next((r["efficient_precision"] for r in rows if r["efficient_precision"]), "fp16")
    labels = [f"{r['model']}\n{r['input']}" for r in rows]
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(rows)), 4))
    w = 0.38
    ax.bar([x - w / 2 for x in xs], [r["baseline"] or 0 for r in rows], w,
           label="baseline (FP32)")
    ax.bar([x + w / 2 for x in xs], [r["efficient"] or 0 for r in rows], w,
           label=f"efficient ({precision.upper()}, channels-last)")
    for x, r in zip(xs, rows):
        if r["ratio"]:
            ax.text(x + w / 2, r["efficient"], f"{r['ratio']:.1f}×", ha="center", va="bottom")
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel("training images/s")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path = Path(json_path).with_suffix(".png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
