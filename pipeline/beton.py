"""Writing FFCV ``.beton`` files from converted records, so FFCV reads the images that
``tricks convert`` validated (a bad file is reported and left out instead of killing FFCV's
writer), under the same class list. Run it in a process with no live FFCV Loader: the writer
forks, and its children can deadlock on numba's lock otherwise."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tricks.errors import OptionError, UserError

from .records import RecordFile


class _RecordImages:
    """Indexed dataset of (HWC uint8 image, label) over a record file, for FFCV's writer."""

    def __init__(self, records: RecordFile):
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int):
        img = Image.open(io.BytesIO(self.records.raw(i).tobytes())).convert("RGB")
        return np.asarray(img), int(self.records.index["label"][i])


INSTALL_HINT = ("the FFCV engine needs FFCV: apt-get install pkg-config libopencv-dev "
                "libturbojpeg0-dev build-essential, then pip install 'tricks[ffcv]'")


def import_ffcv():
    """Import FFCV's loader pieces, keeping torch's thread count as it was."""
    threads = torch.get_num_threads()
    try:
        from ffcv import fields, loader, transforms
        from ffcv.fields import decoders
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    finally:
        torch.set_num_threads(threads)
    return fields, decoders, loader, transforms


def write_beton(records_path: str | os.PathLike, out: str | os.PathLike | None = None, *,
                write_mode: str = "jpg", max_resolution: int | None = None,
                jpeg_quality: int = 90, compress_probability: float = 0.5,
                workers: int = 2) -> Path:
    if write_mode not in ("jpg", "raw", "proportion", "smart"):
        raise OptionError(f"beton write mode must be jpg, raw, proportion or smart, got "
                          f"{write_mode!r}")
    # checked here: FFCV's writer processes die on a bad value (OpenCV asserts) and its parent
    # then waits for them forever
    if max_resolution is not None and (not isinstance(max_resolution, int) or
                                       max_resolution < 1):
        raise OptionError(f"beton max resolution must be a positive number of pixels, got "
                          f"{max_resolution!r}")
    if not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
        raise OptionError(f"beton JPEG quality must be in 1..100, got {jpeg_quality!r}")
    if not 0 <= compress_probability <= 1:
        raise OptionError(f"beton compress probability must be in [0, 1], got "
                          f"{compress_probability!r}")
    fields, _, _, _ = import_ffcv()
    from ffcv.writer import DatasetWriter  # after import_ffcv, which restores torch's threads

    records = RecordFile(records_path)
    out = Path(out) if out else records.path.with_suffix(".beton")
    tmp = out.with_name(f".{out.name}.tmp")
    image = fields.RGBImageField(write_mode=write_mode, max_resolution=max_resolution,
                                 jpeg_quality=jpeg_quality,
                                 compress_probability=compress_probability)
    writer = DatasetWriter(str(tmp), {"image": image, "label": fields.IntField()},
                           num_workers=max(1, workers))
    writer.from_indexed_dataset(_RecordImages(records))
    os.replace(tmp, out)
    return out
