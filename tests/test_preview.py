"""show-batch's grid: captions stay inside their own cell, whatever the mix op writes."""
import numpy as np
import torch
from PIL import Image

from tricks.pipeline.preview import save_grid

CLASSES = [f"a-long-class-name-{i}" for i in range(4)] + ["x"]


def _grid(targets, path):
    return np.asarray(Image.open(save_grid(torch.zeros(2, 3, 32, 32), targets, CLASSES, path,
                                           cell=160)).convert("L"))


def test_ricap_captions_wrap_inside_their_cell(tmp_path):
    # RICAP gives four classes per sample: sample 0's caption must change nothing in the
    # neighbouring cell (sample 1's), and all four classes must be written
    ricap = _grid(torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0], [0, 0, 0, 0, 1.0]]), tmp_path / "a.png")
    alone = _grid(torch.tensor([[0, 0, 0, 0, 1.0], [0, 0, 0, 0, 1.0]]), tmp_path / "b.png")
    assert ricap.shape[1] == alone.shape[1] == 2 * 160
    band, own = ricap[160:, 160:], alone[160:, 160:]  # cell 1's caption band
    assert np.array_equal(band[:len(own)], own) and (band[len(own):] == 255).all(), \
        "sample 0's caption overflows into sample 1's cell"
    ink_rows = np.flatnonzero((ricap[160:, :160] < 128).any(axis=1))
    assert ink_rows.max() - ink_rows.min() > 3 * 10, "the four classes were not wrapped in"
