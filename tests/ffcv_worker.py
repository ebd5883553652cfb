"""Test helper, run in a subprocess (``import ffcv`` changes process-wide torch settings):
read splits with the FFCV engine and print JSON: for each split and epoch the (colour id,
label) pairs in order, and the batch contract. Usage: python tests/ffcv_worker.py ROOT EPOCHS
SPLIT [SPLIT …]"""
import json
import sys

import torch

from conftest import ids_of
from tricks.pipeline import Engine, Loader, Output, Sampling

root, epochs, splits = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
out = {"threads": torch.get_num_threads()}
for split in splits:
    # mean 0, std 1/255: the float output is the engine's 0..255 pixels
    loader = Loader(root, split, 8, image_size=24, engine=Engine("ffcv", workers=2),
                    sampling=Sampling(seed=3), output=Output(mean=(0, 0, 0), std=(1 / 255,) * 3))
    out[split] = []
    for e in range(epochs):
        loader.set_epoch(e)
        pairs = []
        for images, labels in loader:
            out.setdefault(f"{split}_contract", dict(
                shape=list(images.shape), dtype=str(images.dtype), stride=list(images.stride()),
                label_dtype=str(labels.dtype),
                channels_last=images.is_contiguous(memory_format=torch.channels_last)))
            pairs += [[i, int(y)] for i, y in zip(ids_of(images), labels)]
        out[split].append(pairs)
    loader.close()
print(json.dumps(out))
