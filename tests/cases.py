"""The engine's test cases, shared by the tests/test_engine_*.py files: a table of small layer/model
factories (CASES, built by `_build`), the Chain model, and dense autograd on the unmodified model as the
reference that `_check_round` holds one selection to:
(a) forward outputs equal, (b) every selected slice gradient equals the dense gradient at that slice,
(c) classifier gradients equal, (d) after an SGD step + sync() the model's state dict is the dense
model's weights minus lr x dense gradient on the selected entries and the classifier, bit-identical
everywhere else (buffers included), (e) no full-size gradient on any frozen or partially updated
weight, (f) measured budgeted bytes == analytic, no graph below the lowest selected layer.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trady.engine import EngineConfig, SparseEngine

# ---------------------------------------------------------------------------------------------
# Dense autograd on the unmodified model, and the checks (a)-(f) of one selection
# ---------------------------------------------------------------------------------------------


LR = 0.5
BATCH = 2


def _loss(out: torch.Tensor) -> torch.Tensor:
    """A fixed random projection of the output: every output entry gets its own gradient."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=out.dtype)
    return (out * w).sum()


def _close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=2e-5 * scale, msg=lambda m: f"{what}: {m}")


def _randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine terms, so that frozen BatchNorm is really tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                if m.affine:
                    m.weight.copy_(1.0 + 0.3 * torch.randn(m.num_features, generator=g))
                    m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
    return model


def _channel_mask(module: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Bool mask of the weight entries owned by input channels `idx` (written independently of ops)."""
    w = module.weight
    mask = torch.zeros(w.shape, dtype=torch.bool)
    groups = getattr(module, "groups", 1)
    cin_g = w.shape[1]
    cout_g = w.shape[0] // groups
    for c in idx.tolist():
        g, local = divmod(c, cin_g)
        mask[g * cout_g : (g + 1) * cout_g, local] = True
    return mask


def _weight_key(module: nn.Module, name: str) -> str:
    """State-dict key of a layer's weight (a MultiheadAttention's layer is its input projection)."""
    return f"{name}.in_proj_weight" if isinstance(module, nn.MultiheadAttention) else f"{name}.weight"


def _expected_slice_grad(module: nn.Module, dense_grad: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The dense gradient at the slice, in the documented slice layout.

    Conv groups=1 and Linear: [C', S, ...] (the weight's columns); groups > 1: [S, C'/g, kh, kw]
    (each selected channel with the output rows of its group).
    """
    groups = getattr(module, "groups", 1)
    if groups == 1:
        return torch.stack([dense_grad[:, c] for c in idx.tolist()], dim=1)
    cin_g = dense_grad.shape[1]
    cout_g = dense_grad.shape[0] // groups
    blocks = []
    for c in idx.tolist():
        g, local = divmod(c, cin_g)
        blocks.append(dense_grad[g * cout_g : (g + 1) * cout_g, local])
    return torch.stack(blocks, dim=0)


