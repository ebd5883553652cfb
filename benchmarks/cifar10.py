"""A class-balanced subset of the CIFAR-10 JPEG tarball as an ImageFolder tree (train/ test/).

    python -m tricks.benchmarks.cifar10 ../shared/data/cifar10-jpg.tar.gz /tmp/cifar --train 500 --test 100
"""
from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path


def extract_subset(tarball: str | Path, dst: str | Path, train: int | None = None,
                   test: int | None = None) -> Path:
    """The first ``train``/``test`` images of each class (file-name order; None: all), extracted
    in one pass in archive order (random access into a .gz re-reads it from the start)."""
    per_class = {"train": train, "test": test}
    dst = Path(dst)
    with tarfile.open(tarball) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        chosen, counts = set(), {}
        for m in sorted(members, key=lambda m: m.name):
            _, split, cls, _ = m.name.split("/")
            limit = per_class.get(split)
            if limit is None or counts.get((split, cls), 0) < limit:
                counts[(split, cls)] = counts.get((split, cls), 0) + 1
                chosen.add(m.name)
        tar.extractall(dst, members=[m for m in members if m.name in chosen], filter="data")
    return dst / "cifar10"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tricks.benchmarks.cifar10", description=__doc__)
    p.add_argument("tarball")
    p.add_argument("dst")
    p.add_argument("--train", type=int, default=None, help="images per class (default: all)")
    p.add_argument("--test", type=int, default=None, help="images per class (default: all)")
    args = p.parse_args(argv)
    print(extract_subset(args.tarball, args.dst, args.train, args.test))
    return 0


if __name__ == "__main__":
    sys.exit(main())
