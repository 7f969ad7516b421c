"""Bad input through the CLI: `trady.cli.main` returns 2 and prints ONE line `trady: error: ...` on
stderr (no traceback); what a run wrote before the failure stays."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import MODEL, RESOLUTION, cli, error_line, metrics, reference_run, run_args, shared_profile, weights
from trady import models
from trady.core.files import read_jsonl
from trady.engine.costs import analyze
from trady.train import loop as train
from trady.train.checkpoint import CHECKSUMS, save_checkpoint


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    return shared_profile(tmp_path_factory)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, profile) -> Path:
    """A finished one-epoch run folder (classifier only: the cheapest); tests change copies of it."""
    return reference_run(tmp_path_factory, run_args(profile, "classifier", epochs=1, budget=None))


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    "option,kind,value,suggestion",
    [
        ("--model", "model", "mbv2-w0.3", "mbv2-w0.35"),
        ("--data", "dataset", "digit", "digits"),
        ("--strategy", "strategy", "tradi", "trady"),
    ],
)
def test_unknown_names_suggest_the_closest(capsys, tmp_path, profile, option, kind, value, suggestion):
    args = run_args(profile)
    args[args.index(option) + 1] = value
    line = error_line(capsys, ["finetune", *args, "--out", tmp_path / "run"])
    assert f"unknown {kind} {value!r}" in line and f"did you mean {suggestion}" in line
    assert not (tmp_path / "run").exists()  # nothing written for bad input


def test_budget_below_the_cheapest_channel_prints_its_cost(capsys, tmp_path, profile):
    net = models.create(MODEL, pretrained=False, num_classes=10)
    cheapest = analyze(net, example_input=torch.zeros(1, 3, RESOLUTION, RESOLUTION)).min_channel_units
    line = error_line(capsys, ["finetune", *run_args(profile, budget="1"), "--out", tmp_path / "run"])
    assert "cheapest channel" in line and f"costs {cheapest} units" in line


def test_budget_above_full_finetuning_runs_full_finetuning(capsys, tmp_path, profile):
    out = tmp_path / "run"
    assert cli(["finetune", *run_args(profile, epochs=1, budget="100000000"), "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "full fine-tuning" in printed and "running full fine-tuning instead" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "full" and summary["status"] == "ok"
    assert any("running full fine-tuning instead" in n for n in summary["notes"])


def test_missing_data_folder(capsys, tmp_path, profile):
    args = run_args(profile)
    args[args.index("--data") + 1] = str(tmp_path / "no-such-folder")
    line = error_line(capsys, ["finetune", *args, "--out", tmp_path / "run"])
    assert "no-such-folder does not exist" in line


def test_corrupt_image(capsys, tmp_path, profile):
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("test", 2)):
        for cls in ("a", "b"):
            folder = tmp_path / "images" / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (tmp_path / "images" / "train" / "a" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really an image")
    args = run_args(profile, "classifier", epochs=1, budget=None, extra=("--batch-size", "4"))
    for opt in ("--train-size", "--test-size"):
        i = args.index(opt)
        del args[i : i + 2]
    args[args.index("--data") + 1] = str(tmp_path / "images")
    out = tmp_path / "run"
    line = error_line(capsys, ["finetune", *args, "--out", out])
    assert "cannot read image" in line and "1.png" in line
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "cannot read image" in summary["error"]
    assert (out / "config.json").is_file()


def test_checkpoint_with_wrong_keys_or_shapes(capsys, tmp_path, finished):
    state = torch.load(finished / train.CHECKPOINT, weights_only=True)
    model = state["model"]
    dropped = next(k for k in model if k.endswith("conv.weight"))
    del model[dropped]
    model["extra.weight"] = torch.zeros(1)
    model["classifier.weight"] = torch.zeros(3, 3)
    run = copy_run(finished, tmp_path / "run")
    save_checkpoint(run, state)  # recorded with its checksum: the content checks below are what is tested
    line = error_line(capsys, ["finetune", "--resume", run])
    assert "do not match" in line
    assert f"missing keys: {dropped}" in line and "unexpected keys: extra.weight" in line
    assert "shape mismatches: classifier.weight" in line
    # the same file as --weights of a new run
    line = error_line(
        capsys, ["finetune", "--model", MODEL, "--weights", run / train.CHECKPOINT, "--out", tmp_path / "x"]
    )
    assert "do not match" in line and dropped in line


def test_unreadable_or_foreign_checkpoint(capsys, tmp_path, finished):
    run = copy_run(finished, tmp_path / "truncated")
    data = (run / train.CHECKPOINT).read_bytes()
    (run / train.CHECKPOINT).write_bytes(data[: len(data) // 3])
    assert "is corrupted: its SHA-256" in error_line(capsys, ["finetune", "--resume", run])
    (run / CHECKSUMS).unlink()  # a folder from before checksums: torch.load's own check
    assert "not a complete torch.save file" in error_line(capsys, ["finetune", "--resume", run])

    run = copy_run(finished, tmp_path / "foreign")
    save_checkpoint(run, {"weights": torch.zeros(2)})
    assert "is not a trady checkpoint" in error_line(capsys, ["finetune", "--resume", run])

    run = copy_run(finished, tmp_path / "other-run")
    state = torch.load(run / train.CHECKPOINT, weights_only=True)
    state["config"]["lr"] = 0.5
    save_checkpoint(run, state)
    line = error_line(capsys, ["finetune", "--resume", run])
    assert "written by a different run: lr 0.5 there vs 0.02 here" in line


def test_resume_arguments(capsys, tmp_path, finished):
    line = error_line(capsys, ["finetune", "--resume", tmp_path / "missing"])
    assert "no such folder" in line
    line = error_line(capsys, ["finetune", "--resume", finished, "--epochs", "5", "--lr", "1"])
    assert "drop --epochs, --lr" in line


def test_non_finite_loss_keeps_the_last_good_checkpoint(capsys, tmp_path, profile, monkeypatch):
    real = train.lr_at

    def lr_at(step, total, warmup, base):  # the second epoch's first update turns every weight into NaN
        return float("nan") if step >= total // 2 else real(step, total, warmup, base)

    monkeypatch.setattr(train, "lr_at", lr_at)
    out = tmp_path / "run"
    line = error_line(capsys, ["finetune", *run_args(profile, "trady", epochs=2), "--out", out], code=3)
    assert "non-finite training loss" in line and "at epoch 2, step 2 of 4" in line
    assert f"the last good checkpoint (epoch 1) is kept in {out / train.CHECKPOINT}" in line
    state = train.load_checkpoint(out / train.CHECKPOINT)
    assert state["epoch"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in weights(out).values() if v.is_floating_point())
    assert [r["epoch"] for r in read_jsonl(out / "metrics.jsonl")] == [1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_epoch"] == 2 and summary["epochs_done"] == 1
    assert "epoch 2" in summary["error"]
    assert metrics(out)[0]["epoch"] == 1
