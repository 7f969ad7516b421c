"""The model's weights and state dict against the engine's slices: loads after select() or after a step
win, the state dict is current right after a step, a hand-written update reaches the forward, and
restore() is final.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cases import LR, Case, _build, _channel_mask, _close, _dense_reference, _loss, conv3x3, conv_grouped4
from trady.core.errors import TradyError
from trady.engine import SparseEngine


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
