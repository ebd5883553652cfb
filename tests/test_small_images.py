"""The small-image benchmark (the ``cifar`` preset against a plain loop) and its preset."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tricks.benchmarks.small_images import _variant, main
from tricks.pipeline.stages import IMAGENET_MEAN, IMAGENET_STD
from tricks.train.config import preset_path as config_path
from tricks.train.config import load_config


def test_variant_is_a_name_and_its_overrides():
    assert _variant("bare:train.label_smoothing=0,data.pad=0") == (
        "bare", ["train.label_smoothing=0", "data.pad=0"])


@pytest.mark.parametrize("text", ["bare", ":data.pad=0", "plain:data.pad=0", "preset:x=1",
                                  "bare:data.pad"])
def test_bad_variant_is_refused_naming_it(text, capsys):
    with pytest.raises(SystemExit, match="--variant"):
        _variant(text)


def _tree(root: Path, per_split: dict, size: int = 32) -> Path:
    """An ImageFolder tree of 2 classes of noise JPEGs (``size``²), ``per_split`` a class."""
    rng = np.random.default_rng(0)
    for split, n in per_split.items():
        for cls in ("a", "b"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for k in range(n):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.jpg", quality=95)
    return root


def test_side_by_side_writes_every_epoch_under_a_name_with_the_epochs(tmp_path, capsys):
    tree = _tree(tmp_path / "tree", {"train": 8, "test": 4})
    out = tmp_path / "results"
    assert main(["--tree", str(tree), "--name", "tiny", "--epochs", "2", "--batch", "8",
                 "--width", "4", "--workers", "1", "--out", str(out)]) == 0
    path = out / "small_images-tiny-2ep.json"  # a 5-epoch result keeps its own file
    doc = json.loads(path.read_text())
    assert doc["settings"]["epochs"] == 2
    sides = {r["name"]: r for r in doc["results"]}
    assert set(sides) == {"preset", "plain"}
    for r in sides.values():
        curve, = r["settings"]["top1_per_epoch"]
        assert len(curve) == 2 and all(0 <= a <= 1 for a in curve)
        assert r["windows"] == [curve[-1]]  # the result is the top-1 after the last epoch


def test_preset_pads_by_reflection(tmp_path):
    """The preset's border comes from the image (reflection, as airbench94 pads), not from a
    fill: on images whose columns all differ, each training image is the same image unshifted
    (the preset with data.pad=0: same order and flips) moved by torchvision's reflect pad and
    crop, and no pixel is a constant fill."""
    import torchvision.transforms.v2.functional as TF

    from tricks.pipeline.convert import convert
    from tricks.train.data import make_loaders

    root = tmp_path / "ramps"
    ramp = np.repeat(np.repeat((np.arange(32) * 8).astype(np.uint8)[None, :, None], 32, 0), 3, 2)
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for k in range(16):
            Image.fromarray(ramp).save(root / "train" / cls / f"{k}.png")
    convert(root, tmp_path / "rec", workers=0, progress=False)
    base = [f"data.path={tmp_path / 'rec'}", "data.workers=1", "train.batch=32",
            "train.device=cpu"]
    std, mean = torch.tensor(IMAGENET_STD).view(3, 1, 1), torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    batches = {}
    for name, extra in (("preset", []), ("unshifted", ["data.pad=0"])):
        cfg = load_config([config_path("cifar")], base + extra)
        train, _ = make_loaders(cfg, tmp_path / "rec", torch.device("cpu"), torch.float32)
        try:
            train.set_epoch(0)
            images, _ = next(iter(train))
            batches[name] = ((images * std + mean) * 255).round()
            if name == "preset":
                p, shifts = cfg.data.pad, train.plan.shifts(0, 0, cfg.data.pad)
        finally:
            train.close()
    assert p > 0 and shifts.abs().sum() > 0  # the images were moved
    for k, src in enumerate(batches["unshifted"]):
        dx, dy = shifts[k].tolist()
        want = TF.pad(src, [p], padding_mode="reflect")[:, p + dy:p + dy + 32, p + dx:p + dx + 32]
        assert torch.equal(batches["preset"][k], want), (k, dx, dy)


def test_each_side_reports_its_top1_after_the_last_epoch(tmp_path, monkeypatch, capsys):
    import tricks.benchmarks.small_images as small_images
    monkeypatch.setattr(small_images, "plain_loop", lambda cfg, *a, pad=False: [
        0.1, 0.3 + cfg.train.seed + 0.05 * pad])
    monkeypatch.setattr(small_images, "preset_run", lambda cfg: [0.2, 0.4 + cfg.train.seed])
    tree = _tree(tmp_path / "tree", {"train": 8, "test": 4})
    assert main(["--tree", str(tree), "--name", "fake", "--epochs", "2", "--batch", "8",
                 "--seeds", "2", "--workers", "1", "--plain-pad", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "small_images-fake-2ep.json").read_text())
    sides = {r["name"]: r for r in doc["results"]}
    assert sides["preset"]["windows"] == [0.4, 1.4]
    assert sides["plain"]["windows"] == [0.3, 1.3]
    assert sides["plain"]["settings"]["top1_per_epoch"] == [[0.1, 0.3], [0.1, 1.3]]
    assert sides["plain+pad"]["windows"] == pytest.approx([0.35, 1.35])  # the padded loop
