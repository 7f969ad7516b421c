"""Issue 19, item 2: `trady plan` and `trady bench memory` on the user's own model
(`path/to/file.py:build_fn`, `package.module:build_fn`), the bench's child process building it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import cli
from trady.core.errors import TradyError
from trady.engine.costs import analyze
from trady.experiments.bench import memory_bench
from trady.train.plan import plan
from user_model import build

FILE = str(Path(__file__).with_name("user_model.py")) + ":build"


@pytest.mark.parametrize("name", [FILE, "user_model:build"])
def test_plan_of_a_user_model(name, capsys):
    p = plan(name, resolution=16, budget="10%", batch_size=4)
    table = analyze(build(), (1, 3, 16, 16))
    assert p["model"] == name and p["classifier"] == "head" == table.classifier
    assert p["full_units"] == table.full_units and [lay["name"] for lay in p["layers"]] == table.names
    assert cli(["plan", "--model", name, "--resolution", "16", "--budget", "10%", "--batch-size", "4", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["step_peak"]["model"] == name and printed["step_peak"]["predicted_step_peak_bytes"] > 0


def test_plan_of_an_nn_module():
    p = plan(build(), resolution=16, budget="10%", batch_size=4)
    from_file = plan(FILE, resolution=16, budget="10%", batch_size=4)
    assert p["model"] == "UserNet" and p == {**from_file, "model": "UserNet"}


def test_plan_of_a_user_model_needs_a_resolution():
    with pytest.raises(TradyError, match="is a user model: give its input resolution"):
        plan(FILE)


def test_bench_memory_child_builds_the_user_model():
    config = memory_bench.MemoryBenchConfig(model=FILE, resolution=16, batch_size=4, budget="10%", repeats=1,
                                            steps=1, variants=("inference", "engine"))  # fmt: skip
    inp, source = memory_bench.step_inputs(config)
    assert type(inp.model).__name__ == "UserNet" and inp.costs.names == analyze(build(), (1, 3, 16, 16)).names
    assert source.startswith("top")  # no shipped profile for a user model
    zygote = memory_bench.Zygote(config)  # the --quick parent: each measuring process is forked from it
    try:
        for variant in ("inference", "engine"):  # the forked processes import and run the user's file
            child = zygote.measure(config, variant)
            assert child["variant"] == variant and child["peak_bytes"] is not None and child["allocator_env"]
        assert child["selected_channels"] > 0
        with pytest.raises(TradyError, match="child for 'nope' failed: TradyError: unknown step variant"):
            zygote.measure(config, "nope")
    finally:
        zygote.close()
    assert zygote.proc.returncode == 0
