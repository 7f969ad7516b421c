"""The measured peak is real (trady.memory.resident_peak.PeakMeter), and the memory bench reports its interface."""

from __future__ import annotations

import pytest
import torch

from trady.memory.resident_peak import PeakMeter, cpu_peak_supported

pytestmark = pytest.mark.skipif(not cpu_peak_supported(), reason="needs Linux /proc/self/clear_refs")

MIB = 2**20


def test_a_tensor_allocated_inside_the_region_raises_the_peak_by_its_size():
    # control_allocator: the heap's free pages are given back first and blocks of 64 KiB or more are
    # fresh mappings, so nothing is reused unseen; torch.ones touches every page: the resident size
    # must rise by the tensor's size, whatever ran in this process before.
    size = 64 * MIB
    with PeakMeter("cpu", control_allocator=True) as empty:
        pass
    with PeakMeter("cpu", control_allocator=True) as meter:
        t = torch.ones(size // 4, dtype=torch.float32)
        del t  # freed inside the region: the high-water mark keeps it
    assert empty.peak_bytes < 4 * MIB
    # The kernel batches per-thread resident-page counts (up to 64 pages per thread in flight): the
    # figure is exact to a few hundred KiB.
    assert 0.98 * size <= meter.peak_bytes < size + 4 * MIB


def test_the_peak_is_of_the_region_not_of_what_lived_before_it():
    keep = torch.ones(32 * MIB // 4)  # resident before the region: not part of its peak
    with PeakMeter("cpu", control_allocator=True) as meter:
        t = torch.zeros(16 * MIB // 4)
        t += 1
    assert 0.96 * 16 * MIB <= meter.peak_bytes < 20 * MIB
    del keep, t


def test_memory_bench_keys_and_engine_below_full(tmp_path):
    from trady.experiments.bench.memory_bench import MemoryBenchConfig, bench_memory

    cfg = MemoryBenchConfig(
        model="mbv2-w0.35", resolution=64, batch_size=4, budget="5%", repeats=1, steps=1, pretrained=False
    )
    r = bench_memory(cfg)
    for key in (
        "inference_peak_bytes", "engine_peak_bytes", "freeze_peak_bytes", "full_peak_bytes",
        "engine_saved_bytes", "predicted_engine_peak_bytes",
    ):  # fmt: skip
        assert isinstance(r[key], int) and r[key] > 0, key
    assert r["engine_budgeted_bytes"] == r["analytic_budgeted_bytes"]
    assert r["engine_peak_bytes"] < r["full_peak_bytes"]
    assert r["setup"]["allocator_env"] is True


def test_predicted_step_peak_parts_and_micro_batches():
    from trady.train.prediction import predict_step_peak

    whole = predict_step_peak("mbv2-w0.35", 64, "5%", 8)
    micro = predict_step_peak("mbv2-w0.35", 64, "5%", 8, micro_batch_size=2)
    parts = ("budgeted_bytes", "kept_rest_bytes", "gradient_bytes")
    for p in (whole, micro):
        floor = max(p["inference_working_set_bytes"], p["backward_transient_bytes"])
        assert p["predicted_step_peak_bytes"] == floor + sum(p[k] for k in parts)
        assert 1.0 < p["step_time_floor_forwards"] <= 2.0
    assert micro["forward_batch"] == 2
    assert micro["inference_working_set_bytes"] < whole["inference_working_set_bytes"]
    assert micro["predicted_step_peak_bytes"] < whole["predicted_step_peak_bytes"]


def test_time_floor_is_one_plus_the_forward_flops_share_from_the_lowest_selected_layer():
    from torch import nn

    from trady.engine.costs import analyze
    from trady.train.prediction import time_floor

    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    costs = analyze(model, (1, 3, 8, 8))
    macs = [3 * 4 * 9 * 64, 4 * 4 * 64]  # forward multiply-adds of the two convs (the head is outside)
    share, floor = time_floor(costs, costs.names[1])
    assert share == pytest.approx(macs[1] / sum(macs))
    assert floor == pytest.approx(1 + macs[1] / sum(macs))
    assert time_floor(costs, None) == (0.0, 1.0)


def test_the_summary_says_under_which_allocator_setting_the_cpu_peak_was_taken():
    from trady.memory.resident_peak import peak_measure

    assert "returning freed blocks" in peak_measure("cpu", True)
    assert "can read low" in peak_measure("cpu", False)
    assert peak_measure("cuda", False) == peak_measure("cuda", True)
    assert "max_memory_allocated" in peak_measure("cuda", False)
