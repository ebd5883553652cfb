"""One precision policy for train, eval and bench (train.build): FP16 needs CUDA, everywhere."""
import re

import pytest
import torch

from tricks.errors import ConfigError
from tricks.train.build import half_precision, resolve_precision
from tricks.train.checkpoint import save_checkpoint
from tricks.train.cli import main
from tricks.train.config import load_config

NEEDS_CUDA = r"^error: \S.*=fp16 needs a CUDA device; [^\n]*fp32 \(or bf16\) on the CPU$"


@pytest.fixture
def fp16_checkpoint(tmp_path):
    path = tmp_path / "fp16.pt"
    cfg = load_config([], ["train.precision=fp16", "model.name=resnet18", "model.width=8"])
    save_checkpoint(path, {"config": cfg.to_dict(), "model": {}, "classes": ["a", "b"]})
    return path


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only decision")
@pytest.mark.parametrize("argv", [
    ["train", "data.path={data}", "train.precision=fp16", "train.device=cpu"],
    ["eval", "{ck}", "{data}", "--device", "cpu"],                       # the checkpoint's fp16
    ["eval", "{ck}", "{data}", "--device", "cpu", "--precision", "fp16"],
    ["bench", "augment", "--device", "cpu", "--dtype", "fp16", "--batch", "2", "--size", "8",
     "--runs", "1", "--iters", "1", "--no-train-step", "--out", "{tmp}"],
])
def test_fp16_on_the_cpu_is_the_same_one_line_error_everywhere(
        argv, fp16_checkpoint, shapes_records, tmp_path, capsys):
    code = main([a.format(data=shapes_records, ck=fp16_checkpoint, tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert re.match(NEEDS_CUDA, err), err


def test_the_policy_and_what_it_builds():
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match="train.precision=fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ConfigError, match="train.precision=fp8: choose from fp32, fp16, bf16"):
        resolve_precision("fp8", cpu)
    bf16 = resolve_precision(half_precision(cpu), cpu)
    assert bf16.dtype == torch.bfloat16 and not bf16.grad_scaler().is_enabled()
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    with resolve_precision("fp32", cpu).autocast():
        assert not torch.is_autocast_enabled("cpu")
