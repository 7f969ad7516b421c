"""Modern architectures with the default (few-bit) EngineConfig: bytes kept vs stock freezing, gradient
cosine vs dense autograd; functional calls; squeeze-excitation, LayerNorm and attention keeping less.

(Exactness in the exact mode: the modern cases of the shared CASES table in tests/cases.py, run by
tests/test_engine_exactness.py.)
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import fp32_sum_tolerance
from trady.core.errors import TradyError
from trady.engine import EngineConfig, SparseEngine, kept_tensors
from trady.memory.kept_bytes import measure_saved_bytes
from trady.models.constructed import SMALL, MBConv, calibrate_batchnorm, layer_weight, stock_freeze

BATCH = 4
# name -> (input resolution, bytes-ratio target vs stock freezing) (issue 13)
TARGETS = {"efficientnet_b0_like": (96, 10.0), "mobilenet_v3_like": (96, 10.0), "convnext_like": (64, 4.0),
           "vit_like": (32, 4.0)}  # fmt: skip


def selection_of(engine: SparseEngine, seed: int = 0, layers: int = 6) -> dict[str, list[int]]:
    """An eighth of the channels of `layers` layers drawn from the upper two thirds."""
    rng = random.Random(seed)
    names = engine.costs.names
    chosen = rng.sample(names[len(names) // 3 :], layers)
    sizes = {n: engine.costs.by_name[n].in_channels for n in chosen}
    return {n: sorted(rng.sample(range(c), max(1, c // 8))) for n, c in sizes.items()}



def stock_saved_bytes(model: nn.Module, selection, x, w) -> int:
    """Stock autograd with requires_grad freezing of the same selection (the selected layers' whole weight)."""
    stock_freeze(model, selection)
    return measure_saved_bytes(model, lambda: (model(x) * w).sum()).total


@pytest.mark.parametrize("name", list(TARGETS))
def test_default_config_meets_the_targets(name: str) -> None:
    res, target = TARGETS[name]
    torch.manual_seed(0)
    model = calibrate_batchnorm(SMALL[name][0](), res)
    x = torch.randn(BATCH, 3, res, res, generator=torch.Generator().manual_seed(1))
    w = torch.randn(BATCH, 10, generator=torch.Generator().manual_seed(2))
    dense = copy.deepcopy(model)
    for p in dense.parameters():
        p.requires_grad_(True)
    (dense(x) * w).sum().backward()
    stock = copy.deepcopy(model)

    engine = SparseEngine(model, x)  # the default EngineConfig
    selection = engine.select(selection_of(engine))
    saved, _ = engine.measure_saved(lambda: (model(x) * w).sum())
    saved.loss.backward()
    for n, idx in selection.items():
        module = dense.get_submodule(n)
        g = layer_weight(module).grad
        expected = g[:, idx] if getattr(module, "groups", 1) == 1 else g[idx]
        cos = F.cosine_similarity(engine.layers[n].trady.w_slice.grad.flatten(), expected.flatten(), dim=0)
        assert cos >= 0.99, (n, float(cos))
    ratio = stock_saved_bytes(stock, selection, x, w) / saved.total
    assert ratio >= target, ratio


# ---------------------------------------------------------------------------------------------
# Functional calls
# ---------------------------------------------------------------------------------------------


class Functional(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.op = op
        self.classifier = nn.Linear(8, 4)

    def forward(self, x):
        return self.classifier(self.op(self.body(self.conv(x))).mean((2, 3)))


def _kept(model, engine, x) -> dict[str, int]:
    saved, _ = engine.measure_saved(lambda: model(x).square().sum())
    return saved.by_dtype


@pytest.mark.parametrize(
    "op", [F.silu, torch.sigmoid, lambda t: t.sigmoid(), F.gelu, torch.tanh, F.mish, F.hardswish, F.elu,
           lambda t: F.leaky_relu(t, 0.2), F.relu, lambda t: t * torch.sigmoid(t.mean((2, 3), keepdim=True))],
    ids=["silu", "sigmoid", "Tensor.sigmoid", "gelu", "tanh", "mish", "hardswish", "elu", "leaky_relu", "relu",
         "x*gate"],
)  # fmt: skip
def test_functional_calls_keep_codes_not_floats(op) -> None:
    torch.manual_seed(0)
    model = Functional(op)
    x = torch.randn(2, 3, 9, 9)
    dense = copy.deepcopy(model)
    engine = SparseEngine(model, x)
    engine.select({"conv": [0, 2]})
    kept = _kept(model, engine, x)
    # float32: the conv's kept input slice [2, 2, 9, 9], the head's input [2, 8] and small values (levels;
    # the gate, lo, step per (sample, channel)); a full float activation [2, 8, 9, 9] would be 5184 bytes
    assert kept.get("float32", 0) <= 4 * (2 * 2 * 81 + 2 * 8 + 6 * 16), kept
    for p in dense.parameters():
        p.requires_grad_(True)
    dense(x).square().sum().backward()
    model(x).square().sum().backward()
    got, expected = engine.layers["conv"].trady.w_slice.grad, dense.conv.weight.grad[:, [0, 2]]
    cos = F.cosine_similarity(got.flatten(), expected.flatten(), dim=0)
    assert cos > 0.995


def test_functional_dropout_keeps_a_bit_mask_and_draws_as_stock() -> None:
    torch.manual_seed(0)
    model = Functional(lambda t: F.dropout(t, 0.3))
    x = torch.randn(2, 3, 9, 9)
    dense = copy.deepcopy(model)
    engine = SparseEngine(model, x)
    engine.select({"conv": [0, 2]})
    torch.manual_seed(5)
    kept = _kept(model, engine, x)
    assert kept["uint8"] == 2 * 8 * 81 // 8  # the dropout mask: 1 bit per element
    for p in dense.parameters():
        p.requires_grad_(True)
    torch.manual_seed(5)
    out_dense = dense(x)
    torch.manual_seed(5)
    out = model(x)
    torch.testing.assert_close(out, out_dense)
    out.square().sum().backward()
    out_dense.square().sum().backward()
    got, expected = engine.layers["conv"].trady.w_slice.grad, dense.conv.weight.grad[:, [0, 2]]
    # a weight gradient sums batch x positions (2 x 9 x 9) fp32 terms, in the engine's order or stock's
    torch.testing.assert_close(got, expected, **fp32_sum_tolerance(expected, 2 * 9 * 9))


def test_functional_call_that_keeps_a_tensor_is_named_or_runs_stock() -> None:
    torch.manual_seed(0)
    model = Functional(lambda t: torch.exp(t))
    x = torch.randn(2, 3, 9, 9)
    dense = copy.deepcopy(model)
    engine = SparseEngine(model, x)
    with pytest.raises(TradyError, match=r"backward: torch.exp in module '<root>' \(keeps float32 \[1, 8, 9, 9\]"):
        engine.select({"conv": [1]})  # at select time, from one sample of the example
    assert engine.selection == {}  # the previous selection stays
    with torch.no_grad():
        model(x)  # evaluation: nothing is kept, nothing to report
    with pytest.raises(TradyError, match="torch.exp"):
        engine.select({"body": [1]})  # exp above: still on the path
    engine.restore()
    engine = SparseEngine(model, x, EngineConfig(strict=False))
    engine.select({"conv": [1]})
    model(x).square().sum().backward()
    for p in dense.parameters():
        p.requires_grad_(True)
    dense(x).square().sum().backward()
    got, expected = engine.layers["conv"].trady.w_slice.grad, dense.conv.weight.grad[:, [1]]
    torch.testing.assert_close(got, expected, **fp32_sum_tolerance(expected, 2 * 9 * 9))


def test_every_offending_call_is_named_once_at_the_end_of_the_forward() -> None:
    model = Functional(lambda t: torch.exp(t) * t + torch.exp(t) * t)
    x = torch.randn(1, 3, 5, 5)
    engine = SparseEngine(model, x)
    with pytest.raises(TradyError) as err:
        engine.select({"conv": [0]})
    msg = str(err.value)
    assert msg.count("torch.exp in module '<root>'") == 1 and msg.count("Tensor.mul in module '<root>'") == 1


def test_the_mode_is_left_after_an_error() -> None:
    model = Functional(lambda t: torch.exp(t) if t.shape[-1] > 6 else t)
    x = torch.randn(1, 3, 5, 5)
    engine = SparseEngine(model, x)
    engine.select({"conv": [1]})  # the example (5 px) meets no offender
    with pytest.raises(TradyError, match="torch.exp"):
        model(torch.randn(2, 3, 9, 9))  # a wider input does: named at the end of the forward
    model(x).sum().backward()  # the engine still trains after the error
    # a call outside the model is not seen: the mode was left (it would name this exp otherwise)
    torch.exp(torch.randn(3, requires_grad=True)).sum().backward()
    engine.restore()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_bad_config_values() -> None:
    model, x = Functional(F.silu), torch.randn(1, 3, 5, 5)
    with pytest.raises(TradyError, match=r"activation_bits must be one of \(1, 2, 3, 4\) or None"):
        SparseEngine(model, x, EngineConfig(activation_bits=8))
    with pytest.raises(TradyError, match=r"kept_precision must be one of \('int8', 'fp32'\), got 'int4'"):
        SparseEngine(model, x, EngineConfig(kept_precision="int4"))


# ---------------------------------------------------------------------------------------------
# Squeeze-excitation, LayerNorm, attention: error of the 8-bit copies, exactness at fp32
# ---------------------------------------------------------------------------------------------


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _grads(fn, *inputs, grad=None):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(grad if grad is not None else torch.randn(out.shape, generator=torch.Generator().manual_seed(5)))
    return out, [t.grad for t in leaves]


def test_gate_mul_error_and_exactness() -> None:
    g = torch.Generator().manual_seed(0)
    x = F.silu(torch.randn(4, 16, 7, 7, generator=g))
    gate = torch.sigmoid(torch.randn(4, 16, 1, 1, generator=g))
    ref_out, ref = _grads(torch.mul, x, gate)
    for mode, bound in (("fp32", 1e-6), ("int8", 1e-2)):
        out, got = _grads(lambda a, b, m=mode: kept_tensors.gate_mul(a, b, m), x, gate)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)  # x's gradient needs only the gate
        assert _rel(got[1], ref[1]) < bound, (mode, _rel(got[1], ref[1]))


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_error_and_exactness(affine: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = 2 + 3 * torch.randn(4, 10, 24, generator=g)
    weight = 1 + 0.2 * torch.randn(24, generator=g) if affine else None
    bias = 0.1 * torch.randn(24, generator=g) if affine else None
    ref_out, ref = _grads(lambda t: F.layer_norm(t, (24,), weight, bias), x)
    for mode, bound in (("fp32", 1e-5), ("int8", 2e-2)):
        out, got = _grads(lambda t, m=mode: kept_tensors.layer_norm(t, (24,), weight, bias, 1e-5, m), x)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
        assert _rel(got[0], ref[0]) < bound, (mode, _rel(got[0], ref[0]))


# fp32 reductions of one attention output: q.k over 8 features, the softmax's sum and the weighted sum of
# values over 9 keys (another kernel, e.g. a fused one, adds them in another order)
ATTENTION_TERMS = 8 + 9 + 9


@pytest.mark.parametrize("masked", [False, True])
def test_attention_error_exactness_and_dropout_replay(masked: bool) -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g) for _ in range(3))
    mask = torch.randn(9, 9, generator=g) if masked else None
    ref_out, ref = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, mask), q, k, v)
    for mode, bound in (("fp32", 1e-5), ("int8", 3e-2)):
        out, got = _grads(lambda a, b, c, m=mode: kept_tensors.attention(a, b, c, mask, mode=m), q, k, v)
        torch.testing.assert_close(out, ref_out, **fp32_sum_tolerance(ref_out, ATTENTION_TERMS))
        assert max(_rel(a, b) for a, b in zip(got, ref)) < bound, mode
    # dropout: backward recomputes with the forward's random stream
    torch.manual_seed(7)
    ref_out, ref = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, mask, 0.3), q, k, v)
    torch.manual_seed(7)
    out, got = _grads(lambda a, b, c: kept_tensors.attention(a, b, c, mask, 0.3, mode="fp32"), q, k, v)
    torch.testing.assert_close(out, ref_out, **fp32_sum_tolerance(ref_out, ATTENTION_TERMS))
    for a, b in zip(got, ref):  # the backward runs the same reductions the other way: twice the terms
        torch.testing.assert_close(a, b, **fp32_sum_tolerance(b, 2 * ATTENTION_TERMS))


