"""Test helper, run in a subprocess (``import ffcv`` changes process-wide torch settings):
read splits with the FFCV engine and print JSON: for each split and epoch the (colour id,
label) pairs in order, and the batch contract; with ``--save OUT``, also ``torch.save`` each
split's epochs as uint8 crops and labels there.

Usage: python tests/ffcv_worker.py ROOT EPOCHS SPLIT [SPLIT …] [--size S] [--seed N]
[--save OUT] [--no-os-cache] [--device D]"""
import argparse
import json

import torch

from conftest import ids_of
from tricks.pipeline import Engine, Loader, Output, Sampling

p = argparse.ArgumentParser()
p.add_argument("root")
p.add_argument("epochs", type=int)
p.add_argument("splits", nargs="+")
p.add_argument("--size", type=int, default=24)
p.add_argument("--seed", type=int, default=3)
p.add_argument("--save")
p.add_argument("--no-os-cache", action="store_true")
p.add_argument("--device", default="cpu")
args = p.parse_args()
out = {"threads": torch.get_num_threads()}
saved = {}
for split in args.splits:
    # mean 0, std 1/255: the float output is the engine's 0..255 pixels
    loader = Loader(args.root, split, 8, image_size=args.size, device=args.device,
                    engine=Engine("ffcv", workers=2, os_cache=not args.no_os_cache),
                    sampling=Sampling(seed=args.seed),
                    output=Output(mean=(0, 0, 0), std=(1 / 255,) * 3))
    out[split], saved[split] = [], []
    for e in range(args.epochs):
        loader.set_epoch(e)
        pairs, batches = [], []
        for images, labels in loader:
            out.setdefault(f"{split}_contract", dict(
                shape=list(images.shape), dtype=str(images.dtype), stride=list(images.stride()),
                label_dtype=str(labels.dtype),
                channels_last=images.is_contiguous(memory_format=torch.channels_last)))
            pairs += [[i, int(y)] for i, y in zip(ids_of(images.cpu()), labels.cpu())]
            batches.append((images.round().to(torch.uint8).cpu(), labels.cpu()))
        out[split].append(pairs)
        saved[split].append(batches)
    loader.close()
if args.save:
    torch.save(saved, args.save)
print(json.dumps(out))
