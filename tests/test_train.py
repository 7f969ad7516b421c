"""The fine-tuning loop: run-folder contract, determinism, and that measuring the first step of each
epoch (saved-tensor hooks) leaves the numerics untouched (tiny runs: see helpers.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import assert_same_weights, cli, metrics, reference_run, run_args, shared_profile, tiny_config, weights
from trady.config import FinetuneConfig
from trady.core.files import read_jsonl
from trady.train import loop as train


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    return shared_profile(tmp_path_factory)


def test_run_folder_contract(tmp_path_factory, profile):
    out = reference_run(tmp_path_factory, run_args(profile, "trady", epochs=2))
    assert sorted(p.name for p in out.iterdir()) == [
        ".trady.lock", "checkpoint.prev.pt", "checkpoint.pt", "checkpoint.sha256", "config.json", "metrics.jsonl",
        "summary.json",
    ]  # fmt: skip
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "selected_channels", "selected_units",
                "activation_sparsity", "weight_sparsity", "flops_reduction", "epoch_time_s"):  # fmt: skip
        assert key in rows[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["epochs_done"] == 2 and summary["error"] is None
    assert FinetuneConfig.load(out / "config.json").strategy == "trady"
    state = train.load_checkpoint(out / train.CHECKPOINT)  # weights_only=True
    assert state["epoch"] == 2 and state["schedule"]["step"] == 8 and len(state["metrics"]) == 2
    assert {"torch", "python", "numpy"} <= set(state["rng"])


def test_same_seed_same_selections_and_metrics(tmp_path, tmp_path_factory, profile, one_thread):
    """Determinism: the same seed gives the same selections, metrics and weights on the same machine."""
    args = run_args(profile, "medyate", epochs=2)
    first = reference_run(tmp_path_factory, args)
    assert cli(["finetune", *args, "--out", tmp_path / "again"]) == 0
    assert metrics(first) == metrics(tmp_path / "again")
    assert_same_weights(weights(first), weights(tmp_path / "again"))

    def selections(seed: int) -> list[dict]:
        run = train.setup(tiny_config(profile, seed=seed))
        return [{k: v.tolist() for k, v in train.choose_selection(run, e).items()} for e in (1, 2, 3)]

    first = selections(3)
    assert first == selections(3)
    assert first[0] != first[1]  # trady redraws every epoch ...
    assert first != selections(4)  # ... from (seed, epoch)


@pytest.mark.parametrize("strategy", ["trady", "full"])
def test_measuring_the_first_step_does_not_change_numerics(profile, strategy, one_thread):
    """The first step of each epoch runs under saved-tensor hooks (memory measurement): same numbers."""
    results = []
    for measure in (True, False):
        run = train.setup(tiny_config(profile, strategy, epochs=2, measure_memory=measure))
        losses = []
        for epoch in (1, 2):
            if run.mode == "sparse":
                train.choose_selection(run, epoch)
            optimizer = run.optimizer or train.make_optimizer(run)
            stats = train.train_epoch(run, epoch, optimizer, measure=measure)
            losses.append((stats["train_loss"], stats["train_acc"]))
            assert ("measured_saved_bytes" in stats) == measure
        results.append((losses, {k: v.clone() for k, v in run.model.state_dict().items()}))
    assert results[0][0] == results[1][0]
    assert_same_weights(results[0][1], results[1][1])


def test_threads_are_restored(profile):
    before = torch.get_num_threads()
    train.finetune(tiny_config(profile, "classifier", epochs=1, budget=None, threads=1))
    assert torch.get_num_threads() == before
