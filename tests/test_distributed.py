"""torchrun with 2 CPU processes (gloo), and crash safety with real signals and a real SIGKILL."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tricks.train.checkpoint import load_checkpoint

from conftest import subprocess_env, wait_for

ROOT = Path(__file__).resolve().parents[1]
ENV = subprocess_env(ROOT, OMP_NUM_THREADS="1")
BASE = ["model.name=resnet18d", "model.width=8", "data.image_size=32", "data.workers=0",
        "train.batch=32", "data.scale=[0.35, 1]", "optim.lr=0.2", "train.label_smoothing=0.1",
        "train.log_every=1"]


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process_accumulating_two_micro_batches(shapes_records,
                                                                          tmp_path):
    common = BASE + [f"data.path={shapes_records}", "train.epochs=1", "train.device=cpu"]
    (tmp_path / "ddp").mkdir()
    (tmp_path / "acc").mkdir()
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path / "ddp"), *common,
         f"train.out={tmp_path}/ddp-runs"], cwd=ROOT, env=ENV, capture_output=True, text=True,
        timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    acc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path / "acc"), *common,
         "train.accumulate=2", f"train.out={tmp_path}/acc-runs"], cwd=ROOT, env=ENV,
        capture_output=True, text=True, timeout=300)
    assert acc.returncode == 0, acc.stderr[-3000:]
    r0 = torch.load(tmp_path / "ddp" / "rank0.pt")
    r1 = torch.load(tmp_path / "ddp" / "rank1.pt")
    one = torch.load(tmp_path / "acc" / "rank0.pt")
    params = [k for k in r0 if "running" not in k and "num_batches" not in k]
    assert len(params) > 20
    for k in params:
        assert torch.equal(r0[k], r1[k]), k               # DDP keeps ranks identical
        assert torch.allclose(r0[k], one[k], atol=2e-5, rtol=1e-4), k
    # BN statistics follow each rank's shard (no broadcast every forward); evaluation averages
    # them over the ranks first, so both ranks evaluated, and rank 0 saved, the same model
    stats = [k for k in r0 if "running" in k]
    assert len(stats) > 10
    assert all(torch.allclose(r0[k], r1[k], rtol=0, atol=1e-6) for k in stats)
    # only rank 0 wrote a run directory, with one metrics line per epoch
    runs = list((tmp_path / "ddp-runs").iterdir())
    assert len(runs) == 1
    metrics = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and metrics[0]["val_images"] == 100  # sharded, each sample once


def _train(tmp_path, name, *extra):
    return [sys.executable, "-m", "tricks.train.cli", "train", "--no-progress", *BASE, *extra,
            f"train.out={tmp_path}", f"train.name={name}"]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    return {r["step"]: r["loss"] for r in rows}


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_before_exiting(shapes_records, tmp_path):
    run = tmp_path / "r"
    proc = subprocess.Popen(_train(tmp_path, "r", f"data.path={shapes_records}",
                                   "train.epochs=50"), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "train_log.jsonl"
    assert wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by signal 15" in out
    state = load_checkpoint(run)
    assert state["step"] == max(_losses(run)) and state["step"] < 50 * 12


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(shapes_records, tmp_path):
    args = [f"data.path={shapes_records}", "train.epochs=4", "model.width=16",
            "train.checkpoint_every=5", "schedule.warmup_epochs=1", "mix.name=mixup",
            "augment.ops=[jitter, erasing]"]
    full = subprocess.run(_train(tmp_path, "full", *args), cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    run = tmp_path / "cut"
    proc = subprocess.Popen(_train(tmp_path, "cut", *args), cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run / "checkpoint.pt"

    def mid_epoch_checkpoint():
        if not ckpt.exists():
            return False
        s = load_checkpoint(ckpt)
        return s["step"] >= 15 and s["position"] < 12
    assert wait_for(mid_epoch_checkpoint, proc), "no mid-epoch checkpoint before the run ended"
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    cut_at = load_checkpoint(ckpt)["step"]
    assert cut_at < 48
    resumed = subprocess.run([sys.executable, "-m", "tricks.train.cli", "train", "--no-progress",
                              "--resume", str(run)], cwd=ROOT, env=ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _losses(tmp_path / "full"), _losses(run)
    assert sorted(b) == list(range(1, 49))  # lines after the checkpoint were replaced
    later = [s for s in a if s > cut_at]
    assert later and all(a[s] == b[s] for s in later)  # bitwise: == on the logged floats
    wa = load_checkpoint(tmp_path / "full")["model"]
    wb = load_checkpoint(run)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
