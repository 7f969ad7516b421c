"""ResNet-18/50 (He et al. 2016; torchvision's v1.5: the stride of a bottleneck is on its 3x3 conv).

Module names follow torchvision (conv1, bn1, layer1.0.conv1, layer2.0.downsample.0, ...) so its
checkpoints load strictly, except the head: torchvision's `fc` is `classifier` here, and the loader
renames `fc.` to `classifier.` (`checkpoint_prefix_map`). No weights ship with trady: pass
`weights=PATH` (a torchvision-layout .pth/.pt/.safetensors state dict).

Each ReLU use is its own module (torchvision reuses one `relu` per block), so that a memory engine
can treat every activation separately; ReLUs have no parameters, the state dict is unchanged.
"""

from __future__ import annotations

from torch import nn

from trady.models.base import ZooModel, init_weights
from trady.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, register


def _conv3x3(inp: int, oup: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, oup, 3, stride, 1, bias=False)


def _conv1x1(inp: int, oup: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, oup, 1, stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inp: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(inp, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.relu2 = nn.ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inp: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv1x1(inp, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample
        self.relu3 = nn.ReLU()

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNet(ZooModel):
    checkpoint_prefix_map = {"fc.": "classifier."}

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.classifier = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self)
        # torchvision initialises its fc with nn.Linear's default; keep that for the head.
        self.classifier.reset_parameters()

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = x.mean((2, 3))  # global average pooling; its backward keeps nothing
        return self.classifier(x)


_USER_FILE = "none bundled: weights=PATH (torchvision-layout .pth/.pt/.safetensors)"

for _name, _block, _layers in (("resnet18", BasicBlock, [2, 2, 2, 2]), ("resnet50", Bottleneck, [3, 4, 6, 3])):

    def _build(num_classes: int, _block=_block, _layers=_layers) -> ResNet:
        return ResNet(_block, _layers, num_classes)

    register(
        ModelSpec(
            name=_name,
            resolution=224,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            pretrained_source=_USER_FILE,
            num_classes=1000,
        ),
        _build,
    )
