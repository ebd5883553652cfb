"""Every way a run is stopped saves it (issue 25, items 4 and 5): a real ``tricks train`` in its
own session, signalled at its whole process group (as Ctrl-C, a closed terminal and ``scancel``
do) after a few iterations, for every decode path: native C threads, Pillow worker processes,
DALI and FFCV. Each must exit with 128 + the signal, leave a checkpoint and no traceback, and
resume to the end of the epoch."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env, wait_for
from tricks.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = subprocess_env(ROOT, OMP_NUM_THREADS="1")
HAS_DALI = importlib.util.find_spec("nvidia") is not None and \
    importlib.util.find_spec("nvidia.dali") is not None
HAS_FFCV = importlib.util.find_spec("ffcv") is not None
BASE = ["--no-progress", "model.name=resnet18d", "model.width=8", "data.image_size=32",
        "train.batch=8", "train.log_every=1", "train.device=cpu", "train.tensorboard=false",
        "data.workers=2"]
ENGINES = {
    "native-threads": ["data.engine=native"],
    "native-pillow": ["data.engine=native", "data.engine_options={cpu_decoder: pillow}"],
    "dali": ["data.engine=dali"],
    "ffcv": ["data.engine=ffcv"],
}
CASES = [("native-threads", "SIGHUP"), ("native-pillow", "SIGTERM"), ("native-pillow", "SIGINT"),
         ("native-pillow", "SIGHUP"), ("dali", "SIGTERM"), ("ffcv", "SIGTERM")]


@pytest.fixture(scope="module")
def data(shapes_records, tmp_path_factory):
    """The shapes records (400 training images: 50 iterations an epoch at batch 8), with FFCV
    betons beside them when FFCV is installed (written in a subprocess: FFCV's writer forks)."""
    if not HAS_FFCV:
        return shapes_records
    root = tmp_path_factory.mktemp("signals-data")
    for f in shapes_records.iterdir():
        (root / f.name).symlink_to(f)
    code = ("import sys; from tricks.pipeline.beton import write_beton\n"
            "for s in ('train', 'val'): write_beton(f'{sys.argv[1]}/{s}.rec', workers=1)")
    run = subprocess.run([sys.executable, "-c", code, str(root)], cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    return root


@pytest.mark.slow
@pytest.mark.parametrize("engine, signame", CASES)
def test_a_signal_to_the_process_group_saves_a_checkpoint_and_resumes(data, tmp_path, engine,
                                                                     signame):
    if engine == "dali" and not HAS_DALI or engine == "ffcv" and not HAS_FFCV:
        pytest.skip(f"{engine} is not installed")
    sig = getattr(signal, signame)
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "tricks.train.cli", "train", *BASE, *ENGINES[engine],
           f"data.path={data}", "train.epochs=100", f"train.out={tmp_path}", "train.name=r"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        log = run / "train_log.jsonl"
        trained = wait_for(lambda: log.exists() and len(log.read_text().splitlines()) >= 3,
                           proc, timeout=240)
        if trained:
            os.killpg(proc.pid, sig)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert trained, err[-3000:]
    assert proc.returncode == 128 + sig, (proc.returncode, err[-3000:])
    assert f"stopped by signal {int(sig)}" in out
    assert "Traceback" not in err, err[-3000:]
    state = load_checkpoint(run)
    assert 3 <= state["step"] < 50 and state["epoch"] == 0
    # the run continues where it stopped, to the end of its first epoch
    resumed = subprocess.run([sys.executable, "-m", "tricks.train.cli", "train", "--no-progress",
                              "--resume", str(run), "train.epochs=1"], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
    steps = [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 51))
    assert load_checkpoint(run)["step"] == 50


EXIT_WITHOUT_CLOSE = """
import sys
from tricks.pipeline import Engine, Loader
loader = Loader(sys.argv[1], "train", 8, image_size=16,
                engine=Engine(workers=2, cpu_decoder="pillow"))
next(iter(loader))
print("exiting", flush=True)
"""


def test_a_program_that_never_closes_its_pillow_workers_still_exits(shapes_records):
    """The Pillow workers ignore SIGTERM, and multiprocessing's exit handler SIGTERMs daemonic
    children, then waits for them: the engine shuts its workers down at exit first."""
    run = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_CLOSE, str(shapes_records)],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "exiting" in run.stdout, run.stderr[-2000:]
