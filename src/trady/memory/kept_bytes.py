"""Bytes kept for backward: every tensor autograd keeps between forward and backward (saved-tensor hooks).

Each storage is counted once; parameters and buffers are left out (`measure_saved_bytes`, `MemoryReport`).
This is one of two memories never to be confused; the other, what the machine sees while a step runs, is
`trady.memory.resident_peak`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

# ---------------------------------------------------------------------------------------------
# Bytes kept for backward
# ---------------------------------------------------------------------------------------------


@dataclass
class MemoryReport:
    """Bytes kept between forward and backward of one step, plus gradient/optimizer bytes."""

    batch_size: int
    saved_bytes: int  # every tensor kept for backward, each storage once, parameters/buffers excluded
    budgeted_activation_bytes: int  # the kept input slices of selected channels
    budgeted_grad_bytes: int  # gradients of the selected weight slices
    other_grad_bytes: int  # classifier (and biases): outside the budget
    optimizer_state_bytes: int
    analytic_budgeted_bytes: int
    saved_by_kind: dict[str, int] = field(default_factory=dict)
    # The part of saved_bytes the BatchNorm layers keep (train mode: input and batch statistics), outside the
    # budget as the paper leaves it; frozen BatchNorm keeps at most its per-channel scale.
    batchnorm_kept_bytes: int = 0

    @property
    def budgeted_bytes(self) -> int:
        return self.budgeted_activation_bytes + self.budgeted_grad_bytes

    @property
    def rest_saved_bytes(self) -> int:
        return self.saved_bytes - self.budgeted_activation_bytes

    @property
    def total_bytes(self) -> int:
        return self.saved_bytes + self.budgeted_grad_bytes + self.other_grad_bytes + self.optimizer_state_bytes

    def as_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "saved_bytes": self.saved_bytes,
            "budgeted_bytes": self.budgeted_bytes,
            "budgeted_activation_bytes": self.budgeted_activation_bytes,
            "budgeted_grad_bytes": self.budgeted_grad_bytes,
            "rest_saved_bytes": self.rest_saved_bytes,
            "other_grad_bytes": self.other_grad_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "total_bytes": self.total_bytes,
            "analytic_budgeted_bytes": self.analytic_budgeted_bytes,
            "saved_by_kind": dict(self.saved_by_kind),
            "batchnorm_kept_bytes": self.batchnorm_kept_bytes,
        }


def storage_key(t: torch.Tensor) -> tuple:
    """Identifies the storage behind a tensor (views of one storage share it)."""
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr())


@dataclass
class SavedTensors:
    loss: torch.Tensor  # its graph is still alive: call backward on it
    per_storage: dict[tuple, int]  # storage key -> bytes
    by_dtype: dict[str, int]
    attributed: int = 0  # bytes of the storages first kept during a forward of an `attribute_to` module

    @property
    def total(self) -> int:
        return sum(self.per_storage.values())


def measure_saved_bytes(
    model: nn.Module, step: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor] = (),
    attribute_to: Sequence[nn.Module] = (),
) -> SavedTensors:
    """Run `step()` (forward + loss) under saved-tensor hooks and count the bytes kept for backward.

    Each storage counts once; parameters, buffers and `exclude` are left out. The storages first kept
    while one of `attribute_to` runs its forward are also summed apart (`SavedTensors.attributed`).
    """
    skip = {storage_key(t) for t in list(model.parameters()) + list(model.buffers()) + list(exclude)}
    seen: dict[tuple, int] = {}
    by_kind: dict[str, int] = {}
    inside = [0]  # depth of `attribute_to` forwards running now
    attributed = [0]

    def pack(t: torch.Tensor):
        key = storage_key(t)
        if key not in skip and key not in seen:
            nbytes = t.untyped_storage().nbytes()
            seen[key] = nbytes
            kind = str(t.dtype).replace("torch.", "")
            by_kind[kind] = by_kind.get(kind, 0) + nbytes
            if inside[0]:
                attributed[0] += nbytes
        return t

    def enter(*_):
        inside[0] += 1

    def leave(*_):
        inside[0] -= 1

    handles = [m.register_forward_pre_hook(enter) for m in attribute_to]
    handles += [m.register_forward_hook(leave, always_call=True) for m in attribute_to]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = step()
    finally:
        for h in handles:
            h.remove()
    return SavedTensors(loss=loss, per_storage=seen, by_dtype=by_kind, attributed=attributed[0])


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.nbytes
    return total
