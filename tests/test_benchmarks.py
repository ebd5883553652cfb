import json

from tricks.benchmarks.loader import main


def test_loader_benchmark_writes_valid_results(tmp_path, capsys):
    assert main(["--images", "48", "--batch", "16", "--size", "64", "--storage", "full",
                 "--workers", "1,2", "--runs", "2", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "loader.json").read_text())
    assert doc["benchmark"] == "loader" and doc["device"] and doc["versions"]["torch"]
    assert doc["settings"]["batch"] == 16 and doc["settings"]["timed_windows"] == 2
    assert "grace_hopper.jpg" in doc["settings"]["data"]  # real photographs by default
    import importlib.util
    want = ["native", "native-pillow"] + (["dali"] if importlib.util.find_spec("nvidia")
                                          and importlib.util.find_spec("nvidia.dali") else []) + \
        (["ffcv"] if importlib.util.find_spec("ffcv") else []) + ["torchvision", "decode-ceiling"]
    for workers in (1, 2):  # every engine in every cell of the grid
        cell = [r for r in doc["results"] if r["settings"]["workers"] == workers]
        assert [r["name"] for r in cell] == want
        assert all(r["settings"]["size"] == 64 and r["settings"]["max_side"] is None
                   for r in cell)
    for r in doc["results"]:
        assert len(r["windows"]) == 2 and all(w > 0 for w in r["windows"])
        assert min(r["windows"]) <= r["median"] <= max(r["windows"])
        assert r["unit"] == "images/s"
        assert r["per_worker"] == r["median"] / r["settings"]["workers"]
        before, after = r["settings"]["load_average"]  # the shared machine's load, recorded
        assert before >= 0 and after >= 0
    native = [r for r in doc["results"] if r["name"] == "native"]
    assert all(r["settings"]["decode"] == "workers" for r in native)
    pillow = [r for r in doc["results"] if r["name"] == "native-pillow"]
    assert all(r["settings"]["cpu_decoder"] == "pillow" and r["settings"]["pillow_images"] > 0
               for r in pillow)
    md = (tmp_path / "loader.md").read_text()
    assert "## 2 workers" in md and "native ÷ decode-ceiling | load average |" in md
    assert (tmp_path / "loader.png").stat().st_size > 0


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
