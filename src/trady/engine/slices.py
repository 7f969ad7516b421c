"""Trainable weight slices: how they stay in agreement with the model's weights.

A layer's slice (`LayerState.w_slice`) is the leaf an optimizer updates; the model's own weight is what
the forward reads. After every optimizer step a public global step hook writes the stepped slices into
their weights, so the forward never writes anything (correct under torch.compile, and a weight saved
for backward is never bumped by a later forward). An eager forward also writes a slice that differs
from its weight (an update outside torch.optim); a compiled one relies on the hook. The pre-step hook
lets each live engine check the optimizer (`SparseEngine.check_optimizer`) and drops any slice state
(momentum, ...) not made for the slice's current channels, loaded state included (a tag in the state).
"""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Mapping

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from trady.core.errors import TradyError
from trady.engine import functions


def groups_of(module: nn.Module) -> int:
    return getattr(module, "groups", 1)


def empty_slot(module: nn.Module) -> torch.Tensor:
    """The layer's trainable slice with no channel selected (resized in place by select())."""
    none = torch.empty(0, dtype=torch.int64, device=module.weight.device)
    return functions.gather_slice(module.weight.detach(), none, groups_of(module)).requires_grad_(True)


def write_slice_if_changed(module: nn.Module) -> None:
    """Write the layer's slice into its weight where they differ (no write, no version bump, otherwise)."""
    st = module.trady  # sparse_modules.LayerState
    if st.idx is None:
        return
    with torch.no_grad():
        if not torch.equal(functions.gather_slice(module.weight, st.idx, groups_of(module)), st.w_slice):
            functions.scatter_slice_(module.weight, st.idx, st.w_slice, groups_of(module))


# Every live slice: id(slice) -> its layer (weakly); read by the global optimizer step hooks.
SLICE_LAYERS: dict[int, weakref.ref] = {}
ENGINES: weakref.WeakSet = weakref.WeakSet()  # prepared, not yet restored engines
_STEP_HOOKS: list = []


def register_layers(layers) -> None:
    """Make the step hooks see these layers' slices (entries of dead layers are dropped on the way)."""
    for key in [k for k, ref in SLICE_LAYERS.items() if ref() is None]:
        del SLICE_LAYERS[key]
    for layer in layers:
        SLICE_LAYERS[id(layer.trady.w_slice)] = weakref.ref(layer)


def _layer_of(p: torch.Tensor) -> nn.Module | None:
    ref = SLICE_LAYERS.get(id(p))
    layer = ref() if ref is not None else None
    st = getattr(layer, "trady", None)
    return layer if st is not None and st.w_slice is p else None  # never a recycled id


CHANNELS_KEY = "trady_channels"  # in a slice's optimizer state: the channels the state was made for


def _before_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    ids = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for engine in list(ENGINES):
        engine.check_optimizer(optimizer, ids)
    _drop_other_channels_state(optimizer)


def _drop_other_channels_state(optimizer: torch.optim.Optimizer) -> None:
    """A slice's state (momentum, Adam moments) made for other channels than the selected ones, or with no
    tag (loaded from elsewhere), is dropped: the step then starts from fresh state, as after a re-selection."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if state and _layer_of(p) is not None and state.get(CHANNELS_KEY) != _layer_of(p).trady.channels:
                del optimizer.state[p]


def _after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """The optimizer changed its slices: write them into the model's weights (before any next forward)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            layer = _layer_of(p) if p.grad is not None else None
            if layer is not None and layer.trady.idx is not None:
                with torch.no_grad():
                    functions.scatter_slice_(layer.weight, layer.trady.idx, p, groups_of(layer))
                state = optimizer.state.get(p)
                if state:
                    state[CHANNELS_KEY] = layer.trady.channels


def install_step_hooks() -> None:
    if not _STEP_HOOKS:
        _STEP_HOOKS.append(register_optimizer_step_pre_hook(_before_step))
        _STEP_HOOKS.append(register_optimizer_step_post_hook(_after_step))


def check_index_forms(selection) -> None:
    """Channel indices: a list/tuple/range of ints or an integer tensor/array (a set has no order, a str is no list)."""
    accepted = "accepted: {layer name: a list, tuple or range of ints, or an integer tensor}"
    if not isinstance(selection, Mapping):
        raise TradyError(f"a selection must be a mapping, got {type(selection).__name__}; {accepted}")
    for name, idx in selection.items():
        if isinstance(idx, torch.Tensor) or (hasattr(idx, "__array__") and hasattr(idx, "dtype")):
            continue
        ok = isinstance(idx, (list, tuple, range)) and all(
            isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.numel() == 1) for v in idx
        )
        if not ok:
            raise TradyError(f"channel indices of layer {name!r}: got {type(idx).__name__} {idx!r}; {accepted}")
