"""Fine-tuning saved weights into a model with another class count (issue 25, item 8):
``model.weights_strict=false`` loads everything but the classifier, said in one line."""
import pytest
import torch
import torchvision

from tricks.train.config import ConfigError, load_config
from tricks.train.build import build_model


@pytest.fixture(scope="module")
def imagenet_r18(tmp_path_factory):
    """A torchvision ResNet-18 state dict with ImageNet's 1,000 classes."""
    path = tmp_path_factory.mktemp("weights") / "r18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def _build(path, *overrides, name="resnet18", classes=3):
    lines = []
    cfg = load_config([], [f"model.name={name}", f"model.weights={path}", *overrides])
    return build_model(cfg, classes, log=lines.append), lines


def test_another_class_count_is_refused_naming_the_class_count_and_the_option(imagenet_r18):
    with pytest.raises(ConfigError, match=r"1000 outputs, this model 3 classes; set "
                                          r"model\.weights_strict=false"):
        _build(imagenet_r18)


def test_weights_strict_false_loads_the_backbone_and_says_so_in_one_line(imagenet_r18):
    model, lines = _build(imagenet_r18, "model.weights_strict=false")
    saved = torch.load(imagenet_r18)
    ours = model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in saved.items() if not k.startswith("fc."))
    assert ours["fc.weight"].shape == (3, 512) and ours["fc.bias"].shape == (3,)
    assert len(lines) == 1 and "fc.weight, fc.bias" in lines[0] and "1000" in lines[0]


def test_weights_strict_false_still_refuses_another_architecture(imagenet_r18):
    with pytest.raises(ConfigError, match="do not match"):
        _build(imagenet_r18, "model.weights_strict=false", name="resnet18d")


def test_our_checkpoint_into_another_class_count_is_one_line_either_way(tmp_path):
    from tricks.train.checkpoint import save_checkpoint
    src = build_model(load_config([], ["model.name=resnet18", "model.width=8"]), 10)
    save_checkpoint(tmp_path / "c.pt", {"model": src.state_dict(), "config": {}})
    with pytest.raises(ConfigError, match="weights_strict=false"):
        _build(tmp_path / "c.pt", "model.width=8")
    model, lines = _build(tmp_path / "c.pt", "model.width=8", "model.weights_strict=false")
    assert torch.equal(model.state_dict()["layer4.1.bn2.weight"],
                       src.state_dict()["layer4.1.bn2.weight"])
    assert len(lines) == 1 and "10 outputs in the weights, 3 classes here" in lines[0]
