"""The BatchNorm regime of a prepared model, `EngineConfig.batchnorm`: "frozen" (default) or "train".

"frozen", trady's regime: every BatchNorm2d is a per-channel affine map on its running statistics, never
updated, folded into the conv right before it where there is one (modules.FrozenBatchNorm2d,
FoldedBatchNorm2d). Its backward keeps at most its C scale values: this is what makes the savings real.

"train", the regime of the paper's predecessor (its trainer calls model.train() every epoch on float
models with their BatchNorm layers in place): every BatchNorm2d stays unfolded and stock
(modules.TrainBatchNorm2d): in train mode it normalises with the batch statistics and updates its
running statistics, in eval mode it uses them. The convolutions before it become scale-invariant. Its
backward keeps what stock autograd keeps: its input and the batch mean and inverse standard deviation
of every channel, for each BatchNorm on the backprop path (above the lowest selected layer). That
memory is outside the budget, as the paper leaves it; it is measured (MemoryReport.batchnorm_kept_bytes).

In both regimes the affine parameters (gamma, beta) stay frozen: a sparse strategy trains only the
selected channels of its layers (as the predecessor trains only the selected neurons), with
`train_bias` the shifts beta too. Which regime a module is in follows its `training` flag ("train") or
never changes ("frozen"); `batchnorm_training(model)` puts only the BatchNorm layers into train mode
(dropout stays off), as trady's training loop does with `FinetuneConfig(batchnorm="train")`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from trady.config import BATCHNORM_MODES as MODES
from trady.core.errors import TradyError


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise TradyError(f"batchnorm must be one of {', '.join(MODES)}, got {mode!r}")


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer of the model (stock or prepared), in module order."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def batchnorm_training(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Only the BatchNorm layers in train mode (`on`) for the block; every flag put back afterwards."""
    layers = batchnorms(model)
    flags = [m.training for m in layers]
    try:
        for m in layers:
            m.train(on)
        yield
    finally:
        for m, flag in zip(layers, flags):
            m.train(flag)
