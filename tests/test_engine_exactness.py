"""The channel-sparse engine against dense autograd on the unmodified model.

Every case of the CASES table (tests/cases.py) runs through the checks (a)-(f) of `_check_round`, then
(g) a second selection on the same engine (no re-preparation) and (h) restore(). Then even-kernel 'same'
padding, trained biases, two forwards before one backward, the zoo at small resolution and
nn.MultiheadAttention.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch
from torch import nn

from cases import (
    BATCH,
    CASES,
    EXACT,
    Case,
    _build,
    _check_round,
    _close,
    _dense_reference,
    _expected_slice_grad,
    _loss,
    _random_selection,
    _randomize_bn,
    _stem_then,
    conv_bn_relu6_chain,
)
from trady.core.errors import TradyError
from trady.engine import EngineConfig, SparseEngine


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_engine_matches_dense_autograd(case: Case) -> None:
    model, x = _build(case)
    stock = copy.deepcopy(model)  # the unmodified model: reference classes, keys, dense autograd
    classes = {n: type(m) for n, m in model.named_modules()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    engine = SparseEngine(model, x, case.config)
    layers = engine.costs.names
    assert layers, "the case has no updatable layer below the classifier"
    costs = engine.costs
    # selection A: every other layer from the second on (the bottom layer stays frozen: no graph there)
    sel_a = _random_selection(engine, layers[1::2] or layers, seed=1)
    _check_round(model, engine, copy.deepcopy(stock), x, sel_a, stock)

    # (g) a different selection on the same engine: from the bottom layer, one layer in full
    dense_b = copy.deepcopy(stock)
    dense_b.load_state_dict(model.state_dict())
    sel_b = _random_selection(engine, layers[0::2], seed=2, full=layers[0])
    _check_round(model, engine, dense_b, x, sel_b, stock)
    assert engine.costs is costs

    # classifier only
    engine.select({})
    assert engine.slice_parameters() == []

    # (h) restore: stock classes, same keys, original flags, the trained values in place
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    restored = engine.restore()
    assert restored is model
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert list(model.state_dict()) == list(stock.state_dict())
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    for m in model.modules():
        assert not any(a.startswith("trady") for a in vars(m)), type(m)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
def test_same_padding_with_even_kernel() -> None:
    """padding='same' with an even kernel pads asymmetrically (the extra row/column at the end)."""
    torch.manual_seed(0)
    model = _stem_then(nn.Conv2d(8, 12, 4, padding="same"), nn.ReLU())
    x = torch.randn(BATCH, 4, 9, 10)
    with torch.no_grad():
        model.eval()(x)
    stock = copy.deepcopy(model)
    engine = SparseEngine(model, x)
    _check_round(model, engine, copy.deepcopy(stock), x, {"3": [1, 4, 6]}, stock)
    dense_b = copy.deepcopy(stock)
    dense_b.load_state_dict(model.state_dict())
    _check_round(model, engine, dense_b, x, {"0": [0, 2], "3": list(range(8))}, stock)


def test_train_bias_updates_biases_and_bn_shifts() -> None:
    model, x = _build(Case(conv_bn_relu6_chain))
    stock = copy.deepcopy(model)
    engine = SparseEngine(model, x, EngineConfig(train_bias=True))
    engine.select({"3": [0, 5]})
    params = engine.parameters()
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    assert all(any(p is q for q in params) for p in biases)
    _, dense_grads = _dense_reference(stock, x)
    model.train()
    _loss(model(x)).backward()
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            _close(p.grad, dense_grads[n], f"bias gradient {n}")
        elif not n.startswith(engine.classifier_name + "."):
            assert p.grad is None, n


def test_two_forwards_before_one_backward() -> None:
    """A forward must not bump the version of a weight that an earlier forward saved for backward."""
    model, x = _build(Case(conv_bn_relu6_chain))
    stock = copy.deepcopy(model)
    engine = SparseEngine(model, x)
    engine.select({"3": [1, 2], "9": [0, 7]})
    model.train()
    loss = _loss(model(x)) + _loss(model(2 * x))
    engine.sync()  # a sync between forward and backward must be harmless as well
    loss.backward()
    stock.eval()
    for p in stock.parameters():
        p.requires_grad_(True)
    (_loss(stock(x)) + _loss(stock(2 * x))).backward()
    _close(engine.layers["9"].trady.w_slice.grad, stock[9].weight.grad[:, [0, 7]], "slice gradient")


def _zoo_names() -> list[str]:
    try:
        from trady import models
    except ImportError:  # the zoo is not there yet
        return []
    # image models; the token model minilm-l6 is tested exact on its real weights in tests/test_transformers.py
    return [n for n in models.available() if models.spec(n).inputs == "image"]


ZOO = _zoo_names()
ZOO_RES = 64


@pytest.mark.parametrize("name", ZOO or [pytest.param("none", marks=pytest.mark.skip("no zoo models"))])
def test_zoo_model_matches_dense(name: str) -> None:
    from trady import models

    torch.manual_seed(0)
    model = _randomize_bn(models.create(name, pretrained=False, num_classes=7))
    x = torch.randn(BATCH, 3, ZOO_RES, ZOO_RES)
    stock = copy.deepcopy(model)
    engine = SparseEngine(model, x)
    assert engine.classifier_name == "classifier"
    layers = engine.costs.names
    rng = random.Random(name)
    chosen = set(rng.sample(layers[2:], min(5, len(layers) - 2))) | {layers[rng.randint(0, 2)]}
    selection = {}
    for n in chosen:
        c = engine.costs.by_name[n].in_channels
        selection[n] = sorted(rng.sample(range(c), min(c, rng.randint(1, 4))))
    canonical = engine.select(selection)

    stock.eval()  # dropout off on both sides; BatchNorm on running statistics
    model.eval()
    dense_out, dense_grads = _dense_reference(stock, x)
    out = model(x)
    _close(out.detach(), dense_out, f"{name}: forward output")  # (a)
    _loss(out).backward()
    for n, idx in canonical.items():  # (b)
        module = engine.layers[n]
        expected = _expected_slice_grad(module, dense_grads[f"{n}.weight"], idx)
        _close(module.trady.w_slice.grad, expected, f"{name}: slice gradient of {n}")
    for n, p in model.named_parameters():
        if not n.startswith("classifier."):
            assert p.grad is None, n
    report = engine.measure_step(x, None, loss_fn=lambda o, _y: _loss(o))  # (f)
    assert report.budgeted_bytes == report.analytic_budgeted_bytes > 0


class ConvAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1)
        self.act = nn.ReLU()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.classifier = nn.Linear(8, 4)

    def forward(self, x):
        t = self.act(self.conv0(x)).flatten(2).transpose(1, 2)
        t = self.attn(t, t, t, need_weights=False)[0]
        return self.classifier(t.mean(1))


def test_multihead_attention_is_a_layer_and_a_subclass_with_its_own_forward_is_refused() -> None:
    """nn.MultiheadAttention computes in its own forward (its out_proj is never called): the engine runs its
    own version (in_proj and out_proj channel-sparse); a subclass with its own forward cannot be run so."""
    torch.manual_seed(0)
    model, x = ConvAttention().eval(), torch.randn(2, 3, 5, 5)
    stock = copy.deepcopy(model)
    engine = SparseEngine(model, x, EXACT)
    engine.select({"conv0": [1, 2], "attn": [0, 3], "attn.out_proj": [5]})
    _loss(model(x)).backward()
    _, dense_grads = _dense_reference(stock, x)
    _close(engine.layers["conv0"].trady.w_slice.grad, dense_grads["conv0.weight"][:, [1, 2]], "slice gradient")
    _close(engine.layers["attn"].trady.w_slice.grad, dense_grads["attn.in_proj_weight"][:, [0, 3]], "in_proj slice")
    _close(engine.layers["attn.out_proj"].trady.w_slice.grad, dense_grads["attn.out_proj.weight"][:, [5]], "out_proj")
    engine.restore()

    class OwnForward(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model.attn.__class__ = OwnForward
    with pytest.raises(TradyError, match=r"layer 'attn' is a OwnForward with its own forward"):
        SparseEngine(model, x)
