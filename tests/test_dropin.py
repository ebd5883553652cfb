"""The Loader in a user's own training loop (issue 22): each trap a DataLoader, FFCV or DALI user
fell into, as a test."""
import numpy as np
import pytest
import torch
from PIL import Image

from tricks.pipeline import (CenterCrop, Engine, Loader, LoaderClosed, Output, PerSample,
                             RandomResizedCrop, Sampling)
from tricks.errors import DataError, OptionError
from tricks.pipeline.records import RecordFile


def _loader(root, split="train", batch_size=16, **kw):
    kw.setdefault("engine", Engine(workers=0))
    kw.setdefault("image_size", 32)
    return Loader(root, split, batch_size, **kw)


def _first(loader):
    return next(iter(loader))


# --- 1. a new epoch on every iteration ----------------------------------------------------------

def test_each_iteration_is_the_next_epoch_unless_one_is_pinned(shapes_records):
    loader = _loader(shapes_records)
    first, second = _first(loader), _first(loader)
    assert not torch.equal(first.targets, second.targets)   # a new order
    assert not torch.equal(first.images, second.images)     # and new crops
    assert loader.epoch == 1
    pinned = _loader(shapes_records)
    pinned.set_epoch(1)
    assert torch.equal(_first(pinned).images, second.images)  # the 2nd iteration is epoch 1
    loader.set_epoch(0)
    assert torch.equal(_first(loader).images, first.images)   # set_epoch gives that epoch
    assert torch.equal(_first(loader).images, second.images)  # and then the next one, 1


# --- 2. the shard from torch.distributed, batch_size per process --------------------------------

def _fake_torchrun(monkeypatch, rank, world):
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)


def test_under_torchrun_each_rank_reads_its_own_shard_of_per_process_batches(shapes_records,
                                                                               monkeypatch):
    single = _first(_loader(shapes_records, batch_size=16))  # one process, batch 16
    _fake_torchrun(monkeypatch, 1, 2)
    rank1 = _loader(shapes_records, batch_size=8)
    assert (rank1.rank, rank1.world_size, rank1.batch_size, rank1.global_batch_size) == \
        (1, 2, 8, 16)
    batch = _first(rank1)
    assert len(batch.targets) == 8 and len(rank1) == 400 // 16
    assert torch.equal(batch.images, single.images[8:])      # rank 1's half of the global batch
    # explicit arguments win over torch.distributed
    alone = _loader(shapes_records, batch_size=16, sampling=Sampling(rank=0, world_size=1))
    assert alone.world_size == 1 and torch.equal(_first(alone).images, single.images)
    # the global batch, as tricks train's train.batch, when asked for
    glob = _loader(shapes_records, batch_size=16, sampling=Sampling(global_batch=True))
    assert glob.batch_size == 8 and torch.equal(_first(glob).images, single.images[8:])


# --- 3. an ImageFolder tree as the source -------------------------------------------------------

def test_an_image_folder_tree_is_converted_once_and_reused(shapes_tree, capsys):
    loader = _loader(shapes_tree)
    said = capsys.readouterr().out
    assert "converting" in said and loader.num_classes == 10 and len(loader.dataset) == 400
    assert _first(loader).images.shape == (16, 3, 32, 32)
    val = _loader(shapes_tree, "val", train=False)          # the tree's val/ split, same cache
    assert capsys.readouterr().out == "" and len(val.dataset) == 100
    assert val.dataset.root == loader.dataset.root


def test_a_file_or_a_missing_path_is_one_line(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"\xff\xd8")
    for path, message in ((tmp_path / "x.jpg", "not a folder"),
                          (tmp_path / "nope", "no such dataset folder")):
        with pytest.raises(DataError, match=message) as e:
            _loader(path)
        assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def twelve_colours(tmp_path_factory):
    """12 flat JPEGs, picture k of grey level 20·k, listed as (path, label k): targets beyond 9
    tell whether integer labels stay the targets (class "10" sorts before "2" as text)."""
    folder = tmp_path_factory.mktemp("listed")
    for k in range(12):
        Image.fromarray(np.full((20, 30, 3), 20 * k, np.uint8)).save(folder / f"p{k}.jpg",
                                                                        quality=95)
    return [(str(folder / f"p{k}.jpg"), k) for k in range(12)]


