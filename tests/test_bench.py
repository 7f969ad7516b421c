"""trady.experiments.bench.engine_bench on a tiny model: keys, measured == analytic, real savings; CLI wiring."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from torch import nn

from trady.core.errors import TradyError
from trady.engine.costs import analyze, parse_budget
from trady.experiments.bench import engine_bench as bench

REQUIRED_KEYS = [
    "full_saved_bytes",
    "simulation_saved_bytes",
    "engine_saved_bytes",
    "engine_budgeted_bytes",
    "analytic_budgeted_bytes",
    "full_step_s",
    "simulation_step_s",
    "engine_step_s",
    "forward_step_s",
]


def _tiny() -> nn.Module:
    """conv-BN-ReLU6 stem, an inverted-residual-like body, global pooling and a Linear classifier."""
    torch.manual_seed(0)

    def cbr(cin, cout, k=1, stride=1, groups=1):
        return nn.Sequential(
            nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), nn.ReLU6()
        )

    model = nn.Sequential(
        cbr(3, 8, 3, 2),
        cbr(8, 16),
        cbr(16, 16, 3, 1, groups=16),
        nn.Sequential(nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12)),
        cbr(12, 24),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 5),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model


def test_bench_engine_on_a_tiny_model() -> None:
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = bench.bench_engine(model, resolution=16, batch_size=4, budget="30%", layers="top-fraction", rounds=2, warmup=1)
    for key in REQUIRED_KEYS:
        assert key in r, key
        assert r[key] > 0, key
    assert r["engine_budgeted_bytes"] == r["analytic_budgeted_bytes"]
    assert r["engine_saved_bytes"] < r["full_saved_bytes"]
    assert r["simulation_saved_bytes"] == r["full_saved_bytes"]  # the simulation keeps what full FT keeps
    assert r["engine_grad_bytes"] < r["simulation_grad_bytes"] == r["full_grad_bytes"]
    assert "targets" not in r  # issue targets live beside the benchmarks (benchmarks/*/targets.json), not in trady
    assert r["ratios"]["full_over_engine_saved_bytes"] == r["full_saved_bytes"] / r["engine_saved_bytes"]
    assert all(len(v) == 2 for v in r["step_samples_s"].values())
    # the selection: within budget, from the top half of the layers only
    costs = analyze(model, (1, 3, 16, 16))
    sel = {k: torch.tensor(v) for k, v in r["selection"].items()}
    assert 0 < costs.selection_units(sel) <= parse_budget("30%", costs) == r["setup"]["budget_units"]
    assert set(sel) <= set(bench.top_layers(costs, 0.5))
    assert r["cuda_peak_delta_bytes"] is None
    json.dumps(r)  # JSON-ready
    assert "engine" in bench.format_engine_bench(r)
    # the model itself is untouched (everything ran on copies)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(type(m).__module__.startswith("torch.nn") for m in model.modules())


def test_random_selection_fills_the_budget_and_skips_what_does_not_fit() -> None:
    costs = analyze(_tiny(), (1, 3, 16, 16))
    names = costs.names
    budget = parse_budget("10%", costs)
    sel = bench.random_selection(costs, names, budget, torch.Generator().manual_seed(1))
    used = costs.selection_units(sel)
    assert 0 < used <= budget
    # full: no channel left outside the selection would still fit
    left = budget - used
    for name in names:
        unit = costs.by_name[name].space_units_per_channel
        free = costs.by_name[name].in_channels - len(sel.get(name, []))
        assert free == 0 or unit > left, name
    again = bench.random_selection(costs, names, budget, torch.Generator().manual_seed(1))
    assert {k: v.tolist() for k, v in sel.items()} == {k: v.tolist() for k, v in again.items()}
    with pytest.raises(TradyError, match="fits no channel"):
        bench.random_selection(costs, names, 1, torch.Generator())


def test_simulation_masks_keep_exactly_the_selected_input_channels() -> None:
    model = _tiny()
    costs = analyze(model, (1, 3, 16, 16))
    selection = {"1.0": torch.tensor([0, 5]), "2.0": torch.tensor([3, 7, 15])}  # 1x1 conv, depthwise
    masks = {id(p): m for p, m in bench.simulation_masks(model, costs, selection)}
    w1, w2 = model[1][0].weight, model[2][0].weight
    full1 = torch.ones_like(w1) * masks[id(w1)]
    assert full1[:, [0, 5]].eq(1).all() and full1.sum() == 2 * w1.shape[0]
    full2 = torch.ones_like(w2) * masks[id(w2)]
    assert full2[[3, 7, 15]].eq(1).all() and full2.sum() == 3 * 9
    assert masks[id(model[4][0].weight)] is None  # frozen layer: zeroed
    assert id(model[7].weight) not in masks  # the classifier trains in full


def test_candidate_layers() -> None:
    costs = analyze(_tiny(), (1, 3, 16, 16))
    assert bench.candidate_layers(costs, "all")[0] == costs.names
    names, source = bench.candidate_layers(costs, "auto", model_name=None, top_fraction=0.25)
    assert names == costs.names[-2:] and "top 25%" in source
    with pytest.raises(TradyError):
        bench.candidate_layers(costs, "profile", model_name=None)
    with pytest.raises(TradyError):
        bench.candidate_layers(costs, "bottom")


def test_cli_engine_parser(tmp_path, monkeypatch, capsys) -> None:
    from trady.cli import bench as bench_cli

    parser = argparse.ArgumentParser()
    bench_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "engine", "--model", "m", "--budget", "5.3%", "--json", "--threads", "1"])
    assert args.func is bench_cli.run and args.budget == "5.3%" and args.batch_size == 32 and args.resolution == 128

    seen = {}

    def fake_run(config, model=None):
        seen["config"] = config
        return {"environment": {}, "model": config.model}

    monkeypatch.setattr(bench, "run_engine_bench", fake_run)
    out = tmp_path / "r.json"
    args = parser.parse_args(["bench", "engine", "--model", "m", "--rounds", "3", "--json", "--out", str(out)])
    assert args.func(args) == 0
    assert seen["config"].rounds == 3 and seen["config"].model == "m"
    assert json.loads(capsys.readouterr().out)["model"] == "m"
    assert json.loads(out.read_text())["environment"]["command"].startswith("trady ")


def test_config_validation() -> None:
    with pytest.raises(TradyError):
        bench.EngineBenchConfig(layers="nope").validate()
    with pytest.raises(TradyError):
        bench.EngineBenchConfig(device="tpu").validate()
    with pytest.raises(TradyError):
        bench.EngineBenchConfig(rounds=0).validate()


def test_both_benches_parse_the_same_step_arguments_into_their_configs(monkeypatch) -> None:
    from trady.cli import bench as bench_cli
    from trady.experiments.bench import memory_bench

    parser = argparse.ArgumentParser()
    bench_cli.register(parser.add_subparsers(dest="command"))
    seen = {}

    def fake_engine(config, model=None):
        seen["engine"] = config
        return {"environment": {}}

    def fake_memory(config, progress=None):
        seen["memory"] = config
        return {}

    monkeypatch.setattr(bench, "run_engine_bench", fake_engine)
    monkeypatch.setattr(memory_bench, "bench_memory", fake_memory)
    monkeypatch.setattr(memory_bench, "format_memory_bench", lambda result: "")
    step = ["--model", "m", "--resolution", "64", "--budget", "3%", "--seed", "5", "--no-flush-denormal", "--json"]
    for name in ("engine", "memory"):
        args = parser.parse_args(["bench", name, *step])
        assert args.func(args) == 0
    engine, memory = seen["engine"], seen["memory"]
    assert isinstance(memory, bench.StepBenchConfig) and isinstance(engine, bench.StepBenchConfig)
    for field in ("model", "resolution", "budget", "seed", "flush_denormal", "lr", "mask_bits", "num_classes"):
        assert getattr(engine, field) == getattr(memory, field), field
    assert memory.flush_denormal is False and memory.threads == 1 and engine.threads is None
    with pytest.raises(TradyError, match="micro_batch_size must be a positive integer"):
        memory_bench.MemoryBenchConfig(micro_batch_size=0).validate()
