"""Safe loading: checkpoints and weight files go through torch.load(weights_only=True) or safetensors,
the int8 MCU files through a restricted unpickler; a pickle carrying code is refused everywhere and
its code never runs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from helpers import MODEL, cli, error_line, tiny_config, write_profile
from trady import models
from trady.core.errors import TradyError
from trady.core.files import write_json
from trady.models import mcu
from trady.train import checkpoint
from trady.train import loop as train


class Payload:
    """Unpickling this runs os.system(...): what a malicious checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "the pickle's code ran"


def evil_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "epoch": 0, "model": {}, "hook": Payload(marker)}, path)
    return path


def test_resume_refuses_a_checkpoint_carrying_code(capsys, tmp_path, marker):
    folder = tmp_path / "run"
    folder.mkdir()
    config = tiny_config(write_profile(tmp_path / "profile.json"), "classifier", budget=None, out=str(folder))
    write_json(folder / "config.json", config.to_dict())
    evil_checkpoint(folder / train.CHECKPOINT, marker)
    line = error_line(capsys, ["finetune", "--resume", folder])
    assert "refusing to load" in line and "system" in line and "weights_only=True" in line
    with pytest.raises(TradyError, match="refusing to load"):
        train.load_checkpoint(folder / train.CHECKPOINT)


def test_weights_option_refuses_a_pickle_carrying_code(capsys, tmp_path, marker):
    path = evil_checkpoint(tmp_path / "weights.pt", marker)
    line = error_line(capsys, ["finetune", "--model", MODEL, "--weights", path, "--out", tmp_path / "run"])
    assert "refusing to load" in line and "system" in line
    with pytest.raises(TradyError, match="refusing to load"):
        models.create(MODEL, weights=path)


def test_mcu_format_refuses_a_pickle_carrying_code(capsys, tmp_path, marker):
    evil = tmp_path / "mcu"
    evil.mkdir()
    path = evil / mcu.MCU_FILES[MODEL][0]
    torch.save(Payload(marker), path)  # a torch.save zip archive, like the real files
    with pytest.raises(TradyError, match="refusing to unpickle .* references (posix|os)\\.system"):
        mcu.read_archive(path)  # the restricted unpickler itself
    # through the model zoo and the CLI the file's SHA-256 check refuses it even before unpickling
    with pytest.raises(TradyError, match="SHA-256"):
        models.create(MODEL, pretrained=True, mcu_dir=evil)
    line = error_line(capsys, ["finetune", "--model", MODEL, "--mcu-dir", evil, "--out", tmp_path / "run"])
    assert "SHA-256" in line


def test_the_restricted_unpickler_reads_the_real_mcu_file(tmp_path):
    real = mcu.mcu_file(MODEL)
    desc = mcu.read_archive(real)
    assert {"first_conv", "blocks", "classifier"} <= set(desc)
    copy = tmp_path / real.name
    shutil.copy(real, copy)
    assert mcu.read_archive(copy).keys() == desc.keys()


def test_checkpoints_and_safetensors_load_as_weights(tmp_path):
    from safetensors.torch import save_file

    net = models.create(MODEL, pretrained=True, num_classes=10)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "epoch": 1, "model": state}, tmp_path / "checkpoint.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    for name in ("checkpoint.pt", "model.safetensors"):
        loaded = models.create(MODEL, weights=tmp_path / name).state_dict()
        assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_weights_option_accepts_a_run_checkpoint(tmp_path, capsys):
    """--weights takes a trady checkpoint (its `model` entry); --weights implies --no-pretrained."""
    net = models.create(MODEL, pretrained=True, num_classes=10)
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "model": net.state_dict()}, tmp_path / "checkpoint.pt")
    profile = write_profile(tmp_path / "profile.json")
    args = ["--model", MODEL, "--data", "digits", "--train-size", "32", "--test-size", "32", "--resolution", "32",
            "--batch-size", "32", "--epochs", "1", "--strategy", "classifier", "--threads", "1", "--no-progress",
            "--profile", profile]  # fmt: skip
    assert cli(["finetune", *args, "--weights", tmp_path / "checkpoint.pt", "--out", tmp_path / "run"]) == 0
    assert train.load_checkpoint(tmp_path / "run" / train.CHECKPOINT)["config"]["pretrained"] is False
