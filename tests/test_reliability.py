"""Reliability of a run folder (issue 20): one owner (lock), checksummed checkpoints, write failures in one
line with a folder that stays consistent, divergence as a result, and one line for every bad input,
before any training."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (
    MODEL,
    assert_same_weights,
    cli,
    error_line,
    metrics,
    reference_run,
    run_args,
    shared_profile,
    weights,
)  # fmt: skip
from trady.core import files
from trady.core.errors import TradyError
from trady.core.files import read_jsonl
from trady.train import loop as train

LOCK_FILE = ".trady.lock"  # the run folder's files this issue adds (docs/reliability.md)
PREVIOUS = "checkpoint.prev.pt"


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    return shared_profile(tmp_path_factory)


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


# --------------------------------------------------------------------------------------------------
# 2. one process owns a run folder


_HOLD_LOCK = """\
import sys
from trady.core import run_lock
lock = run_lock.acquire(sys.argv[1])
print("locked", flush=True)
sys.stdin.read()  # held until the test closes our stdin
"""


def test_a_second_run_or_resume_into_a_folder_in_use_refuses_naming_the_holder(capsys, tmp_path, profile):
    out = tmp_path / "run"
    assert cli(["finetune", *run_args(profile, "classifier", epochs=1, budget=None), "--out", out]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_FILE}
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"  # no sleep: the child says when it holds the lock
        line = error_line(capsys, ["finetune", *run_args(profile, "classifier", epochs=1, budget=None), "--out", out])
        assert f"is in use by process {holder.pid}" in line and str(out) in line
        line = error_line(capsys, ["finetune", "--resume", out])
        assert f"is in use by process {holder.pid}" in line
        # nothing of the holder's run was touched
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != LOCK_FILE} == before
    finally:
        holder.stdin.close()
        holder.wait()
    assert cli(["finetune", "--resume", out, "--no-progress"]) == 0  # free again once the holder ended


def test_a_stale_lock_of_a_dead_process_is_taken_over_and_said(capsys, tmp_path, profile):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has ended: its flock died with it, its pid stays in the file
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text(f"{pid}\n")
    assert cli(["finetune", *run_args(profile, "classifier", epochs=1, budget=None), "--out", out]) == 0
    err = capsys.readouterr().err
    assert f"took over the lock of {out} left by process {pid}" in err
    assert (out / LOCK_FILE).read_text() == ""  # released: no pid left for the next run


def test_the_lock_dies_with_its_holder_and_separate_folders_never_meet(tmp_path):
    from trady.core import run_lock

    a = run_lock.acquire(tmp_path / "a")
    b = run_lock.acquire(tmp_path / "b")  # a sweep's runs: one folder each
    with pytest.raises(run_lock.RunFolderBusy, match=f"in use by process {os.getpid()}"):
        run_lock.acquire(tmp_path / "a")
    a.release()
    run_lock.acquire(tmp_path / "a").release()
    b.release()


# --------------------------------------------------------------------------------------------------
# 3. checksummed checkpoints, write failures


def test_a_corrupted_checkpoint_is_refused_in_one_line_and_the_previous_is_kept(capsys, tmp_path, profile):
    args = run_args(profile, "trady", epochs=2)
    out = tmp_path / "run"
    assert cli(["finetune", *args, "--out", out]) == 0
    capsys.readouterr()
    assert train.load_checkpoint(out / PREVIOUS)["epoch"] == 1  # the one before the last, kept and verified
    path = out / train.CHECKPOINT
    data = bytearray(path.read_bytes())
    largest = max(weights(out).values(), key=lambda t: t.numel())
    start = bytes(data).find(largest.numpy().tobytes()[:64])  # the largest tensor's record, as the issue's probe
    assert start > 0
    for i in range(start + 100, start + 4000):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    line = error_line(capsys, ["finetune", "--resume", out])
    assert f"checkpoint {path} is corrupted" in line
    assert f"the previous good checkpoint (epoch 1) is kept in {out / PREVIOUS}" in line
    # the previous one resumes: the run ends as the uninterrupted run did
    path.write_bytes((out / PREVIOUS).read_bytes())
    assert cli(["finetune", "--resume", out, "--no-progress"]) == 0
    ref = reference_run_of(tmp_path, args)
    assert metrics(out) == metrics(ref)
    assert_same_weights(weights(out), weights(ref))


def reference_run_of(tmp_path: Path, args: list) -> Path:
    ref = tmp_path / "reference"
    if not (ref / "summary.json").is_file():
        assert cli(["finetune", *args, "--out", ref]) == 0
    return ref


def test_a_full_disk_is_one_line_the_folder_stays_consistent_and_resume_continues(
    capsys, tmp_path, profile, monkeypatch, tmp_path_factory
):
    args = run_args(profile, "trady", epochs=3)
    real = files.atomic_write
    writes = []

    def full_disk(path, write):  # the second checkpoint hits a full disk
        if Path(path).name == train.CHECKPOINT:
            writes.append(path)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, "No space left on device")
        real(path, write)

    monkeypatch.setattr(files, "atomic_write", full_disk)
    out = tmp_path / "run"
    line = error_line(capsys, ["finetune", *args, "--out", out], code=4)
    assert line == f"trady: error: cannot write {out / train.CHECKPOINT}: No space left on device (ENOSPC)"
    monkeypatch.setattr(files, "atomic_write", real)
    # summary and metrics never ahead of the checkpoint
    assert train.load_checkpoint(out / train.CHECKPOINT)["epoch"] == 1
    summary = summary_of(out)
    assert summary["status"] == "failed" and summary["epochs_done"] == 1 and "ENOSPC" in summary["error"]
    assert summary["test_acc"] == read_jsonl(out / "metrics.jsonl")[0]["test_acc"]
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    assert not [p for p in out.iterdir() if p.name.endswith("tmp")]  # no temporary file left
    # --resume continues from the last good epoch and ends as the uninterrupted run
    assert cli(["finetune", "--resume", out, "--no-progress"]) == 0
    ref = reference_run(tmp_path_factory, args)
    assert metrics(out) == metrics(ref)
    assert_same_weights(weights(out), weights(ref))


def test_a_write_failure_of_any_file_names_the_path_and_cause(tmp_path, monkeypatch):
    def denied(path, write):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(files, "atomic_write", denied)
    with pytest.raises(files.WriteFailed) as info:
        files.write_json(tmp_path / "summary.json", {"a": 1})
    assert str(info.value) == f"cannot write {tmp_path / 'summary.json'}: Permission denied (EACCES)"


# --------------------------------------------------------------------------------------------------
# 5. divergence is a result


def test_an_exploding_loss_is_diverged_with_its_epoch_and_keeps_the_checkpoint_before(capsys, tmp_path, profile,
                                                                                          monkeypatch):  # fmt: skip
    real = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, total, warmup, base: 1e6 if step >= total // 2
                        else real(step, total, warmup, base))  # fmt: skip
    out = tmp_path / "run"
    line = error_line(capsys, ["finetune", *run_args(profile, "trady", epochs=2), "--out", out], code=3)
    assert "exploding training loss" in line and "at epoch 2" in line and "first loss" in line
    summary = summary_of(out)
    assert summary["status"] == "diverged" and summary["diverged_epoch"] == 2 and summary["epochs_done"] == 1
    assert train.load_checkpoint(out / train.CHECKPOINT)["epoch"] == 1
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]


def test_the_issues_lr_1e6_run_is_diverged_not_ok(capsys, tmp_path, profile):
    args = run_args(profile, "trady", epochs=2)
    args[args.index("--lr") + 1] = "1e6"
    out = tmp_path / "run"
    line = error_line(capsys, ["finetune", *args, "--out", out], code=3)
    assert "at epoch 1" in line
    summary = summary_of(out)
    assert summary["status"] == "diverged" and summary["diverged_epoch"] == 1


def test_accuracy_at_chance_is_said_in_the_summary_and_printed(capsys, tmp_path, profile):
    # a zero head that barely moves predicts one class for everything: chance on 10 balanced classes
    args = run_args(profile, "classifier", epochs=1, budget=None, extra=("--classifier-init", "zeros"))
    args[args.index("--lr") + 1] = "1e-9"
    out = tmp_path / "run"
    assert cli(["finetune", *args, "--out", out]) == 0  # a warning, not a failure
    assert summary_of(out)["at_chance"] is True
    assert "trady: warning: test accuracy" in capsys.readouterr().err
    assert train.at_chance(0.9, 10, 32) is False and train.at_chance(0.1, 10, 32) is True


# --------------------------------------------------------------------------------------------------
# 4. one line for every bad input, before any training


def one_class_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        folder = root / "one-class" / split / "cat"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root / "one-class"


THREE_CLASS_MODEL = """\
from torch import nn
def build(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
"""


def nan_profile(profile: Path, path: Path) -> Path:
    data = json.loads(profile.read_text())
    data["layers"][2]["rgn"] = float("nan")
    path.write_text(json.dumps(data))  # JSON's NaN, as json.dumps writes it
    return path


def replace_option(args: list, option: str, value: str) -> list:
    args = list(args)
    args[args.index(option) + 1] = value
    return args


# (name, how to change the tiny run's arguments, what the line must contain)
BAD_CLI_INPUTS = [
    ("seed", lambda a, t, p: replace_option(a, "--seed", "-1"), "seed must be an integer in 0..4294967295, got -1"),
    ("momentum", lambda a, t, p: a + ["--momentum", "-1"], "momentum must be in [0, 1), got -1.0"),
    ("weight decay", lambda a, t, p: a + ["--weight-decay", "-1"], "weight_decay must be >= 0, got -1.0"),
    ("strategy option", lambda a, t, p: replace_option(a, "--strategy", "medyate") + ["--strategy-option", "ratio=abc"],
     "option ratio='abc' of strategy 'medyate': accepted a number"),
    ("huge resolution", lambda a, t, p: replace_option(a, "--resolution", "100000"),
     "resolution 100000 needs at least"),
    ("resolution 1", lambda a, t, p: replace_option(a, "--resolution", "1"),
     "resolution 1 is too small; accepted: 8 pixels or more"),
    ("micro-batch", lambda a, t, p: replace_option(a, "--batch-size", "32") + ["--micro-batch", "64"],
     "micro_batch_size 64 is larger than batch_size 32; accepted: 1..32"),
    ("threads", lambda a, t, p: replace_option(a, "--threads", "0"), "threads must be >= 1"),
    ("warm-up", lambda a, t, p: replace_option(a, "--epochs", "1") + ["--warmup-epochs", "5"],
     "warmup_epochs 5 is more than epochs 1; accepted: 0..1"),
    ("out empty", lambda a, t, p: a + ["--out", ""], "out (the run folder) must be a path, got ''"),
    ("out a file", lambda a, t, p: a + ["--out", str(t / "a-file")], "is an existing file; accepted: a folder"),
    ("out under /proc", lambda a, t, p: a + ["--out", "/proc/trady-run"], "cannot use run folder '/proc/trady-run'"),
    ("three-class model", lambda a, t, p: replace_option(a, "--model", f"{t / 'three.py'}:build"),
     "outputs (1, 3) for one example, the dataset has 10 classes"),
    ("one class", lambda a, t, p: replace_option(replace_option(replace_option(
        a, "--data", str(one_class_folder(t))), "--train-size", "8"), "--test-size", "4"),
     "has 1 class(es) ('cat'); accepted: a dataset of at least 2 classes"),
    ("NaN profile", lambda a, t, p: replace_option(a, "--profile", str(nan_profile(p, t / "nan.json"))),
     "has rgn nan; accepted: a finite number >= 0"),
]  # fmt: skip


@pytest.mark.parametrize("name,change,expected", BAD_CLI_INPUTS, ids=[c[0] for c in BAD_CLI_INPUTS])
def test_every_bad_input_is_one_line_naming_the_value_before_any_training(
    capsys, tmp_path, profile, monkeypatch, name, change, expected
):
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "three.py").write_text(THREE_CLASS_MODEL)
    steps = []
    monkeypatch.setattr(train, "train_epoch", lambda *a, **k: steps.append(1))  # no training may start
    args = change(run_args(profile, "trady", epochs=2), tmp_path, profile)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    line = error_line(capsys, ["finetune", *args])
    assert expected in line, line
    assert not steps
    assert not (tmp_path / "run" / train.CHECKPOINT).exists()


def test_bad_python_inputs_are_one_line_naming_the_value(tmp_path):
    from trady.engine import SparseEngine
    from trady.experiments.sweep_grid import SweepGrid
    from trady.selection.tuner import Tuner

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 2))  # fmt: skip
    tuner = Tuner(model, torch.zeros(1, 3, 8, 8), strategy="full")
    with pytest.raises(TradyError, match=r"epoch must be a whole number >= 1 \(an int\), got 1\.7"):
        tuner.start_epoch(1.7)
    tuner.restore()
    engine = SparseEngine(model, torch.zeros(1, 3, 8, 8))
    with pytest.raises(TradyError, match=r"channel indices of layer '0' repeat \[1\]"):
        engine.select({"0": [1, 1, 2]})
    with pytest.raises(TradyError, match=r"channel indices of layer '0' must be integers, got \[0\.0, 1\.0\]"):
        engine.select({"0": torch.tensor([0.0, 1.0])})
    engine.restore()
    with pytest.raises(TradyError, match=r"invalid budget unit 'apples' in '5 apples'; accepted: units"):
        SweepGrid(models=[MODEL], datasets=["digits"], budgets=["5%", "5 apples"], strategies=["trady"], seeds=[0])


def test_a_sweep_with_one_bad_budget_runs_nothing(capsys, tmp_path):
    out = tmp_path / "sweep"
    line = error_line(capsys, ["sweep", "--out", out, "--models", MODEL, "--datasets", "digits", "--budgets",
                               "5%,12zz", "--strategies", "trady", "--seeds", "0"])  # fmt: skip
    assert "invalid budget unit 'zz' in '12zz'; accepted: units" in line
    assert not out.exists() or not any(out.iterdir())



def test_a_diverged_run_is_a_finished_result_for_sweep_and_report(tmp_path, profile):
    from helpers import tiny_config
    from trady.experiments.report import summarize
    from trady.experiments.sweep import SweepGrid, run_sweep

    base = {k: v for k, v in tiny_config(profile).to_dict().items() if k not in ("out", "model", "data", "strategy",
                                                                                  "budget", "seed")}  # fmt: skip
    base["lr"] = 1e6
    grid = SweepGrid(base=base, models=[MODEL], datasets=["digits"], budgets=["5%"], strategies=["trady"], seeds=[0])
    first = run_sweep(grid, tmp_path, jobs=1, progress=False, log=lambda msg: None)
    assert [o.status for o in first.outcomes] == ["diverged"] and first.failed == []
    again = run_sweep(grid, tmp_path, jobs=1, progress=False, log=lambda msg: None)
    assert [o.status for o in again.outcomes] == ["skipped"]  # not run again: it would diverge again
    report = summarize(tmp_path)
    assert [(f["status"], "exploding training loss" in f["error"]) for f in report["failed"]] == [("diverged", True)]
