"""Issue 19, items 4 and 6: a profile ranked on the bare network fits the same network under a wrapper
(layer names matched by a unique dotted suffix; one line when ambiguous or missing), and the Tuner names
what it hands the optimizer (`named_parameters()`, each group's "param_names"); one optimizer with
momentum for the whole run keeps a slice's momentum while its layer's channels stay, and starts it
afresh where they change (checked against SGD's momentum rule computed here)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import trady
from helpers import digits_batches
from test_lightning import fit
from trady.core.errors import TradyError
from trady.engine.functions import gather_slice
from user_model import build


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = build()

    def forward(self, x):
        return self.net(x)


class Twice(nn.Module):
    """Two copies of the network: the bare profile's `stem.0` matches `a.stem.0` and `b.stem.0`."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = build(), build()

    def forward(self, x):
        return self.a(x) + self.b(x)


@pytest.fixture(scope="module")
def batches():
    return digits_batches(64)


@pytest.fixture(scope="module")
def bare_profile(batches):
    return trady.rank(build(), batches, epochs=1)


def test_bare_profile_drives_the_wrapped_network_as_the_bare_one(batches, bare_profile):
    x = batches[0][0][:1]
    bare, wrapped = build(), Wrapper().eval()
    t_bare = trady.Tuner(bare, x, budget="20%", profile=bare_profile, seed=2)
    t_wrap = trady.Tuner(wrapped, x, budget="20%", profile=bare_profile, seed=2)
    assert t_wrap.profile.names == [f"net.{n}" for n in bare_profile.names]
    for epoch in (1, 2):
        t_bare.start_epoch(epoch)
        t_wrap.start_epoch(epoch)
        assert {f"net.{k}": v.tolist() for k, v in t_bare.selection.items()} == {
            k: v.tolist() for k, v in t_wrap.selection.items()
        }
    # and the reverse: a profile ranked on the wrapper, used on the bare network
    back = trady.rank(Wrapper(), batches, epochs=1).matched_to(t_bare.costs)
    assert back.names == bare_profile.names


def test_ambiguous_or_missing_names_get_one_line(batches, bare_profile):
    x = batches[0][0][:1]
    with pytest.raises(TradyError, match=r"profile layer 'stem\.0' matches model layers 'a\.stem\.0', 'b\.stem\.0'"):
        trady.Tuner(Twice(), x, budget="20%", profile=bare_profile)
    other = trady.rank(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10)), batches[:1], epochs=1)
    with pytest.raises(TradyError, match=r"model layer 'net\.grouped' is missing from the profile") as err:
        trady.Tuner(Wrapper(), x, budget="20%", profile=other)
    assert "\n" not in str(err.value)


@pytest.mark.filterwarnings("ignore:Found .* in eval mode")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_lightning_callback_takes_the_bare_profile(batches, bare_profile):
    from test_lightning import ToyModule

    wrapped_profile = trady.rank(ToyModule(), batches, epochs=1)
    module_a, _, rec_a = fit(batches, bare_profile, epochs=2)
    module_b, _, rec_b = fit(batches, wrapped_profile, epochs=2)
    assert rec_a.selections == rec_b.selections and rec_a.selections[0]
    b = module_b.state_dict()
    assert all(torch.equal(v, b[k]) for k, v in module_a.state_dict().items())


def test_named_parameters_name_each_slice_after_its_weight(batches, bare_profile):
    model = build()
    tuner = trady.Tuner(model, batches[0][0][:1], budget="20%", profile=bare_profile, seed=0)
    groups = tuner.start_epoch(1)
    named = tuner.named_parameters()
    assert [p for _, p in named] == tuner.parameters()
    assert [(g["name"], g["param_names"]) for g in groups] == [
        ("backbone", [n for n, p in named if not n.startswith("head.")]),
        ("classifier", ["head.weight", "head.bias"]),
    ]
    weights = dict(model.named_parameters())
    for name, tensor in named:
        layer = name.rsplit(".", 1)[0]
        if layer in tuner.costs.by_name:
            idx = tuner.selection.get(layer, torch.zeros(0, dtype=torch.long))
            groups_ = getattr(model.get_submodule(layer), "groups", 1)
            assert torch.equal(tensor, gather_slice(weights[name].detach(), idx, groups_)), name
        else:
            assert tensor is weights[name]
    trained = tuner.named_parameters(trained_only=True)
    assert {n for n, p in trained} == {f"{k}.weight" for k in tuner.selection} | {"head.weight", "head.bias"}
    optimizer = torch.optim.SGD(groups, lr=0.1)
    assert optimizer.state_dict()["param_groups"][0]["param_names"] == groups[0]["param_names"]


