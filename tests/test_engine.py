"""The channel-sparse engine against dense autograd on the unmodified model.

One table of small layer/model factories runs through the same checks (`_round`):
(a) forward outputs equal, (b) every selected slice gradient equals the dense gradient at that slice,
(c) classifier gradients equal, (d) after an SGD step + sync() the model's state dict is the dense
model's weights minus lr x dense gradient on the selected entries and the classifier, bit-identical
everywhere else (buffers included), (e) no full-size gradient on any frozen or partially updated
weight, (f) measured budgeted bytes == analytic, no graph below the lowest selected layer; then
(g) a second selection on the same engine (no re-preparation) and (h) restore().
Then the zoo at small resolution, the tensors kept for backward, unsupported kinds and errors.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from cases import (
    BATCH,
    LR,
    Case,
    Chain,
    _build,
    _channel_mask,
    _close,
    _dense_reference,
    _loss,
    _randomize_bn,
    _stem_then,
    conv3x3,
    conv_bn_relu6_chain,
    conv_grouped4,
    maxpool_head,
)
from trady.engine import EngineConfig, SparseEngine
from trady.errors import TradyError

# ---------------------------------------------------------------------------------------------
# The table of layer configurations
# ---------------------------------------------------------------------------------------------


def test_load_state_dict_after_select_is_not_reverted() -> None:
    """Weights loaded into a prepared model win over the slice taken at select() time."""
    model, x = _build(Case(conv3x3))
    engine = SparseEngine(model, x)
    engine.select({"3": [0, 1, 2]})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["3.weight"] += 1.0
    model.load_state_dict(state)
    model(x)
    engine.sync()
    assert torch.equal(model.state_dict()["3.weight"], state["3.weight"])
    assert torch.equal(engine.layers["3"].trady.w_slice, state["3.weight"][:, :3])


def test_state_dict_is_current_right_after_a_step() -> None:
    model, x = _build(Case(conv_grouped4))
    engine = SparseEngine(model, x)
    engine.select({"3": [0, 5]})
    model.train()
    _loss(model(x)).backward()
    torch.optim.SGD(engine.parameters(), lr=LR).step()
    w_slice = engine.layers["3"].trady.w_slice.detach().clone()
    state = model.state_dict()  # no sync(): the state dict hook writes the slices first
    assert torch.equal(state["3.weight"][0:4, 0], w_slice[0]) and torch.equal(state["3.weight"][8:12, 1], w_slice[1])


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


def test_restore_is_final_and_idempotent() -> None:
    model, x = _build(Case(conv3x3))
    engine = SparseEngine(model, x)
    engine.select({"3": [1]})
    engine.restore()
    engine.restore()
    assert type(model[3]) is nn.Conv2d and not model._state_dict_pre_hooks
    with pytest.raises(TradyError, match="restored"):
        engine.select({"3": [1]})
    engine = SparseEngine(model, x)  # prepare again
    with pytest.raises(TradyError, match="already prepared"):
        SparseEngine(model, x)
    engine.select({"3": [2]})


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


# ---------------------------------------------------------------------------------------------
# What is kept for backward
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Layer kinds the engine cannot run on the backprop path
# ---------------------------------------------------------------------------------------------


def _with_module(mid: nn.Module) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), mid, nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip


UNSUPPORTED = {  # (SiLU, GELU, LeakyReLU, LayerNorm, ...: supported, tests/test_modern.py)
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


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_layer_name_suggests_the_closest() -> None:
    model = Chain()
    engine = SparseEngine(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(TradyError) as err:
        engine.select({"b3.O": [0]})
    assert "'b3.O'" in str(err.value) and "b3.0" in str(err.value)
    with pytest.raises(TradyError, match="classifier"):
        SparseEngine(Chain(), torch.randn(1, 3, 8, 8), EngineConfig(classifier="clasifier"))


@pytest.mark.parametrize("bad", [8, -1, 100])
def test_out_of_range_channel_names_layer_and_range(bad: int) -> None:
    model = Chain()
    engine = SparseEngine(model, torch.randn(1, 3, 8, 8))
    engine.select({"b1.0": [0, 1]})
    with pytest.raises(TradyError) as err:
        engine.select({"b1.0": [0, bad]})
    msg = str(err.value)
    assert str(bad) in msg and "'b1.0'" in msg and "0..7" in msg
    # a failed select leaves the previous selection in place
    assert set(engine.selection) == {"b1.0"} and engine.layers["b1.0"].trady.w_slice is not None


def test_mask_bits_must_be_1_or_8() -> None:
    with pytest.raises(TradyError, match="mask_bits"):
        SparseEngine(Chain(), torch.randn(1, 3, 8, 8), EngineConfig(mask_bits=4))


def test_load_after_an_optimizer_step_is_not_reverted() -> None:
    """opt.step() then model.load_state_dict(): the loaded values win, in the weight and the slice."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(64, 2))
    x, y = torch.randn(2, 3, 4, 4), torch.tensor([0, 1])
    original = {k: v.clone() for k, v in model.state_dict().items()}
    engine = SparseEngine(model, x)
    engine.select({"2": [0, 1]})
    opt = torch.optim.SGD(engine.parameters(), lr=0.5)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    model.load_state_dict(original)
    model(x)  # the forward brings weight and slice into agreement
    assert torch.equal(model[2].weight, original["2.weight"])
    assert torch.equal(model[2].trady.w_slice, original["2.weight"][:, [0, 1]])


