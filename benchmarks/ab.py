"""Before and after, side by side in one run: one benchmark command run under two source trees
(say, the last landed commit and a change), interleaved round by round, each tree with its own
cache (a change may alter the stored format), so a machine's drift hits both alike.

    python -m tricks.benchmarks.ab --before /tmp/wt-main --after . --rounds 4 -- \\
        loader --engines native --size 224 --storage full --workers 2 --runs 2 --no-ceiling

Each round runs the command once per tree (the order alternating between rounds) and keeps
every result's median of that run (``results[].median``, keyed by its name and settings);
the JSON holds each tree's commit, every round's figures and the median per cell and tree, and
the Markdown the two medians and their ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tricks.errors import UserError, exit_on_user_error

from .results import default_results_dir, device_slug, resolve_device

MODULES = {"loader": "tricks.benchmarks.loader", "train": "tricks.benchmarks.throughput"}
_KEY = ("storage", "size", "workers", "model", "mode", "input", "batch")


def _commit(tree: Path) -> str:
    out = subprocess.run(["git", "-C", str(tree), "describe", "--always", "--dirty"],
                         capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def _source_path(tree: Path, scratch: Path) -> Path:
    """A folder whose ``tricks`` is ``tree`` (as scripts/srcpath.sh makes it)."""
    root = scratch / "src"
    pkg = root / "tricks"
    pkg.mkdir(parents=True)
    for name in ("errors", "pipeline", "models", "train", "benchmarks", "configs"):
        if (tree / name).is_dir():
            (pkg / name).symlink_to((tree / name).resolve())
    return root


def _cells(results: Path) -> dict[str, float]:
    """Every result's median (images/s), keyed by its name and settings."""
    cells = {}
    for path in sorted(results.glob("*.json")):
        for r in json.loads(path.read_text()).get("results", []):
            if r.get("median") is None:
                continue
            s = r.get("settings", {})
            key = ", ".join([r["name"]] + [f"{k}={s[k]}" for k in _KEY if s.get(k) is not None])
            cells[key] = r["median"]
    return cells


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tricks.benchmarks.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="source tree of the first state")
    p.add_argument("--after", required=True, help="source tree of the second state")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", help="results folder (default: ./benchmarks-results/<device>/)")
    p.add_argument("--name", default="ab", help="file name of the results (NAME.json, .md)")
    p.add_argument("command", nargs=argparse.REMAINDER,
                   help="-- then a benchmark (loader, train) and its arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    command = [c for c in args.command if c != "--"]
    if not command or command[0] not in MODULES:
        raise UserError(f"give the benchmark after --: one of {', '.join(MODULES)}")
    trees = {"before": Path(args.before).resolve(), "after": Path(args.after).resolve()}
    for side, tree in trees.items():
        if not (tree / "pipeline").is_dir():
            raise UserError(f"--{side} {tree}: not a source tree (no pipeline/)")
    rounds: dict[str, list[dict[str, float]]] = {s: [] for s in trees}
    with tempfile.TemporaryDirectory() as tmp:
        scratch = {s: Path(tmp) / s for s in trees}
        paths = {s: _source_path(trees[s], scratch[s]) for s in trees}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(trees)[::-1]
            for side in order:
                out = scratch[side] / f"round{r}"
                env = {**os.environ, "PYTHONPATH": str(paths[side]),
                       "TRICKS_CACHE": str(scratch[side] / "cache")}
                run = subprocess.run([sys.executable, "-m", MODULES[command[0]], *command[1:],
                                      "--out", str(out)], env=env, cwd=tmp, text=True,
                                     capture_output=True)
                if run.returncode:
                    raise UserError(f"{side} round {r + 1} failed: "
                                    f"{(run.stderr.strip().splitlines() or ['?'])[-1]}")
                rounds[side].append(_cells(out))
                print(f"round {r + 1}/{args.rounds} {side}: "
                      + "; ".join(f"{k}: {v:.0f}" for k, v in rounds[side][-1].items()),
                      flush=True)
    keys = sorted(set().union(*(c for runs in rounds.values() for c in runs)))
    medians = {s: {k: statistics.median(c[k] for c in rounds[s] if k in c) for k in keys
                   if any(k in c for c in rounds[s])} for s in trees}
    device = resolve_device("auto")
    out = Path(args.out) if args.out else default_results_dir() / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    record = {"command": command, "rounds": args.rounds,
              "trees": {s: {"path": str(t), "commit": _commit(t)} for s, t in trees.items()},
              "raw": rounds, "median": medians, "load_after": os.getloadavg()}
    (out / f"{args.name}.json").write_text(json.dumps(record, indent=1))
    lines = [f"`{' '.join(command)}`, {args.rounds} interleaved rounds, images/s (median)", "",
             f"| cell | before ({record['trees']['before']['commit']}) | after "
             f"({record['trees']['after']['commit']}) | after ÷ before |", "|---|---|---|---|"]
    for k in keys:
        b, a = medians["before"].get(k), medians["after"].get(k)
        cell = lambda v: f"{v:,.0f}" if v else "–"  # noqa: E731
        lines.append(f"| {k} | {cell(b)} | {cell(a)} | {f'{a / b:.3f}' if a and b else '–'} |")
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {out / args.name}.json, .md")
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_user_error(main))
