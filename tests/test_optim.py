from tricks.models import create_model
from tricks.train.optim import build_optimizer, fp16_sync_note, param_groups


def test_no_bias_decay_groups_by_structure_including_downsample_bn():
    model = create_model("resnet50d")
    decay, no_decay = param_groups(model, 1e-4, no_bias_decay=True)
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    # the shortcut's BN is named downsample.2 in ResNet-D: a name filter for "bn" misses it
    assert "layer1.0.downsample.2.weight" in nd and "layer1.0.downsample.2.bias" in nd
    assert "conv1.1.weight" in nd  # a BN inside the deep stem
    assert "fc.bias" in nd and "fc.weight" not in nd
    assert all(p.ndim > 1 for p in decay["params"])
    assert all(p.ndim <= 1 for p in no_decay["params"])
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 1e-4
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_decay_everything_without_the_trick():
    model = create_model("resnet18")
    (group,) = param_groups(model, 1e-4, no_bias_decay=False)
    assert len(group["params"]) == len(list(model.parameters()))


def test_sgd_is_nesterov():
    opt = build_optimizer(create_model("resnet18"), "sgd", 0.1, 0.9, True, 1e-4, True)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9


def test_fp16_sync_note_only_for_optimizers_the_scaler_reads_back():
    """Fused SGD applies the scale itself: no note; unfused SGD and AdaBound: a note naming the
    fix (which configs sync is checked against a step in tests/test_no_sync.py)."""
    model = create_model("resnet18", num_classes=10, cifar_stem=True, width=8)
    assert fp16_sync_note(build_optimizer(model, "sgd", 0.1, fused=True), "sgd") is None
    note = fp16_sync_note(build_optimizer(model, "sgd", 0.1), "sgd")
    assert note and "optim.fused=false" in note and "set optim.fused=true" in note
    note = fp16_sync_note(build_optimizer(model, "adabound", 0.1), "adabound")
    assert note and "optim.name=adabound" in note and "optim.fused=false" not in note
