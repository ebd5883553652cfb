"""Pad-and-crop: torchvision RandomCrop(padding=p, fill=f) semantics, batched."""
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from tricks.pipeline import Engine, Loader, PadCrop, Sampling
from tricks.errors import OptionError
from tricks.pipeline.sampling import EpochPlan
from tricks.pipeline.translate import draw_shifts, translate
from tricks.errors import ConfigError
from tricks.train.config import load_config


def reference(img: torch.Tensor, dx: int, dy: int, pad: int, fill: int,
              mode: str = "constant") -> torch.Tensor:
    """torchvision's pad (``padding_mode``) by ``pad`` on every side, then the H×W crop at
    corner (pad + dx, pad + dy): RandomCrop(padding=pad, fill, padding_mode) for one draw."""
    h, w = img.shape[-2:]
    padded = TF.pad(img, [pad], fill=fill, padding_mode=mode)
    return padded[..., pad + dy:pad + dy + h, pad + dx:pad + dx + w]


@pytest.mark.parametrize("mode", ["constant", "edge", "reflect", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.bfloat16])
def test_translate_equals_pad_then_crop_per_sample(dtype, mode):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 9, 7), generator=g).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    pad, fill = 6, 117     # up to 6 each way: every mirrored index of a 7-pixel side
    s = draw_shifts(40, pad, g)
    out = translate(x, s, fill, mode)
    assert out.shape == x.shape and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    for k in range(40):
        want = reference(x[k].float(), int(s[k, 0]), int(s[k, 1]), pad, fill, mode).to(dtype)
        assert torch.equal(out[k], want), (k, s[k])


def test_translate_refuses_an_unknown_padding_mode():
    with pytest.raises(ValueError, match="unknown padding mode 'wrap'"):
        translate(torch.zeros(1, 1, 4, 4), torch.zeros(1, 2, dtype=torch.int64), 0, "wrap")


def test_translate_moves_content_by_the_shift_in_the_right_direction():
    x = torch.zeros(1, 1, 5, 5, dtype=torch.uint8)
    x[0, 0, 2, 2] = 200
    out = translate(x, torch.tensor([[1, -2]]), 9)  # dx = 1, dy = −2
    # output (y, x) = input (y + dy, x + dx): the dot moves to (2 + 2, 2 − 1)
    assert out[0, 0, 4, 1] == 200 and (out == 200).sum() == 1
    assert (out[0, 0, :2] == 9).all() and (out[0, 0, :, 4] == 9).all()


def test_shifts_are_uniform_over_minus_pad_to_pad_and_independent():
    pad, n = 4, 90_000
    s = draw_shifts(n, pad, torch.Generator().manual_seed(1))
    assert s.min() == -pad and s.max() == pad
    # each of the 2p+1 = 9 values with frequency 1/9 (±0.006: a 0..2p or −p..p−1 range, or
    # a triangular sum of two draws, all land far outside)
    for axis in (0, 1):
        freq = torch.bincount(s[:, axis] + pad, minlength=2 * pad + 1).double() / n
        assert torch.allclose(freq, torch.full_like(freq, 1 / 9), atol=0.006), freq
    # dx and dy drawn independently: the joint frequency of (0, 0) is 1/81
    both = ((s[:, 0] == 0) & (s[:, 1] == 0)).double().mean()
    assert abs(both - 1 / 81) < 0.002
    assert abs(torch.corrcoef(s.T.double())[0, 1]) < 0.02


def test_plan_shifts_do_not_depend_on_the_number_of_ranks():
    kw = dict(n=100, batch_size=16, seed=3, train=True, drop_last=True, shuffle=True)
    whole = EpochPlan(**kw).shifts(2, 5, 4)
    parts = [EpochPlan(**kw, rank=r, world_size=4).shifts(2, 5, 4) for r in range(4)]
    assert torch.equal(torch.cat(parts), whole) and whole.shape == (16, 2)
    assert not torch.equal(EpochPlan(**kw).shifts(2, 6, 4), whole)  # a new draw per batch


