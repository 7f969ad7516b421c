"""The engine's registration point for modern architectures (one place, so engine.py stays small).

- SWAPS: smooth activations -> activations.FewBit* (few-bit derivative), nn.LayerNorm ->
  lowbit.LowBitLayerNorm, nn.MultiheadAttention -> attention.SparseMultiheadAttention;
- configure(): per-module settings from the EngineConfig (bits, norm/attention mode, layer state);
- install(): the functional-call mode (functional_mode) active during the prepared model's forward.
"""

from __future__ import annotations

from torch import nn

from trady import activations, functional_mode, lowbit
from trady.attention import SparseMultiheadAttention
from trady.engine import LayerState, SparseEngine

SWAPS: dict[type, type] = {
    **activations.SWAPS,
    nn.LayerNorm: lowbit.LowBitLayerNorm,
    nn.MultiheadAttention: SparseMultiheadAttention,
}
CLASSES = frozenset(SWAPS.values())
MODULE_ATTRS = ("trady_bits", "trady_mode")  # set here, removed by SparseEngine.restore()


def check_config(config) -> None:
    activations.check_bits(config.activation_bits)
    lowbit.check_mode(config.kept_precision)


def configure(name: str, module: nn.Module, config) -> None:
    """Settings of one swapped module."""
    if isinstance(module, activations.FewBitActivation):
        module.trady_bits = config.activation_bits
    if isinstance(module, (lowbit.LowBitLayerNorm, SparseMultiheadAttention)):
        module.trady_mode = config.kept_precision
    if isinstance(module, SparseMultiheadAttention):
        module.trady = LayerState(name)


def checked_by_mode(module: nn.Module) -> bool:
    """A subclass of a supported kind with its own forward (timm's LayerNorm2d, ...): not swapped, its
    functional calls go through the functional-call mode, which handles them or raises (strict)."""
    return type(module) not in CLASSES and isinstance(module, tuple(SWAPS)) and next(module.children(), None) is None


def install(engine: SparseEngine) -> list:
    """Hooks for functional calls in the forward code of the model's containers (handles to remove)."""
    cfg = engine.config
    mode = functional_mode.FunctionalCalls(cfg.activation_bits, cfg.kept_precision, cfg.mask_bits, cfg.strict)
    engine_classes = engine.engine_classes()

    def passes_through(m: nn.Module) -> bool:
        if checked_by_mode(m):
            return False
        return next(m.children(), None) is None or type(m) in engine_classes

    return functional_mode.install(engine.model, mode, passes_through, engine.sync)
