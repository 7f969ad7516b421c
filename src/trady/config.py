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
    # how to train (the paper's recipe: plain SGD, cosine with warm-up, frozen BatchNorm)
    strategy: str = "trady"
    budget: str | None = None  # units ("27946"), bytes ("256KB") or share of full fine-tuning ("2.2%")
    profile: str | None = None  # layer-ranking profile JSON; None: the one shipped for the model
    epochs: int = 10
    batch_size: int = 32
    micro_batch_size: int | None = None  # split each step's batch; gradients accumulate (trady.train.microbatch)
    lr: float = 0.125
    classifier_lr: float | None = None  # the fresh head's base LR; None: same as lr
    classifier_init: str = "default"  # the fresh head: "default" (PyTorch's) or "zeros"
    warmup_epochs: int = 1
    momentum: float = 0.0
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
        for name in ("train_size", "test_size", "resolution", "resample_every"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise TradyError(f"{name} must be >= 1, got {v}")