def test_a_list_of_path_label_pairs_keeps_integer_labels_as_targets(twelve_colours, capsys):
    with _loader(twelve_colours, "val", batch_size=5, image_size=16,
                 output=Output(dtype=torch.uint8)) as val:
        assert val.num_classes == 12 and len(val.dataset) == 12
        for batch in val:
            grey = batch.images.double().mean(dim=(1, 2, 3))
            assert torch.allclose(grey, 20 * batch.targets.double(), atol=3), \
                (grey, batch.targets)
    assert "linking 12 listed images" in capsys.readouterr().out
    # the same list again: the same converted folder, nothing said
    again = _loader(twelve_colours, "val", batch_size=5, image_size=16)
    assert again.dataset.root == val.dataset.root and capsys.readouterr().out == ""
    named = _loader([(p, "odd" if k % 2 else "even") for p, k in twelve_colours], "train",
                    batch_size=4, image_size=16)
    assert named.classes == ["even", "odd"]
    assert sorted(int(y) for b in named for y in b.targets) == [0] * 6 + [1] * 6


@pytest.mark.parametrize("make,error,message", [
    (lambda ps: ps + [("/nowhere/x.jpg", 1)], DataError,
     "1 of the 13 listed image.s. do not exist, first /nowhere/x.jpg"),
    (lambda ps: [(p, k) for p, k in ps if k != 3], OptionError, "label.s. 3 have no training"),
    (lambda ps: ps[:1] + [(ps[1][0], "cat")], OptionError, "labels must all be integers"),
    (lambda ps: [p for p, _ in ps], OptionError, "a list must hold .path, label. pairs"),
])
def test_a_bad_list_is_one_line(twelve_colours, make, error, message):
    with pytest.raises(error, match=message) as e:
        _loader(make(twelve_colours), "train", batch_size=2)
    assert "\n" not in str(e.value)


def test_numpy_integer_labels_are_integers(twelve_colours):
    """Labels from a pandas column or a NumPy array (np.int64) are integer labels."""
    pairs = [(p, np.int64(k)) for p, k in twelve_colours]
    with _loader(pairs, "val", batch_size=12, image_size=16) as val:
        assert sorted(int(y) for y in next(iter(val)).targets) == list(range(12))


# --- 4. your own transforms ---------------------------------------------------------------------

def test_a_per_sample_torchvision_transform_is_named_and_can_be_wrapped(shapes_records):
    from torchvision.transforms import v2
    with pytest.raises(OptionError, match=r"augment\[1\]: RandomHorizontalFlip is a per-sample "
                                          r"torchvision transform; wrap it with .*PerSample"):
        _loader(shapes_records, augment=[lambda x, gen: x, v2.RandomHorizontalFlip()])
    with pytest.raises(OptionError, match=r"augment\[0\]: .* does not take \(images, gen\)"):
        _loader(shapes_records, augment=[lambda x: x])
    flip = [PerSample(v2.RandomHorizontalFlip())]
    plain = _first(_loader(shapes_records, sampling=Sampling(seed=3), crop=CenterCrop(1.0)))
    a = _first(_loader(shapes_records, sampling=Sampling(seed=3), crop=CenterCrop(1.0),
                       augment=flip))
    same = lambda x, y: torch.allclose(x, y, rtol=0, atol=1e-5)  # noqa: E731
    flipped = [same(x, p.flip(-1)) and not same(x, p) for x, p in zip(a.images, plain.images)]
    assert 3 <= sum(flipped) <= 13   # a draw per image, not one for the batch
    assert all(f or same(x, p) for f, x, p in zip(flipped, a.images, plain.images))
    b = _first(_loader(shapes_records, sampling=Sampling(seed=3), crop=CenterCrop(1.0),
                       augment=flip))
    assert torch.equal(a.images, b.images)  # keyed: the same in another loader (or a resume)


def test_one_op_instead_of_a_list_is_one_line(shapes_records):
    from torchvision.transforms import v2
    for op in (lambda x, gen: x, v2.RandomHorizontalFlip()):
        with pytest.raises(OptionError, match=r"augment= takes a list of batch ops, got one "
                                              r"object .*: pass \[op\]") as e:
            _loader(shapes_records, augment=op)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("op,message", [
    (lambda x, gen: None, "returned NoneType, not the batch"),
    (lambda x, gen: x[:, :, :16, :16], r"turned the \(16, 3, 32, 32\) torch.float32 batch on "
     r"cpu into \(16, 3, 16, 16\) torch.float32"),
    (lambda x, gen: x.double(), "into .* torch.float64 on cpu: a batch op keeps shape"),
])
def test_an_op_that_breaks_the_batch_is_named(shapes_records, op, message):
    with pytest.raises(OptionError, match=message) as e:
        _first(_loader(shapes_records, augment=[op]))
    assert "\n" not in str(e.value)


