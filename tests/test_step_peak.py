"""`trady.memory.measure_step_peak`: the measured step peak of the user's own step, as the bench takes it.

A step that allocates a tensor of known size peaks at least at that size; on a small conv net with the
allocator controlled, full fine-tuning's step peaks above the head-only step, which peaks at or above
nothing kept; the same in a fresh process (spawned, started with ALLOCATOR_ENV)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trady.core.errors import TradyError
from trady.memory import measure_step_peak, measure_step_peak_fresh
from trady.memory.resident_peak import cpu_peak_supported

pytestmark = pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs")

SIZE = 48 * 2**20  # bytes of the tensor the step allocates and touches
# The kernel folds each thread's resident-page count into the process's in batches (up to 64 pages per
# thread at a time), so VmHWM may lag the true high-water mark by that much: a few hundred KiB.
RSS_SLACK = 1 * 2**20
# full fine-tuning keeps the three ReLU outputs (each the next layer's input) for backward
KEPT = 3 * 16 * 32 * 48 * 48 * 4


def _touch_big() -> None:
    t = torch.ones(SIZE // 4)  # written: every page resident
    assert float(t[-1]) == 1.0


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip


def _steps(head_only: bool):
    model = _small_net()
    for name, p in model.named_parameters():
        p.requires_grad_(not head_only or name.startswith("8."))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    x, y = torch.randn(16, 3, 48, 48), torch.randint(0, 10, (16,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    def inference():
        with torch.no_grad():
            model(x)

    return step, inference


def make_full():
    """For the fresh process: module level, so that spawn finds it by name."""
    return _steps(head_only=False)


def test_a_known_allocation_is_in_the_peak():
    result = measure_step_peak(_touch_big, steps=2)
    assert result.step_peak_bytes >= SIZE - RSS_SLACK
    assert result.inference_peak_bytes is None and len(result.step_samples) == 2


def test_full_fine_tuning_peaks_above_head_only_with_the_allocator_controlled():
    torch.set_num_threads(1)
    full = measure_step_peak(*_steps(head_only=False))
    head = measure_step_peak(*_steps(head_only=True))
    assert full.step_peak_bytes >= KEPT - RSS_SLACK
    assert full.step_peak_bytes > head.step_peak_bytes
    assert head.step_peak_bytes >= 0 and full.inference_peak_bytes > 0
    assert "glibc returning freed blocks" in full.measure


def test_fresh_process():
    result = measure_step_peak_fresh(make_full, steps=1)
    assert result.fresh_process and result.step_peak_bytes >= KEPT - RSS_SLACK
    assert result.inference_peak_bytes > 0


def test_bad_input_is_one_line():
    with pytest.raises(TradyError, match="steps must be a whole number >= 1, got 0"):
        measure_step_peak(_touch_big, steps=0)
    with pytest.raises(TradyError, match="must be callables"):
        measure_step_peak(None)
