"""Typed, JSON-serialisable configuration of one fine-tuning run (the CLI fills the same object)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trady.core.errors import TradyError

CHECKPOINT = "checkpoint.pt"  # the run folder's checkpoint file (written by trady.train.checkpoint)
# The one list of settings that never change what a run computes (where it writes, how it reports, how
# fast it runs, where it finds files whose contents are checked anyway): a resume may change them
# (`trady finetune --resume DIR --threads 2`), and a sweep ignores them when it checks that a finished
# run is the one it asks for. Everything else must match.
NON_RESULT_SETTINGS = (
    "out", "progress", "threads", "device", "measure_memory", "control_allocator", "data_dir", "mcu_dir",
)  # fmt: skip


MIN_RESOLUTION = 8  # pixels: below this an image has no spatial structure left for a convolutional network
MAX_SEED = 2**32 - 1  # numpy's and torch's generators both take 0..2**32-1

# The training recipes (docs/models-data-recipe.md#training-recipe). "default" trains every zoo model and
# strategy (chosen from measurements: benchmarks/recipe, docs/results/recipe.md); "paper" is the
# published one (one lr of 0.125 for backbone and head, PyTorch's head init), which collapses the
# float MCU models and full fine-tuning here (docs/results/lr-recipe.md). `trady finetune --recipe paper`.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {"lr": 0.002, "classifier_lr": 0.1, "classifier_init": "zeros", "warmup_epochs": 0, "momentum": 0.0},
    "paper": {"lr": 0.125, "classifier_lr": None, "classifier_init": "default", "warmup_epochs": 1, "momentum": 0.0},
}
_DEFAULT = RECIPES["default"]

# EngineConfig.batchnorm / FinetuneConfig.batchnorm (trady.engine.batchnorm says what each means)
BATCHNORM_MODES = ("frozen", "train")


def check_micro_batch(micro_batch_size: int | None) -> None:
    if micro_batch_size is not None and (isinstance(micro_batch_size, bool) or micro_batch_size < 1):
        raise TradyError(f"micro_batch_size must be a positive integer or None, got {micro_batch_size!r}")


@dataclass
class FinetuneConfig:
    # what to train
    model: str = "mobilenet_v2"  # a zoo name, or a user builder: path/to/file.py:build_fn, package.module:fn
    pretrained: bool = True
    weights: str | None = None  # a local .pth/.safetensors file instead of the packaged weights
    mcu_dir: str | None = None  # folder of the paper's int8 MCU models
    data: str = "fashion-mnist"  # fashion-mnist | digits | cifar10 | cifar100 | PATH to image folder
    data_dir: str | None = None
    train_size: int | None = None
    test_size: int | None = None
    resolution: int | None = None  # None: the model's default
    sequence_length: int | None = None  # token models: ids per text (truncated/padded); None: the model's default
    # how to train (plain SGD, cosine with warm-up, frozen BatchNorm; the rates: RECIPES["default"])
    strategy: str = "trady"
    budget: str | None = None  # units ("27946"), bytes ("256KB") or share of full fine-tuning ("2.2%")
    profile: str | None = None  # layer-ranking profile JSON; None: the one shipped for the model
    epochs: int = 10
    batch_size: int = 32
    micro_batch_size: int | None = None  # split each step's batch; gradients accumulate (trady.train.microbatch)
    lr: float = _DEFAULT["lr"]  # the backbone's base LR (the paper's: 0.125, RECIPES["paper"])
    classifier_lr: float | None = _DEFAULT["classifier_lr"]  # the fresh head's base LR; None: same as lr
    classifier_init: str = _DEFAULT["classifier_init"]  # the fresh head: "zeros" or "default" (PyTorch's)
    warmup_epochs: int = _DEFAULT["warmup_epochs"]
    momentum: float = _DEFAULT["momentum"]
    weight_decay: float = 0.0
    train_bias: bool = False
    mask_bits: int = 1  # ReLU masks kept for backward: 1 (bit-packed) or 8 (bool)
    # "frozen": BatchNorm on running statistics (the default); "train": batch statistics while training,
    # running statistics updated, what BatchNorm keeps for backward outside the budget (trady.engine.batchnorm)
    batchnorm: str = "frozen"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    resample_every: int | None = None  # redraw the selection every N steps; None: once per epoch (the paper)
    # bookkeeping
    seed: int = 0
    out: str | None = None
    device: str = "cpu"
    threads: int | None = None
    progress: bool = True
    measure_memory: bool = True
    # glibc settings for the measured step (trady.memory.resident_peak.PeakMeter): process-wide and not fully undoable
    # (glibc's dynamic mmap threshold stays off), so off for library callers; the CLI turns it on
    control_allocator: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TradyError(f"unknown config keys {unknown}; accepted: {sorted(known)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> FinetuneConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def validate(self) -> None:
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise TradyError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise TradyError(f"lr must be > 0, got {self.lr}")
        if self.classifier_lr is not None and self.classifier_lr <= 0:
            raise TradyError(f"classifier_lr must be > 0, got {self.classifier_lr}")
        if self.warmup_epochs < 0:
            raise TradyError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if self.classifier_init not in ("default", "zeros"):
            raise TradyError(f"classifier_init must be 'default' or 'zeros', got {self.classifier_init!r}")
        check_micro_batch(self.micro_batch_size)
        if self.mask_bits not in (1, 8):
            raise TradyError(f"mask_bits must be 1 or 8, got {self.mask_bits}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise TradyError(f"batchnorm must be one of {', '.join(BATCHNORM_MODES)}, got {self.batchnorm!r}")
        for name in ("train_size", "test_size", "resolution", "sequence_length", "resample_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise TradyError(f"{name} must be >= 1, got {v}")
        self._validate_ranges()

    def _validate_ranges(self) -> None:
        """The ranges beyond the positive counts: each bad value gets one line naming it and what is accepted."""
        import math

        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise TradyError(f"seed must be an integer in 0..{MAX_SEED}, got {self.seed!r}")
        for name in ("lr", "momentum", "weight_decay"):
            if not math.isfinite(getattr(self, name)):
                raise TradyError(f"{name} must be a finite number, got {getattr(self, name)!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise TradyError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.weight_decay < 0:
            raise TradyError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.warmup_epochs > self.epochs:
            raise TradyError(f"warmup_epochs {self.warmup_epochs} is more than epochs {self.epochs}; "
                             f"accepted: 0..{self.epochs} (the warm-up is part of the run)")  # fmt: skip
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise TradyError(f"micro_batch_size {self.micro_batch_size} is larger than batch_size {self.batch_size}; "
                             f"accepted: 1..{self.batch_size} (a micro-batch splits a step's batch)")  # fmt: skip
        if self.threads is not None and (isinstance(self.threads, bool) or self.threads < 1):
            raise TradyError(f"threads must be >= 1 (or unset: torch's default), got {self.threads!r}")
        if self.resolution is not None and self.resolution < MIN_RESOLUTION:
            raise TradyError(f"resolution {self.resolution} is too small; accepted: {MIN_RESOLUTION} pixels or more")
        if self.out is not None:
            if not str(self.out).strip():
                raise TradyError(f"out (the run folder) must be a path, got {self.out!r}")
            if Path(self.out).exists() and not Path(self.out).is_dir():
                raise TradyError(f"out {str(self.out)!r} is an existing file; accepted: a folder (new or a run folder)")
