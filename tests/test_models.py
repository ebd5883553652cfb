import copy

import pytest
import torch
import torchvision
from torch import nn

from tricks.models import count_macs, create_model, list_models, load_torchvision_state_dict, register
from tricks.models.resnet import BasicBlock, Bottleneck

TABLE5_GMACS = {"resnet50": 3.8, "resnet50b": 4.1, "resnet50c": 4.3, "resnet50d": 4.3}


@pytest.mark.parametrize("name", sorted(TABLE5_GMACS))
def test_forward_macs_match_table5(name):
    macs = count_macs(create_model(name), 224) / 1e9
    assert abs(macs - TABLE5_GMACS[name]) / TABLE5_GMACS[name] < 0.03, macs


def test_mobilenet_v1_matches_its_paper():
    """Howard et al. 2017, Table 1: 569 M multiply-adds and 4.2 M parameters at 224²."""
    from tricks.models import count_params
    m = create_model("mobilenet_v1")
    assert round(count_macs(m, 224) / 1e6) == 569
    assert round(count_params(m) / 1e6, 1) == 4.2
    depthwise = [c for c in m.modules() if isinstance(c, nn.Conv2d) and c.groups > 1]
    assert len(depthwise) == 13 and all(c.groups == c.in_channels for c in depthwise)


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_and_trains_a_step(name):
    model = create_model(name, num_classes=7, width=8)
    side = 80 if name == "inception_v3" else 64  # Inception-V3 needs at least 75 px
    x = torch.randn(2, 3, side, side)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def _has_avgpool_shortcut(model):
    return any(isinstance(m.downsample[0], nn.AvgPool2d)
               for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))
               and m.downsample is not None)


def test_variants_are_structurally_distinct():
    vanilla, b, c, d = (create_model(f"resnet50{s}") for s in ("", "b", "c", "d"))
    # vanilla strides the first 1×1 of a downsampling block, B the 3×3
    assert vanilla.layer2[0].conv1.stride == (2, 2) and vanilla.layer2[0].conv2.stride == (1, 1)
    assert b.layer2[0].conv1.stride == (1, 1) and b.layer2[0].conv2.stride == (2, 2)
    # C and D share the deep stem (three 3×3 convs); only D average-pools the shortcut
    for m in (c, d):
        convs = [x for x in m.conv1.modules() if isinstance(x, nn.Conv2d)]
        assert [x.kernel_size for x in convs] == [(3, 3)] * 3
        assert [x.out_channels for x in convs] == [32, 32, 64]
    assert isinstance(b.conv1, nn.Conv2d) and b.conv1.kernel_size == (7, 7)
    assert not _has_avgpool_shortcut(c) and _has_avgpool_shortcut(d)
    assert d.layer2[0].downsample[1].stride == (1, 1)
    assert c.layer2[0].downsample[0].stride == (2, 2)
    # layer1's shortcut only changes channels: no pooling there
    assert isinstance(d.layer1[0].downsample[0], nn.Identity)


def test_resnet50b_loads_torchvision_weights_with_identical_logits():
    torch.manual_seed(0)
    tv = torchvision.models.resnet50()
    for m in tv.modules():  # non-trivial BN statistics so eval mode is really compared
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ours = create_model("resnet50b")
    load_torchvision_state_dict(ours, tv.state_dict())
    tv.eval(), ours.eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))


def test_torchvision_weights_into_wrong_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="do not match"):
        load_torchvision_state_dict(create_model("resnet50d"),
                                    torchvision.models.resnet50().state_dict())


def test_zero_gamma_zeroes_only_the_last_bn_of_each_block():
    model = create_model("resnet50d", zero_init_last=True)
    blocks = [m for m in model.modules() if isinstance(m, Bottleneck)]
    assert len(blocks) == 16
    for blk in blocks:
        assert torch.all(blk.bn3.weight == 0)
        assert torch.all(blk.bn1.weight == 1) and torch.all(blk.bn2.weight == 1)
    assert torch.all(model.bn1.weight == 1)
    plain = create_model("resnet18d")
    assert all(torch.all(m.bn2.weight == 1) for m in plain.modules() if isinstance(m, BasicBlock))
    # with zero-γ every residual block starts as the identity of its shortcut
    zero = create_model("resnet18", zero_init_last=True, num_classes=3).eval()
    x = torch.randn(1, 64, 8, 8).abs()
    assert torch.allclose(zero.layer1[0](x), x)


def test_xavier_init_is_the_default_and_torchvision_init_is_available():
    conv = create_model("resnet18").layer1[0].conv1.weight
    fan_in = fan_out = conv.shape[1] * 9
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert conv.abs().max() <= bound
    tv = create_model("resnet18", init="torchvision").layer1[0].conv1.weight
    assert tv.abs().max() > bound  # normal, not bounded uniform
    with pytest.raises(ValueError, match="unknown init"):
        create_model("resnet18", init="he")


def test_cifar_stem_keeps_resolution():
    model = create_model("resnet18d", cifar_stem=True, num_classes=10, width=16)
    assert isinstance(model.maxpool, nn.Identity)
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        register("resnet50d", lambda **kw: None)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet51")


@pytest.mark.parametrize("name", ["resnet18", "resnet18c"])  # basic blocks: a 4-channel shortcut
def test_narrow_models_get_the_same_gradients_channels_last(name):
    """The strided 1×1 shortcut (and vanilla bottleneck conv) of a width-4 model has fewer
    input channels than oneDNN's block: its channels-last weight gradient on the CPU was 49%
    wrong with 2 threads (uxlfoundation/oneDNN#6035). Every gradient must match NCHW's."""
    torch.manual_seed(0)
    ref = create_model(name, num_classes=3, width=4)
    x = torch.randn(8, 3, 32, 32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the multi-threaded kernel gives wrong numbers (1 thread aborts)
    try:
        grads = []
        for channels_last in (False, True):
            model = copy.deepcopy(ref)
            xi = x.clone()
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
                xi = xi.contiguous(memory_format=torch.channels_last)
            model(xi).square().sum().backward()
            grads.append({n: p.grad for n, p in model.named_parameters()})
    finally:
        torch.set_num_threads(threads)
    # relative to each gradient's largest entry: summation order differs between layouts
    # (~1e-6); the kernel's error was ~0.5
    worst = {n: ((grads[1][n] - g).abs().max() / g.abs().max()).item()
             for n, g in grads[0].items()}
    assert max(worst.values()) < 1e-3, sorted(worst.items(), key=lambda kv: -kv[1])[:3]
