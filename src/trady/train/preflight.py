"""Checks of a run before any training: it fits the machine's memory, and the model fits the data.

`check_fits_memory` predicts a lower bound of one forward's memory at the run's resolution from a probe
forward at a small resolution (activations grow with the pixel count) and refuses a run that cannot fit
before anything of that size is allocated; `check_output_classes` runs one example forward and
compares the model's output with the dataset's classes. Each refusal is one line (TradyError).
"""

from __future__ import annotations

import os

import torch
from torch import nn

from trady.core.errors import TradyError
from trady.core.formatting import fmt_bytes

PROBE_RESOLUTION = 32  # small enough to cost nothing, large enough for every zoo model's strides
BYTES_PER_VALUE = 4  # fp32 activations


def machine_memory_bytes() -> int | None:
    """The machine's physical memory (MemTotal), or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def largest_layer_values(model: nn.Module, resolution: int) -> int:
    """The most values any leaf module's input and output hold together in one forward of one sample
    at `resolution` (a lower bound of what a forward keeps alive at that layer)."""
    most = 0

    def hook(_module, inputs, output) -> None:
        nonlocal most
        held = sum(t.numel() for t in inputs if isinstance(t, torch.Tensor))
        if isinstance(output, torch.Tensor):
            held += output.numel()
        most = max(most, held)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, resolution, resolution, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return max(most, 2 * 3 * resolution * resolution)


def predicted_forward_bytes(model: nn.Module, resolution: int, batch: int) -> int:
    """A lower bound of one forward's memory at `resolution` for `batch` samples: the largest layer's input
    and output, measured at PROBE_RESOLUTION and scaled by the pixel count. A model that does not run at
    the probe size (a flatten sized for its own resolution) is bounded by its input batch alone."""
    probe = min(resolution, PROBE_RESOLUTION)
    try:
        values = largest_layer_values(model, probe)
    except Exception:  # noqa: BLE001 - the probe size does not fit the model: fall back to the input
        probe, values = resolution, 2 * 3 * resolution * resolution
    return int(values * (resolution / probe) ** 2) * batch * BYTES_PER_VALUE


def check_fits_memory(model: nn.Module, resolution: int, batch: int, memory: int | None = None) -> None:
    """Refuse (one line) a resolution whose forward alone would not fit the machine's memory."""
    memory = machine_memory_bytes() if memory is None else memory
    if memory is None:
        return
    need = predicted_forward_bytes(model, resolution, batch)
    if need <= memory:
        return
    largest = int(resolution * (memory / need) ** 0.5)
    raise TradyError(
        f"resolution {resolution} needs at least {fmt_bytes(need)} for one forward of {batch} samples (the largest "
        f"layer's input and output), more than this machine's {fmt_bytes(memory)}; accepted: a resolution up to "
        f"about {largest} at this batch size"
    )


def check_output_classes(model: nn.Module, example: torch.Tensor, classes: int, name: str) -> None:
    """One forward of one example: the model must output [1, classes] logits for a dataset of `classes`."""
    with torch.no_grad():
        out = model(example[:1])
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[1] != classes:
        raise TradyError(
            f"model {name!r} outputs {shape} for one example, the dataset has {classes} classes; accepted: a model "
            f"whose output is [batch, {classes}] (build_fn(num_classes={classes}))"
        )
