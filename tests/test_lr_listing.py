"""`tricks lr`: the listing and PNG show the LR the trainer really uses, every combination."""
import pytest
from PIL import Image

from tricks.train.cli import main
from tricks.train.config import load_config
from tricks.train.lr_listing import lr_columns
from tricks.train.trainer import Trainer


def _rows(out: str) -> tuple[list[str], dict[int, list[str]]]:
    lines = [ln for ln in out.splitlines() if ln and not ln.startswith("wrote")]
    head = lines[0].replace(" (config)", "(config)").split()
    return head, {int(ln.split()[0]): ln.split() for ln in lines[1:]}


def test_lr_lists_every_update_of_every_schedule_and_warmup(tmp_path, capsys):
    png = tmp_path / "lr.png"
    # overrides on both sides of an option are all taken
    assert main(["lr", "-c", "cifar", "train.epochs=4", "--steps-per-epoch", "10",
                 "train.batch=256", "optim.lr=0.2", "--png", str(png), "schedule.name=step",
                 "schedule.step_epochs=[2]", "schedule.warmup_epochs=1"]) == 0
    head, rows = _rows(capsys.readouterr().out)
    assert head == ["update", "epoch", "batch", "step+warmup1(config)", "cosine",
                    "cosine+warmup1", "linear", "linear+warmup1", "step"]
    assert sorted(rows) == list(range(1, 41))  # all 40 updates of a short run
    col = {name: k for k, name in enumerate(head)}
    lr = lambda u, name: float(rows[u][col[name]])  # noqa: E731
    assert rows[21][1:3] == ["3", "1"]                    # update 21: epoch 3, batch 1
    assert lr(1, "step+warmup1(config)") == pytest.approx(0.02)  # warmup i·η/m, m = 10
    assert lr(20, "step") == pytest.approx(0.2)           # the milestone epoch ends at η
    assert lr(21, "step") == pytest.approx(0.02)
    assert lr(1, "cosine") == pytest.approx(0.2)          # the first update at η
    assert lr(11, "cosine+warmup1") == pytest.approx(0.2)
    assert 0 < lr(40, "cosine") < 0.001
    assert lr(11, "linear+warmup1") == pytest.approx(0.2)
    assert lr(40, "linear") == pytest.approx(0.2 / 40)    # (1 − 39/40)·η
    with Image.open(png) as im:
        assert im.size[0] > 400 and im.size[1] > 200


def test_lr_listing_is_what_the_trainer_runs(shapes_records, tmp_path):
    cfg = load_config([], [
        f"data.path={shapes_records}", "data.image_size=32", "data.workers=0",
        "model.name=resnet18d", "model.width=8", "train.batch=64", "train.epochs=3",
        "schedule.warmup_epochs=0.5", f"train.out={tmp_path}", "train.device=cpu"])
    trainer = Trainer(cfg, progress=False, log=lambda *a: None)
    try:
        spe = trainer.steps_per_epoch
        assert spe == 400 // 64
        listed = next(iter(lr_columns(cfg, spe).values()))
        assert listed == [trainer.lr(i) for i in range(1, 3 * spe + 1)]
    finally:
        trainer.close()


def test_lr_counts_updates_from_the_dataset(shapes_records, tmp_path, capsys):
    assert main(["lr", f"data.path={shapes_records}", "train.batch=64", "train.epochs=2",
                 "--png", str(tmp_path / "x.png")]) == 0
    _, rows = _rows(capsys.readouterr().out)
    assert max(rows) == 2 * (400 // 64)


def test_lr_bad_steps_is_a_one_line_error(capsys, tmp_path):
    assert main(["lr", "--steps-per-epoch", "0", "--png", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --steps-per-epoch must be at least 1") and err.count("\n") == 1


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        main(["lr", "-c", "cifar", "train.epochs=4", "--bogus", "train.batch=8"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
