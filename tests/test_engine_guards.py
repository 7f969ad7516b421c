"""What the engine refuses, and how: layer kinds it cannot run on the backprop path (strict and not),
subclasses with their own forward, bad configurations, a failed preparation, frozen BatchNorm in train
mode, deep copies of a prepared model.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from cases import Case, Chain, _build, _close, _dense_reference, _loss, conv3x3, conv_bn_relu6_chain
from trady.core.errors import TradyError
from trady.engine import EngineConfig, SparseEngine


def test_failed_preparation_leaves_the_model_untouched() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
        nn.Flatten(), nn.LazyLinear(2),
    )  # fmt: skip
    x = torch.randn(1, 3, 7, 7)
    model(x)
    classes = [type(m) for m in model.modules()]
    with pytest.raises(TradyError, match=r"BatchNorm '3' has no running statistics"):
        SparseEngine(model, x)
    assert [type(m) for m in model.modules()] == classes
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_pre_hooks for m in model.modules())


def _with_module(mid: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), mid, nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


UNSUPPORTED = {  # (SiLU, GELU, LeakyReLU, LayerNorm, ...: supported, tests/test_engine_layer_kinds.py)
    "Softplus": lambda: nn.Softplus(),
    "PReLU": lambda: nn.PReLU(),
    "SELU": lambda: nn.SELU(),
    "AdaptiveAvgPool2d": lambda: nn.AdaptiveAvgPool2d(3),
}


@pytest.mark.parametrize("kind", list(UNSUPPORTED))
def test_unsupported_kind_on_backprop_path(kind: str) -> None:
    torch.manual_seed(0)
    model = _with_module(UNSUPPORTED[kind]())
    x = torch.randn(2, 3, 6, 6)
    stock = copy.deepcopy(model)
    engine = SparseEngine(model, x)
    model.train()

    with pytest.raises(TradyError) as err:  # the module lies above a selected layer: on the backprop path
        engine.select({"0": [1, 2]})  # known at select time: one forward of the example finds it
    msg = str(err.value)
    assert "'1'" in msg and kind in msg and "supported kinds" in msg
    assert "Conv2d" in msg and "BatchNorm2d" in msg and "ReLU6" in msg
    assert engine.selection == {} and engine.slice_parameters() == []  # the previous selection stays

    engine.select({"2": [0, 3]})  # the module lies below the lowest selected layer: fine
    _loss(model(x)).backward()
    with torch.no_grad():  # and any module is fine without grad (evaluation)
        model(x)

    # strict=False: stock autograd runs it, gradients still exact
    engine.restore()
    engine = SparseEngine(model, x, EngineConfig(strict=False))
    engine.select({"0": [1, 2]})
    _, dense_grads = _dense_reference(stock, x)
    model.train()
    _loss(model(x)).backward()
    _close(engine.layers["0"].trady.w_slice.grad, dense_grads["0.weight"][:, [1, 2]], "slice gradient")


def test_conv_subclass_with_own_forward_is_rejected() -> None:
    class MyConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(MyConv(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    x = torch.randn(1, 3, 5, 5)
    model(x)
    with pytest.raises(TradyError, match=r"'0'.*MyConv.*supported kinds"):
        SparseEngine(model, x)


class TwoUnsupported(nn.Module):
    """Softplus and SELU on the backprop path, only for inputs wider than 6 px."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.gelu = nn.Softplus()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.silu = nn.SELU()
        self.classifier = nn.Linear(8, 4)

    def forward(self, x):
        wide = x.shape[-1] > 6
        x = self.conv0(x)
        x = self.conv1(self.gelu(x) if wide else x)
        return self.classifier((self.silu(x) if wide else x).mean((2, 3)))


def test_strict_error_names_every_offender_once() -> None:
    torch.manual_seed(0)
    model = TwoUnsupported().eval()
    engine = SparseEngine(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(TradyError) as err:  # at select time, from the example
        engine.select({"conv0": [0]})
    msg = str(err.value)
    assert msg.count("'gelu' (Softplus)") == 1 and msg.count("'silu' (SELU)") == 1 and "\n" not in msg
    engine.restore()
    engine = SparseEngine(model, torch.randn(1, 3, 6, 6))  # the example meets neither
    engine.select({"conv0": [1]})
    with pytest.raises(TradyError) as err:  # a wider input meets both: named at the end of the forward
        model(torch.randn(2, 3, 8, 8))
    msg = str(err.value)
    assert msg.count("'gelu' (Softplus)") == 1 and msg.count("'silu' (SELU)") == 1
    _loss(model(torch.randn(2, 3, 6, 6))).backward()  # the engine still trains after the error


def test_mask_bits_must_be_1_or_8() -> None:
    with pytest.raises(TradyError, match="mask_bits"):
        SparseEngine(Chain(), torch.randn(1, 3, 8, 8), EngineConfig(mask_bits=4))


def test_frozen_batchnorm_in_train_mode_warns_once() -> None:
    from trady.engine.modules import FrozenBatchNormWarning

    model, x = _build(Case(conv_bn_relu6_chain))
    engine = SparseEngine(model, x)
    engine.select({"3": [0]})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.eval()(x)
        with torch.no_grad():
            model.train()(x)  # evaluation: no training step, no warning
        model.train()(x)
        model(x)
    assert [w.category for w in caught] == [FrozenBatchNormWarning]
    assert "frozen" in str(caught[0].message)


def test_deepcopy_of_a_prepared_model_raises() -> None:
    model, x = _build(Case(conv3x3))
    engine = SparseEngine(model, x)
    with pytest.raises(TradyError, match=r"cannot be deep-copied.*restore\(\)"):
        copy.deepcopy(model)
    engine.restore()
    copy.deepcopy(model)  # a restored model copies as usual
