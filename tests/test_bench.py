"""Table 3 and Table 5 benchmarks: tiny CPU runs that write valid JSON, Markdown and PNG."""
import json
import statistics

import pytest
from PIL import Image

from train.cli import main


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
    assert base["settings"]["precision"] == "fp32" and not base["settings"]["channels_last"]
    assert eff["settings"]["precision"] == "bf16" and eff["settings"]["channels_last"]  # CPU
    ratio = eff["median"] / base["median"]
    md = (tmp_path / "train.md").read_text()
    assert f"{ratio:.2f}×" in md
    frac = by[("efficient", "native")]["median"] / eff["median"]
    assert f"{100 * frac:.0f}%" in md
    assert f"efficient / baseline = {ratio:.2f}×" in capsys.readouterr().out
    png = Image.open(tmp_path / "train.png")
    assert png.format == "PNG" and png.size[0] > 300


def test_bench_train_unknown_model_lists_the_known_ones(tmp_path, capsys):
    assert main(["bench", "train", "--models", "resnet51", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "unknown model(s) resnet51; known:" in err and "resnet50d" in err
    assert "inception_v3" in err


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
