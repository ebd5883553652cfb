"""One ResNet class; the paper's variants (He et al. 2018, Figure 2) are options of it.

- vanilla: stride 2 on the first 1×1 conv of a downsampling bottleneck (the original ResNet);
- B: stride 2 on the 3×3 conv instead (what torchvision's ``resnet50`` is);
- C: the 7×7 stem conv replaced by three 3×3 convs (widths 32, 32, 64);
- D: C plus a 2×2 average pool before the 1×1 projection shortcut, which then has stride 1.

Module names follow torchvision's (conv1, bn1, layer1..4, downsample, fc), so a torchvision
ResNet state dict loads unchanged into the matching variant (B for bottlenecks).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Stem = Literal["standard", "deep", "cifar"]


class StridedConv1x1(nn.Conv2d):
    """A 1×1 convolution with stride s (no padding): on the CPU computed as the input subsampled
    by s, then a stride-1 1×1 convolution, which is the same sum over the same pixels (shapes:
    N×C×H×W → N×C'×⌈H/s⌉×⌈W/s⌉; parameters and state-dict keys those of ``nn.Conv2d``).

    Why: oneDNN's strided 1×1 backward-weights kernel (its "reduce to unit stride" workspace)
    is wrong for channels-last inputs with fewer input channels than its block
    (uxlfoundation/oneDNN#6035). Measured here with torch 2.14.1 on an AVX2 CPU: 4 input
    channels, 2 threads, weight gradient off by 49%; 1 thread, heap corruption and an abort.
    Our narrow test and CPU models (width 4) have such a shortcut. Other devices use the
    strided convolution itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.stride == (1, 1):
            return super().forward(x)
        sh, sw = self.stride
        return nn.functional.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias, 1, 0,
                                    self.dilation, self.groups)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 stride_on_3x3: bool = True):
        super().__init__()
        # stride_on_3x3 does not apply: a basic block has no 1×1 conv.
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, downsample: nn.Module | None,
                 stride_on_3x3: bool = True):
        super().__init__()
        s1, s3 = (1, stride) if stride_on_3x3 else (stride, 1)
        self.conv1 = StridedConv1x1(inplanes, planes, 1, s1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, s3, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ResNet(nn.Module):
    """ResNet with the paper's tweaks as options.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage, e.g. (3, 4, 6, 3) for ResNet-50.
        stem: "standard" (7×7 stride 2 + max-pool), "deep" (ResNet-C: three 3×3 convs + max-pool)
            or "cifar" (one 3×3 stride-1 conv, no max-pool: for 32² inputs).
        avg_down: ResNet-D's shortcut: 2×2 average pool, then a stride-1 1×1 conv.
        stride_on_3x3: ResNet-B (True) or the original ResNet (False); bottlenecks only.
        width: channels of the first stage (64 in the paper; smaller for quick CPU runs).
        zero_init_last: γ = 0 in the last BN of every residual block (the paper's zero-γ).
        init: "xavier" (the paper's §2.1: Xavier uniform for conv and linear, BN γ=1, β=0) or
            "torchvision" (Kaiming normal, fan-out, for conv; PyTorch's default for linear).
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...],
                 num_classes: int = 1000, stem: Stem = "standard", avg_down: bool = False,
                 stride_on_3x3: bool = True, width: int = 64, zero_init_last: bool = False,
                 init: Literal["xavier", "torchvision"] = "xavier"):
        super().__init__()
        if stem == "standard":
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        elif stem == "deep":
            half = width // 2
            self.conv1 = nn.Sequential(*_conv_bn_relu(3, half, 2), *_conv_bn_relu(half, half, 1),
                                       nn.Conv2d(half, width, 3, 1, 1, bias=False))
        elif stem == "cifar":
            self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        else:
            raise ValueError(f"unknown stem {stem!r}; choose standard, deep or cifar")
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity() if stem == "cifar" else nn.MaxPool2d(3, 2, 1)

        self.inplanes = width
        self.stride_on_3x3 = stride_on_3x3
        self.avg_down = avg_down
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, width * 2, layers[1], 2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], 2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)
        self._init_weights(init, zero_init_last)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        out = planes * block.expansion
        if stride != 1 or self.inplanes != out:
            if self.avg_down:
                pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) \
                    if stride > 1 else nn.Identity()
                downsample = nn.Sequential(pool, nn.Conv2d(self.inplanes, out, 1, bias=False),
                                           nn.BatchNorm2d(out))
            else:
                downsample = nn.Sequential(StridedConv1x1(self.inplanes, out, 1, stride,
                                                          bias=False),
                                           nn.BatchNorm2d(out))
        layers = [block(self.inplanes, planes, stride, downsample, self.stride_on_3x3)]
        self.inplanes = out
        layers += [block(out, planes, 1, None, self.stride_on_3x3) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _init_weights(self, init: str, zero_init_last: bool) -> None:
        if init not in ("xavier", "torchvision"):
            raise ValueError(f"unknown init {init!r}; choose xavier or torchvision")
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if init == "xavier":
                    nn.init.xavier_uniform_(m.weight)
                else:
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and init == "xavier":
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(m.last_bn.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.forward_features(x))
        return self.fc(torch.flatten(x, 1))