def _loader(root, pad=None, pad_fill=0, pad_mode="constant", crop=None):
    crop = PadCrop(pad, pad_fill, pad_mode) if pad is not None else crop
    return Loader(root, "train", 16, engine=Engine(workers=0), image_size=32,
                  sampling=Sampling(seed=7), crop=crop)


@pytest.mark.parametrize("mode", ["constant", "reflect"])
def test_pad_crop_loader_is_the_whole_image_shifted(shapes_records, mode):
    plain = _loader(shapes_records, pad=0)
    padded = _loader(shapes_records, pad=4, pad_fill=255, pad_mode=mode)
    plain.set_epoch(1)
    padded.set_epoch(1)
    for b, (a, c) in enumerate(zip(plain, padded)):
        shifts = padded.plan.shifts(1, b, 4)
        # back to uint8 levels: (x·std + mean)·255
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        u8 = lambda t: ((t.images * std + mean) * 255).round().to(torch.uint8)  # noqa: E731
        assert torch.equal(u8(c), translate(u8(a), shifts, 255, mode))
        assert torch.equal(a.targets, c.targets)
        if b == 2:
            break
    # the crop box is the whole 64² image (then resized to 32² and flipped): no zoom-in
    task = next(padded.plan.tasks(0, padded._heights, padded._widths, 32))
    assert (task.boxes == [[0, 0, 64, 64]] * len(task.boxes)).all()
    assert 0.3 < task.flips.mean() < 0.7


def test_pad_crop_options_are_one_line_errors(shapes_records):
    with pytest.raises(OptionError, match=r"PadCrop\(pad=32\) must be smaller than the 32² "):
        _loader(shapes_records, pad=32)
    with pytest.raises(OptionError, match="fill must be an integer 0..255"):
        _loader(shapes_records, pad=4, pad_fill=300)
    with pytest.raises(OptionError, match=r"PadCrop\(mode='wrap'\): choose one of constant"):
        _loader(shapes_records, pad=4, pad_mode="wrap")
    with pytest.raises(OptionError, match="Loader.crop='zoom'.: give RandomResizedCrop"):
        _loader(shapes_records, crop="zoom")


@pytest.mark.parametrize("override,message", [
    (["data.crop=pad", "data.image_size=32", "data.pad=32"],
     "data.pad=32 must be in [0, 32): the smallest training image is 32²"),
    (["data.crop=pad", "data.image_size=32", "data.pad=8", "data.progressive=[[0, 8], [2, 32]]"],
     "data.pad=8 must be in [0, 8)"),
    (["data.crop=pad", "data.pad_fill=-1"], "data.pad_fill=-1 must be a uint8 level"),
    (["data.crop=translate"], "data.crop='translate': choose one of random_resized, pad"),
    (["data.pad_mode=wrap"], "data.pad_mode='wrap': choose one of constant, edge, reflect, "
                             "symmetric"),
])
def test_pad_crop_config_errors(override, message):
    with pytest.raises(ConfigError) as e:
        load_config([], override)
    assert message in str(e.value)


@pytest.mark.parametrize("engine,options", [("native", {}), ("dali", {})])
def test_pad_crop_works_with_every_engine(coloured, engine, options):
    # constant-colour images: after pad-and-crop, exactly the shifted-in border is the fill
    if engine == "dali":
        pytest.importorskip("nvidia.dali")
    root, _ = coloured
    loader = Loader(root, "train", 8, image_size=24,
                    engine=Engine(engine, workers=2 if engine == "dali" else 0, **options),
                    sampling=Sampling(seed=4), crop=PadCrop(5, 0))
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    loader.set_epoch(0)
    for b, (images, _) in enumerate(loader):
        u8 = ((images * std + mean) * 255).round()
        shifts = loader.plan.shifts(0, b, 5)
        for k in range(len(images)):
            dx, dy = shifts[k].tolist()
            inside = torch.zeros(24, 24, dtype=torch.bool)
            inside[max(0, -dy):24 - max(0, dy), max(0, -dx):24 - max(0, dx)] = True
            black = (u8[k] == 0).all(0)
            assert torch.equal(black, ~inside), (b, k, dx, dy)
        if b == 1:
            break
    loader.close()
