"""The DALI engine on the CPU (device_id=None): exactly-once epochs by content, both sources."""
import sys
import pytest
import torch

pytest.importorskip("nvidia.dali")

from conftest import cuda, ids_of  # noqa: E402
from tricks.pipeline import Loader  # noqa: E402
from tricks.pipeline.errors import UserError  # noqa: E402

def _epoch(root, split, source, epoch=0, world=1, rank=0, batch=8, train=None, size=24):
    loader = Loader(root, split, batch, train=train, image_size=size, engine="dali",
                    workers=2, rank=rank, world_size=world, seed=3,
                    engine_options={"source": source}, dtype=torch.float32)
    loader.set_epoch(epoch)
    out = []
    for b in loader.engine.batches(loader.plan.tasks(epoch, loader._heights, loader._widths,
                                                     size)):
        out.append(b)
    loader.close()
    return out


@pytest.mark.parametrize("source", ["records", "files"])
@pytest.mark.parametrize("world", [1, 2])
def test_validation_epoch_has_every_sample_exactly_once(coloured, source, world):
    root, label_of = coloured
    pairs = []
    for rank in range(world):
        for images, labels in _epoch(root, "val", source, world=world, rank=rank, train=False):
            pairs += list(zip(ids_of(images), labels.tolist()))
    assert sorted(pairs) == sorted((k, label_of[k]) for k in range(37, 48))


@pytest.mark.parametrize("source", ["records", "files"])
@pytest.mark.parametrize("world", [1, 2])
def test_training_epoch_has_no_sample_twice_and_labels_match(coloured, source, world):
    root, label_of = coloured
    pairs = []
    for rank in range(world):
        for images, labels in _epoch(root, "train", source, world=world, rank=rank,
                                     train=True):
            assert len(labels) == 8 // world  # full batches only (drop last)
            pairs += list(zip(ids_of(images), labels.tolist()))
    ids = [i for i, _ in pairs]
    assert len(ids) == len(set(ids)) and len(ids) >= 32 - 8
    assert all(label_of[i] == lab for i, lab in pairs)
    assert all(i < 37 for i in ids)


def test_both_sources_read_the_same_content(coloured):
    root, _ = coloured
    sets = []
    for source in ("records", "files"):
        pairs = set()
        for images, labels in _epoch(root, "val", source, train=False):
            pairs |= set(zip(ids_of(images), labels.tolist()))
        sets.append(pairs)
    assert sets[0] == sets[1] and len(sets[0]) == 11


@pytest.mark.parametrize("source", ["records", "files"])
def test_contract_determinism_and_reshuffle(coloured, source):
    root, _ = coloured
    native = next(iter(Loader(root, "train", 8, image_size=24, workers=0)))
    # mean 0 and std 1/255: the loader's float output is the engine's 0..255 pixels
    loader = Loader(root, "train", 8, image_size=24, engine="dali", workers=2,
                    engine_options={"source": source}, mean=(0, 0, 0), std=(1 / 255,) * 3)
    images, labels = next(iter(loader))
    assert images.shape == native.images.shape and images.dtype == native.images.dtype
    assert images.stride() == native.images.stride() and labels.dtype == torch.int64
    v = [_epoch(root, "val", source, train=False) for _ in range(2)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*v))
    orders = []
    for e in (0, 1):  # consecutive epochs of one loader: a new global order
        loader.set_epoch(e)
        orders.append([i for b in loader for i in ids_of(b.images.view(8, 3, 24, 24) * 0 + b.images)])
    assert sorted(orders[0]) != orders[0] and orders[0] != orders[1]
    fresh = [[i for b in _epoch(root, "train", source, epoch=e, train=True)
              for i in ids_of(b[0])] for e in (0, 1)]
    assert fresh[0] != fresh[1]  # set_epoch is honoured by a new loader too


def test_records_source_follows_the_loader_plan(coloured):
    # the same samples, in the same order, as the native engine: crops keyed by the plan
    root, _ = coloured
    a = [b.targets for b in Loader(root, "train", 8, image_size=24, workers=0, seed=1)]
    b = [b.targets for b in Loader(root, "train", 8, image_size=24, engine="dali", workers=2,
                                   seed=1)]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 4


def test_image_size_can_change_between_epochs(coloured):
    root, _ = coloured
    loader = Loader(root, "train", 8, image_size=24, engine="dali", workers=2)
    assert next(iter(loader)).images.shape[-1] == 24
    loader.set_image_size(32)
    loader.set_epoch(1)
    assert next(iter(loader)).images.shape[-1] == 32


