"""The engine's registration point for modern architectures (one place, so engine.py stays small).

- SWAPS: smooth activations -> activations.FewBit* (few-bit derivative), nn.LayerNorm ->
  kept_tensors.LowBitLayerNorm, nn.MultiheadAttention -> attention.SparseMultiheadAttention;
- configure(): per-module settings from the EngineConfig (bits, norm/attention mode, layer state);
- install(): the functional-call mode (functional_calls) active during the prepared model's forward, and
  activation checkpointing of the modules named in EngineConfig.recompute.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trady.core.errors import TradyError, unknown_name
from trady.engine import activations, functional_calls, kept_tensors, slices
from trady.engine.attention import SparseMultiheadAttention
from trady.engine.modules import LayerState

SWAPS: dict[type, type] = {
    **activations.SWAPS,
    nn.LayerNorm: kept_tensors.LowBitLayerNorm,
    nn.MultiheadAttention: SparseMultiheadAttention,
}
CLASSES = frozenset(SWAPS.values())
SUPPORTED_KINDS = (
    "SiLU, GELU, Hardswish, Sigmoid, Hardsigmoid, Tanh, Mish, LeakyReLU, ELU, LayerNorm, MultiheadAttention "
    "(self-attention)"
)


def check_config(config) -> None:
    activations.check_bits(config.activation_bits)
    kept_tensors.check_mode(config.kept_precision)


def configure(name: str, module: nn.Module, config) -> None:
    """Settings of one swapped module (`trady*` attributes: SparseEngine.restore() removes them)."""
    if isinstance(module, activations.FewBitActivation):
        module.trady_bits = config.activation_bits
    if isinstance(module, (kept_tensors.LowBitLayerNorm, SparseMultiheadAttention)):
        module.trady_mode = config.kept_precision
    if isinstance(module, SparseMultiheadAttention):
        module.trady = LayerState(name, w_slice=slices.empty_slot(module))


def checked_by_mode(module: nn.Module) -> bool:
    """Whether the functional-call mode checks this module's own calls (handles them or, strict, raises):
    a leaf subclass of a supported kind with its own forward (timm's LayerNorm2d, ...), a parameter-free
    leaf defined outside torch (transformers' GELUActivation calling F.gelu, a user's Swish); the forward
    code of modules with children (nn.TransformerEncoderLayer, a user's block) is always checked."""
    if next(module.children(), None) is not None:
        return type(module) not in CLASSES
    if type(module) in CLASSES:
        return False
    return isinstance(module, tuple(SWAPS)) or _foreign_stateless(module)


def _foreign_stateless(module: nn.Module) -> bool:
    """A leaf without parameters or buffers whose class lives outside torch: its forward is plain torch
    calls on its inputs, which the mode sees as it sees a container's (torch's own leaves stay guarded)."""
    return (
        not type(module).__module__.startswith("torch.")
        and next(module.parameters(recurse=False), None) is None
        and next(module.buffers(recurse=False), None) is None
    )


def install(engine) -> list:
    """Checks the config; hooks for functional calls in the forward code of the model (handles to remove)."""
    cfg = engine.config
    check_config(cfg)
    mode = functional_calls.FunctionalCalls(cfg.activation_bits, cfg.kept_precision, cfg.mask_bits, cfg.strict)

    def passes_through(m: nn.Module) -> bool:  # engine classes and guarded leaves: their calls are theirs
        return type(m) in CLASSES or (next(m.children(), None) is None and not checked_by_mode(m))

    handles = functional_calls.install(engine.model, mode, passes_through, engine.sync)
    return handles + [_Recompute(engine.model, name, mode) for name in cfg.recompute]


class _Recompute:
    """Runs a module's forward under torch.utils.checkpoint (reentrant: its inputs go through
    save_for_backward, so the engine's measurement counts them); everything inside is recomputed in
    backward, dropout's RNG replayed, with the functional-call mode active as in the forward (so the
    recomputed graph is the forward's; in strict mode the calls it cannot handle are named there, as the
    forward ran without grad). A forward whose inputs need no gradient runs as it is (the reentrant form
    could not give the slices inside their gradients); `remove()` undoes the patch.
    Kept inputs are all there is: the slices of selected layers inside are not kept (recomputed), so the
    measured budgeted bytes fall below the analytic ones."""

    def __init__(self, model: nn.Module, name: str, mode: functional_calls.FunctionalCalls) -> None:
        names = [n for n, _ in model.named_modules() if n]
        if name not in names:
            raise unknown_name("module to recompute", name, names)
        self.module = module = model.get_submodule(name)
        if "forward" in vars(module):
            raise TradyError(f"module {name!r} already has an instance forward; accepted: a module with its class's")
        original = module.forward

        def run(*args, **kwargs):
            if mode.active:  # the forward pass (under no_grad here)
                return original(*args, **kwargs)
            mode.stack.append((name, False))
            mode.active = True
            mode.__enter__()
            try:
                out = original(*args, **kwargs)
            finally:
                mode.__exit__(None, None, None)
                mode.active = False
                mode.stack.clear()
            mode.raise_offenders()
            return out

        def forward(*args, **kwargs):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
                return original(*args, **kwargs)
            return checkpoint(functools.partial(run, **kwargs), *args, use_reentrant=True)

        module.forward = forward

    def remove(self) -> None:
        vars(self.module).pop("forward", None)
