"""What a run does with a record it cannot use (a checksum mismatch, an undecodable JPEG):
``data.on_bad_record=stop`` (the default: a one-line error naming the file and record) or
``skip``: the record is named once (log, and ``metrics.jsonl`` through ``take_new``), counted,
and replaced in every batch that holds it by a deterministic substitute, so batches stay full;
past ``budget`` bad records the run stops with one line (a dataset that damaged needs
``tricks verify`` and a new conversion, not a quiet run).

The seam: ``BadRecords.batches(engine, tasks_from, start)`` stands where a Loader hands its task
stream to its engine. Each task is screened (``screen``: the records already known bad are
substituted) before the engine sees it; an engine that fails on a record raises
``RecordError``, after which the stream is made again from the failed batch on, with that
record substituted (the batches before it were already yielded; the engine's prefetched ones
are dropped). Engines need nothing new beyond raising ``RecordError`` (the native engine does:
its decode threads check each record's CRC-32).

The substitute for record ``i``: the first record after ``i`` (cyclically) not known bad, with
its crop drawn for its own size from the key (seed, epoch, batch, "substitute", slot) (training:
the plan's random-resized crop; evaluation: its centre crop); the flip is the original's. It
depends only on the record, epoch, batch and slot, so a resumed or repeated run makes the same
batches.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from tricks.errors import DataError, RecordError
from .records import RecordFile
from .sampling import BatchTask, EpochPlan, center_boxes, keyed_generator, random_resized_boxes

POLICIES = ("stop", "skip")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class BadRecords:
    """The bad-record policy of one record file and plan (see the module docstring).

    Args:
        records: the file the tasks index.
        plan: the epoch plan (its seed, train flag, scale, ratio and crop ratio draw the
            substitutes' crops).
        policy: "stop" or "skip".
        budget: the most distinct bad records ``skip`` tolerates.
        log: where the one line per bad record goes (default: stderr).
    """

    def __init__(self, records: RecordFile, plan: EpochPlan, policy: str = "stop",
                 budget: int = 100, log: Callable[[str], None] | None = None):
        if policy not in POLICIES:
            raise DataError(f"data.on_bad_record={policy!r}: choose one of {', '.join(POLICIES)}")
        if budget < 0:
            raise DataError(f"data.bad_record_budget must be ≥ 0, got {budget}")
        self.records, self.plan, self.policy, self.budget = records, plan, policy, budget
        self.log = log or _stderr
        self.bad: dict[int, str] = {}      # record → reason, in the order found
        self._new: list[dict] = []         # found since the last take_new
        self._bad_sorted = np.zeros(0, np.int64)

    def found(self, error: RecordError) -> None:
        """Record ``error``'s record as bad: raises it under ``stop`` (or when it is not about
        this file), and a one-line ``DataError`` past the budget."""
        if error.index is None or error.path != str(self.records.path):
            raise error
        if self.policy == "stop":
            raise RecordError(f"{error} (Loader(on_bad_record='skip'), data.on_bad_record=skip "
                              f"in tricks train, skips such records; `tricks verify "
                              f"{self.records.path.parent}` lists them)",
                              error.path, error.index, error.reason) from None
        i = int(error.index)
        if i in self.bad:  # its substitute was the one that failed: cannot happen twice
            raise error
        self.bad[i] = error.reason or "bad"
        self._bad_sorted = np.array(sorted(self.bad), np.int64)
        if len(self.bad) > self.budget:
            raise DataError(f"{self.records.path}: {len(self.bad)} bad records, over "
                            f"data.bad_record_budget={self.budget} (the latest: record {i}, "
                            f"{self.bad[i]}): check it with `tricks verify "
                            f"{self.records.path.parent}` and convert it again")
        sub = self.substitute(i)
        self.log(f"skipped bad record {i} of {self.records.path} ({self.bad[i]}): record {sub} "
                 f"takes its place ({len(self.bad)} of at most {self.budget} bad records)")
        self._new.append({"file": str(self.records.path), "record": i, "reason": self.bad[i],
                          "substitute": sub})

    def substitute(self, i: int) -> int:
        """The first record after ``i`` (cyclically) not known bad."""
        n = len(self.records)
        j = (i + 1) % n
        while j in self.bad:
            if j == i:
                raise DataError(f"{self.records.path}: every record is bad")
            j = (j + 1) % n
        return j

    def screen(self, task: BatchTask) -> BatchTask:
        """``task`` with its known-bad records replaced by their substitutes (and those
        substitutes' crops); ``task`` itself when it holds none."""
        if not len(self._bad_sorted):
            return task
        hit = np.isin(task.indices, self._bad_sorted)
        if not hit.any():
            return task
        indices, boxes = task.indices.copy(), task.boxes.copy()
        index = self.records.index
        for k in np.flatnonzero(hit):
            j = self.substitute(int(indices[k]))
            indices[k] = j
            h = torch.tensor([int(index[j]["height"])], dtype=torch.int64)
            w = torch.tensor([int(index[j]["width"])], dtype=torch.int64)
            if self.plan.train:
                gen = keyed_generator(self.plan.seed, task.epoch, task.batch, "substitute",
                                      int(k))
                box = random_resized_boxes(h, w, gen, self.plan.scale, self.plan.ratio)
            else:
                box = center_boxes(h, w, self.plan.crop_ratio)
            boxes[k] = box[0].numpy()
        return replace(task, indices=indices, boxes=boxes)

    def batches(self, engine, tasks_from: Callable[[int], Iterable[BatchTask]], start: int
                ) -> Iterator:
        """The engine's batches for the tasks ``tasks_from(start)``, screened; on a
        ``RecordError`` the record is handled by the policy and the stream made again from the
        batch that failed."""
        position = start
        while True:
            stream = engine.batches(map(self.screen, tasks_from(position)))
            try:
                for out in stream:
                    position += 1
                    yield out
                return
            except RecordError as e:
                self.found(e)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()

    def take_new(self) -> list[dict]:
        """The bad records found since the last call (for ``metrics.jsonl``)."""
        new, self._new = self._new, []
        return new