def test_one_optimizer_with_momentum_across_epochs(batches, bare_profile):
    """SGD(momentum=0.9) built once: at each epoch's first step a layer with the same channels as before
    has buf = 0.9 * old buf + grad; a layer whose channels changed starts afresh, buf = grad."""
    model, mu = build(), 0.9
    tuner = trady.Tuner(model, batches[0][0][:1], strategy="trady", budget="20%", profile=bare_profile, seed=4)
    optimizer = torch.optim.SGD(tuner.start_epoch(1), lr=0.01, momentum=mu)
    names = dict((id(p), n) for n, p in tuner.named_parameters())
    changed = 0
    previous = None
    for epoch in (1, 2, 3, 4):
        if epoch > 1:
            tuner.start_epoch(epoch)
        for i, (x, y) in enumerate(batches[:2]):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            before = {names[id(p)]: optimizer.state[p]["momentum_buffer"].clone()
                      for p in tuner.parameters() if p in optimizer.state and p.numel()}  # fmt: skip
            grads = {names[id(p)]: p.grad.clone() for p in tuner.parameters() if p.grad is not None}
            optimizer.step()
            if i == 0 and previous is not None:
                for layer, idx in tuner.selection.items():
                    name = f"{layer}.weight"
                    buf = optimizer.state[dict(tuner.named_parameters())[name]]["momentum_buffer"]
                    if layer in previous and torch.equal(previous[layer], idx):
                        assert torch.allclose(buf, mu * before[name] + grads[name]), name
                    else:
                        assert torch.equal(buf, grads[name]), name
                        changed += 1
        previous = {k: v.clone() for k, v in tuner.selection.items()}
    assert changed > 0  # random draws change channels; the static strategy below keeps them
    # a static strategy keeps every layer's channels: every momentum carries on
    model2 = build()
    tuner2 = trady.Tuner(model2, batches[0][0][:1], strategy="s-full-random", budget="20%", seed=4)
    opt2 = torch.optim.SGD(tuner2.start_epoch(1), lr=0.01, momentum=mu)
    x, y = batches[0]
    for epoch in (1, 2):
        if epoch == 2:
            tuner2.start_epoch(2)
        opt2.zero_grad()
        F.cross_entropy(model2(x), y).backward()
        before = {n: opt2.state[p]["momentum_buffer"].clone() for n, p in tuner2.named_parameters(trained_only=True)
                  if p in opt2.state}  # fmt: skip
        grads = {n: p.grad.clone() for n, p in tuner2.named_parameters(trained_only=True)}
        opt2.step()
        if epoch == 2:
            assert before and set(before) == set(grads)
            for n, p in tuner2.named_parameters(trained_only=True):
                assert torch.allclose(opt2.state[p]["momentum_buffer"], mu * before[n] + grads[n]), n


def test_groups_of_ones_own_join_the_tuners_with_names(batches, bare_profile):
    """The documented rule: own groups beside the tuner's need "param_names" too (PyTorch's all-or-none)."""
    model = build()
    tuner = trady.Tuner(model, batches[0][0][:1], budget="20%", profile=bare_profile)
    extra = torch.zeros(3, requires_grad=True)
    optimizer = torch.optim.SGD(tuner.start_epoch(1) + [{"params": [extra], "param_names": ["extra"]}], lr=0.1)
    assert optimizer.param_groups[-1]["param_names"] == ["extra"]
    plain = [{k: v for k, v in g.items() if k != "param_names"} for g in tuner.param_groups()]
    torch.optim.SGD(plain + [{"params": [extra]}], lr=0.1)
