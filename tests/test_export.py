"""`trady export RUN --out FILE` (issue 19 item 7): the fine-tuned stock model's weights as safetensors and a
JSON of what they are; loaded into a fresh model they give the run's test accuracy again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import MODEL, RESOLUTION, cli, error_line, run_args, shared_profile, weights
from trady import models
from trady.data import BatchLoader, load_dataset
from trady.data.transforms import ImageTransform
from trady.models import entry
from trady.train.export import export_run, load_exported

USER_MODEL = Path(__file__).parent / "user_model.py"


def test_accuracy(model: torch.nn.Module, mean, std, seed: int = 3) -> float:
    """The run's test split (digits, 32 test images, seed 3), transformed as trady's evaluation does."""
    data = load_dataset("digits", train_size=64, test_size=32, seed=seed)
    loader = BatchLoader(data.test, 64, ImageTransform(RESOLUTION, mean, std, train=False), shuffle=False, seed=seed)
    correct = seen = 0
    model.eval()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the run evaluated (--threads 1): the same kernels, the same rounding
    try:
        with torch.no_grad():
            for x, y in loader:
                correct += int((model(x).argmax(1) == y).sum())
                seen += len(y)
    finally:
        torch.set_num_threads(threads)
    return correct / seen


test_accuracy.__test__ = False  # a helper, not a test


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    return shared_profile(tmp_path_factory)


def test_export_of_a_zoo_run_reproduces_its_test_accuracy(tmp_path, profile):
    run = tmp_path / "run"
    assert cli(["finetune", *run_args(profile, "trady", epochs=2), "--out", run]) == 0
    summary = json.loads((run / "summary.json").read_text())
    out = tmp_path / "export" / "model.safetensors"
    assert cli(["export", run, "--out", out]) == 0

    info = json.loads(out.with_suffix(".json").read_text())
    spec = models.spec(MODEL)
    assert info["model"] == MODEL and info["zoo"] and not info["builder"]
    assert info["classes"] == [str(i) for i in range(10)] and info["num_classes"] == 10
    assert info["resolution"] == RESOLUTION and info["mean"] == list(spec.mean) and info["std"] == list(spec.std)
    assert info["strategy"] == "trady" and info["finished"] and info["epoch"] == 2
    assert info["test_acc"] == summary["test_acc"]
    with safe_open(str(out), "pt") as fh:  # the same description travels inside the weights file
        assert json.loads(fh.metadata()["trady"]) == info

    state = load_file(str(out))
    ckpt = weights(run)
    assert state.keys() == ckpt.keys() and all(torch.equal(state[k], ckpt[k]) for k in state)
    fresh = models.create(MODEL, pretrained=False, num_classes=info["num_classes"])
    models.load_into(fresh, state)
    assert test_accuracy(fresh, info["mean"], info["std"]) == summary["test_acc"]
    pretrained = models.create(MODEL, pretrained=True, num_classes=10)  # the export is not the start point
    assert any(not torch.equal(pretrained.state_dict()[k], state[k]) for k in state if "classifier" not in k)


def test_export_of_a_builder_run_loads_through_load_exported(tmp_path):
    run = tmp_path / "run"
    args = ["--model", f"{USER_MODEL}:build", "--data", "digits", "--train-size", "64", "--test-size", "32",
            "--resolution", str(RESOLUTION), "--batch-size", "16", "--epochs", "1", "--lr", "0.05",
            "--strategy", "s-full-random", "--budget", "30%", "--threads", "1", "--no-progress",
            "--seed", "3"]  # fmt: skip
    assert cli(["finetune", *args, "--out", run]) == 0
    summary = json.loads((run / "summary.json").read_text())
    info = export_run(run, tmp_path / "net.safetensors")
    assert info["builder"] and info["model"] == f"{USER_MODEL}:build"
    assert info["mean"] == list(entry.MEAN) and info["std"] == list(entry.STD)
    model, loaded = load_exported(tmp_path / "net.safetensors")
    assert loaded == info
    assert test_accuracy(model, info["mean"], info["std"]) == summary["test_acc"]


def test_export_refuses_bad_input_in_one_line(tmp_path, capsys):
    line = error_line(capsys, ["export", tmp_path, "--out", tmp_path / "m.safetensors"])
    assert "no config.json" in line and "run folder" in line
    line = error_line(capsys, ["export", tmp_path, "--out", tmp_path / "m.pt"])
    assert "m.pt" in line and ".safetensors" in line
