"""Test helper: run an example training script (examples/*.py) with its training loader
traced: each image's id, read back from its constant colour (conftest.colour_of), per epoch,
written to $PORT_TRACE-<rank>.json at the end. Usage: python tests/port_worker.py SCRIPT ARGS…
(or under torchrun)."""
import importlib.util
import json
import os
import sys

import torch

from conftest import ids_of

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class Traced:
    """The script's training loader, iterated as it is, every image's id recorded."""

    def __init__(self, loader):
        self.loader, self.epochs = loader, []

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        ids = []
        self.epochs.append(ids)
        for images, targets in self.loader:
            ids += ids_of(((images.float().cpu() * STD + MEAN) * 255).round())
            yield images, targets


spec = importlib.util.spec_from_file_location("example", sys.argv[1])
example = importlib.util.module_from_spec(spec)
spec.loader.exec_module(example)
made = []
plain = example.make_loaders


def traced(args, device, distributed):
    train, val, classes = plain(args, device, distributed)
    made.append(Traced(train))
    return made[-1], val, classes


example.make_loaders = traced
example.main(sys.argv[2:])
with open(f"{os.environ['PORT_TRACE']}-{os.environ.get('RANK', 0)}.json", "w") as f:
    json.dump(made[0].epochs, f)
