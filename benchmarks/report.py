"""Tables and charts from a throughput results file: Table 3's layout, and a bar chart."""
from __future__ import annotations

import json
import statistics
import sys
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
            "baseline_peak_mb": base[1]["peak_memory_mb"] if base else None,
            "efficient_peak_mb": eff[1]["peak_memory_mb"] if eff else None,
            "extra": extra})
    # fed from data, against synthetic input in the same mode; the trick stack (any input)
    # also against the plain efficient mode on synthetic input (the issue's 90% target)
    loader = [{"model": m, "mode": mode, "input": i, "rate": v[0],
               "synthetic": med[(m, ref, "synthetic")][0],
               "fraction": v[0] / med[(m, ref, "synthetic")][0],
               "reference": f"{ref} synthetic", "data_wait": v[1].get("data_wait")}
              for (m, mode, i), v in med.items()
              for ref in dict.fromkeys([mode] + (["efficient"] if mode == "efficient-stack"
                                                 else []))
              if (m, ref, "synthetic") in med and (i, ref) != ("synthetic", mode)]
    return {"rows": rows, "loader": loader}


def _fmt(v, spec=",.0f"):
    return "—" if v is None else format(v, spec)


def _rate(v):  # CPU rates are small: keep a decimal there
    return _fmt(v, ",.1f" if v is not None and v < 100 else ",.0f")


def _times(v):
    return "—" if v is None else f"{v:.2f}×"


def _gib(mb):  # peak memory is only known on CUDA
    return "—" if mb is None else f"{mb / 1024:.1f}"


def write_markdown(json_path: Path, summary: dict, title: str = "", notes: str = "") -> Path:
    lines = [f"{title}", ""] if title else []
    lines += [notes, ""] if notes else []
    lines += ["| Model | Input | Baseline img/s (batch, FP32) | Strict FP32 img/s (no TF32) "
              "| Efficient img/s (batch, precision) | Efficient / baseline "
              "| Efficient / strict FP32 | min/epoch baseline | min/epoch efficient "
              "| peak GiB baseline / efficient | other modes img/s (÷ baseline) |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        strict = r["extra"].get("baseline-strict")
        extra = ", ".join(f"{k}: {_rate(v)}" + (f" ({v / r['baseline']:.2f}×)" if r["baseline"]
                                                else "")
                          for k, v in r["extra"].items() if k != "baseline-strict")
        vs_strict = r["efficient"] / strict if strict and r["efficient"] else None
        base = _rate(r["baseline"]) + (f" ({r['baseline_batch']})" if r["baseline"] else "")
        eff = _rate(r["efficient"]) + (f" ({r['efficient_batch']}, {r['efficient_precision']})"
                                       if r["efficient"] else "")
        lines.append(
            f"| {r['model']} | {r['input']} | {base} | {_rate(strict)} | {eff} | "
            f"{_times(r['ratio'])} | {_times(vs_strict)} | "
            f"{_fmt(r['baseline_epoch_min'], '.1f')} | "
            f"{_fmt(r['efficient_epoch_min'], '.1f')} | {_gib(r['baseline_peak_mb'])} / "
            f"{_gib(r['efficient_peak_mb'])} | {extra} |")
    if summary["loader"]:
        lines += ["", "| Model | Mode | Input | img/s | against | its img/s | fraction "
                  "| time waiting for data |", "|---|---|---|---|---|---|---|---|"]
        for r in summary["loader"]:
            wait = "—" if r["data_wait"] is None else f"{100 * r['data_wait']:.0f}%"
            lines.append(f"| {r['model']} | {r['mode']} | {r['input']} | {_rate(r['rate'])} | "
                         f"{r['reference']} | {_rate(r['synthetic'])} | "
                         f"{100 * r['fraction']:.0f}% | {wait} |")
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


def render(json_path: str | Path) -> tuple[dict, Path, Path]:
    """The Markdown table and the chart of a ``bench train`` results file, beside it."""
    json_path = Path(json_path)
    doc = json.loads(json_path.read_text())
    summary = summarize(doc["results"])
    st = doc["settings"]
    title = f"Training throughput on {doc['device']}, torch {doc['versions']['torch']}"
    cuda = any(e["settings"]["tf32"] is not None for e in doc["results"])
    fp32 = ("strict FP32 (TF32 off)" if st.get("strict_fp32") else  # files before baseline-strict
            "FP32 with torch's defaults (cuDNN may use TF32 for convolutions; the strict FP32 "
            "column turns TF32 off in cuDNN and cuBLAS)" if cuda else "FP32")
    notes = (f"Median images/s of {st['windows']} windows of {st['steps_per_window']} steps after "
             f"{st['warmup_steps']} warm-up steps; cuDNN autotuning on. Baseline: "
             f"{fp32}, NCHW, SGD. Efficient: channels-last, fused SGD, "
             f"linear-scaled LR with warmup (FP16 autocast + gradient scaler on CUDA, BF16 on "
             f"the CPU). Minutes per epoch are for ImageNet's {IMAGENET_TRAIN:,} images. "
             f"The paper's efficient / baseline: 3.0× (ResNet-50, 8 V100s, Table 3).")
    return (summary, write_markdown(json_path, summary, title, notes),
            write_chart(json_path, summary, title))


if __name__ == "__main__":  # python -m tricks.benchmarks.report train.json: redraw table and chart
    for arg in sys.argv[1:]:
        print(*render(arg)[1:])
