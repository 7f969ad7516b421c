"""The engine's registration point for modern architectures (one place, so engine.py stays small).

- SWAPS: smooth activations -> activations.FewBit* (few-bit derivative), nn.LayerNorm ->
  lowbit.LowBitLayerNorm, nn.MultiheadAttention -> attention.SparseMultiheadAttention;
- configure(): per-module settings from the EngineConfig (bits, norm/attention mode, layer state);
- install(): the functional-call mode (functional_mode) active during the prepared model's forward.
"""

from __future__ import annotations

from torch import nn

from trady import activations, functional_mode, lowbit, slices
from trady.attention import SparseMultiheadAttention
from trady.sparse_modules import LayerState

SWAPS: dict[type, type] = {
    **activations.SWAPS,
    nn.LayerNorm: lowbit.LowBitLayerNorm,
    nn.MultiheadAttention: SparseMultiheadAttention,
}
CLASSES = frozenset(SWAPS.values())
SUPPORTED_KINDS = (
    "SiLU, GELU, Hardswish, Sigmoid, Hardsigmoid, Tanh, Mish, LeakyReLU, ELU, LayerNorm, MultiheadAttention "
    "(self-attention)"
)


def check_config(config) -> None:
    activations.check_bits(config.activation_bits)
    lowbit.check_mode(config.kept_precision)


def configure(name: str, module: nn.Module, config) -> None:
    """Settings of one swapped module (`trady*` attributes: SparseEngine.restore() removes them)."""
    if isinstance(module, activations.FewBitActivation):
        module.trady_bits = config.activation_bits
    if isinstance(module, (lowbit.LowBitLayerNorm, SparseMultiheadAttention)):
        module.trady_mode = config.kept_precision
    if isinstance(module, SparseMultiheadAttention):
        module.trady = LayerState(name, w_slice=slices.empty_slot(module))


def checked_by_mode(module: nn.Module) -> bool:
    """Whether the functional-call mode checks this module's own calls (handles them or, strict, raises):
    a leaf subclass of a supported kind with its own forward (timm's LayerNorm2d, ...); the forward code
    of modules with children (nn.TransformerEncoderLayer, a user's block) is always checked."""
    if next(module.children(), None) is not None:
        return type(module) not in CLASSES
    return type(module) not in CLASSES and isinstance(module, tuple(SWAPS))


def install(engine) -> list:
    """Checks the config; hooks for functional calls in the forward code of the model (handles to remove)."""
    cfg = engine.config
    check_config(cfg)
    mode = functional_mode.FunctionalCalls(cfg.activation_bits, cfg.kept_precision, cfg.mask_bits, cfg.strict)

    def passes_through(m: nn.Module) -> bool:  # engine classes and guarded leaves: their calls are theirs
        return type(m) in CLASSES or (next(m.children(), None) is None and not checked_by_mode(m))

    return functional_mode.install(engine.model, mode, passes_through, engine.sync)
