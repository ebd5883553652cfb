"""The paper's Table 5 columns we can compute: parameters and forward multiply-adds at 224²
for the ResNet-50 variants (and ResNet-D at other depths), beside the paper's values."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tricks.errors import exit_on_user_error
from tricks.models import count_macs, count_params, create_model

from .results import default_results_dir, parse_models

# He et al. 2018, Table 5: FLOPs (multiply-adds) in G
PAPER_GMACS = {"resnet50": 3.8, "resnet50b": 4.1, "resnet50c": 4.3, "resnet50d": 4.3}
DEFAULT = "resnet50,resnet50b,resnet50c,resnet50d,resnet18d,resnet34d,resnet101d,resnet152d"


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tricks bench models", description=__doc__)
    p.add_argument("--models", default=DEFAULT)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--out", help="folder for models.json and models.md (default: "
                                 "benchmarks/results/ in a source checkout, "
                                 "./benchmarks-results/ for an installed package)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    names = parse_models(args.models)
    if names is None:
        return 1
    rows = []
    for name in names:
        model = create_model(name)
        macs = count_macs(model, args.size) / 1e9
        paper = PAPER_GMACS.get(name) if args.size == 224 else None
        rows.append({"model": name, "params_m": count_params(model) / 1e6, "gmacs": macs,
                     "paper_gmacs": paper,
                     "diff_pct": 100 * (macs - paper) / paper if paper else None})
        print(f"{name:12s} {rows[-1]['params_m']:7.2f} M params  {macs:6.2f} GMACs"
              + (f"  (paper {paper})" if paper else ""))
    out = Path(args.out) if args.out else default_results_dir()
    out.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "models", "image_size": args.size, "torch": torch.__version__,
           "source_of_paper_values": "He et al. 2018, Bag of Tricks, Table 5", "rows": rows}
    (out / "models.json").write_text(json.dumps(doc, indent=1))
    lines = [f"| Model | Params (M) | GMACs at {args.size}² | Paper (Table 5) | Difference |",
             "|---|---|---|---|---|"]
    for r in rows:
        paper = f"{r['paper_gmacs']}" if r["paper_gmacs"] else "—"
        diff = f"{r['diff_pct']:+.1f}%" if r["diff_pct"] is not None else "—"
        lines.append(f"| {r['model']} | {r['params_m']:.2f} | {r['gmacs']:.2f} | {paper} | "
                     f"{diff} |")
    (out / "models.md").write_text("\n".join(lines) + "\n")
    print(f"results: {out / 'models.json'}, {out / 'models.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
