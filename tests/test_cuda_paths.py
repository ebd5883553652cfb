"""CUDA paths shown on the CPU where the property can be seen there (a fake two-device RNG state,
the config's refusals, the C compiler check), and on a GPU where only CUDA shows it."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from tricks.train import checkpoint

from conftest import cuda


class FakeCuda:
    """``torch.cuda``'s RNG functions for ``devices`` GPUs: a state per device, and
    ``set_rng_state`` indexing the device's generator as torch's lazy CUDA init does
    (``default_generators[i]``: IndexError for a device that is not there)."""

    def __init__(self, monkeypatch, devices: int):
        self.states = [torch.full((8,), i, dtype=torch.uint8) for i in range(devices)]
        self.restored: dict[int, torch.Tensor] = {}
        for target in (torch.cuda, torch.cuda.random):
            monkeypatch.setattr(target, "set_rng_state", self.set_rng_state, raising=False)
            monkeypatch.setattr(target, "get_rng_state_all", lambda: list(self.states),
                                raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)

    def set_rng_state(self, state, device=0):
        self.states[int(device)]  # noqa: B018 (IndexError where torch's would raise it)
        self.restored[int(device)] = state


def test_resume_on_a_host_with_fewer_gpus_restores_the_devices_that_exist(monkeypatch):
    """A checkpoint written on two GPUs resumes on one: device 0's state is restored, device
    1's dropped, no IndexError (torch's set_rng_state_all indexed the missing device)."""
    FakeCuda(monkeypatch, 2)
    saved = checkpoint.rng_state()
    assert len(saved["cuda"]) == 2
    one = FakeCuda(monkeypatch, 1)
    checkpoint.set_rng_state(saved)
    assert list(one.restored) == [0] and torch.equal(one.restored[0], saved["cuda"][0])
    three = FakeCuda(monkeypatch, 3)  # more GPUs here: the saved ones restored, the rest kept
    checkpoint.set_rng_state(saved)
    assert list(three.restored) == [0, 1]


def test_host_rng_states_round_trip():
    saved = checkpoint.rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(saved)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
