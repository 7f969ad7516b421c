"""Issue 19, item 9 and the lr column: `trady rank` on a folder smaller than its default subset,
`dir(trady)`, the one-line warning when a draw that trains the stem makes the loss explode, and the
epoch's `lr` (the mean over its steps, not the last step's 0 at the end of the cosine)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import trady
from helpers import cli, tiny_config, write_profile
from test_data import make_folder
from trady.core.schedule import lr_at
from trady.selection.ranking import RankingProfile
from trady.train import loop as train


def test_dir_trady_lists_the_public_entry_points() -> None:
    assert {"rank", "Tuner", "RankingProfile", "TradyCallback"} <= set(dir(trady))


def test_rank_uses_what_a_small_folder_has(tmp_path: Path) -> None:
    make_folder(tmp_path / "data", {"cat": 25, "dog": 25}, size=12)  # 40 training images after the 80/20 split
    out = tmp_path / "p.json"
    assert cli(["rank", "--model", "tests/user_model.py:build", "--data", tmp_path / "data", "--resolution", "12",
                "--epochs", "1", "--batch-size", "8", "--out", out, "--no-progress"]) == 0  # fmt: skip
    profile = RankingProfile.load(out)
    assert profile.extra["train_size"] == 40 and profile.iterations == 5


def test_stem_explosion_warns_once_only_when_the_stem_trains(tmp_path: Path, capsys) -> None:
    profile = write_profile(tmp_path / "p.json")
    summary = train.finetune(tiny_config(profile, "full", budget=None, lr=0.2, epochs=1,
                                          measure_memory=False))  # the loss ends 10x-100x: warned, not diverged
    notes = [n for n in summary["notes"] if "while the stem" in n]
    assert len(notes) == 1 and "first_conv.conv" in notes[0]
    assert capsys.readouterr().err.count("while the stem") == 1
    # the head alone at a far larger lr: the loss explodes too, but the stem does not train
    run = train.setup(tiny_config(profile, "classifier", budget=None, lr=5.0, classifier_lr=5.0, epochs=1,
                                  measure_memory=False))
    with pytest.raises(train.NonFiniteLoss, match="exploding training loss"):  # over 100x: diverged
        train.train_epoch(run, 1, train.make_optimizer(run), measure=False)
    assert not run.stem_warned and not any("while the stem" in n for n in run.notes)


def test_epoch_lr_is_the_mean_over_its_steps(tmp_path: Path) -> None:
    profile = write_profile(tmp_path / "p.json")
    config = tiny_config(profile, "classifier", budget=None, lr=0.02, epochs=2, measure_memory=False,
                         out=str(tmp_path / "run"))  # fmt: skip
    train.finetune(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = 64 // 16
    for row in rows:
        e = row["epoch"]
        expected = sum(lr_at((e - 1) * steps + i, 2 * steps, steps * config.warmup_epochs, 0.02) for i in range(steps))
        assert math.isclose(row["lr"], expected / steps, rel_tol=1e-12)
    assert rows[-1]["lr"] > 0