def test_multihead_attention_projections_are_layers_and_eval_sees_trained_weights() -> None:
    torch.manual_seed(0)
    model = SMALL["vit_like"][0]()
    x = torch.randn(2, 3, 32, 32)
    engine = SparseEngine(model, x)
    assert {"blocks.0.self_attn", "blocks.0.self_attn.out_proj"} <= set(engine.costs.names)
    info = engine.costs.by_name["blocks.0.self_attn"]
    assert (info.in_channels, info.out_channels, info.input_hw) == (32, 96, (65, 1))
    engine.select({"blocks.1.self_attn": [0, 5], "blocks.1.self_attn.out_proj": [3]})
    opt = torch.optim.SGD(engine.parameters(), lr=1.0)
    model.train()
    model(x).square().sum().backward()
    opt.step()
    model.eval()
    with torch.no_grad():  # the encoder layer's fused inference path reads the weights directly
        out = model(x)
    trained = copy.deepcopy(engine.restore())
    with torch.no_grad():
        torch.testing.assert_close(out, trained.eval()(x))


def test_multihead_attention_refuses_what_it_cannot_run_sparse() -> None:
    class Cross(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(6, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.classifier = nn.Linear(8, 3)

        def forward(self, x, weights=False):
            h = self.embed(x)
            return self.classifier(self.attn(h, h, h, need_weights=weights)[0].mean(1))

    model, x = Cross(), torch.randn(2, 5, 6)
    engine = SparseEngine(model, x)
    engine.select({"embed": [0]})
    with pytest.raises(TradyError, match="accepted need_weights=False"):
        model(x, weights=True)
    model(x).sum().backward()


def test_hardswish_se_block_keeps_codes() -> None:
    """MobileNetV3 block: what the 4-bit codes, 1-bit masks and the 8-bit SE copy cost, in bytes."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Conv2d(3, 8, 1), MBConv(8, 8, 3, 1, 2, 0.25, nn.Hardswish, functional_se=True),
                          nn.Flatten(), nn.LazyLinear(3))  # fmt: skip
    x = torch.randn(2, 3, 8, 8)
    block.eval()(x)
    engine = SparseEngine(block, x)
    engine.select({"0": [0]})
    kept = _kept(block, engine, x)
    n = 2 * 16 * 64  # elements of the expanded activation
    # expand and depthwise Hardswish: 4 bit planes each; SE: x at 8 bits (+ fp32 lo, step, gate per
    # (sample, channel)), its functional relu a 1-bit mask of [2, 8] (2 bytes), its hardsigmoid exact
    # with 1 bit on [2, 16] (4 bytes)
    assert kept["uint8"] == 2 * 4 * n // 8 + n + 2 + 4


def _vit_grads(config: EngineConfig, dropout: float, seed: int = 3):
    torch.manual_seed(0)
    model = SMALL["vit_like"][0]()
    for block in model.blocks:  # dropout everywhere in the encoder layers, attention included
        for m in block.modules():
            if isinstance(m, nn.Dropout):
                m.p = dropout
        block.self_attn.dropout = dropout
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    engine = SparseEngine(model, x, config)
    engine.select({"patch_embed": [0, 2], "blocks.1.linear1": [3, 4]})
    model.train()
    torch.manual_seed(seed)
    saved, budget = engine.measure_saved(lambda: model(x).square().sum())
    saved.loss.backward()
    return {n: m.trady.w_slice.grad.clone() for n, m in engine.layers.items() if m.trady.idx is not None}, saved, budget


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_recompute_keeps_block_inputs_only_with_the_same_gradients(dropout: float) -> None:
    blocks = ("blocks.0", "blocks.1")
    for base in (EngineConfig(), EngineConfig(activation_bits=None, kept_precision="fp32")):
        plain, saved, budget = _vit_grads(base, dropout)
        again, saved_r, budget_r = _vit_grads(EngineConfig(**{**vars(base), "recompute": blocks}), dropout)
        for n in plain:  # dropout replayed in the recomputation: the same draws, the same gradients, summed
            # in another order: fp32 rounding over the longest reduction on the path (d_ff = 128 terms)
            torch.testing.assert_close(again[n], plain[n], **fp32_sum_tolerance(plain[n], n_terms=128))
        assert saved_r.total < 0.6 * saved.total, (saved_r.total, saved.total)
        assert budget_r < budget  # blocks.1.linear1's input slice is recomputed, not kept


def test_recompute_names_must_exist() -> None:
    model, x = SMALL["vit_like"][0](), torch.randn(1, 3, 32, 32)
    with pytest.raises(TradyError, match="unknown module to recompute 'blocks.7'"):
        SparseEngine(model, x, EngineConfig(recompute=("blocks.7",)))
    assert "forward" not in vars(model.blocks[0])


def test_a_forward_nested_in_a_forward_hook_keeps_the_outer_forward_in_the_mode(monkeypatch):
    """A hook (after the engine's) that re-selects runs the strict check's nested forward inside the outer
    one: only the outermost root call enters/leaves the functional-call mode, so the outer F.silu stays routed."""
    from helpers import SiluNet
    from trady.engine import SparseEngine, activations

    torch.manual_seed(0)
    model, x = SiluNet().eval(), torch.randn(2, 3, 8, 8)
    engine = SparseEngine(model, x[:1])
    engine.select({"c1": [0], "c2": [1]})
    calls = []
    few_bit = activations.few_bit
    monkeypatch.setattr(activations, "few_bit", lambda *a, **k: calls.append(1) or few_bit(*a, **k))
    pending = [True]

    def reselect_once(module, args):
        if pending:
            pending.clear()
            engine.select({"c1": [2], "c2": [3]})  # its strict check runs model(example) inside this forward
            calls.clear()

    model.register_forward_pre_hook(reselect_once)
    model(x).sum().backward()
    assert len(calls) == 2 and engine.slice_parameters()[0].grad is not None
    engine.restore()
