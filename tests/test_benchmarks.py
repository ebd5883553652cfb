import json

from tricks.benchmarks.loader import main


def test_loader_benchmark_writes_valid_results(tmp_path, capsys):
    assert main(["--images", "48", "--batch", "16", "--size", "64", "--workers", "1",
                 "--runs", "2", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "loader.json").read_text())
    assert doc["benchmark"] == "loader" and doc["device"] and doc["versions"]["torch"]
    assert doc["settings"]["batch"] == 16 and doc["settings"]["timed_epochs"] == 2
    names = [r["name"] for r in doc["results"]]
    import importlib.util
    want = ["native"] + (["dali", "dali-files"] if importlib.util.find_spec("nvidia")
                         and importlib.util.find_spec("nvidia.dali") else []) + \
        (["ffcv"] if importlib.util.find_spec("ffcv") else []) + ["torchvision"]
    assert names == want
    for r in doc["results"]:
        assert len(r["windows"]) == 2 and all(w > 0 for w in r["windows"])
        assert min(r["windows"]) <= r["median"] <= max(r["windows"])
        assert r["unit"] == "images/s"


def test_augment_benchmark_writes_valid_results(tmp_path):
    from tricks.benchmarks.augment import main as augment_main
    assert augment_main(["--batch", "4", "--size", "32", "--runs", "2", "--iters", "1",
                         "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "augment.json").read_text())
    names = [r["name"] for r in doc["results"]]
    assert {"jitter", "lighting", "erasing", "autoaugment", "mixup", "ricap",
            "train step: resnet50d"} <= set(names)
    assert any(n.startswith("stack:") for n in names)
    for r in doc["results"]:
        assert r["unit"] == "ms/batch" and len(r["windows"]) == 2 and r["median"] > 0
