"""`tricks ablate` on a tiny subset: a complete table, one row per configuration; a failing
configuration is reported in its row and does not end the ablation."""
import json

import pytest

from tricks.benchmarks.ablate import interval, verdict
from tricks.train.cli import main

TINY = ["model.width=4", "data.image_size=16", "train.epochs=1", "data.workers=0",
        "train.batch=32", "model.name=resnet18d"]


def test_interval_is_students_t_on_paired_changes():
    mean, lo, hi = interval([1.0, 2.0, 3.0])
    assert mean == 2.0 and lo == pytest.approx(2 - 4.303 * 1.0 / 3 ** 0.5, rel=1e-4)
    assert interval([1.0]) is None
    assert verdict((1.0, 0.2, 1.8)) == "reproduced"
    assert verdict((-1.0, -1.8, -0.2)) == "opposite"
    assert verdict((0.1, -0.5, 0.7)) == "not reproduced"


@pytest.mark.slow
def test_table6_is_complete_and_well_formed(shapes_records, tmp_path, capsys):
    assert main(["ablate", "--table", "6", "--seeds", "2", "--out", str(tmp_path),
                 f"data.path={shapes_records}", *TINY]) == 0
    doc = json.loads((tmp_path / "table6.json").read_text())
    names = [r["name"] for r in doc["rows"]]
    assert names == ["cosine", "+ label smoothing", "+ distillation", "+ mixup",
                     "+ distillation + mixup"]
    for r in doc["rows"]:
        assert len(r["top1"]) == 2 and all(0 <= v <= 1 for v in r["top1"])
        assert len(r["curves"]) == 2 and r["images_per_s"] and r["wall_s"]
    assert doc["rows"][0]["change"] is None and doc["rows"][2]["compare_to"] == "+ label smoothing"
    assert all(r["verdict"] in ("reproduced", "not reproduced", "opposite")
               for r in doc["rows"][1:])
    md = (tmp_path / "table6.md").read_text()
    assert md.count("\n| ") == 1 + 5  # header + one line per configuration
    assert (tmp_path / "table6.png").stat().st_size > 1000


@pytest.mark.slow
def test_a_failing_configuration_is_reported_in_its_row(shapes_records, tmp_path):
    # cutout holes larger than the 16² images: only the "+ cutout" row can fail
    assert main(["ablate", "--table", "augment", "--seeds", "1", "--out", str(tmp_path),
                 f"data.path={shapes_records}", *TINY, "augment.cutout_size=64"]) == 0
    rows = {r["name"]: r for r in json.loads((tmp_path / "tableaugment.json").read_text())["rows"]}
    assert len(rows) == 7
    assert "larger than the 16² training image" in rows["+ cutout"]["error"]
    assert all("error" not in r for name, r in rows.items() if name != "+ cutout")
    assert "| + cutout | failed: ConfigError" in (tmp_path / "tableaugment.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("table,extra,rows", [
    ("4", ["--ref-batch", "16", "--large-batch", "32", "--warmup-epochs", "0.5"], 6),
    ("5", ["--depth", "18", "--stem-size", "32"], 3),  # basic blocks: vanilla, C, D
])
def test_tables_4_and_5_run(shapes_records, tmp_path, table, extra, rows):
    assert main(["ablate", "--table", table, "--seeds", "1", "--out", str(tmp_path), *extra,
                 f"data.path={shapes_records}", *TINY]) == 0
    doc = json.loads((tmp_path / f"table{table}.json").read_text())
    assert len(doc["rows"]) == rows and all("error" not in r for r in doc["rows"])
    if table == "4":
        assert doc["rows"][0]["name"] == "reference: batch 16, FP32"
        assert doc["rows"][-1]["name"] == "+ BF16"  # FP16 needs CUDA
