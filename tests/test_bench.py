"""Table 3 and Table 5 benchmarks: tiny CPU runs that write valid JSON, Markdown and PNG."""
import json
import statistics

import pytest
from PIL import Image

from tricks.benchmarks.report import render
from tricks.train.cli import main


def test_bench_train_writes_json_markdown_png_and_ratios_follow_the_windows(
        tmp_path, capsys, shapes_records):
    assert main(["bench", "train", "--models", "resnet18", "--size", "32",
                 "--baseline-batch", "4", "--efficient-batch", "8", "--warmup", "1",
                 "--windows", "3", "--steps", "1", "--data", str(shapes_records),
                 "--workers", "0", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "train.json").read_text())
    assert doc["benchmark"] == "train" and doc["device"] and doc["versions"]["torch"]
    by = {(e["settings"]["mode"], e["settings"]["input"]): e for e in doc["results"]}
    assert set(by) == {("baseline", "synthetic"), ("efficient", "synthetic"),
                       ("baseline", "native"), ("efficient", "native")}
    for e in doc["results"]:
        assert len(e["windows"]) == 3
        assert e["median"] == statistics.median(e["windows"])
        assert e["imagenet_epoch_minutes"] == pytest.approx(1_281_167 / e["median"] / 60)
    base, eff = by[("baseline", "synthetic")], by[("efficient", "synthetic")]
    assert (base["settings"]["batch"], eff["settings"]["batch"]) == (4, 8)
    assert not base["settings"]["fused_sgd"] and eff["settings"]["fused_sgd"]
    assert base["settings"]["cudnn_benchmark"] and base["settings"]["compile"] is None
    assert base["settings"]["precision"] == "fp32" and not base["settings"]["channels_last"]
    assert eff["settings"]["precision"] == "bf16" and eff["settings"]["channels_last"]  # CPU
    ratio = eff["median"] / base["median"]
    md = (tmp_path / "train.md").read_text()
    assert f"{ratio:.2f}×" in md
    native = by[("efficient", "native")]
    frac = native["median"] / eff["median"]
    assert 0 <= native["settings"]["data_wait"] <= 1 and eff["settings"]["data_wait"] is None
    assert native["settings"]["decode"] == "workers"  # auto on a CPU
    assert f"| {100 * frac:.0f}% | {100 * native['settings']['data_wait']:.0f}% |" in md
    assert f"efficient / baseline = {ratio:.2f}×" in capsys.readouterr().out
    assert "Median images/s of 3 windows of 1 steps after 1 warm-up steps" in md
    png = Image.open(tmp_path / "train.png")
    assert png.format == "PNG" and png.size[0] > 300
    (tmp_path / "train.md").unlink()  # python -m tricks.benchmarks.report redraws from the JSON alone
    render(tmp_path / "train.json")
    assert (tmp_path / "train.md").read_text() == md


def test_bench_train_optional_modes_compile_cuda_graphs_bf16(tmp_path):
    """The optional modes run on the CPU too (reduce-overhead only adds CUDA graphs on CUDA);
    the table gives each its rate and its ratio to the baseline."""
    assert main(["bench", "train", "--models", "resnet18", "--size", "32",
                 "--baseline-batch", "4", "--efficient-batch", "8", "--warmup", "1",
                 "--windows", "2", "--steps", "1", "--compile", "--cuda-graphs", "--bf16",
                 "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "train.json").read_text())
    by = {e["settings"]["mode"]: e for e in doc["results"]}
    assert list(by) == ["baseline", "efficient", "efficient-compile", "efficient-graphs",
                        "efficient-bf16"]
    assert by["efficient-compile"]["settings"]["compile"] == "default"
    assert by["efficient-graphs"]["settings"]["compile"] == "reduce-overhead"
    assert by["efficient-bf16"]["settings"]["precision"] == "bf16"
    md = (tmp_path / "train.md").read_text()
    base = statistics.median(by["baseline"]["windows"])
    for mode in ("efficient-compile", "efficient-graphs", "efficient-bf16"):
        rate = statistics.median(by[mode]["windows"])
        shown = f"{rate:,.1f}" if rate < 100 else f"{rate:,.0f}"  # small CPU rates: 1 decimal
        assert f"{mode}: {shown} ({rate / base:.2f}×)" in md


def test_bench_train_unknown_model_lists_the_known_ones(tmp_path, capsys):
    assert main(["bench", "train", "--models", "resnet51", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unknown model(s) resnet51; known:" in err and "resnet50d" in err
    assert "inception_v3" in err


def test_bench_train_bad_engine_fails_before_any_timing(tmp_path, capsys, shapes_records):
    assert main(["bench", "train", "--models", "resnet18", "--data", str(shapes_records),
                 "--engines", "native,fcv", "--out", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert err.strip() == "error: unknown engine 'fcv'; available: dali, ffcv, native"
    assert "images/s" not in out and not (tmp_path / "train.json").exists()


def test_bench_models_table5(tmp_path):
    assert main(["bench", "models", "--models", "resnet50,resnet50d,resnet18d",
                 "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "models.json").read_text())
    rows = {r["model"]: r for r in doc["rows"]}
    assert rows["resnet50"]["paper_gmacs"] == 3.8 and abs(rows["resnet50"]["diff_pct"]) < 3
    assert rows["resnet18d"]["paper_gmacs"] is None
    assert 25 < rows["resnet50d"]["params_m"] < 26
    md = (tmp_path / "models.md").read_text()
    assert "| resnet50d | 25.58 | 4.33 | 4.3 | +0.7% |" in md


@pytest.mark.parametrize("name", ["train", "models", "loader", "augment"])
def test_bench_help_names_the_command_typed(name, capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: tricks bench {name} ")


def test_default_results_go_under_the_cwd_never_into_the_checkout(tmp_path, monkeypatch):
    # an editable install's package folder is the checkout: a trial `tricks bench` there must
    # not overwrite the committed benchmarks/results/
    from tricks.benchmarks.results import default_results_dir
    monkeypatch.chdir(tmp_path)
    assert default_results_dir() == tmp_path / "benchmarks-results"