def _dense_reference(
    model: nn.Module, x: torch.Tensor, batchnorm: str = "frozen"
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Stock autograd, every parameter trainable; BatchNorm on its running statistics (frozen BN, eval mode)
    or, with batchnorm="train", the stock model in train mode (batch statistics, running statistics updated)."""
    model.train(batchnorm == "train")
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    out = model(x)
    _loss(out).backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _leaf_order(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[str, bool]], torch.Tensor]:
    """(leaf module name, output requires grad) in call order, for one forward with grad enabled."""
    calls: list[tuple[str, bool]] = []
    handles = []
    order: list[str] = []  # by call start: a MultiheadAttention comes before its out_proj

    def record(mod, args, out, name):
        out = out[0] if isinstance(out, tuple) else out  # MultiheadAttention: (output, weights)
        calls.append((name, bool(out.requires_grad)))

    for name, m in model.named_modules():
        if name and (next(m.children(), None) is None or isinstance(m, nn.MultiheadAttention)):
            handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: order.append(name)))
            handles.append(m.register_forward_hook(lambda mod, args, out, name=name: record(mod, args, out, name)))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    grad = dict(calls)
    return [(n, grad[n]) for n in order], out


def _random_selection(engine: SparseEngine, layers: list[str], seed: int, full: str | None = None) -> dict:
    """Random non-empty proper subsets of channels of `layers` (all channels of `full`)."""
    rng = random.Random(seed)
    sel = {}
    for name in layers:
        c = engine.costs.by_name[name].in_channels
        if name == full or c == 1:
            sel[name] = list(range(c))
        else:
            sel[name] = sorted(rng.sample(range(c), rng.randint(1, max(1, c // 2))))
    return sel


def _check_round(model, engine, dense_model, x, selection, stock_model) -> None:
    """Checks (a)-(f) for one selection; `dense_model` holds the same weights as `model`."""
    canonical = engine.select(selection)
    assert set(canonical) == {k for k, v in selection.items() if len(v)}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_bn = engine.config.batchnorm == "train"
    dense_out, dense_grads = _dense_reference(dense_model, x, engine.config.batchnorm)
    # train-mode BatchNorm: one training forward updates the running statistics, the dense model's as well
    running = {k for k in before if k.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}
    dense_after = dense_model.state_dict()

    for p in engine.parameters():
        p.grad = None
    model.train()  # the frozen engine freezes BatchNorm in train mode too; "train" uses batch statistics
    calls, out = _leaf_order(model, x)
    # (a) forward outputs
    _close(out.detach(), dense_out, "forward output")
    # no graph below the lowest selected layer; graph from it on
    names = [n for n, _ in calls]
    lowest = min(names.index(n) for n in canonical) if canonical else names.index(engine.classifier_name)
    assert not any(rg for _, rg in calls[:lowest]), f"graph built below the lowest selected layer: {calls}"
    assert calls[lowest][1]

    _loss(out).backward()
    # (b) selected slices
    params = dict(model.named_parameters())
    for name, idx in canonical.items():
        module = engine.layers[name]
        grad = module.trady.w_slice.grad
        info = engine.costs.by_name[name]
        assert grad.numel() == len(idx) * info.weight_units_per_channel, f"{name}: slice gradient is not slice-sized"
        expected = _expected_slice_grad(module, dense_grads[_weight_key(module, name)], idx)
        _close(grad, expected, f"slice gradient of {name}")
    # (c) classifier, (e) no gradient of any other model parameter (nothing full-size for partial layers)
    cls = engine.classifier_name
    for n, p in params.items():
        if n.startswith(cls + "."):
            _close(p.grad, dense_grads[n], f"classifier gradient {n}")
        else:
            assert p.grad is None, f"{n} got a gradient of shape {tuple(p.grad.shape)}"
            assert not p.requires_grad, n
    norms = engine.slice_grad_norms()
    assert set(norms) == set(canonical)

    # (d) one SGD step: expected weights by hand from the dense gradients
    opt = torch.optim.SGD(engine.parameters(), lr=LR)
    opt.step()
    engine.sync()
    after = model.state_dict()
    assert list(after) == list(stock_model.state_dict()), "state_dict keys changed"
    updated = {_weight_key(engine.layers[n], n): _channel_mask(engine.layers[n], idx) for n, idx in canonical.items()}
    for key, value in after.items():
        old = before[key]
        if key.startswith(cls + "."):
            _close(value, old - LR * dense_grads[key], f"classifier after step {key}")
        elif key in updated:
            mask = updated[key]
            _close(value[mask], old[mask] - LR * dense_grads[key][mask], f"updated slice of {key}")
            assert torch.equal(value[~mask], old[~mask]), f"unselected entries of {key} changed"
        elif train_bn and key in running:
            _close(value.double(), dense_after[key].double(), f"running statistic {key} (train-mode BatchNorm)")
        else:
            assert torch.equal(value, old), f"{key} changed although not selected"

    # (f) measured budgeted bytes == analytic
    report = engine.measure_step(x, None, loss_fn=lambda o, _y: _loss(o))
    units_w = engine.costs.selection_weight_units(canonical)
    units_a = engine.costs.selection_activation_units(canonical)
    assert report.budgeted_grad_bytes == 4 * units_w
    assert report.budgeted_activation_bytes == 4 * BATCH * units_a
    assert report.budgeted_bytes == report.analytic_budgeted_bytes
    assert report.analytic_budgeted_bytes == engine.costs.selection_bytes(canonical, batch_size=BATCH)


# ---------------------------------------------------------------------------------------------
# The table of layer configurations
# ---------------------------------------------------------------------------------------------


def _stem_then(*body: nn.Module, head: tuple[nn.Module, ...] | None = None, cin: int = 4, c: int = 8):
    """stem conv (cin -> c) + BN + ReLU, the layers under test, then a pooled Linear head by default."""
    if head is None:
        head = (nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LazyLinear(5))
    return nn.Sequential(nn.Conv2d(cin, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), *body, *head)


def conv3x3():
    return _stem_then(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())


def conv_stride2():
    return _stem_then(nn.Conv2d(8, 12, 3, stride=2, padding=1), nn.ReLU())


def conv_dilation2():
    return _stem_then(nn.Conv2d(8, 12, 3, padding=2, dilation=2), nn.ReLU())


def conv_asym_pad():
    return _stem_then(nn.ZeroPad2d((0, 1, 2, 0)), nn.Conv2d(8, 12, 3, stride=2), nn.ReLU())


def conv_grouped4():
    return _stem_then(nn.Conv2d(8, 16, 3, padding=1, groups=4), nn.ReLU())


def conv_depthwise():
    return _stem_then(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU6())


def conv_depthwise_mult2():
    return _stem_then(nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=8), nn.ReLU6())


def conv_1x1():
    return _stem_then(nn.Conv2d(8, 12, 1, bias=False), nn.ReLU())


def conv_same():
    return _stem_then(nn.Conv2d(8, 12, 3, padding="same", dilation=2), nn.ReLU())


def conv_rect_kernel():
    return _stem_then(nn.Conv2d(8, 12, (1, 3), stride=(2, 1), padding=(0, 1)), nn.ReLU())


def conv_bn_relu6_chain():
    return _stem_then(
        nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8),
    )  # fmt: skip


class InvertedResidual(nn.Module):
    def __init__(self, c: int, expand: int = 2) -> None:
        super().__init__()
        h = c * expand
        self.expand = nn.Sequential(nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


def residual_block():
    return _stem_then(InvertedResidual(8), InvertedResidual(8))


def maxpool_head():
    return _stem_then(
        nn.MaxPool2d(3, stride=2, padding=1), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        head=(nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(5)),
    )  # fmt: skip


def avgpool_head():
    return _stem_then(
        nn.AvgPool2d(2), nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        head=(nn.AvgPool2d(2), nn.Flatten(), nn.LazyLinear(5)),
    )  # fmt: skip


def adaptive_pool_head():
    return _stem_then(nn.Conv2d(8, 12, 3, padding=1), nn.Hardtanh(-1.0, 2.0))


def conv_classifier():
    return _stem_then(
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(),
        head=(nn.AdaptiveAvgPool2d(1), nn.Conv2d(12, 5, 1), nn.Flatten()),
    )  # fmt: skip


def linear_2d():
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU6(), nn.Linear(12, 5))


class TokenNet(nn.Module):
    """Linear layers on [B, T, F] tokens, mean over tokens, then the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(10, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 12)
        self.classifier = nn.Linear(12, 5)

    def forward(self, x):
        return self.classifier(self.fc2(self.act(self.fc1(x))).mean(1))


def linear_3d():
    return TokenNet()


class InplaceResidual(nn.Module):
    """`identity = out; out = relu_(out)`: with stock nn.ReLU(inplace=True) the identity is clamped too."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        out = self.conv1(x)
        identity = out
        out = self.relu(out)
        return self.conv2(out) + identity


def inplace_relu_residual():
    return _stem_then(InplaceResidual(8), nn.Hardtanh(-0.5, 0.5, inplace=True))


def inplace_relu6_after_bn():
    return _stem_then(nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU6(inplace=True))


def smooth_activations():
    acts = [nn.SiLU(), nn.GELU(approximate="tanh"), nn.Hardswish(), nn.Sigmoid(), nn.Hardsigmoid(), nn.Tanh(),
            nn.Mish(), nn.LeakyReLU(0.2), nn.ELU(0.7), nn.GELU()]  # fmt: skip
    body = []
    for act in acts:
        body += [nn.Conv2d(8, 8, 3, padding=1), act]
    return _stem_then(*body)


def silu_se_blocks():
    """EfficientNet's MBConv: SiLU, squeeze-excitation with module gates, residual."""
    from trady.models.constructed import MBConv

    return _stem_then(MBConv(8, 8, 3, 1, 2, 0.25, nn.SiLU), MBConv(8, 12, 5, 2, 2, 0.25, nn.SiLU))


def hardswish_functional_se():
    """MobileNetV3's block with the SE written as functional calls (F.relu, F.hardsigmoid, x * gate)."""
    from trady.models.constructed import MBConv

    return _stem_then(MBConv(8, 8, 3, 1, 2, 0.25, nn.Hardswish, functional_se=True))


def convnext_blocks():
    """7x7 depthwise, LayerNorm on NHWC tokens, Linear-GELU-Linear, layer scale; LayerNorm2d downsampling."""
    from trady.models.constructed import ConvNeXtBlock, LayerNorm2d

    return _stem_then(ConvNeXtBlock(8, 0.5), LayerNorm2d(8), nn.Conv2d(8, 12, 2, stride=2), ConvNeXtBlock(12, 0.5))


class TinyTransformer(nn.Module):
    """Tokens -> Linear -> TransformerEncoderLayer (batch first, pre-norm) -> one (sequence first) -> head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(10, 16)
        self.block1 = nn.TransformerEncoderLayer(16, 2, 32, 0.0, activation="gelu", batch_first=True, norm_first=True)
        self.block2 = nn.TransformerEncoderLayer(16, 4, 24, 0.0, batch_first=False)
        self.norm = nn.LayerNorm(16)
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        x = self.block1(self.embed(x))
        x = self.block2(x.transpose(0, 1)).transpose(0, 1)
        return self.classifier(self.norm(x).mean(1))


# Modern cases run in the exact mode (stock-equivalent keeping, gradients to fp32 rounding); the few-bit
# default is checked against dense autograd by cosine in tests/test_engine_layer_kinds.py.
EXACT = EngineConfig(activation_bits=None, kept_precision="fp32")


@dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...] = (BATCH, 4, 11, 14)  # non-square: catches H/W mix-ups
    config: EngineConfig | None = None

    @property
    def id(self) -> str:
        train_bn = self.config is not None and self.config.batchnorm == "train"
        return self.build.__name__ + ("-bn_train" if train_bn else "")


# The paper's predecessor's regime: BatchNorm unfolded, in train mode (batch statistics), against the stock
# model in train mode (trady.engine.batchnorm).
BN_TRAIN = EngineConfig(batchnorm="train")


CASES = [
    Case(conv3x3),
    Case(conv_stride2),
    Case(conv_dilation2),
    Case(conv_asym_pad),
    Case(conv_grouped4),
    Case(conv_depthwise),
    Case(conv_depthwise_mult2),
    Case(conv_1x1),
    Case(conv_same),
    Case(conv_rect_kernel),
    Case(conv_bn_relu6_chain),
    Case(residual_block),
    Case(maxpool_head, (BATCH, 4, 12, 16)),
    Case(avgpool_head, (BATCH, 4, 12, 16)),
    Case(adaptive_pool_head),
    Case(conv_classifier),
    Case(linear_2d, (BATCH, 10)),
    Case(linear_3d, (BATCH, 7, 10)),
    Case(inplace_relu_residual),
    Case(inplace_relu6_after_bn),
    Case(smooth_activations, config=EXACT),
    Case(silu_se_blocks, config=EXACT),
    Case(hardswish_functional_se, config=EXACT),
    Case(convnext_blocks, (BATCH, 4, 12, 14), config=EXACT),
    Case(TinyTransformer, (BATCH, 7, 10), config=EXACT),
    Case(conv3x3, config=BN_TRAIN),
    Case(conv_depthwise_mult2, config=BN_TRAIN),
    Case(conv_bn_relu6_chain, config=BN_TRAIN),
    Case(residual_block, config=BN_TRAIN),
    Case(maxpool_head, (BATCH, 4, 12, 16), config=BN_TRAIN),
    Case(inplace_relu6_after_bn, config=BN_TRAIN),
    Case(silu_se_blocks, config=EngineConfig(activation_bits=None, kept_precision="fp32", batchnorm="train")),
]


def _build(case: Case, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    model = case.build()
    x = torch.randn(case.input_shape)
    with torch.no_grad():
        model.eval()(x)  # materialise lazy layers
    return _randomize_bn(model, seed), x


# ---------------------------------------------------------------------------------------------
# A chain of conv blocks (several test files select its layers)
# ---------------------------------------------------------------------------------------------


class Chain(nn.Module):
    """conv -> BN -> ReLU blocks (ReLU6 and a residual add in between), pooled, then a Linear head."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin, cout, act, **kw):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(cout), act)

        self.b0 = block(3, 8, nn.ReLU())
        self.b1 = block(8, 8, nn.ReLU6(), stride=2)
        self.b2 = block(8, 8, nn.ReLU())  # residual: b2(x) + x
        self.b3 = block(8, 16, nn.ReLU6(), groups=8)
        self.b4 = block(16, 16, nn.ReLU(), groups=16)
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        x = self.b1(self.b0(x))
        x = self.b2(x) + x
        x = self.b4(self.b3(x))
        return self.classifier(x.mean((2, 3)))
