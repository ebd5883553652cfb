"""Name → constructor registry. Each variant is a line of data, not a subclass.

Naming follows the paper: ``resnet50`` is the original ResNet (stride on the first 1×1 of a
downsampling bottleneck), ``resnet50b`` is ResNet-B (torchvision's and timm's ``resnet50``),
``resnet50c`` and ``resnet50d`` add the paper's stem and shortcut tweaks. Basic-block depths
(18, 34) have no 1×1 conv, so their plain name already equals B.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .mobilenet import MobileNetV1
from .resnet import BasicBlock, Bottleneck, ResNet

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}

_DEPTHS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
}

# variant suffix → (stem, avg_down, stride_on_3x3)
_VARIANTS = {
    "": ("standard", False, False),
    "b": ("standard", False, True),
    "c": ("deep", False, True),
    "d": ("deep", True, True),
}


def register(name: str, factory: Callable[..., nn.Module]) -> None:
    if name in _REGISTRY:
        raise ValueError(f"model {name!r} is already registered")
    _REGISTRY[name] = factory


def _resnet_factory(depth: int, stem: str, avg_down: bool, stride_on_3x3: bool):
    block, layers = _DEPTHS[depth]

    def build(num_classes: int = 1000, cifar_stem: bool = False, **kwargs) -> ResNet:
        return ResNet(block, layers, num_classes, stem="cifar" if cifar_stem else stem,
                      avg_down=avg_down, stride_on_3x3=stride_on_3x3, **kwargs)
    return build


for _depth, (_block, _) in _DEPTHS.items():
    for _suffix, (_stem, _avg, _s3) in _VARIANTS.items():
        if _block is BasicBlock and _suffix == "b":
            continue  # no 1×1 conv to move the stride from: B is the plain name
        register(f"resnet{_depth}{_suffix}", _resnet_factory(_depth, _stem, _avg, _s3))


# torchvision's other families for the throughput tables (their own architectures and init)
def _torchvision(builder: str, input_size: int = 224, **fixed):
    def build(num_classes: int = 1000, **_ignored) -> nn.Module:
        import torchvision
        return getattr(torchvision.models, builder)(num_classes=num_classes, **fixed)
    build.input_size = input_size
    return build


register("inception_v3", _torchvision("inception_v3", 299, aux_logits=False, init_weights=True))
register("mobilenet_v2", _torchvision("mobilenet_v2"))
register("mobilenet_v1", lambda num_classes=1000, **_ignored: MobileNetV1(num_classes))


def default_input_size(name: str) -> int:
    """The side a model is trained at (299 for Inception-V3, else 224)."""
    return getattr(_REGISTRY.get(name), "input_size", 224)


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; unknown names get an error listing the known ones."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return _REGISTRY[name](**kwargs)
