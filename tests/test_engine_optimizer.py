"""Optimizers across selections: multi-step training (eager and torch.compile) equals dense autograd with
masked gradients, momentum kept or restarted per layer, loaded optimizer state for other channels, and
optimizers built from the model's parameters or the head alone.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from cases import LR, Case, _build, _channel_mask, _close, _loss, _randomize_bn, conv_bn_relu6_chain
from helpers import fp32_sum_tolerance
from trady.core.errors import TradyError
from trady.engine import SparseEngine


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
    # the losses of two steps: the weights differ by lr x gradient rounding, the gradients being fp32 sums over
    # batch x positions (4 x 10 x 10 terms) in the engine's order or stock autograd's
    reference = torch.tensor(dense_losses)
    torch.testing.assert_close(torch.tensor(losses), reference, **fp32_sum_tolerance(reference, 4 * 10 * 10))
    for k, v in dense_state.items():
        _close(state[k], v, f"{backend}: {k} after the schedule")


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