# ---------------------------------------------------------------------------------------------
# Off the common path: torch.compile, stale optimizers, other input sizes, strict guards, ...
# ---------------------------------------------------------------------------------------------


def _small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(inplace=True),
        nn.Conv2d(8, 6, 1, groups=2), nn.ReLU6(), nn.Flatten(), nn.Linear(6 * 6 * 6, 5),
    )  # fmt: skip


# selections and re-selections: same sizes other channels, other layers, classifier only, back again
SCHEDULE = [{"3": [0, 3]}, {"3": [1, 5]}, {"0": [1], "3": [0, 3, 4], "5": [2, 7]}, {}, {"3": [0, 3]}]


def _train_schedule(model: nn.Module, x, y, compile_backend: str | None = None) -> tuple[list[float], dict]:
    """SGD with momentum over SCHEDULE (2 steps each); one optimizer, built before the first select()."""
    engine = SparseEngine(model, x[:1])
    opt = torch.optim.SGD(engine.parameters(), lr=0.2, momentum=0.9)
    f = torch.compile(model, backend=compile_backend) if compile_backend else model
    losses = []
    for selection in SCHEDULE:
        engine.select(selection)
        for _ in range(2):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(f(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


def _dense_schedule(model: nn.Module, x, y) -> tuple[list[float], dict]:
    """The same schedule on the stock model: dense autograd, gradients masked to the selected entries,
    momentum restarting for a layer whose channels change (the engine's documented rule)."""
    model.eval()
    opt_state: dict[str, torch.Tensor] = {}
    losses, prev = [], {}
    head = {"8.weight", "8.bias"}
    for selection in SCHEDULE:
        masks = {f"{n}.weight": _channel_mask(model.get_submodule(n), torch.tensor(i)) for n, i in selection.items()}
        for key in list(opt_state):
            if key not in head and (key not in masks or prev.get(key) != selection.get(key.split(".")[0])):
                del opt_state[key]
        prev = {f"{n}.weight": v for n, v in selection.items()}
        for _ in range(2):
            model.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.item())
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n not in head and n not in masks:
                        continue
                    g = p.grad if n in head else p.grad * masks[n]
                    buf = opt_state[n] = g.clone() if n not in opt_state else opt_state[n].mul_(0.9).add_(g)
                    p.sub_(0.2 * (buf if n in head else buf * masks[n]))
    return losses, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backend", [None, "aot_eager"])
def test_multi_step_training_matches_dense_compiled_or_not(backend: str | None) -> None:
    """Eager and torch.compile train exactly what dense autograd does, step by step, across re-selections,
    with one optimizer built before the first select()."""
    torch.manual_seed(0)
    base = _randomize_bn(_small_net()).eval()
    x, y = torch.randn(4, 3, 10, 10), torch.randint(0, 5, (4,))
    dense_losses, dense_state = _dense_schedule(copy.deepcopy(base), x, y)
    losses, state = _train_schedule(copy.deepcopy(base), x, y, backend)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(dense_losses), rtol=1e-5, atol=1e-6)
    for k, v in dense_state.items():
        _close(state[k], v, f"{backend}: {k} after the schedule")


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


def test_frozen_batchnorm_in_train_mode_warns_once() -> None:
    from trady.sparse_modules import FrozenBatchNormWarning

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


def test_deepcopy_of_a_prepared_model_raises() -> None:
    model, x = _build(Case(conv3x3))
    engine = SparseEngine(model, x)
    with pytest.raises(TradyError, match=r"cannot be deep-copied.*restore\(\)"):
        copy.deepcopy(model)
    engine.restore()
    copy.deepcopy(model)  # a restored model copies as usual


