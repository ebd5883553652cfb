"""The drop-in port (issue 22): examples/train_dataloader.py (torchvision's reference recipe:
ImageFolder + DataLoader) and examples/train_loader.py (the same script on tricks' Loader) run
on one small tree, on one process and as two gloo ranks under torchrun: each epoch a new order,
each rank's shard disjoint and together complete, and the same accuracy."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import colour_of, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"dataloader": ROOT / "examples" / "train_dataloader.py",
           "loader": ROOT / "examples" / "train_loader.py"}
TRAIN, VAL, BATCH = 128, 40, 16


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Constant-colour images, each id its own colour (read back after any crop or flip); the
    class is whether the red level is high (id % 10 ≥ 5): learnable in an epoch or two."""
    root = tmp_path_factory.mktemp("port") / "tree"
    for k in range(TRAIN + VAL):
        split = "train" if k < TRAIN else "val"
        folder = root / split / ("red" if k % 10 >= 5 else "dark")
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (36 + k % 5 * 4, 30 + k % 3 * 5), colour_of(k)).save(
            folder / f"{k:03d}.jpg", quality=95)
    return root


def _run(script, tree, tmp_path, epochs, ranks):
    trace, out = tmp_path / f"{script}-trace", tmp_path / f"{script}-metrics.jsonl"
    args = [str(ROOT / "tests" / "port_worker.py"), str(SCRIPTS[script]), "--data", str(tree),
            "--epochs", str(epochs), "--batch-size", str(BATCH), "--image-size", "32",
            "--workers", "0", "--lr", "0.4", "--out", str(out)]
    if ranks > 1:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
                *args]
    env = subprocess_env(ROOT, ROOT / "tests", PORT_TRACE=str(trace), OMP_NUM_THREADS="1",
                         TRICKS_CACHE=str(tmp_path / "cache"))
    run = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    traces = [json.loads((tmp_path / f"{script}-trace-{r}.json").read_text())
              for r in range(ranks)]
    metrics = [json.loads(line) for line in out.read_text().splitlines()]
    return traces, metrics


def test_one_process_reshuffles_every_epoch_and_learns_as_well_as_the_original(tree, tmp_path):
    top1 = {}
    for script in SCRIPTS:
        (epochs,), metrics = _run(script, tree, tmp_path, epochs=3, ranks=1)
        assert len(epochs) == 3
        for ids in epochs:  # drop_last: every full batch, no image twice, no val image
            assert len(ids) == TRAIN // BATCH * BATCH and len(set(ids)) == len(ids)
            assert max(ids) < TRAIN
        assert epochs[0] != epochs[1] != epochs[2], script
        top1[script] = metrics[-1]["val_top1"]
    assert min(top1.values()) >= 0.9 and abs(top1["loader"] - top1["dataloader"]) <= 0.1, top1


@pytest.mark.parametrize("script", SCRIPTS)
def test_two_ranks_read_disjoint_shards_that_make_the_whole_epoch(script, tree, tmp_path):
    traces, metrics = _run(script, tree, tmp_path, epochs=2, ranks=2)
    for epoch in range(2):
        a, b = (set(t[epoch]) for t in traces)
        assert not a & b and len(a) == len(b) == TRAIN // 2
        assert a | b == set(range(TRAIN))
    assert traces[0][0] != traces[0][1]  # a new order in the next epoch
    assert len(metrics) == 2
