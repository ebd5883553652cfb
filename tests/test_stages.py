"""The normalize stage's CPU path (rows of W·3 values, a reused buffer) against the formula."""
import pytest
import torch

from tricks.pipeline.stages import IMAGENET_MEAN, IMAGENET_STD, Stages


def _reference(u8: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (u8.double() / 255 - mean.double()) / std.double()


@pytest.mark.parametrize("h,w", [(32, 32), (17, 23), (5, 224)])
def test_cpu_normalize_is_the_formula_per_channel(h, w):
    g = torch.Generator().manual_seed(h * w)
    u8 = torch.randint(0, 256, (4, h, w, 3), dtype=torch.uint8, generator=g).permute(0, 3, 1, 2)
    stages = Stages(torch.float32, 10)
    x, _ = stages(u8, torch.zeros(4, dtype=torch.long), None)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x.double(), _reference(u8), rtol=0, atol=2e-6)
    kept = x.clone()
    y, _ = stages(u8.flip(0).contiguous(memory_format=torch.channels_last),
                  torch.zeros(4, dtype=torch.long), None)
    assert torch.equal(x, kept)  # x is still held: y got another buffer
    torch.testing.assert_close(y.double(), _reference(u8.flip(0)), rtol=0, atol=2e-6)


def test_other_layouts_and_dtypes_take_the_general_path():
    u8 = torch.randint(0, 256, (2, 3, 9, 11), dtype=torch.uint8,  # NCHW-contiguous
                       generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float32, torch.bfloat16):
        x, _ = Stages(dtype, 10, channels_last=False)(u8, torch.zeros(2, dtype=torch.long), None)
        assert x.dtype == dtype
        tol = 2e-6 if dtype == torch.float32 else 4e-2  # bf16: 8 bits of mantissa, |x| < 2.7
        torch.testing.assert_close(x.double(), _reference(u8), rtol=0, atol=tol)
