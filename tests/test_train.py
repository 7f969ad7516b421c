"""The fine-tuning loop: run-folder contract, determinism, and that measuring the first step of each
epoch (saved-tensor hooks) leaves the numerics untouched.

Also holds the helpers the other train/CLI test files import (tiny runs: sklearn digits, 32 px, the
MCU model mbv2-w0.35 with its pretrained int8 weights from ../shared/models/mcu, one thread)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from trady import models, train
from trady.config import FinetuneConfig
from trady.costs import analyze
from trady.io import read_jsonl
from trady.ranking import LayerRank, RankingProfile

MODEL = "mbv2-w0.35"
RESOLUTION = 32
TIMING_FIELDS = {"epoch_time_s", "wall_time_s"}



# --------------------------------------------------------------------------------------------------
# helpers shared with test_resume / test_errors / test_distributed / test_safe_loading


def write_profile(path: Path, model: str = MODEL, resolution: int = RESOLUTION) -> Path:
    """A synthetic layer-ranking profile (fixed pseudo-random RGN) so that tests need no `trady rank` run."""
    net = models.create(model, pretrained=False, num_classes=10)
    costs = analyze(net, example_input=torch.zeros(1, 3, resolution, resolution), classifier="classifier")
    g = torch.Generator().manual_seed(1234)
    layers = []
    for lay in costs.layers:
        grad = float(torch.rand((), generator=g)) + 0.05
        layers.append(
            LayerRank(
                name=lay.name,
                kind=lay.kind,
                in_channels=lay.in_channels,
                grad_norm=grad * lay.full_units,
                rgn=grad,
                lara=grad,
                weight_units=lay.weight_units_per_channel,
                activation_units=lay.activation_units_per_channel,
            )
        )
    profile = RankingProfile(model=model, resolution=resolution, dataset="synthetic", epochs=1, seed=0, layers=layers)
    profile.save(path)
    return path


def run_args(
    profile: Path, strategy: str = "trady", epochs: int = 2, budget: str | None = "5%", extra: tuple = ()
) -> list[str]:
    """`trady finetune` options of a tiny run (without --out)."""
    args = [
        "--model", MODEL, "--data", "digits", "--train-size", "64", "--test-size", "32",
        "--resolution", str(RESOLUTION), "--batch-size", "16", "--epochs", str(epochs), "--lr", "0.02",
        "--strategy", strategy, "--profile", str(profile), "--threads", "1", "--no-progress", "--seed", "3",
    ]  # fmt: skip
    if budget is not None:
        args += ["--budget", budget]
    return args + list(extra)


def tiny_config(profile: Path, strategy: str = "trady", **kw) -> FinetuneConfig:
    base = dict(
        model=MODEL, data="digits", train_size=64, test_size=32, resolution=RESOLUTION, batch_size=16, epochs=2,
        lr=0.02, strategy=strategy, budget="5%", profile=str(profile), threads=1, progress=False, seed=3,
    )  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


def _present_command_modules() -> list[str]:
    import trady.cli

    return [m for m in trady.cli.COMMAND_MODULES if importlib.util.find_spec(f"trady.cli.{m}") is not None]


def cli(argv: list) -> int:
    """trady.cli.main(argv). While some command modules listed in COMMAND_MODULES are not written yet,
    the parser is built from the ones that exist (main itself runs unchanged)."""
    import trady.cli

    argv = [str(a) for a in argv]
    present = _present_command_modules()
    if present == trady.cli.COMMAND_MODULES:
        return trady.cli.main(argv)
    saved = trady.cli.COMMAND_MODULES
    trady.cli.COMMAND_MODULES = present
    try:
        return trady.cli.main(argv)
    finally:
        trady.cli.COMMAND_MODULES = saved


# `python -m trady` (the same shim as `cli` while command modules are missing).
_SHIM = (
    "import importlib.util, sys, trady.cli as c; "
    "c.COMMAND_MODULES = [m for m in c.COMMAND_MODULES if importlib.util.find_spec('trady.cli.' + m)]; "
    "sys.exit(c.main())"
)


def trady_command() -> list[str]:
    import trady.cli

    if _present_command_modules() == trady.cli.COMMAND_MODULES:
        return [sys.executable, "-m", "trady"]
    return [sys.executable, "-c", _SHIM]


_REFERENCE_RUNS: dict[tuple, Path] = {}
_PROFILES: dict[str, Path] = {}


def shared_profile(tmp_path_factory, model: str = MODEL) -> Path:
    """One synthetic profile file per model and test session (so that runs in several files share it)."""
    if model not in _PROFILES:
        _PROFILES[model] = write_profile(tmp_path_factory.mktemp("profile") / f"{model}.json", model=model)
    return _PROFILES[model]


def reference_run(tmp_path_factory, args: list) -> Path:
    """The run folder of `trady finetune *args`, run once per test session (read-only for callers)."""
    key = tuple(str(a) for a in args)
    if key not in _REFERENCE_RUNS:
        out = tmp_path_factory.mktemp("reference") / "run"
        assert cli(["finetune", *args, "--out", out]) == 0
        _REFERENCE_RUNS[key] = out
    return _REFERENCE_RUNS[key]


def strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def metrics(folder: Path) -> list[dict]:
    return strip_timing(read_jsonl(Path(folder) / "metrics.jsonl"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(folder) / train.CHECKPOINT, map_location="cpu", weights_only=True)["model"]


@pytest.fixture
def one_thread():
    """Tests that drive the loop below finetune() (which sets --threads itself) use one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


# --------------------------------------------------------------------------------------------------
# tests


@pytest.fixture(scope="module")
def profile(tmp_path_factory) -> Path:
    return shared_profile(tmp_path_factory)


def test_run_folder_contract(tmp_path_factory, profile):
    out = reference_run(tmp_path_factory, run_args(profile, "trady", epochs=2))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl", "summary.json"]
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
            optimizer = run.optimizer or train._make_optimizer(run)
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
