"""What the engine keeps for backward (recorded with saved-tensor hooks): input slices of the selected
layers, bit masks, BatchNorm scales and the classifier input, nothing below the lowest selected layer;
and its measured budgeted bytes against the analytic ones (other dtypes, other input sizes).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from cases import (
    BATCH,
    Case,
    Chain,
    _build,
    _close,
    _dense_reference,
    _loss,
    _randomize_bn,
    _stem_then,
    conv_bn_relu6_chain,
    maxpool_head,
)
from trady.core.errors import TradyError
from trady.engine import EngineConfig, SparseEngine


@dataclass
class Saved:
    module: str | None  # the leaf module whose forward saved it (None: outside any module, e.g. the loss)
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    storage: int


def _record_saved(model: nn.Module, x: torch.Tensor) -> tuple[list[Saved], torch.Tensor]:
    """Forward under saved-tensor hooks; each saved tensor attributed to the leaf module running."""
    current: list[str] = []
    handles = []
    for name, m in model.named_modules():
        if next(m.children(), None) is None:
            handles.append(m.register_forward_pre_hook(lambda mod, args, name=name: current.append(name)))
            handles.append(m.register_forward_hook(lambda mod, args, out: current.pop() and None))
    saved: list[Saved] = []

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        saved.append(Saved(current[-1] if current else None, t.dtype, tuple(t.shape), s.nbytes(), s.data_ptr()))
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    return saved, out


@pytest.mark.parametrize("mask_bits", [1, 8])
def test_saved_tensors_are_only_slices_masks_and_scales(mask_bits: int) -> None:
    torch.manual_seed(0)
    model = _randomize_bn(Chain())
    x = torch.randn(3, 3, 13, 11)
    engine = SparseEngine(model, x, EngineConfig(mask_bits=mask_bits, fold_bn=False))  # BN keeps its scale
    selection = engine.select({"b1.0": [2, 5], "b3.0": [0, 3, 4]})  # b0 below: no graph; b2, b4 frozen
    params = {p.untyped_storage().data_ptr(): n for n, p in model.named_parameters()}

    inputs: dict[str, tuple] = {}
    hooks = [
        m.register_forward_hook(lambda mod, args, out, n=n: inputs.__setitem__(n, (args[0], out)))
        for n, m in model.named_modules()
        if n
    ]
    model.train()
    saved, out = _record_saved(model, x)
    for h in hooks:
        h.remove()

    by_module: dict[str | None, list[Saved]] = {}
    for s in saved:
        if s.storage in params:  # weights: no extra memory
            continue
        by_module.setdefault(s.module, []).append(s)

    # nothing below the lowest selected layer: no saved tensor and no graph at all
    for n in ("b0.0", "b0.1", "b0.2"):
        assert n not in by_module, (n, by_module.get(n))
        assert inputs[n][1].grad_fn is None and not inputs[n][1].requires_grad, n
    assert inputs["b1.0"][1].requires_grad

    for n in ("b1.0", "b3.0"):  # selected: the input slice (and its int64 channel indices)
        xin = inputs[n][0]
        floats = [s for s in by_module[n] if s.dtype.is_floating_point]
        assert [s.shape for s in floats] == [(xin.shape[0], len(selection[n]), *xin.shape[2:])], n
        assert floats[0].nbytes == 4 * xin.shape[0] * len(selection[n]) * xin.shape[2] * xin.shape[3]
        assert all(s.dtype == torch.int64 and s.shape == (len(selection[n]),) for s in by_module[n] if s not in floats)
    for n in ("b2.0", "b4.0"):  # frozen conv on the backprop path: nothing but its weight
        assert n not in by_module, (n, by_module.get(n))
    for blk in ("b1", "b2", "b3", "b4"):
        bn, act = f"{blk}.1", f"{blk}.2"
        c = model.get_submodule(bn).num_features
        assert [(s.dtype, s.shape) for s in by_module[bn]] == [(torch.float32, (c,))], bn  # just the scale
        n_el = inputs[act][0].numel()
        (mask,) = by_module[act]
        if mask_bits == 1:
            assert mask.dtype == torch.uint8 and mask.nbytes == math.ceil(n_el / 8), act
        else:
            assert mask.dtype == torch.bool and mask.nbytes == n_el, act
    # the classifier keeps its input; the only float tensors scaling with the batch are the slices
    assert [s.shape for s in by_module["classifier"]] == [(3, 16)]
    allowed = {"b1.0", "b3.0", "classifier", None}
    for s in saved:
        if s.storage not in params and s.dtype.is_floating_point and s.module not in allowed:
            assert s.shape[0] != 3 or len(s.shape) == 1, s

    # the same accounting from the engine's own measurement
    report = engine.measure_step(x, torch.zeros(3, dtype=torch.int64))
    assert report.budgeted_bytes == report.analytic_budgeted_bytes
    assert report.budgeted_activation_bytes == 4 * 3 * (2 * 13 * 11 + 3 * 7 * 6)


def test_saved_bytes_scale_with_batch_only_through_slices_masks_and_head() -> None:
    """Doubling the batch adds exactly: slices + classifier input + masks (+ the loss's own tensors)."""
    torch.manual_seed(0)
    model = _randomize_bn(Chain())
    engine = SparseEngine(model, torch.randn(1, 3, 16, 16))
    engine.select({"b2.0": [1, 3, 6]})
    model.train()
    sizes = {}
    for b in (2, 4):
        saved, out = _record_saved(model, torch.randn(b, 3, 16, 16))
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        sizes[b] = {}
        for s in saved:
            if s.storage not in params and s.module is not None:
                sizes[b][s.module] = sizes[b].get(s.module, 0) + s.nbytes
    grow = {k: sizes[4][k] - sizes[2].get(k, 0) for k in sizes[4] if sizes[4][k] != sizes[2].get(k, 0)}
    # 2 more samples: slice 3 ch x 8x8 floats, classifier input 16 floats, masks of 8x8x8, 8x8x8, 16x8x8 bits
    assert grow == {
        "b2.0": 2 * 3 * 8 * 8 * 4,
        "classifier": 2 * 16 * 4,
        "b2.2": 2 * 8 * 8 * 8 // 8,
        "b3.2": 2 * 16 * 8 * 8 // 8,
        "b4.2": 2 * 16 * 8 * 8 // 8,
    }


class Pools(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.act0 = nn.ReLU()
        self.max = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1)
        self.avg = nn.AvgPool2d(2, ceil_mode=True)
        self.conv2 = nn.Conv2d(6, 8, 1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        x = self.avg(self.conv1(self.max(self.act0(self.conv0(x)))))
        return self.classifier(self.flat(self.gap(self.conv2(x))))


def test_pooling_keeps_no_float_activation() -> None:
    torch.manual_seed(0)
    model = Pools()
    x = torch.randn(2, 3, 13, 12)
    stock = copy.deepcopy(model)
    engine = SparseEngine(model, x)
    engine.select({"conv0": [0, 2]})  # everything above the stem conv is on the backprop path
    model.train()
    saved, out = _record_saved(model, x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    by_module: dict = {}
    for s in saved:
        if s.storage not in params:
            by_module.setdefault(s.module, []).append(s)
    (pos,) = by_module["max"]  # 1 byte per output element: 2 x 6 x 7 x 6
    assert pos.dtype == torch.uint8 and pos.nbytes == 2 * 6 * 7 * 6
    assert "avg" not in by_module and "gap" not in by_module and "conv1" not in by_module
    _loss(out).backward()
    _, dense_grads = _dense_reference(stock, x)
    _close(engine.layers["conv0"].trady.w_slice.grad, dense_grads["conv0.weight"][:, [0, 2]], "slice gradient")


@pytest.mark.parametrize("inplace", [False, True])
def test_train_mode_dropout_keeps_a_bit_mask(inplace: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Dropout(0.3, inplace=inplace), nn.Linear(8 * 5 * 5, 4))
    x = torch.randn(2, 3, 7, 7)
    stock = copy.deepcopy(model).train()
    engine = SparseEngine(model, x)
    engine.select({"0": [0, 2]})
    model.train()
    torch.manual_seed(7)
    saved, out = _record_saved(model, x)
    (mask,) = [s for s in saved if s.module == "2"]
    assert mask.dtype == torch.uint8 and mask.nbytes == math.ceil(2 * 8 * 5 * 5 / 8)
    _loss(out).backward()
    torch.manual_seed(7)  # the same draws as stock dropout: same output, same gradients
    for p in stock.parameters():
        p.requires_grad_(True)
    stock_out = stock(x)
    _loss(stock_out).backward()
    _close(out.detach(), stock_out.detach(), "dropout output")
    _close(engine.layers["0"].trady.w_slice.grad, stock[0].weight.grad[:, [0, 2]], "slice gradient")
    _close(model[3].weight.grad, stock[3].weight.grad, "classifier gradient")


def test_float64_model_measures_its_own_slot_size() -> None:
    model, x = _build(Case(conv_bn_relu6_chain))
    model.double()
    x = x.double()
    engine = SparseEngine(model, x)
    engine.select({"3": [0, 1], "6": [4]})
    report = engine.measure_step(x, None, loss_fn=lambda o, _y: _loss(o))
    assert report.budgeted_bytes == report.analytic_budgeted_bytes
    assert report.analytic_budgeted_bytes == engine.costs.selection_bytes(engine.selection, BATCH, "fp64")


def test_bfloat16_model_and_autocast() -> None:
    model, x = _build(Case(maxpool_head, (BATCH, 4, 12, 16)))
    model.to(torch.bfloat16)
    engine = SparseEngine(model, x.bfloat16())
    engine.select({"0": [0, 2], "4": [5]})
    report = engine.measure_step(x.bfloat16(), None, loss_fn=lambda o, _y: o.float().sum())
    assert report.budgeted_bytes == report.analytic_budgeted_bytes
    assert report.budgeted_grad_bytes == 2 * engine.costs.selection_weight_units(engine.selection)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TradyError, match="autocast"):
            model(x)
        with torch.no_grad():  # evaluation under autocast is fine
            assert model(x).dtype == torch.bfloat16


def test_measure_step_follows_the_input_size() -> None:
    """Prepared at 16 px, measured at 32 px: the analytic bytes are those of 32 px, equal to the measured."""
    torch.manual_seed(0)
    model = _stem_then(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU())
    small, large = torch.randn(2, 4, 16, 16), torch.randn(2, 4, 32, 32)
    model.eval()(small)
    engine = SparseEngine(model, small)
    selection = engine.select({"3": [0, 5, 6]})
    report = engine.measure_step(large, None, loss_fn=lambda o, _y: _loss(o))
    assert report.budgeted_bytes == report.analytic_budgeted_bytes
    assert report.budgeted_activation_bytes == 4 * 2 * 3 * 32 * 32
    assert engine.costs_for(large).selection_bytes(selection, 2) == report.analytic_budgeted_bytes
    assert engine.costs.selection_bytes(selection, 2) < report.analytic_budgeted_bytes  # the example's table
