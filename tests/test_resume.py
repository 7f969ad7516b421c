"""Resuming: a run killed at any moment and resumed ends with exactly the metrics (timing aside) and
weights of an uninterrupted run with the same seed.

The main test kills a real `python -m trady finetune` process with SIGKILL during its second epoch,
right after a known optimizer step (the process kills itself from the public global step hook, so the
point does not depend on the machine's speed);
the others cut a run after its first checkpoint in-process (the folder a kill leaves, plus the
temporary file of an interrupted atomic write) to cover the other kinds of state cheaply."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import (
    STEPS_PER_EPOCH,
    assert_same_weights,
    cli,
    metrics,
    reference_run,
    run_args,
    shared_profile,
    trady_command_killed_after_step,
    weights,
)
from trady.core.files import read_jsonl, write_jsonl
from trady.train import checkpoint
from trady.train import loop as train


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    return shared_profile(tmp_path_factory)


@pytest.mark.parametrize("strategy", ["trady", "medyate"])
def test_kill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path, tmp_path_factory, profile, strategy):
    args = run_args(profile, strategy, epochs=2)
    ref = reference_run(tmp_path_factory, args)  # uninterrupted, same seed (shared with test_train)

    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    kill_after = STEPS_PER_EPOCH + 2  # the second step of epoch 2: after the first checkpoint, mid-epoch
    command = [*trady_command_killed_after_step(kill_after), "finetune", *args, "--out", str(killed)]
    with open(tmp_path / "log.txt", "wb") as log:
        proc = subprocess.run(command, stdout=log, stderr=log, env=env, timeout=600)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists()  # it never finished
    assert train.load_checkpoint(killed / train.CHECKPOINT)["epoch"] == 1  # killed during epoch 2

    assert cli(["finetune", "--resume", killed, "--no-progress"]) == 0
    assert metrics(killed) == metrics(ref)
    assert_same_weights(weights(killed), weights(ref))
    a, b = (json.loads((d / "summary.json").read_text()) for d in (ref, killed))
    for key in ("test_acc", "best_test_acc", "activation_sparsity", "epochs_done", "status"):
        assert a[key] == b[key]


def _run_keeping_epoch1(monkeypatch, args: list, ref: Path) -> None:
    """`trady finetune *args --out ref`, keeping a copy of the epoch-1 checkpoint as ref/epoch1.pt."""
    real_save = train.save_checkpoint

    def save_and_keep_epoch1(folder, state):
        real_save(folder, state)
        if state["epoch"] == 1:
            torch.save(state, Path(folder) / "epoch1.pt")

    monkeypatch.setattr(train, "save_checkpoint", save_and_keep_epoch1)
    assert cli(["finetune", *args, "--out", ref]) == 0
    monkeypatch.setattr(train, "save_checkpoint", real_save)


def _cut_after_first_epoch(ref: Path, folder: Path) -> None:
    """The folder a run killed during epoch 2 leaves: config, the epoch-1 checkpoint, metrics of epoch 1,
    and a half-written temporary checkpoint of the atomic write."""
    folder.mkdir()
    shutil.copy(ref / "config.json", folder / "config.json")
    shutil.copy(ref / "epoch1.pt", folder / train.CHECKPOINT)
    write_jsonl(folder / "metrics.jsonl", read_jsonl(ref / "metrics.jsonl")[:1])
    (folder / f".{train.CHECKPOINT}.x1y2.tmp").write_bytes(b"PK\x03\x04 half a checkpoint")


@pytest.mark.parametrize(
    "strategy,extra",
    [
        ("s-topk-random", ()),  # static selection chosen at epoch 1
        ("full", ("--momentum", "0.9")),  # optimizer state (momentum buffers) of the whole model
        ("bias", ("--momentum", "0.9", "--weight-decay", "0.001")),  # engine + persistent optimizer
    ],
)
def test_resume_restores_strategy_and_optimizer_state(tmp_path, profile, monkeypatch, strategy, extra):
    budget = "5%" if strategy == "s-topk-random" else None
    args = run_args(profile, strategy, epochs=2, budget=budget, extra=extra)
    ref = tmp_path / "ref"
    _run_keeping_epoch1(monkeypatch, args, ref)
    state = torch.load(ref / "epoch1.pt", weights_only=True)
    if strategy == "s-topk-random":
        assert state["strategy"]["selection"]
    else:
        assert state["optimizer"]["state"]  # momentum buffers are in the checkpoint

    cut = tmp_path / "cut"
    _cut_after_first_epoch(ref, cut)
    assert cli(["finetune", "--resume", cut, "--no-progress"]) == 0
    assert metrics(cut) == metrics(ref)
    assert_same_weights(weights(cut), weights(ref))
    assert not list(cut.glob(".*.tmp"))  # the interrupted write's leftover is gone


def test_resume_of_a_finished_run_changes_nothing(tmp_path, tmp_path_factory, profile):
    out = shutil.copytree(reference_run(tmp_path_factory, run_args(profile, "classifier", epochs=1, budget=None)),
                          tmp_path / "run")  # fmt: skip
    before = (metrics(out), weights(out))
    assert cli(["finetune", "--resume", out, "--no-progress"]) == 0
    assert metrics(out) == before[0]
    assert_same_weights(weights(out), before[1])
    assert json.loads((out / "summary.json").read_text())["status"] == "ok"


def test_rng_states_round_trip_through_a_weights_only_checkpoint():
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    buffer = io.BytesIO()
    torch.save(checkpoint.rng_state(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    draws = (torch.rand(3), random.random(), float(np.random.rand()))
    torch.manual_seed(2), random.seed(2), np.random.seed(2)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(3), draws[0])
    assert random.random() == draws[1] and float(np.random.rand()) == draws[2]


def test_resume_without_a_checkpoint_starts_from_the_first_epoch(tmp_path, tmp_path_factory, profile):
    """Killed during the first epoch: config.json (and perhaps a half-written temporary file) only."""
    args = run_args(profile, "classifier", epochs=1, budget=None)
    ref = reference_run(tmp_path_factory, args)
    folder = tmp_path / "run"
    folder.mkdir()
    shutil.copy(ref / "config.json", folder / "config.json")
    (folder / f".{train.CHECKPOINT}.a1b2.tmp").write_bytes(b"PK")
    assert cli(["finetune", "--resume", folder, "--no-progress"]) == 0
    assert metrics(folder) == metrics(ref)
    assert_same_weights(weights(folder), weights(ref))
    assert sorted(p.name for p in folder.iterdir()) == [
        ".trady.lock", "checkpoint.pt", "checkpoint.sha256", "config.json", "metrics.jsonl", "summary.json"
    ]  # fmt: skip


def test_resumed_summary_peak_covers_the_epochs_before_the_resume(tmp_path, profile, monkeypatch):
    """peak_memory_bytes is each epoch's row (kept by the checkpoint); the summary's is the highest row,
    so a resumed run's summary covers the epochs measured by the killed process too."""
    args = run_args(profile, "classifier", epochs=2, budget=None)
    ref = tmp_path / "ref"
    _run_keeping_epoch1(monkeypatch, args, ref)
    rows = read_jsonl(ref / "metrics.jsonl")
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in rows)
    # the killed process's epoch 1 peaked far above anything this process measures
    state = torch.load(ref / "epoch1.pt", weights_only=True)
    pre_resume_peak = 2**50
    state["metrics"][0]["peak_memory_bytes"] = pre_resume_peak
    torch.save(state, ref / "epoch1.pt")
    cut = tmp_path / "cut"
    _cut_after_first_epoch(ref, cut)
    assert cli(["finetune", "--resume", cut, "--no-progress"]) == 0
    resumed = read_jsonl(cut / "metrics.jsonl")
    assert resumed[0]["peak_memory_bytes"] == pre_resume_peak
    assert resumed[1]["peak_memory_bytes"] is not None and resumed[1]["peak_memory_bytes"] < pre_resume_peak
    assert json.loads((cut / "summary.json").read_text())["peak_memory_bytes"] == pre_resume_peak
