"""A log is not a terminal: `tricks train` with its output in a pipe writes plain lines (no
progress bar of carriage returns), and the stop message starts its own line."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def test_a_piped_run_has_no_carriage_returns_and_the_stop_message_starts_a_line(
        shapes_records, tmp_path):
    log = tmp_path / "r" / "train_log.jsonl"
    cmd = [sys.executable, "-m", "tricks.train.cli", "train", f"data.path={shapes_records}",
           "model.name=resnet18d", "model.width=4", "data.image_size=16", "train.batch=8",
           "train.log_every=1", "train.device=cpu", "train.tensorboard=false", "data.workers=0",
           "train.epochs=100", f"train.out={tmp_path}", "train.name=r"]  # progress: the default
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(ROOT, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        start = time.time()
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() - start < 120, "the run did not start"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=120)[0].decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, out[-2000:]
    assert "\r" not in out, out[-2000:]
    stops = [ln for ln in out.splitlines() if "stopped by signal" in ln]
    assert stops and all(ln.startswith("stopped by signal") for ln in stops), out[-2000:]