@pytest.mark.parametrize("source", ["records", "files"])
def test_progressive_resizing_is_right_from_the_first_batch_of_each_epoch(coloured, source):
    """DALI asks the size callback ahead of time (prefetch): a size change between epochs must
    still reach every batch of the new epoch, the first included, with the epoch intact."""
    root, label_of = coloured
    loader = Loader(root, "train", 8, image_size=24, engine="dali", workers=2, prefetch=2,
                    engine_options={"source": source}, dtype=torch.float32,
                    mean=(0, 0, 0), std=(1 / 255,) * 3)
    for epoch, size in enumerate((24, 32, 32, 16)):
        loader.set_image_size(size)
        loader.set_epoch(epoch)
        batches = list(loader)
        assert [b.images.shape[-1] for b in batches] == [size] * len(batches), epoch
        ids = [i for b in batches for i in ids_of(b.images)]
        labels = [int(t) for b in batches for t in b.targets]
        assert len(ids) == len(set(ids)) == 32 and all(i < 37 for i in ids)
        assert [label_of[i] for i in ids] == labels
    loader.close()


def test_augment_and_mix_run_after_dali(coloured):
    from tricks.pipeline.augment import ColorJitter, RandomErasing
    from tricks.pipeline.mix import Mixup
    root, _ = coloured
    loader = Loader(root, "train", 8, image_size=24, engine="dali", workers=2,
                    augment=[ColorJitter(), RandomErasing(p=1.0)], mix=Mixup())
    images, targets = next(iter(loader))
    assert targets.shape == (8, 3) and images.is_contiguous(memory_format=torch.channels_last)


def test_missing_dali_is_a_one_line_install_hint(coloured, monkeypatch):
    root, _ = coloured
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(UserError, match=r"pip install 'tricks\[dali\]'"):
        Loader(root, "train", 8, image_size=24, engine="dali")


def test_training_with_the_dali_engine(coloured, tmp_path):
    from tricks.train.cli import main
    root, _ = coloured
    assert main(["train", "--no-progress", f"data.path={root}", "data.engine=dali",
                 "data.image_size=24", "data.workers=2", "model.name=resnet18d",
                 "model.width=8", "train.batch=8", "train.epochs=1",
                 f"train.out={tmp_path}", "data.engine_options={source: files}"]) == 0


@cuda
def test_mixed_decode_on_the_gpu(coloured):
    root, label_of = coloured
    pairs = []
    for images, labels in _epoch(root, "val", "records", train=False):
        assert images.is_cuda
        pairs += list(zip(ids_of(images.cpu()), labels.tolist()))
    assert sorted(pairs) == sorted((k, label_of[k]) for k in range(37, 48))


def test_gpu_outputs_are_bound_to_torchs_current_stream(coloured, monkeypatch):
    """Every ``run`` of a CUDA pipeline names torch's current stream (DALI then orders its
    outputs, and their release, on it); a CPU pipeline's runs name none."""
    root, _ = coloured
    loader = Loader(root, "train", 8, image_size=24, engine="dali", workers=2)
    engine = loader.engine
    calls = []

    class Pipe:
        def run(self, *args):
            calls.append(args)

    engine._run(Pipe())
    assert calls == [()]
    stream = object()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(engine, "device_id", 0)
    engine._run(Pipe())
    assert calls[-1] == (stream,)
    loader.close()


@cuda
@pytest.mark.parametrize("source", ["records", "files"])
def test_batches_stay_intact_while_the_consumer_stream_is_busy(coloured, source):
    """The training step keeps torch's stream busy while DALI runs ahead: each batch must still
    hold its own pixels (ids match labels, every sample once)."""
    root, label_of = coloured
    loader = Loader(root, "train", 8, image_size=24, engine="dali", workers=2, device="cuda",
                    engine_options={"source": source}, mean=(0, 0, 0), std=(1 / 255,) * 3)
    busy = torch.randn(4096, 4096, device="cuda")
    pairs = []
    for epoch in range(3):
        loader.set_epoch(epoch)
        for images, labels in loader:
            for _ in range(8):  # ~10 ms of queued work behind each hand-off
                busy = (busy @ busy).tanh_()
            pairs += list(zip(ids_of(images.cpu()), labels.tolist()))
    assert all(label_of[i] == lab for i, lab in pairs)
    assert len(pairs) == 3 * 32
