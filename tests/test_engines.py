"""Every engine and source sees the same picture (issue 13): one small tree of photograph-like
images (EXIF-rotated, 16-bit, transparent, CMYK and palette members beside plain JPEGs), converted
once, through every installed engine's validation path: the same crops within 2 levels of mean
absolute error, the same labels, the same count; and the native engine's crops are the upright,
8-bit picture as taken."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from tricks.pipeline import Engine, Loader, Output
from tricks.pipeline.convert import convert, to_rgb

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parents[1]
ENV = subprocess_env(ROOT, ROOT / "tests")
# Every image's shorter side is 64 and its longer side even: the validation crop (0.875 of the
# shorter side, centred) is then a whole-pixel 56² box, which every engine copies 1:1. The
# engines' resamplers differ (Pillow's box filter, roi_align, DALI's and OpenCV's antialiased
# resize: several levels apart on a photograph's fine detail), so comparing at 1:1 isolates
# what this test is about: the stored picture, decoded, up to each decoder's rounding.
SIZE = 56
matplotlib = pytest.importorskip("matplotlib")
PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
HAS_DALI = importlib.util.find_spec("nvidia") is not None and \
    importlib.util.find_spec("nvidia.dali") is not None
HAS_FFCV = importlib.util.find_spec("ffcv") is not None


def _photo(h: int, w: int, seed: int) -> np.ndarray:
    """A real photograph (matplotlib's sample of Grace Hopper), a different window per seed,
    resized to h × w."""
    img = Image.open(PHOTO).convert("RGB")
    x0, y0 = 20 * (seed % 5), 30 * (seed % 4)
    return np.asarray(img.crop((x0, y0, x0 + 400, y0 + 460)).resize(
        (w, h), Image.Resampling.LANCZOS))


def _members(folder: Path) -> None:
    """Write the tree's files; each is an odd case for some engine or some stage."""
    Image.fromarray(_photo(64, 96, 1)).save(folder / "a" / "plain.jpg", quality=95)
    Image.fromarray(_photo(96, 64, 2)).save(folder / "a" / "tall.jpg", quality=95)
    for o in (3, 6, 8):  # stored sideways or upside down, with the tag that says so
        exif = Image.Exif()
        exif[0x0112] = o
        Image.fromarray(_photo(64, 96, 10 + o)).save(folder / "b" / f"exif{o}.jpg", quality=95,
                                                      exif=exif.tobytes())
    grey = _photo(64, 80, 3)[..., 0].astype(np.uint16) * 257
    Image.fromarray(grey).save(folder / "b" / "grey16.png")
    rgba = np.dstack([_photo(64, 64, 4), _photo(64, 64, 5)[..., :1]])
    Image.fromarray(rgba, "RGBA").save(folder / "c" / "alpha.png")
    Image.fromarray(_photo(64, 72, 6)).convert("CMYK").save(folder / "c" / "cmyk.jpg",
                                                            quality=95)
    Image.fromarray(_photo(80, 64, 7)).convert("P", palette=Image.Palette.ADAPTIVE).save(
        folder / "c" / "palette.png")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos") / "tree"
    for c in ("a", "b", "c"):
        (root / "val" / c).mkdir(parents=True)
    _members(root / "val")
    out = tmp_path_factory.mktemp("photos-rec")
    report = convert(root, out, workers=0, progress=False, quality=95)
    assert report["splits"]["val"]["written"] == 9
    if HAS_FFCV:  # the beton from the same records, in a subprocess (FFCV's writer forks)
        code = ("from tricks.pipeline.beton import write_beton; "
                f"write_beton({str(out / 'val.rec')!r}, workers=1, write_mode='raw')")
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    return root, out


def _epoch(root, engine, **options):
    loader = Loader(root, "val", 4, train=False, image_size=SIZE,
                    engine=Engine(engine, workers=2, **options),
                    output=Output(mean=(0, 0, 0), std=(1 / 255,) * 3))
    images, labels = [], []
    for x, y in loader:
        images.append(x.round().to(torch.uint8))
        labels.append(y)
    loader.close()
    return torch.cat(images), torch.cat(labels)


def _ffcv_epoch(root, tmp_path):
    save = tmp_path / "ffcv.pt"
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "ffcv_shard_worker.py"),
                          str(root), "val", "4", "0", "1", str(tmp_path / "init"), str(SIZE),
                          str(save)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = torch.load(save)
    return out["images"], out["labels"]


PATHS = {
    "native-workers": (lambda root, tmp: _epoch(root, "native", decode="workers"), True),
    "native-device": (lambda root, tmp: _epoch(root, "native", decode="device"), True),
    "dali": (lambda root, tmp: _epoch(root, "dali"), HAS_DALI),
    "ffcv": (_ffcv_epoch, HAS_FFCV),
}


@pytest.fixture(scope="module")
def reference(tree):
    return _epoch(tree[1], "native", decode="device")


@pytest.mark.parametrize("path", list(PATHS))
def test_every_engine_gives_the_same_validation_crops(tree, reference, path, tmp_path):
    read, installed = PATHS[path]
    if not installed:
        pytest.skip(f"{path} is not installed")
    images, labels = read(tree[1], tmp_path)
    ref_images, ref_labels = reference
    assert len(images) == len(ref_images) == 9
    assert torch.equal(labels.cpu(), ref_labels)
    mae = (images.cpu().float() - ref_images.float()).abs().mean(dim=(1, 2, 3))
    assert mae.max() <= 2, (path, mae.tolist())


def test_the_crops_are_the_picture_as_taken(tree, reference):
    """Against Pillow's own reading of each original file (upright per EXIF, 8-bit by value
    range, transparency on white), centre-cropped and resized independently of the engines."""
    src, _ = tree
    files = sorted(p for p in (src / "val").rglob("*") if p.is_file())
    assert [p.parent.name for p in files] == [["a", "b", "c"][i] for i in reference[1]]
    for path, crop in zip(files, reference[0]):
        img = to_rgb(ImageOps.exif_transpose(Image.open(path)))
        side = min(img.size) * 0.875
        box = ((img.width - side) / 2, (img.height - side) / 2,
               (img.width + side) / 2, (img.height + side) / 2)
        want = np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX, box=box)).astype(float)
        got = crop.permute(1, 2, 0).numpy().astype(float)
        # storing re-encodes at quality 95 with 4:2:0 chroma: up to ~4 levels on fine colour
        # detail; a sideways, upside-down, white or black picture is tens of levels off
        assert np.abs(got - want).mean() < 6, path.name