def test_load_state_dict_of_something_else_is_one_line(shapes_records):
    loader = _loader(shapes_records)
    for state in ({"epoch": "x", "position": 0}, {"position": 1}, [0, 1]):
        with pytest.raises(OptionError, match="load_state_dict: ") as e:
            loader.load_state_dict(state)
        assert "\n" not in str(e.value)


def test_per_sample_refuses_a_transform_that_changes_the_shape(shapes_records):
    from torchvision.transforms import v2
    loader = _loader(shapes_records, augment=[PerSample(v2.CenterCrop(16))])
    with pytest.raises(OptionError, match=r"PerSample\(CenterCrop.*returned \(3, 16, 16\)"):
        _first(loader)


# --- 5. the Python API checks its arguments -----------------------------------------------------

@pytest.mark.parametrize("make,message", [
    (lambda r: _loader(r, image_size=0), r"Loader\(image_size\) must be a positive integer"),
    (lambda r: _loader(r, batch_size=0), r"Loader\(batch_size\) must be a positive integer"),
    (lambda r: _loader(r, device="cuda:7"), r"Loader\(device='cuda:7'\)"),
    (lambda r: _loader(r, device="tpu"), r"Loader\(device='tpu'\): not a device"),
    (lambda r: _loader(r, crop=RandomResizedCrop(scale=(1.0, 0.08))),
     r"RandomResizedCrop\(scale\) must be a pair 0 < low ≤ high, got \(1, 0.08\)"),
    (lambda r: _loader(r, crop=RandomResizedCrop(ratio=(4 / 3, 3 / 4))),
     r"RandomResizedCrop\(ratio\) must be a pair"),
    (lambda r: _loader(r, crop=RandomResizedCrop(scale=(0.5, 2))), r"area fraction in \(0, 1\]"),
    (lambda r: _loader(r, crop=CenterCrop(0)), r"CenterCrop\(crop_ratio\) must be in \(0, 1\]"),
    (lambda r: _loader(r, engine="nope"), r"unknown engine 'nope'; available: dali, ffcv, native"),
    (lambda r: _loader(r, engine=Engine(workers=-1)), r"Engine\(workers\) must be an integer ≥ 0"),
    (lambda r: _loader(r, engine=Engine(decode="gpu")), r"unknown decode mode 'gpu'"),
    (lambda r: _loader(r, engine=Engine(threads=2)), r"native engine has no option\(s\) threads"),
    (lambda r: _loader(r, output=Output(dtype=torch.int32)), r"Output\(dtype=torch.int32\)"),
    (lambda r: _loader(r, output=Output(std=(0, 1, 1))), r"Output\(std\) must be positive"),
    (lambda r: _loader(r, sampling=Sampling(rank=2, world_size=2)), r"Sampling\(rank=2\)"),
    (lambda r: _loader(r, batch_size=500), r"400 images make no full batch of 500"),
    (lambda r: _loader(r, output=Output(dtype=torch.uint8), augment=[lambda x, g: x]),
     r"uint8 output takes no augment or mix op"),
])
def test_a_bad_argument_is_one_line_naming_it(shapes_records, make, message):
    if "cuda" in message and torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    with pytest.raises((OptionError, DataError), match=message) as e:
        make(shapes_records)
    assert "\n" not in str(e.value)


