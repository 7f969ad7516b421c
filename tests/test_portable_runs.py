"""Run folders resume from any working folder (issue 19 item 3): config.json stores the paths a run reads
(image folder, model file `file.py:fn`, weights, profile, run folder) absolute, so `cd elsewhere &&
trady finetune --resume /abs/run` reads the same files and ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from helpers import MODEL, assert_same_weights, cli, metrics, weights, write_profile
from trady.config import FinetuneConfig
from trady.core.files import read_jsonl, write_jsonl
from trady.experiments.sweep import _settings_diff
from trady.train import loop as train
from trady.train.checkpoint import CHECKSUMS
from trady.train.run_paths import absolute_settings

USER_MODEL = Path(__file__).parent / "user_model.py"


def write_digit_folder(root: Path, per_class: int = 16, classes: int = 4) -> None:
    """An image folder of scikit-learn's digits, one subfolder per class (PNG, 8x8 grey)."""
    digits = load_digits()
    for c in range(classes):
        images = digits.images[digits.target == c][:per_class]
        (root / f"d{c}").mkdir(parents=True)
        for i, image in enumerate(images):
            Image.fromarray((image * 15).astype(np.uint8)).save(root / f"d{c}" / f"{i:02d}.png")


def _workspace(tmp_path: Path) -> Path:
    """The user's working folder: an image folder, a model file, its weights and a profile, all relative."""
    work = tmp_path / "work"
    write_digit_folder(work / "digits_png")
    shutil.copy(USER_MODEL, work / "net.py")
    from safetensors.torch import save_file

    import user_model

    save_file(user_model.build(num_classes=4).state_dict(), str(work / "init.safetensors"))
    write_profile(work / "profile.json")
    return work


CASES = {
    "builder-weights": ["--model", "net.py:build", "--weights", "init.safetensors", "--strategy", "s-full-random",
                        "--budget", "30%"],
    "zoo-profile": ["--model", MODEL, "--profile", "profile.json", "--strategy", "trady", "--budget", "5%"],
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_from_another_working_folder_matches_uninterrupted_run(tmp_path, monkeypatch, case):
    work = _workspace(tmp_path)
    monkeypatch.chdir(work)
    args = [*CASES[case], "--data", "digits_png", "--resolution", "32", "--batch-size", "16", "--epochs", "2",
            "--lr", "0.02", "--threads", "1", "--no-progress", "--seed", "3"]  # fmt: skip
    real_save = train.save_checkpoint

    def save_and_keep_epoch1(folder, state):
        real_save(folder, state)
        if state["epoch"] == 1:  # a checkpoint with its checksum, as a kill during epoch 2 leaves it
            (Path(folder) / "epoch1").mkdir()
            real_save(Path(folder) / "epoch1", state)

    monkeypatch.setattr(train, "save_checkpoint", save_and_keep_epoch1)
    assert cli(["finetune", *args, "--out", "runs/ref"]) == 0  # a relative run folder too
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    ref = work / "runs" / "ref"
    stored = json.loads((ref / "config.json").read_text())
    assert stored["data"] == str(work / "digits_png")
    assert stored["out"] == str(ref)
    if case == "builder-weights":
        assert stored["model"] == f"{work / 'net.py'}:build" and stored["weights"] == str(work / "init.safetensors")
    else:
        assert stored["model"] == MODEL and stored["profile"] == str(work / "profile.json")

    cut = tmp_path / "cut"  # what a kill during epoch 2 leaves
    cut.mkdir()
    shutil.copy(ref / "config.json", cut / "config.json")
    for name in (train.CHECKPOINT, CHECKSUMS):
        shutil.copy(ref / "epoch1" / name, cut / name)
    write_jsonl(cut / "metrics.jsonl", read_jsonl(ref / "metrics.jsonl")[:1])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert cli(["finetune", "--resume", cut, "--no-progress"]) == 0
    assert metrics(cut) == metrics(ref)
    assert_same_weights(weights(cut), weights(ref))


def test_stored_names_stay_names_and_old_relative_folders_still_compare(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    named = FinetuneConfig(model="mcunet-in1", data="digits").to_dict()
    assert absolute_settings(named) == named  # zoo names and dataset names are not paths
    module_builder = {**named, "model": "mypackage.nets:build", "data": "FMNIST"}
    assert absolute_settings(module_builder) == module_builder
    # a sweep finds the run it asked for with relative paths in a run folder that stores them absolute
    wanted = {**named, "data": "imgs", "profile": "p.json"}
    assert _settings_diff(absolute_settings(wanted), wanted) is None
    assert _settings_diff(wanted, wanted) is None  # a run folder written before (relative paths)
    assert "data" in _settings_diff(absolute_settings(wanted), {**wanted, "data": "other"})
