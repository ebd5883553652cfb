"""Test helper, run in a subprocess (an engine such as FFCV changes process-wide torch settings
when imported): run one registered engine over pickled BatchTasks and torch.save what it
yields. Usage: python tests/engine_worker.py RECORDS NAME OPTIONS_JSON TASKS_PT OUT_PT"""
import json
import sys

import torch

from tricks.pipeline.engines.base import EngineSpec, engine_class
from tricks.pipeline.records import RecordFile

records, name, options, tasks_file, out = sys.argv[1:6]
options = json.loads(options)
tasks = torch.load(tasks_file, weights_only=False)
cls = engine_class(name)
spec = EngineSpec("cpu", workers=2, prefetch=2, batch_size=max(len(t.indices) for t in tasks))
engine = cls(RecordFile(records), spec, **options)
cls.capabilities(torch.device("cpu"), **options)
# clone(): a batch lives in the engine's memory until the next is asked for; clone keeps strides
got = [(images.clone(), labels.clone()) for images, labels in engine.batches(tasks)]
engine.close()
torch.save({"batches": got}, out)
