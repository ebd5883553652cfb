"""MobileNet (v1, Howard et al. 2017), the "MobileNet" of the paper's Table 3.

A 3×3 stride-2 stem, then 13 depthwise-separable blocks (3×3 depthwise conv → BN → ReLU →
1×1 pointwise conv → BN → ReLU), global average pooling and one linear layer. At 224² and
width 1.0: 4.2 M parameters and 569 M multiply-adds (Table 1 of the MobileNet paper).
"""
from __future__ import annotations

from torch import nn

# (output channels, stride) of each depthwise-separable block, from Table 1 of the paper
BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
          (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int, groups: int = 1):
    return [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0):
        super().__init__()
        ch = lambda c: max(8, int(c * width_mult))  # noqa: E731
        cin = ch(32)
        layers = _conv_bn_relu(3, cin, 3, 2)
        for cout, stride in BLOCKS:
            cout = ch(cout)
            layers += _conv_bn_relu(cin, cin, 3, stride, groups=cin)  # depthwise
            layers += _conv_bn_relu(cin, cout, 1, 1)                  # pointwise
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
