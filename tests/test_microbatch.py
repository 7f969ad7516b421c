"""Micro-batches: one accumulated step equals the full-batch step (frozen BatchNorm, no dropout)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import fp32_sum_tolerance
from trady.config import FinetuneConfig
from trady.core.errors import TradyError
from trady.engine import SparseEngine
from trady.train.microbatch import accumulate_gradients

# Longest fp32 reductions on the paths below: forward, the 9x9 average pool (81 terms); backward, a weight
# or bias gradient summed over the batch's positions (10 samples x 9 x 9 = 810 terms). Micro-batches add the
# same terms in another order (and other kernels may be picked for another batch size).
FORWARD_TERMS, GRADIENT_TERMS = 81, 10 * 9 * 9


def _model() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    )  # fmt: skip
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _forward_loss(model):
    def f(x, y):
        logits = model(x)
        return logits, F.cross_entropy(logits, y)

    return f


def _batch(n: int = 10):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 9, 9, generator=g), torch.randint(0, 5, (n,), generator=g)


@pytest.mark.parametrize("micro", [1, 3, 4, 10, 64])
def test_full_finetuning_accumulated_gradients_equal_the_full_batch(micro):
    x, y = _batch()
    ref, acc = _model(), _model()
    logits_ref = ref(x)
    loss_ref = F.cross_entropy(logits_ref, y)
    loss_ref.backward()
    logits, loss = accumulate_gradients(_forward_loss(acc), x, y, micro)
    loss_ref, logits_ref = loss_ref.detach(), logits_ref.detach()
    torch.testing.assert_close(loss, loss_ref, **fp32_sum_tolerance(loss_ref, FORWARD_TERMS))
    torch.testing.assert_close(logits, logits_ref, **fp32_sum_tolerance(logits_ref, FORWARD_TERMS))
    for (name, p), q in zip(ref.named_parameters(), acc.parameters()):
        torch.testing.assert_close(q.grad, p.grad, **fp32_sum_tolerance(p.grad, GRADIENT_TERMS), msg=name)


@pytest.mark.parametrize("micro", [2, 3])
def test_engine_accumulated_slice_gradients_equal_the_full_batch(micro):
    x, y = _batch()
    selection = {"0": [0, 2], "3": [1, 5, 7], "6": [0, 3, 4]}
    engines = []
    for _ in range(2):
        m = _model()
        e = SparseEngine(m, x[:1])
        e.select(selection)
        engines.append((m, e))
    (m_ref, e_ref), (m_acc, e_acc) = engines
    F.cross_entropy(m_ref(x), y).backward()
    accumulate_gradients(_forward_loss(m_acc), x, y, micro)
    for p, q in zip(e_ref.parameters(), e_acc.parameters()):
        assert q.grad is not None
        torch.testing.assert_close(q.grad, p.grad, **fp32_sum_tolerance(p.grad, GRADIENT_TERMS))
    # and the engine's full-batch slice gradients are those of dense autograd (the engine's own check)
    dense = copy.deepcopy(_model())
    F.cross_entropy(dense(x), y).backward()
    expected = dense[0].weight.grad[:, [0, 2]]
    got = e_ref.slice_parameters()[0].grad
    torch.testing.assert_close(got, expected, **fp32_sum_tolerance(expected, GRADIENT_TERMS))


def test_micro_batch_size_must_be_positive():
    with pytest.raises(TradyError, match="micro_batch_size"):
        FinetuneConfig(micro_batch_size=0).validate()
    with pytest.raises(TradyError, match="micro_batch_size"):
        accumulate_gradients(_forward_loss(_model()), *_batch(), 0)


@pytest.mark.parametrize("strategy", ["trady", "full"])
def test_a_finetune_in_micro_batches_trains_the_same_weights_and_reports_its_peak(tmp_path, strategy):
    from helpers import tiny_config, weights, write_profile
    from trady.train.loop import finetune

    profile = write_profile(tmp_path / "profile.json")
    runs = {}
    for micro in (None, 4):
        out = tmp_path / f"{strategy}-{micro}"
        # One step (16 images, batch 16): equal to fp32 rounding. Over several steps two fp32 trajectories
        # may part where an activation sits on a ReLU6 boundary (the int8-derived weights make ties common).
        # control_allocator: the resident size follows the live tensors, so the step's peak shows (with glibc's
        # defaults a step can reuse freed heap blocks and read 0, depending on what ran before in the process)
        config = tiny_config(profile, strategy, epochs=1, train_size=16, micro_batch_size=micro, out=str(out),
                             control_allocator=True)  # fmt: skip
        summary = finetune(config)
        assert summary["micro_batch_size"] == micro
        assert summary["peak_memory_bytes"] > 0 and "VmHWM" in summary["peak_memory_measure"]
        assert "returning freed blocks" in summary["peak_memory_measure"]
        runs[micro] = weights(out)
    for name, w in runs[None].items():
        # w - lr * g: the gradients differ by fp32 rounding over 16 samples x 16 x 16 positions (the first
        # layer's output at 32 px), the weights by lr times that, well inside this bound at the weights' scale
        torch.testing.assert_close(runs[4][name], w, **fp32_sum_tolerance(w, 16 * 16 * 16), msg=name)


def test_a_full_gradient_strategy_says_its_pass_is_outside_the_micro_batched_measured_step(tmp_path):
    from helpers import tiny_config, write_profile
    from trady.train.setup import setup

    profile = write_profile(tmp_path / "profile.json")
    notes = setup(tiny_config(profile, "d-det-rgn", micro_batch_size=4)).notes
    assert any("full-gradient pass" in n and "not micro-batched" in n and "batches of 16" in n for n in notes)
    assert not any("full-gradient pass" in n for n in setup(tiny_config(profile, "trady", micro_batch_size=4)).notes)
