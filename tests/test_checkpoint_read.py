"""Every file a user hands in is read with weights_only=True: a pickle that would run code is
refused (and the code not run), a damaged or foreign file is one line naming it."""
import pytest
import torch

from tricks.errors import UserError
from tricks.train.checkpoint import load_checkpoint, read_state_dict, read_torch_file
from tricks.train.cli import main


class _CreatesAFile:
    """Unpickled with weights_only=False, builds ``open(target, "w")``: the file appears."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return open, (self.target, "w")


@pytest.fixture
def malicious(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "model": _CreatesAFile(target), "config": {}}, path)
    return path, target


@pytest.mark.parametrize("argv", [
    ["eval", "{ck}", "{data}"],
    ["train", "--resume", "{ck}"],
    ["train", "data.path={data}", "model.weights={ck}", "train.epochs=1"],
    ["train", "data.path={data}", "teacher.checkpoint={ck}", "teacher.model=resnet18",
     "train.epochs=1"],
])
def test_a_pickle_that_would_run_code_is_refused_and_not_run(malicious, shapes_records, capsys,
                                                             tmp_path, monkeypatch, argv):
    monkeypatch.chdir(tmp_path)
    path, target = malicious
    code = main([a.format(ck=path, data=shapes_records) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == 1 and not target.exists()
    assert err.startswith("error: ") and str(path) in err and "run code" in err
    assert "(io.open)" in err and "\n" not in err


def test_a_truncated_checkpoint_is_one_line(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"format_version": 1, "model": {"w": torch.zeros(1000)}}, path)
    whole = path.read_bytes()
    for cut, reason in ((len(whole) // 2, "truncated"), (0, "truncated")):
        path.write_bytes(whole[:cut])
        with pytest.raises(UserError, match=rf"^checkpoint={path}: cannot read it: .*{reason}"):
            read_torch_file(path)


def test_a_file_that_is_not_a_torch_file_or_not_ours(tmp_path):
    junk = tmp_path / "notes.pt"
    junk.write_text("hello, not a checkpoint")
    with pytest.raises(UserError, match=rf"^model.weights={junk}: cannot read it: not a torch"):
        read_state_dict(junk, "model.weights")
    numbers = tmp_path / "numbers.pt"
    torch.save([1, 2, 3], numbers)
    with pytest.raises(UserError, match="neither a tricks checkpoint nor a model state dict"):
        read_state_dict(numbers, "model.weights")
    with pytest.raises(UserError, match="not a tricks checkpoint"):
        load_checkpoint(numbers)


def test_a_bare_state_dict_and_our_checkpoint_are_told_apart(tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save({"fc.weight": torch.ones(2, 2)}, bare)
    weights, ours = read_state_dict(bare, "model.weights")
    assert ours is None and torch.equal(weights["fc.weight"], torch.ones(2, 2))
