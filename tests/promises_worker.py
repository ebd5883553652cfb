"""Test helper for tests/test_engine_promises.py, run in a subprocess (one per engine and role:
FFCV and DALI change process-wide settings, and "two processes with one seed" is the point).

Usage: python tests/promises_worker.py ROOT SPEC ROLE OUT, SPEC a JSON dict: the engine's name
and its own options (``tricks.pipeline.Engine``). Training batches of 4 at 16², the Loader's float output with
mean 0 and std 1/255 (the engine's 0..255 pixels):

- role ``a``: epochs 0 and 1 whole, the validation epoch, then 20 abandoned training epochs at
  224² (even ones left by ``break`` after one batch, odd ones by an exception), counting after
  each the Python threads, the OS threads and the RSS, and once more after ``close()``;
- role ``b``: epoch 0 whole, then epoch 1 interrupted after batch K (``break``) and resumed with
  ``set_epoch(1, start_batch=K)``.

Saves the batches (float images, labels) to OUT with ``torch.save`` and prints the counts as JSON.
"""
import gc
import json
import sys
import threading

import torch

from tricks.pipeline import Engine, Loader, Output, Sampling

K = 2  # the batch a role-b epoch is interrupted after


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(next(ln for ln in f if ln.startswith(key)).split()[1])


def _counts() -> list[int]:
    gc.collect()
    return [threading.active_count(), _status("Threads:"), _status("VmRSS:") // 1024]


def _epoch(loader, epoch, start=0, stop=None):
    loader.set_epoch(epoch, start)
    out = []
    for k, (images, labels) in enumerate(loader):
        if stop is not None and k == stop:
            break
        out.append((images.clone(), labels.clone()))
    return out


def main(root, spec, role, out_path):
    spec = json.loads(spec)
    engine = Engine(workers=2, **spec)
    raw = Output(mean=(0, 0, 0), std=(1 / 255,) * 3)
    train = Loader(root, "train", 4, image_size=16, engine=engine, sampling=Sampling(seed=7),
                   output=raw)
    out, counts = {}, {}
    if role == "a":
        out["epoch0"], out["epoch1"] = _epoch(train, 0), _epoch(train, 1)
        val = Loader(root, "val", 4, image_size=16, engine=engine, output=raw)
        out["val"] = _epoch(val, 0)
        val.close()
        train.set_image_size(224)
        counts["before"] = _counts()
        counts["abandoned"] = []
        for e in range(20):
            train.set_epoch(e)
            if e % 2 == 0:
                for _ in train:
                    break
            else:
                try:
                    for _ in train:
                        raise KeyError("abandoned")
                except KeyError:
                    pass
            counts["abandoned"].append(_counts())
        train.close()
        counts["closed"] = _counts()
    else:
        out["epoch0"] = _epoch(train, 0)
        out["prefix"] = _epoch(train, 1, stop=K)
        out["resumed"] = _epoch(train, 1, start=K)
        train.close()
    torch.save(out, out_path)
    print(json.dumps(counts))


if __name__ == "__main__":
    main(*sys.argv[1:])