def test_cuda_without_cuda_is_one_line_at_construction(shapes_records, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(OptionError, match=r"Loader\(device='cuda'\): CUDA is not available"):
        _loader(shapes_records, device="cuda")


# --- 6. resume that cannot be misused -----------------------------------------------------------

def test_load_state_dict_then_set_epoch_resumes_rather_than_replays(shapes_records):
    full = _loader(shapes_records, sampling=Sampling(seed=5))
    full.set_epoch(2)
    want = [b.images for b in full]
    interrupted = _loader(shapes_records, sampling=Sampling(seed=5))
    interrupted.set_epoch(2)
    it = iter(interrupted)
    for _ in range(7):
        next(it)
    state = interrupted.state_dict()
    assert (state["epoch"], state["position"]) == (2, 7)
    resumed = _loader(shapes_records, sampling=Sampling(seed=5))
    resumed.load_state_dict(state)
    resumed.set_epoch(2)                     # what a usual loop does at the top of the epoch
    got = [b.images for b in resumed]
    assert len(got) == len(want) - 7 and all(torch.equal(a, b) for a, b in zip(got, want[7:]))
    assert resumed.state_dict()["epoch"] == 3  # the epoch finished: the next one is due
    resumed.set_epoch(2)                       # a later pin of the same epoch starts it over
    assert len(list(resumed)) == len(want)


def test_a_state_from_another_seed_or_batch_is_refused(shapes_records):
    state = _loader(shapes_records, sampling=Sampling(seed=5)).state_dict()
    with pytest.raises(OptionError, match="state's seed is 5, this loader's 0"):
        _loader(shapes_records).load_state_dict(state)
    with pytest.raises(OptionError, match="global_batch_size is 16, this loader's 8"):
        _loader(shapes_records, batch_size=8, sampling=Sampling(seed=5)).load_state_dict(state)


# --- 7. sharded evaluation: len() is what every rank yields -------------------------------------

@pytest.fixture(scope="module")
def ten_images(tmp_path_factory):
    from PIL import Image

    from conftest import colour_of
    from tricks.pipeline.convert import convert
    tree = tmp_path_factory.mktemp("ten") / "tree"
    for k in range(10):
        for split in ("train", "val"):
            folder = tree / split / f"c{k % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 20), colour_of(k)).save(folder / f"{k}.jpg", quality=95)
    out = tmp_path_factory.mktemp("ten-rec")
    convert(tree, out, workers=0, progress=False)
    return out


@pytest.mark.parametrize("batch,global_batch", [(4, True), (1, False), (4, False), (3, False),
                                                (2, False)])
def test_every_rank_yields_len_batches_and_every_image_once(ten_images, batch, global_batch):
    from conftest import ids_of
    ids, counts, lens = [], [], []
    for rank in range(4):
        loader = _loader(ten_images, "val", batch, train=False, image_size=16,
                         output=Output(mean=(0, 0, 0), std=(1 / 255,) * 3),
                         sampling=Sampling(rank=rank, world_size=4, global_batch=global_batch))
        batches = list(loader)
        counts.append(len(batches))
        lens.append(len(loader))
        for b in batches:
            assert len(b.targets) <= loader.batch_size
            # an empty batch (a NaN mean loss in a user's loop) only where it cannot be avoided:
            # one image per rank and batch, 10 images over 4 ranks
            assert len(b.targets) or loader.batch_size == 1
            ids += ids_of(b.images) if len(b.targets) else []
    assert counts == lens == [lens[0]] * 4   # one collective per batch never deadlocks
    assert sorted(ids) == list(range(10))    # and no image is counted twice or missed


# --- 8. with, close, what a DataLoader user looks for, uint8 output -----------------------------

def test_with_and_close(shapes_records):
    with _loader(shapes_records) as loader:
        assert len(_first(loader).targets) == 16
    assert loader.records._map is None      # the record file's mapping is released
    with pytest.raises(LoaderClosed, match="was closed"):
        iter(loader)
    loader.close()                          # twice is fine


def test_batch_size_dataset_and_repr(shapes_records):
    loader = _loader(shapes_records, batch_size=8)
    assert loader.batch_size == 8 and loader.global_batch_size == 8
    assert len(loader.dataset) == 400 and loader.dataset.classes == loader.classes
    assert loader.dataset.split == "train" and "batch_size=8" in repr(loader)


def test_uint8_output_is_the_decoded_pixels(shapes_records):
    raw = _first(_loader(shapes_records, output=Output(dtype=torch.uint8), sampling=Sampling(1)))
    norm = _first(_loader(shapes_records, sampling=Sampling(1)))
    assert raw.images.dtype == torch.uint8 and raw.images.shape == (16, 3, 32, 32)
    assert raw.images.is_contiguous(memory_format=torch.channels_last)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    back = ((norm.images * std + mean) * 255).round()
    assert torch.equal(back.to(torch.uint8), raw.images) and torch.equal(raw.targets,
                                                                         norm.targets)


def test_record_file_close_drops_the_mapping(shapes_records):
    rf = RecordFile(shapes_records / "val.rec")
    data = np.array(rf.raw(0))
    rf.close()
    assert rf._map is None and np.array_equal(np.array(rf.raw(0)), data)  # reopens on use
