"""EngineConfig: how the engine prepares a model (head, biases, masks, BatchNorm folding, layer kinds)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    classifier: str | None = None  # module name of the head; None: the last Conv2d/Linear called
    train_bias: bool = False  # also train conv/linear biases and BatchNorm shifts (no activation cost)
    mask_bits: int = 1  # ReLU-family masks: 1 = bit-packed, 8 = bool
    strict: bool = True  # unknown layer kinds on the backprop path raise instead of using stock autograd
    # Fold a frozen BatchNorm2d into the Conv2d right before it (same nn.Sequential, checked by one
    # forward): the conv scales its weight per output channel, the BatchNorm becomes the identity, so
    # neither forward nor backward makes a separate pass over the activation. Gradients are unchanged.
    fold_bn: bool = True
    # "frozen": BatchNorm2d on its running statistics, never updated (folded as above): trady's regime.
    # "train": BatchNorm2d stays unfolded and stock (train mode: batch statistics, running statistics
    # updated); its backward keeps its input and batch statistics, outside the budget (engine/batchnorm.py).
    batchnorm: str = "frozen"
    activation_bits: int | None = 4  # smooth activations' derivative code: 1..4 bits; None: exact (activations.py)
    kept_precision: str = "int8"  # SE, LayerNorm, attention inputs: "int8" or "fp32", exact (kept_tensors.py)
    recompute: tuple[str, ...] = ()  # modules run under activation checkpointing: keep their inputs only
