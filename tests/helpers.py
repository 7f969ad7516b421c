"""Helpers shared by the train/CLI test files: tiny runs (sklearn digits, 32 px, the MCU model
mbv2-w0.35 with its pretrained int8 weights from ../shared/models/mcu, one thread), the CLI entry,
run-folder readers and a synthetic layer-ranking profile."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from trady import models
from trady.config import FinetuneConfig
from trady.core.files import read_jsonl
from trady.data import load_dataset
from trady.engine.costs import analyze
from trady.selection.ranking import LayerRank, RankingProfile
from trady.train import loop as train

MODEL = "mbv2-w0.35"
RESOLUTION = 32
# Fields that measure this machine and process, not the run's results: times, and the measured step
# peak (resident memory: other processes' page sharing, the allocator's history), which differs between
# two processes running the same steps. A resumed run's rows are compared without them.
MACHINE_FIELDS = {"epoch_time_s", "step_time_s", "wall_time_s", "peak_memory_bytes"}


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
    """`trady finetune` options of a tiny run (without --out): 64 images, batch 16, so 4 steps an epoch."""
    args = [
        "--model", MODEL, "--data", "digits", "--train-size", "64", "--test-size", "32",
        "--resolution", str(RESOLUTION), "--batch-size", "16", "--epochs", str(epochs), "--lr", "0.02",
        "--strategy", strategy, "--profile", str(profile), "--threads", "1", "--no-progress", "--seed", "3",
    ]  # fmt: skip
    if budget is not None:
        args += ["--budget", budget]
    return args + list(extra)


STEPS_PER_EPOCH = 4  # of run_args' runs


def tiny_config(profile: Path, strategy: str = "trady", **kw) -> FinetuneConfig:
    base = dict(
        model=MODEL, data="digits", train_size=64, test_size=32, resolution=RESOLUTION, batch_size=16, epochs=2,
        lr=0.02, strategy=strategy, budget="5%", profile=str(profile), threads=1, progress=False, seed=3,
    )  # fmt: skip
    base.update(kw)
    return FinetuneConfig(**base)


def cli(argv: list) -> int:
    """trady.cli.main(argv) with every argument as a string (tests pass Paths)."""
    import trady.cli

    return trady.cli.main([str(a) for a in argv])


def trady_command() -> list[str]:
    """`python -m trady` in a fresh process, with this interpreter."""
    return [sys.executable, "-m", "trady"]


# A real `python -m trady` process that SIGKILLs itself right after its K-th optimizer step: the kill
# lands at a known point whatever the machine's speed. It uses the public global optimizer step hook,
# so the product has no test hook of its own.
_KILL_AFTER_STEP = """\
import os, runpy, signal, sys
from torch.optim.optimizer import register_optimizer_step_post_hook
steps = 0
def _count(optimizer, args, kwargs):
    global steps
    steps += 1
    if steps == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
register_optimizer_step_post_hook(_count)
os.environ["TRADY_ALLOCATOR"] = "glibc"  # no re-exec with a preloaded malloc: it would drop the hook
sys.argv[0] = "trady"
runpy.run_module("trady", run_name="__main__", alter_sys=True)
"""


def trady_command_killed_after_step(step: int) -> list[str]:
    """Like trady_command(), but the process kills itself (SIGKILL) after optimizer step `step`."""
    return [sys.executable, "-c", _KILL_AFTER_STEP.format(step=int(step))]


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


def strip_machine_fields(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in MACHINE_FIELDS} for r in rows]


def metrics(folder: Path) -> list[dict]:
    return strip_machine_fields(read_jsonl(Path(folder) / "metrics.jsonl"))


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(Path(folder) / train.CHECKPOINT, map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def error_line(capsys, argv: list, code: int = 2) -> str:
    """The one `trady: error: ...` line that a failing CLI call prints (exit code `code`: 2 bad input,
    3 diverged, 4 a write failed; no traceback)."""
    rc = cli(argv)
    captured = capsys.readouterr()
    assert rc == code, captured
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err
    assert len(lines) == 1 and lines[0].startswith("trady: error: "), captured.err
    return lines[0]


# --------------------------------------------------------------------------------------------------
# any-model tests (test_tuner, test_lightning, test_readme): real digits batches, hand slicing


def digits_batches(n: int = 256, batch: int = 32, split: str = "train") -> list[tuple[torch.Tensor, torch.Tensor]]:
    pair = load_dataset("digits", seed=0)
    data = pair.train if split == "train" else pair.test
    x, y = data.get_batch(torch.arange(min(n, len(data))))
    x = (x.float() / 255.0 - 0.5).expand(-1, 3, -1, -1).contiguous()  # grey -> 3 channels, centred
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, len(x) - batch + 1, batch)]


def channel_mask(weight: torch.Tensor, groups: int, channels: torch.Tensor) -> torch.Tensor:
    """True at the weight entries owned by the given input channels (hand slicing, group by group)."""
    mask = torch.zeros_like(weight, dtype=torch.bool)
    per_group_in, per_group_out = weight.shape[1], weight.shape[0] // groups
    for c in channels.tolist():
        g, local = divmod(c, per_group_in)
        mask[g * per_group_out : (g + 1) * per_group_out, local] = True
    return mask


class SiluNet(torch.nn.Module):
    """Two convs with functional SiLU (routed by the engine's functional-call mode), a pooled linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.silu(self.c2(torch.nn.functional.silu(self.c1(x))))
        return self.fc(x.mean((-2, -1)))


def fp32_sum_tolerance(reference: torch.Tensor, n_terms: int) -> dict:
    """assert_close tolerances for two fp32 computations of `reference` that add the same terms in another
    order (other kernels, thread counts, a recomputation). A sum of n fp32 terms is off by at most
    n * eps * sum|terms| (Higham); with n the longest reduction on the path and the reference's largest
    magnitude as the scale, the bound follows from the computation, not from one CPU's kernels."""
    eps = torch.finfo(torch.float32).eps
    return {"rtol": 0.0, "atol": n_terms * eps * float(reference.abs().max())}
