"""A benchmark image set made of real photographs that ship inside installed PyPI packages.

Generated smooth-noise JPEGs decode unlike photographs (less entropy-coded detail), so loader
figures are made on photos: matplotlib's ``mpl-data/sample_data/grace_hopper.jpg`` (always
there: matplotlib is a dependency) and, when scikit-image is installed, the colour photographs
in ``skimage/data`` (astronaut, chelsea, coffee, rocket, motorcycle_left/right,
hubble_deep_field, retina, ihc; located with ``importlib.util.find_spec``, scikit-image itself
is never imported). Each stored image is a
random 85–100 % crop of one photo, maybe mirrored, resized to 500 px on its longer side
(ImageNet's typical ~500×375) and saved as baseline JPEG at quality 90, so no two files are
byte-identical yet all decode like the photos they come from.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

# photographs only: the packages also ship drawings, masks and synthetic test images
PHOTOS = ("grace_hopper.jpg", "astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg",
          "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg",
          "ihc.png")
LONG_SIDE = 500
QUALITY = 90


def photo_sources() -> list[Path]:
    """The colour photographs of ``PHOTOS`` found in installed packages."""
    folders = []
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.submodule_search_locations:
        folders.append(Path(spec.submodule_search_locations[0]) / "mpl-data" / "sample_data")
    spec = importlib.util.find_spec("skimage")
    if spec and spec.submodule_search_locations:
        folders.append(Path(spec.submodule_search_locations[0]) / "data")
    found = []
    for folder in folders:
        for path in sorted(folder.glob("*")):
            if path.name not in PHOTOS:
                continue
            try:
                with Image.open(path) as img:
                    if img.mode in ("RGB", "RGBA") and min(img.size) >= 256:
                        found.append(path)
            except OSError:
                continue
    return found


def make_photo_set(root: Path, count: int, seed: int = 0, classes: int = 8) -> Path:
    """``count`` JPEGs (an ImageFolder tree of ``classes`` folders) made from ``photo_sources``.
    Reused when complete; its ``SOURCES.txt`` names the photos used."""
    done = root / ".complete"
    if done.is_file():
        return root
    sources = photo_sources()
    if not sources:
        raise FileNotFoundError("no sample photographs found (matplotlib's sample_data is "
                                "missing)")
    photos = [Image.open(p).convert("RGB") for p in sources]
    rng = np.random.default_rng(seed)
    for i in range(count):
        img = photos[i % len(photos)]
        w, h = img.size
        f = rng.uniform(0.85, 1.0) ** 0.5  # side fraction of an 85–100 % area crop
        cw, ch = int(w * f), int(h * f)
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        s = LONG_SIDE / max(cw, ch)
        crop = crop.resize((max(1, round(cw * s)), max(1, round(ch * s))),
                           Image.Resampling.LANCZOS)
        folder = root / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        crop.save(folder / f"{i:06d}.jpg", quality=QUALITY)
    (root / "SOURCES.txt").write_text("\n".join(str(p) for p in sources) + "\n")
    done.touch()
    return root
