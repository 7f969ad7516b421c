"""Issue 19, item 8: output for people. docs/outputs.md lists every key that a tiny run (summary.json,
metrics.jsonl) and both benches (`trady bench memory`, `trady bench engine`, JSON) write; no kineto
"USDT" lines; the bench's progress in human units; the rank bar without a rate; report headings true
to the seeds shown; one bar where the three sparsities agree; one name per quantity in tables."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import cli, tiny_config, write_profile
from test_report import write_run
from trady.experiments.bench import memory_bench
from trady.experiments.report import build_report
from trady.experiments.report.plots import SPARSITY_METRICS, sparsity_series
from trady.train import loop as train

DOC = (Path(__file__).resolve().parents[1] / "docs" / "outputs.md").read_text()
# values that are maps (keyed by layer, dtype or variant), not records: their keys are data
MAPS = {"selection", "engine_saved_by_dtype", "step_samples_s", "step_cpu_samples_s", "cuda_peak_delta_bytes",
        "timeline"}  # fmt: skip
VARIANTS = memory_bench.MEMORY_VARIANTS


def section(title: str) -> str:
    parts = re.split(r"^## ", DOC, flags=re.M)
    return next(p for p in parts if p.startswith(title))


def listed(text: str) -> set[str]:
    names = set(re.findall(r"`([^`]+)`", text))
    for n in list(names):
        if "<v>" in n:
            names |= {n.replace("<v>", v) for v in VARIANTS}
    return names


def keys(d: dict) -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(k)
        if isinstance(v, dict) and k not in MAPS:
            out |= keys(v)
    return out


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("outputs")
    out = tmp / "run"
    train.finetune(tiny_config(write_profile(tmp / "p.json"), epochs=1, resample_every=2, out=str(out)))
    return out


def test_every_run_folder_key_is_documented(run_folder):
    summary = json.loads((run_folder / "summary.json").read_text())
    assert keys(summary) - listed(section("Run folder: `summary.json`")) == set()
    rows = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
    assert set().union(*map(keys, rows)) - listed(section("Run folder: `metrics.jsonl`")) == set()


def test_every_bench_key_is_documented_and_progress_is_readable(tmp_path, monkeypatch, capsys):
    # the children run in this process (the keys are the same; fresh processes cost seconds each); --quick
    # asks for the forking parent, which is this fake here (tests/test_user_model_memory.py runs the real one)
    class InProcess:
        started = []

        def __init__(self, config):
            InProcess.started.append(config.fork)

        def measure(self, config, variant):
            return memory_bench.measure_variant(config, variant)

        def close(self):
            pass

    monkeypatch.setattr(memory_bench, "Zygote", InProcess)
    small = ["--model", "mbv2-w0.35", "--resolution", "32", "--batch-size", "2", "--no-pretrained", "--threads", "1"]
    assert cli(["bench", "memory", *small, "--quick", "--out", tmp_path / "m.json"]) == 0
    captured = capsys.readouterr()
    progress = [line for line in captured.err.splitlines() if line.startswith("round ")]
    assert len(progress) == len(VARIANTS) and all(re.search(r"measured step peak [\d.]+ [KMG]?i?B$", p)
                                                  for p in progress), progress  # fmt: skip
    assert "bytes" not in captured.err and "measured step peak, MiB" in captured.out
    assert "saved" not in captured.out
    assert InProcess.started == [True]
    memory = json.loads((tmp_path / "m.json").read_text())
    assert memory["setup"]["repeats"] == 1 and memory["setup"]["steps"] == 1 and memory["setup"]["fork"]
    assert keys(memory) - listed(section("`trady bench memory")) == set()
    assert memory["ratios"] and all(memory_bench.RATIO_LABELS[k] in captured.out for k in memory["ratios"])
    assert cli(["bench", "engine", *small, "--rounds", "1", "--warmup", "0", "--out", tmp_path / "e.json"]) == 0
    table = capsys.readouterr().out
    assert "kept for backward" in table and "saved" not in table
    engine = json.loads((tmp_path / "e.json").read_text())
    assert keys(engine) - listed(section("`trady bench engine")) == set()


def test_the_profiler_prints_no_usdt_lines():
    code = (
        "import torch; from trady.memory.timeline import profile_step\n"
        "m = torch.nn.Linear(4, 2)\n"
        "profile_step(m, lambda: m(torch.randn(3, 4)).sum())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "USDT" not in proc.stderr + proc.stdout


def test_rank_progress_shows_steps_not_a_rate(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert cli(["rank", "--model", "tests/user_model.py:build", "--resolution", "8", "--epochs", "1",
                "--train-size", "32", "--batch-size", "16", "--out", out]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "step 2/2" in err and "step/s" not in err and "it/s" not in err


def test_report_headings_are_true_to_the_seeds(tmp_path):
    one = tmp_path / "one"
    write_run(one, "trady", 27946, 0, 0.8)
    write_run(one, "full", None, 0, 0.9)
    build_report(one, plots=False, out_dir=tmp_path / "rep")
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "1 seed" in text and "mean ± std" not in text and "means over seeds" not in text
    assert "kept for backward" in text and "saved bytes" not in text
    three = tmp_path / "three"
    for seed in range(3):
        write_run(three, "trady", 27946, seed, 0.8 + seed / 100)
    build_report(three, plots=False, out_dir=tmp_path / "rep3")
    assert "mean ± std over 3 seeds" in (tmp_path / "rep3" / "report.md").read_text()


def test_sparsity_plot_shows_one_bar_where_the_three_agree():
    alike = [{"activation_sparsity": 0.9, "weight_sparsity": 0.9, "flops_reduction": 0.9}]
    differ = [{"activation_sparsity": 0.9, "weight_sparsity": 0.85, "flops_reduction": 0.88}]
    assert len(sparsity_series(alike)) == 1
    assert sparsity_series(differ) == SPARSITY_METRICS
