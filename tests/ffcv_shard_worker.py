"""Test helper, run as one of WORLD subprocesses (FFCV's distributed order asks
torch.distributed for the rank): evaluate a split with the FFCV engine on this rank and print
the colour ids seen as JSON. Usage: python tests/ffcv_shard_worker.py ROOT SPLIT BATCH RANK
WORLD INIT_FILE"""
import json
import sys

import torch.distributed as dist

from conftest import ids_of
from tricks.pipeline import Loader

root, split, batch, rank, world, init = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), \
    sys.argv[6]
dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
loader = Loader(root, split, batch, train=False, image_size=16, engine="ffcv", workers=1,
                rank=rank, world_size=world, mean=(0, 0, 0), std=(1 / 255,) * 3)
ids = [i for images, _ in loader for i in ids_of(images)]
loader.close()
dist.barrier()
dist.destroy_process_group()
print(json.dumps(ids))
