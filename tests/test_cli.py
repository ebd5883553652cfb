"""Bad input: one line naming the problem, a non-zero exit, no traceback."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tricks.train.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("argv,message", [
    (["convert", "{tmp}/missing", "{tmp}/out"], "no such folder"),
    (["convert", "{tmp}/empty", "{tmp}/out"], "is empty"),
    (["convert", "{tmp}/flat", "{tmp}/out"], "no class sub-folders"),
    (["train", "train.epoch=1"], "unknown config key 'train.epoch'"),
    (["train", "data.path={tmp}/missing"], "no such dataset"),
    (["train", "-c", "{tmp}/nope.yaml"], "config file not found"),
    (["eval", "{tmp}/none.pt", "{tmp}"], "checkpoint not found"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    code, err = _run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 1
    assert err.startswith("error: ") and message in err and "\n" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_fp16_on_the_cpu_is_a_one_line_error(capsys, shapes_records):
    code, err = _run(capsys, "train", f"data.path={shapes_records}", "train.precision=fp16",
                     "train.device=cpu")
    assert code == 1 and err == ("error: train.precision=fp16 needs a CUDA device; "
                                 "use fp32 (or bf16) on the CPU")


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "tricks.train.cli", "--help"], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "convert" in out.stdout and "train" in out.stdout


def test_convert_command_prints_the_report(tmp_path, capsys, shapes_tree):
    assert main(["convert", str(shapes_tree), str(tmp_path / "out"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "train: 400 written, 0 skipped" in out and "report:" in out


def test_show_batch_writes_a_captioned_grid(tmp_path, capsys, shapes_records):
    from PIL import Image

    from tricks.pipeline.preview import caption
    out = tmp_path / "grid.png"
    assert main(["show-batch", f"data.path={shapes_records}", "data.image_size=32",
                 "data.workers=0", "augment.ops=[jitter, erasing]", "mix.name=mixup",
                 "--out", str(out), "--count", "9"]) == 0
    assert "9 samples" in capsys.readouterr().out
    img = Image.open(out)
    assert img.size == (3 * 160, 3 * (160 + 14))
    classes = ["a", "b", "c"]
    assert caption(torch.tensor(1), classes) == "b"
    assert caption(torch.tensor([0.7, 0.0, 0.3]), classes) == "a .70 c .30"


def test_a_misspelt_model_is_reported_before_the_dataset_is_built(capsys, monkeypatch):
    import tricks.train.trainer as trainer

    def build_dataset(*a, **k):
        raise AssertionError("the dataset was built before the config was checked")
    monkeypatch.setattr(trainer, "resolve_dataset", build_dataset)
    code, err = _run(capsys, "train", "model.name=resnt18d")
    assert code == 1 and err.startswith("error: model.name='resnt18d': unknown model")


def test_the_readme_offers_a_first_training_command_that_runs_on_a_cpu():
    """The first `tricks train` example names a GPU; the line for a CPU must pass the CPU's
    precision check (fp16 needs CUDA)."""
    import shlex

    from tricks.errors import ConfigError
    from tricks.train.config import load_config
    from tricks.train.config import preset_path as config_path
    from tricks.train.build import resolve_precision

    lines = [ln for ln in (ROOT / "README.md").read_text().splitlines()
             if ln.startswith(".venv/bin/tricks train -c")]
    assert "# on a GPU" in lines[0] and "# on a CPU" in lines[1]

    def precision_of(line):
        args = shlex.split(line.split("#")[0])[2:]
        files = [config_path(a) for prev, a in zip(["", *args], args) if prev == "-c"]
        overrides = [a for a in args if "=" in a]
        return load_config(files, overrides).train.precision

    cpu = torch.device("cpu")
    resolve_precision(precision_of(lines[1]), cpu)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_precision(precision_of(lines[0]), cpu)


def test_a_folder_named_like_a_preset_does_not_shadow_it(tmp_path, monkeypatch, capsys):
    (tmp_path / "cifar").mkdir()  # a dataset folder in the current directory
    monkeypatch.chdir(tmp_path)
    assert main(["train", "-c", "cifar", "--print-config"]) == 0
    assert "pad_mode: reflect" in capsys.readouterr().out


@pytest.mark.parametrize("override", ["optim.lr=-0.1", "optim.lr=0", "optim.weight_decay=-1e-4"])
def test_a_negative_rate_is_one_line_naming_the_key(override, capsys):
    assert main(["train", override, "--print-config"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {override.split('=')[0]} must be") and "\n" not in err
