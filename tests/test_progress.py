"""A log is not a terminal: `tricks train` with its output in a pipe writes plain lines (no
progress bar of carriage returns), and the stop message starts its own line."""
import fcntl
import os
import pty
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]


def _train_then_stop(data, tmp_path, output=None) -> tuple[int, str]:
    """Start `tricks train` (the progress bar as by default) writing stdout and stderr to
    ``output`` (a file descriptor; default a pipe), SIGTERM its process group after three
    iterations; its exit status and all it wrote."""
    log = tmp_path / "r" / "train_log.jsonl"
    cmd = [sys.executable, "-m", "tricks.train.cli", "train", f"data.path={data}",
           "model.name=resnet18d", "model.width=4", "data.image_size=16", "train.batch=8",
           "train.log_every=1", "train.device=cpu", "train.tensorboard=false", "data.workers=0",
           "train.epochs=100", f"train.out={tmp_path}", "train.name=r"]
    out = subprocess.PIPE if output is None else output
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(ROOT, OMP_NUM_THREADS="1"),
                            stdout=out, stderr=out, start_new_session=True)
    try:
        start = time.time()
        while not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert proc.poll() is None and time.time() - start < 120, "the run did not start"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGTERM)
        text = proc.communicate(timeout=120)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, text.decode() if text else ""


def test_a_piped_run_has_no_carriage_returns_and_the_stop_message_starts_a_line(
        shapes_records, tmp_path):
    code, out = _train_then_stop(shapes_records, tmp_path)
    assert code == 128 + signal.SIGTERM, out[-2000:]
    assert "\r" not in out, out[-2000:]
    stops = [ln for ln in out.splitlines() if "stopped by signal" in ln]
    assert stops and all(ln.startswith("stopped by signal") for ln in stops), out[-2000:]


def test_in_a_terminal_the_bar_is_cleared_before_the_stop_message(shapes_records, tmp_path):
    """On a terminal the bar redraws in place; a stop leaves the loop and the bar's line is
    cleared (carriage return) before the message, not left for the message to follow."""
    master, slave = pty.openpty()
    # an 80-column terminal (a new pty has 0 columns: tqdm would draw an empty bar)
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal's other end is closed: the run has exited
                return
            if not data:
                return
            chunks.append(data)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code, _ = _train_then_stop(shapes_records, tmp_path, output=slave)
    finally:
        os.close(slave)
    reader.join(timeout=10)
    os.close(master)
    out = b"".join(chunks).decode(errors="replace")
    assert code == 128 + signal.SIGTERM, out[-2000:]
    assert "it/s" in out  # a bar was drawn
    before = out[:out.index("stopped by signal")]
    assert before.endswith(("\r", "\n")), repr(before[-200:])
