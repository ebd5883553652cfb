"""Test helper: train with the given overrides (under torchrun or alone), then save this rank's
final weights to OUT/rank<r>.pt. Usage: python tests/ddp_worker.py OUT key=value ..."""
import sys

import torch

from tricks.train import distributed
from tricks.train.config import load_config
from tricks.train.trainer import Trainer

out, overrides = sys.argv[1], sys.argv[2:]
trainer = Trainer(load_config([], overrides), progress=False)
trainer.fit()
torch.save(trainer.model.state_dict(), f"{out}/rank{trainer.dist.rank}.pt")
trainer.close()
distributed.shutdown()
