"""Predicted peak and time floor of an engine step, from one inference forward and the selection.

The method's premise is that the device can run the forward pass; a channel-sparse step adds to it:
  predicted step peak = max(inference working set, backward transient)
                        + budgeted bytes (kept input slices + slice gradients, analytic, costs.py)
                        + the rest kept for backward (bit masks, pooling positions: measured at the
                          forward's batch with saved-tensor hooks)
                        + the classifier's (and biases') gradients.
- inference working set: the highest live bytes of a no-grad forward at the forward's batch (the
  micro-batch when given), from the allocator's accounting (trady.timeline.profile_step);
- backward transient: the highest live bytes of that forward within the layers at and above the
  lowest selected layer: input gradients flow down to it, and a layer's backward holds its output's
  and its input's gradient (plus a residual's), as its forward holds its input and output.
The two never coincide: the forward's tensors are gone when backward runs, hence the max.
Step-time floor (in forwards): 1 + the share of forward FLOPs at and above the lowest selected layer
(the input gradients of those layers must be computed; the slice weight gradients are small).
"""

from __future__ import annotations

import functools

import torch.nn.functional as F

from trady.costs import PRECISION_OF_DTYPE
from trady.text import mib


def _forward_macs(costs, name: str) -> int:
    lay = costs.by_name[name]
    return int(lay.flops_per_channel) * int(lay.in_channels)  # weight-derivative MACs = forward MACs


def time_floor(costs, lowest: str | None) -> tuple[float, float]:
    """(share of forward MACs at and above `lowest`, the step-time floor 1 + share, in forwards)."""
    if lowest is None:
        return 0.0, 1.0
    names = costs.names
    total = sum(_forward_macs(costs, n) for n in names) or 1
    above = sum(_forward_macs(costs, n) for n in names[names.index(lowest) :])
    share = above / total
    return share, 1.0 + share


def predict_step_peak(
    model_name: str,
    resolution: int,
    budget: str,
    batch_size: int,
    micro_batch_size: int | None = None,
    *,
    layers: str = "auto",
    seed: int = 0,
    num_classes: int = 10,
    mask_bits: int = 1,
    mcu_dir: str | None = None,
) -> dict:
    """The prediction as a JSON-ready dict (bytes); the selection is drawn as the benchmarks draw it."""
    from trady.memory_bench import MemoryBenchConfig, step_inputs
    from trady.microbatch import check_micro_batch
    from trady.timeline import profile_step
    from trady.variants import build

    check_micro_batch(micro_batch_size)
    cfg = MemoryBenchConfig(
        model=model_name, resolution=resolution, budget=budget, batch_size=batch_size,
        micro_batch_size=micro_batch_size, layers=layers, seed=seed, num_classes=num_classes,
        pretrained=False, mask_bits=mask_bits,
    )  # fmt: skip
    inp, _ = step_inputs(cfg, mcu_dir=mcu_dir)
    b = min(micro_batch_size or batch_size, batch_size)
    costs, selection = inp.costs, inp.selection
    inference = build("inference", inp)
    prof = profile_step(inference.model, inference.step)
    lowest = next((n for n in costs.names if n in selection), None)
    # The forward's segments from the lowest selected layer on (its forward mark closes its segment).
    labels = [s.label for s in prof.segments]
    start = labels.index(f"fwd {lowest}") if lowest is not None and f"fwd {lowest}" in labels else len(labels)
    transient = max((s.peak_bytes for s in prof.segments[start:]), default=0)

    engine = build("engine", inp)
    x, y = inp.x[:b], inp.y[:b]
    saved, budget_act = engine.engine.measure_saved(lambda: F.cross_entropy(engine.model(x), y))
    del saved.loss
    slices = engine.engine.slice_parameters()  # the kept slices' dtype is the slot precision (public view)
    precision = PRECISION_OF_DTYPE.get(slices[0].dtype, "fp32") if slices else "fp32"
    analytic_act = costs.selection_bytes(selection, batch_size=b, precision=precision) - sum(
        p.nbytes for p in engine.engine.slice_parameters()
    )
    slice_grad = sum(p.nbytes for p in engine.engine.slice_parameters())
    other_grad = sum(p.nbytes for p in engine.params) - slice_grad
    kept_rest = saved.total - budget_act
    budgeted = analytic_act + slice_grad
    peak = max(prof.peak_bytes, transient) + budgeted + kept_rest + other_grad
    share, floor = time_floor(costs, lowest)
    return {
        "model": model_name,
        "resolution": resolution,
        "budget": str(budget),
        "batch_size": batch_size,
        "micro_batch_size": micro_batch_size,
        "forward_batch": b,
        "inference_working_set_bytes": int(prof.peak_bytes),
        "backward_transient_bytes": int(transient),
        "budgeted_bytes": int(budgeted),
        "kept_rest_bytes": int(kept_rest),
        "gradient_bytes": int(other_grad),
        "predicted_step_peak_bytes": int(peak),
        "lowest_selected_layer": lowest,
        "forward_flops_share_above_lowest": share,
        "step_time_floor_forwards": floor,
        "selected_channels": int(sum(len(i) for i in selection.values())),
        "selected_layers": len(selection),
    }





_mib = functools.partial(mib, digits=1)  # trady.text


def format_prediction(p: dict) -> str:
    micro = f" in micro-batches of {p['micro_batch_size']}" if p.get("micro_batch_size") else ""
    return "\n".join(
        [
            f"predicted step peak  {_mib(p['predicted_step_peak_bytes'])} at batch {p['batch_size']}{micro} "
            f"(a TraDy draw: {p['selected_channels']} channels in {p['selected_layers']} layers)",
            f"                     = max(inference working set {_mib(p['inference_working_set_bytes'])}, "
            f"backward transient {_mib(p['backward_transient_bytes'])}) + budgeted {_mib(p['budgeted_bytes'])} "
            f"+ masks and rest kept {_mib(p['kept_rest_bytes'])} + classifier gradients {_mib(p['gradient_bytes'])}",
            f"step-time floor      {p['step_time_floor_forwards']:.2f} forwards (1 + "
            f"{100 * p['forward_flops_share_above_lowest']:.0f}% of forward FLOPs at and above "
            f"{p['lowest_selected_layer']})",
        ]
    )
