"""The DALI engine on the CPU (device_id=None): exactly-once epochs by content."""
import sys
import pytest
import torch

pytest.importorskip("nvidia.dali")

from conftest import cuda, ids_of  # noqa: E402
from tricks.pipeline import Engine, Loader, Output, Sampling  # noqa: E402
from tricks.errors import UserError  # noqa: E402

RAW = Output(mean=(0, 0, 0), std=(1 / 255,) * 3)  # float images equal to the engine's 0..255


def _epoch(root, split, epoch=0, world=1, rank=0, batch=8, train=None, size=24):
    loader = Loader(root, split, batch, train=train, image_size=size,
                    engine=Engine("dali", workers=2),
                    sampling=Sampling(seed=3, rank=rank, world_size=world, global_batch=True))
    tasks = loader.plan.tasks(epoch, loader._heights, loader._widths, size)
    out = list(loader.engine.batches(t for t in tasks if len(t.indices)))  # the engine's uint8
    loader.close()
    return out


@pytest.mark.parametrize("world", [1, 2])
def test_validation_epoch_has_every_sample_exactly_once(coloured, world):
    root, label_of = coloured
    pairs = []
    for rank in range(world):
        for images, labels in _epoch(root, "val", world=world, rank=rank, train=False):
            pairs += list(zip(ids_of(images), labels.tolist()))
    assert sorted(pairs) == sorted((k, label_of[k]) for k in range(37, 48))


@pytest.mark.parametrize("world", [1, 2])
def test_training_epoch_has_no_sample_twice_and_labels_match(coloured, world):
    root, label_of = coloured
    pairs = []
    for rank in range(world):
        for images, labels in _epoch(root, "train", world=world, rank=rank, train=True):
            assert len(labels) == 8 // world  # full batches only (drop last)
            pairs += list(zip(ids_of(images), labels.tolist()))
    ids = [i for i, _ in pairs]
    assert len(ids) == len(set(ids)) and len(ids) >= 32 - 8
    assert all(label_of[i] == lab for i, lab in pairs)
    assert all(i < 37 for i in ids)


def test_contract_determinism_and_reshuffle(coloured):
    root, _ = coloured
    native = next(iter(Loader(root, "train", 8, image_size=24, engine=Engine(workers=0))))
    loader = Loader(root, "train", 8, image_size=24, engine=Engine("dali", workers=2),
                    output=RAW)
    images, labels = next(iter(loader))
    assert images.shape == native.images.shape and images.dtype == native.images.dtype
    assert images.stride() == native.images.stride() and labels.dtype == torch.int64
    v = [_epoch(root, "val", train=False) for _ in range(2)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(*v))
    orders = []
    for e in (0, 1):  # consecutive epochs of one loader: a new global order
        loader.set_epoch(e)
        orders.append([i for b in loader for i in ids_of(b.images.view(8, 3, 24, 24) * 0 + b.images)])
    assert sorted(orders[0]) != orders[0] and orders[0] != orders[1]
    fresh = [[i for b in _epoch(root, "train", epoch=e, train=True)
              for i in ids_of(b[0])] for e in (0, 1)]
    assert fresh[0] != fresh[1]  # set_epoch is honoured by a new loader too


def test_records_source_follows_the_loader_plan(coloured):
    # the same samples, in the same order, as the native engine: crops keyed by the plan
    root, _ = coloured
    a = [b.targets for b in Loader(root, "train", 8, image_size=24, engine=Engine(workers=0),
                                   sampling=Sampling(seed=1))]
    b = [b.targets for b in Loader(root, "train", 8, image_size=24,
                                   engine=Engine("dali", workers=2), sampling=Sampling(seed=1))]
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b) == 4


def test_image_size_can_change_between_epochs(coloured):
    root, _ = coloured
    loader = Loader(root, "train", 8, image_size=24, engine=Engine("dali", workers=2))
    assert next(iter(loader)).images.shape[-1] == 24
    loader.set_image_size(32)
    loader.set_epoch(1)
    assert next(iter(loader)).images.shape[-1] == 32


def test_progressive_resizing_is_right_from_the_first_batch_of_each_epoch(coloured):
    """DALI asks the size callback ahead of time (prefetch): a size change between epochs must
    still reach every batch of the new epoch, the first included, with the epoch intact."""
    root, label_of = coloured
    loader = Loader(root, "train", 8, image_size=24, engine=Engine("dali", workers=2, prefetch=2),
                    output=RAW)
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
    loader = Loader(root, "train", 8, image_size=24, engine=Engine("dali", workers=2),
                    augment=[ColorJitter(), RandomErasing(p=1.0)], mix=Mixup())
    images, targets = next(iter(loader))
    assert targets.shape == (8, 3) and images.is_contiguous(memory_format=torch.channels_last)


def test_the_former_files_source_is_a_one_line_error(coloured):
    from tricks.errors import OptionError
    with pytest.raises(OptionError, match="former files source"):
        Loader(coloured[0], "train", 8, engine=Engine("dali", source="files"))


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
                 f"train.out={tmp_path}"]) == 0


@cuda
def test_mixed_decode_on_the_gpu(coloured):
    root, label_of = coloured
    pairs = []
    for images, labels in _epoch(root, "val", train=False):
        assert images.is_cuda
        pairs += list(zip(ids_of(images.cpu()), labels.tolist()))
    assert sorted(pairs) == sorted((k, label_of[k]) for k in range(37, 48))