@pytest.mark.parametrize("bad", [{0, 1}, "01", 3, [0, "1"]])
def test_channel_indices_of_another_form_raise(bad) -> None:
    model, x = _build(Case(conv3x3))
    engine = SparseEngine(model, x)
    with pytest.raises(TradyError, match=r"'3'.*accepted: .*list, tuple or range of ints, or an integer tensor"):
        engine.select({"3": bad})
    assert engine.select({"3": range(2)})["3"].tolist() == [0, 1]


def test_a_hand_written_update_reaches_the_forward() -> None:
    """Slices updated without torch.optim (a manual rule) are what the next eager forward computes with."""
    model, x = _build(Case(conv_grouped4))
    stock = copy.deepcopy(model)
    engine = SparseEngine(model, x)
    engine.select({"3": [0, 5]})
    _loss(model(x)).backward()
    with torch.no_grad():
        for p in engine.slice_parameters():
            p -= LR * p.grad
    _, dense_grads = _dense_reference(stock, x)
    mask = _channel_mask(stock[3], torch.tensor([0, 5]))
    with torch.no_grad():
        stock[3].weight -= LR * dense_grads["3.weight"] * mask
    _close(model(x).detach(), stock(x).detach(), "forward after a hand-written update")


def test_reselecting_the_same_channels_keeps_momentum() -> None:
    """A layer whose channels do not change keeps its slice tensor and its optimizer state."""
    model, x = _build(Case(conv_bn_relu6_chain))
    engine = SparseEngine(model, x)
    engine.select({"3": [1, 2], "6": [0]})
    opt = torch.optim.SGD(engine.parameters(), lr=LR, momentum=0.9)
    _loss(model(x)).backward()
    opt.step()
    kept, changed = engine.layers["3"].trady.w_slice, engine.layers["6"].trady.w_slice
    buf = opt.state[kept]["momentum_buffer"].clone()
    engine.select({"3": [1, 2], "6": [3]})
    assert engine.layers["3"].trady.w_slice is kept and torch.equal(opt.state[kept]["momentum_buffer"], buf)
    assert engine.layers["6"].trady.w_slice is changed and changed not in opt.state


def test_loaded_optimizer_state_for_other_channels_is_dropped() -> None:
    """SGD momentum loaded from a state dict (a resume) made for other channels of the same count: the step
    equals a fresh-state step (hand computed: lr * grad); for the same channels the momentum carries on."""
    torch.manual_seed(0)
    model = _small_net().eval()
    x, y = torch.randn(2, 3, 10, 10), torch.randint(0, 5, (2,))
    engine = SparseEngine(model, x[:1])
    lr, mom = 0.1, 0.9

    def step(opt):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        w = model.get_submodule("3").trady.w_slice
        before, grad = w.detach().clone(), w.grad.detach().clone()
        opt.step()
        return before, grad, w.detach().clone()

    engine.select({"3": [1, 2]})
    opt = torch.optim.SGD(engine.parameters(), lr=lr, momentum=mom)
    step(opt), step(opt)
    saved = copy.deepcopy(opt.state_dict())
    buf = opt.state[model.get_submodule("3").trady.w_slice]["momentum_buffer"].clone()
    for channels, carries in (([0, 3], False), ([1, 2], True)):
        engine.select({"3": channels})
        resumed = torch.optim.SGD(engine.parameters(), lr=lr, momentum=mom)
        resumed.load_state_dict(saved)
        before, grad, after = step(resumed)
        expected = before - lr * (mom * buf + grad if carries else grad)
        torch.testing.assert_close(after, expected, msg=f"channels {channels}")


def test_an_optimizer_built_from_model_parameters_raises_a_head_only_one_does_not() -> None:
    """model.parameters() holds the prepared layers' frozen full weights and no slice: raises at its first
    step, naming a layer. A head-only optimizer next to one for the slices (stepping every second step,
    or a head warm-up before any slice optimizer, LP-FT) is legitimate."""
    torch.manual_seed(0)
    model = _small_net().eval()
    x, y = torch.randn(2, 3, 10, 10), torch.randint(0, 5, (2,))
    engine = SparseEngine(model, x[:1])
    engine.select({"3": [1, 2]})
    torch.nn.functional.cross_entropy(model(x), y).backward()
    stale = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TradyError, match=r"frozen weight of prepared layer '0'.*engine\.parameters\(\)"):
        stale.step()
    head = torch.optim.Adam(engine.classifier.parameters(), lr=0.01)
    for _ in range(3):  # LP-FT: the head warms up alone
        head.step()
    slices_opt = torch.optim.SGD(engine.slice_parameters(), lr=0.1)
    for i in range(4):
        head.step()
        if i % 2:
            slices_opt.step()
    engine.restore()
