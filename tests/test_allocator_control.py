"""The measured step's glibc settings (trady.memory.kept_bytes) never outlive a run, and library callers opt in.

glibc has no call that reads M_MMAP_THRESHOLD/M_TRIM_THRESHOLD back, so the process's setting cannot be
observed: a fake libc records the mallopt calls instead, and the tests check what a run leaves set."""

from __future__ import annotations

import pytest

from helpers import shared_profile, tiny_config
from trady.memory import resident_peak
from trady.train import loop as train

FAST = {resident_peak._M_MMAP_THRESHOLD: 32 * 2**20, resident_peak._M_TRIM_THRESHOLD: 64 * 2**20}


class FakeLibc:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.setting: dict[int, int] = {}

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        self.setting[param] = value
        return 1

    def malloc_trim(self, pad: int) -> int:
        return 1


@pytest.fixture
def libc(monkeypatch) -> FakeLibc:
    fake = FakeLibc()
    monkeypatch.setattr(resident_peak, "_LIBC", fake)
    return fake


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return shared_profile(tmp_path_factory)


def test_a_library_run_leaves_the_allocator_alone(libc, profile):
    summary = train.finetune(tiny_config(profile, "classifier", budget=None, epochs=1))
    assert libc.calls == []
    assert summary["status"] == "ok"


def test_a_controlled_run_ends_with_the_fast_settings(libc, profile):
    train.finetune(tiny_config(profile, "classifier", budget=None, epochs=1, control_allocator=True))
    assert libc.calls  # the measured step did set the measurement thresholds
    assert libc.setting == FAST


def test_a_run_failing_inside_the_measured_step_still_restores_the_settings(libc, profile, monkeypatch):
    monkeypatch.setattr(train, "lr_at", lambda step, total, warmup, base: float("nan"))  # step 2's loss is NaN
    with pytest.raises(train.NonFiniteLoss, match="step 2 of 4"):  # raised between the meter's start and stop
        train.finetune(tiny_config(profile, "classifier", budget=None, epochs=1, control_allocator=True))
    measured = int(resident_peak.ALLOCATOR_ENV["MALLOC_MMAP_THRESHOLD_"])
    assert (resident_peak._M_MMAP_THRESHOLD, measured) in libc.calls
    assert libc.setting == FAST


def test_the_cli_turns_the_control_on_and_keep_allocator_turns_it_off():
    import argparse

    from trady.cli import finetune as cli_finetune

    parser = argparse.ArgumentParser()
    cli_finetune.add_config_arguments(parser)
    assert cli_finetune.config_from_args(parser.parse_args([])).control_allocator is True
    assert cli_finetune.config_from_args(parser.parse_args(["--keep-allocator"])).control_allocator is False
