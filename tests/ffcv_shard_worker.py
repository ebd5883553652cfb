"""Test helper, run as one of WORLD subprocesses (FFCV's distributed order asks
torch.distributed for the rank): evaluate a split with the FFCV engine on this rank at SIZE²
and print the colour ids seen as JSON; with SAVE, also torch.save the uint8 crops and labels
there. Usage: python tests/ffcv_shard_worker.py ROOT SPLIT BATCH RANK WORLD INIT_FILE [SIZE SAVE]"""
import json
import sys

import torch
import torch.distributed as dist

from conftest import ids_of
from tricks.pipeline import Engine, Loader, Output, Sampling

root, split, batch, rank, world, init = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), \
    sys.argv[6]
size, save = (int(sys.argv[7]), sys.argv[8]) if len(sys.argv) > 8 else (16, None)
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
loader = Loader(root, split, batch, train=False, image_size=size, engine=Engine("ffcv", workers=1),
                sampling=Sampling(rank=rank, world_size=world, global_batch=True),
                output=Output(mean=(0, 0, 0), std=(1 / 255,) * 3))
batches = [(images.round().to(torch.uint8), labels) for images, labels in loader]
ids = [i for images, _ in batches for i in ids_of(images)]
if save:
    torch.save({"images": torch.cat([b[0] for b in batches]),
                "labels": torch.cat([b[1] for b in batches])}, save)
loader.close()
dist.barrier()
dist.destroy_process_group()
print(json.dumps(ids))