def test_gpu_outputs_are_bound_to_torchs_current_stream(coloured, monkeypatch):
    """Every ``run`` of a CUDA pipeline names torch's current stream (DALI then orders its
    outputs on it: the step waits for them, the host does not); a CPU pipeline's runs name
    none."""
    root, _ = coloured
    loader = Loader(root, "train", 8, image_size=24, engine=Engine("dali", workers=2))
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
def test_batches_stay_intact_while_the_consumer_stream_is_busy(coloured):
    """The training step keeps torch's stream busy while DALI runs ahead: each batch must still
    hold its own pixels (ids match labels, every sample once)."""
    root, label_of = coloured
    loader = Loader(root, "train", 8, image_size=24, engine=Engine("dali", workers=2),
                    device="cuda", output=RAW)
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


# --- fidelity (issue 13): DALI decodes the stored records, shards exactly once ------------------

@pytest.fixture(scope="module")
def odd_tree(tmp_path_factory):
    """Constant-colour images whose stored pixels differ from a naive decode of the file:
    a transparent PNG (white once flattened), a 16-bit PNG at half scale (128), names with a
    newline and a tab; 3 classes, 2 images each, the same set in train and val."""
    import numpy as np
    from PIL import Image
    from tricks.pipeline.convert import convert
    root = tmp_path_factory.mktemp("odd") / "tree"
    want = {}
    for split in ("train", "val"):
        for c in ("a", "b", "c"):
            (root / split / c).mkdir(parents=True)
        Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(root / split / "a" / "clear\nline.png")
        Image.new("RGB", (40, 30), (255, 255, 255)).save(root / split / "a" / "white.jpg")
        Image.fromarray(np.full((30, 40), 32768, np.uint16)).save(root / split / "b" / "x\ty.png")
        Image.new("RGB", (40, 30), (128, 128, 128)).save(root / split / "b" / "grey.jpg")
        for k in range(2):
            Image.new("RGB", (40, 30), (200, 40, 40)).save(root / split / "c" / f"{k}\n.jpg")
    want = {0: 255.0, 1: 128.0, 2: None}
    out = tmp_path_factory.mktemp("odd-rec")
    convert(root, out, workers=0, progress=False)
    return out, want


@pytest.mark.parametrize("train", [False, True])
def test_dali_decodes_the_stored_records(odd_tree, train):
    root, want = odd_tree
    seen = 0
    for images, labels in _epoch(root, "train" if train else "val", train=train, batch=2):
        for img, lab in zip(images.float(), labels.tolist()):
            if want[lab] is not None:  # white and mid-grey everywhere, as the native engine
                assert abs(img.mean().item() - want[lab]) < 3, (lab, img.mean())
            seen += 1
    assert seen == 6


def test_sharded_evaluation_counts_every_image_once(tmp_path):
    from PIL import Image
    from conftest import colour_of
    from tricks.pipeline.convert import convert
    for k in range(5):
        folder = tmp_path / "tree" / ("train" if k == 0 else "val") / "c"
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 24), colour_of(k)).save(folder / f"{k}.jpg", quality=95)
        Image.new("RGB", (32, 24), colour_of(k)).save(
            tmp_path / "tree" / "train" / "c" / f"t{k}.jpg", quality=95) if k else None
    (tmp_path / "tree" / "val" / "c" / "0.jpg").write_bytes(
        (tmp_path / "tree" / "train" / "c" / "0.jpg").read_bytes())
    convert(tmp_path / "tree", tmp_path / "rec", workers=0, progress=False)
    ids = []
    for rank in range(2):
        for images, _ in _epoch(tmp_path / "rec", "val", world=2, rank=rank, train=False,
                                batch=2):
            ids += ids_of(images)
    assert sorted(ids) == [0, 1, 2, 3, 4]


# --- copies (issue 23): zero-copy JPEG views in, DALI's own buffers out ----------------------------

def test_the_feed_hands_dali_views_of_the_record_map_not_copies(coloured):
    """The external source's JPEGs are views of the memory map (fed with ``no_copy``): no copy
    of a batch's bytes in the training thread, where DALI calls the feed."""
    import numpy as np
    root, _ = coloured
    loader = Loader(root, "train", 8, image_size=24, engine=Engine("dali", workers=2))
    feed, records = loader.engine._feed, loader.engine.records
    feed.tasks = list(loader.plan.tasks(0, loader._heights, loader._widths, 24))[:1]
    jpegs = next(iter(feed))[0]
    assert len(jpegs) == 8
    assert all(np.shares_memory(j, records.raw(0).base) for j in jpegs)
    loader.close()


def test_batches_are_dalis_buffers_and_outlive_later_runs(coloured):
    """``_to_torch`` wraps DALI's output buffers (DLPack) instead of copying them, and under the
    dynamic executor they stay valid while DALI runs on: every batch of two epochs, all kept
    to the end, still holds its own samples."""
    root, label_of = coloured
    loader = Loader(root, "train", 8, image_size=24,
                    engine=Engine("dali", workers=2, prefetch=2))
    engine = loader.engine
    tasks = list(loader.plan.tasks(0, loader._heights, loader._widths, 24))
    engine._feed.tasks = tasks
    pipe = engine._pipeline()
    images, labels = engine._run(pipe)
    x, y = engine._to_torch(images, labels)
    assert x.data_ptr() == images.as_tensor().data_ptr()  # no copy
    kept = [(x, y)]
    for _ in tasks[1:]:
        kept.append(engine._to_torch(*engine._run(pipe)))
    with pytest.raises(StopIteration):
        engine._run(pipe)
    pipe.reset()
    engine._feed.tasks = list(loader.plan.tasks(1, loader._heights, loader._widths, 24))
    for _ in engine._feed.tasks:
        kept.append(engine._to_torch(*engine._run(pipe)))
    pairs = [(i, int(t)) for x, y in kept for i, t in zip(ids_of(x), y)]
    assert len(pairs) == 64 and all(label_of[i] == t for i, t in pairs)
    assert len({i for i, _ in pairs[:32]}) == 32
    loader.close()
