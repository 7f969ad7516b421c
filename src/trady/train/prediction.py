"""Predicted peak and time floor of an engine step, from one inference forward and the selection.

The method's premise is that the device can run the forward pass; a channel-sparse step adds to it:
  predicted step peak = max(inference working set, backward transient)
                        + budgeted bytes (kept input slices + slice gradients, analytic, costs.py)
                        + the rest kept for backward (bit masks, pooling positions: measured at the
                          forward's batch with saved-tensor hooks)
                        + the classifier's (and biases') gradients.
- inference working set: the highest live bytes of a no-grad forward at the forward's batch (the
  micro-batch when given), from the allocator's accounting (trady.memory.timeline.profile_step);
- backward transient: the highest live bytes of that forward within the layers at and above the
  lowest selected layer: input gradients flow down to it, and a layer's backward holds its output's
  and its input's gradient (plus a residual's), as its forward holds its input and output.
The two never coincide: the forward's tensors are gone when backward runs, hence the max.
Step-time floor (in forwards): 1 + the share of forward FLOPs at and above the lowest selected layer
(the input gradients of those layers must be computed; the slice weight gradients are small).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from trady.core.formatting import mib
from trady.engine.costs import PRECISION_OF_DTYPE


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
    model: str | nn.Module,
    resolution: int,
    budget: str,
    batch_size: int,
    micro_batch_size: int | None = None,
    *,
    profile=None,
    seed: int = 0,
    num_classes: int = 10,
    mask_bits: int = 1,
    mcu_dir: str | None = None,
    classifier: str | None = None,
) -> dict:
    """The prediction for one draw as a JSON-ready dict (bytes).

    `model`: a zoo name (built without pretrained weights; its shipped profile is used), a user builder
    (`file.py:build_fn`, `package.module:build_fn`: runs that code) or any nn.Module taking
    [B, 3, resolution, resolution] (left untouched: the engine prepares a copy). `profile`: a
    RankingProfile (or its path) for a TraDy draw; a zoo model without one, or a module without a profile,
    gets a D-Full Random draw over all layers, which reaches lower layers and so predicts no less.
    """
    import copy

    from trady import models
    from trady.config import check_micro_batch
    from trady.engine import EngineConfig, SparseEngine
    from trady.engine.costs import analyze
    from trady.memory.timeline import profile_step
    from trady.models import entry
    from trady.selection import ranking, strategies

    check_micro_batch(micro_batch_size)
    torch.manual_seed(seed)
    if isinstance(model, str) and entry.is_entry_point(model):  # a user's builder: runs that code
        model_name, module = model, entry.build(model, num_classes=num_classes)
    elif isinstance(model, str):
        model_name = model
        module = models.create(model, pretrained=False, num_classes=num_classes, mcu_dir=mcu_dir)
        classifier = classifier or models.classifier_name(module)
        if profile is None and model in ranking.shipped_profiles():
            profile = ranking.load_profile(model)
    else:
        model_name, module = type(model).__name__, copy.deepcopy(model)
    if isinstance(profile, (str, bytes)) or hasattr(profile, "__fspath__"):
        profile = ranking.RankingProfile.load(profile)
    module = module.eval()
    gen = torch.Generator().manual_seed(seed)
    b = min(micro_batch_size or batch_size, batch_size)
    tokens = isinstance(model, str) and model in models.available() and models.spec(model).inputs == "tokens"
    if tokens:  # token ids; `resolution` is the length
        x = models.example_input(model, resolution, batch=b)
    else:
        x = torch.randn(b, 3, resolution, resolution, generator=gen)
    costs = analyze(module, example_input=x[:1], classifier=classifier)
    with torch.no_grad():
        out_classes = module(x[:1]).shape[-1]
    y = torch.randint(0, out_classes, (b,), generator=gen)
    if profile is not None:
        profile = profile.matched_to(costs)
    draw = strategies.draw_once(costs, budget, profile=profile, model=module, seed=seed)
    selection, drawn_by = draw

    def inference_step() -> None:
        with torch.no_grad():
            F.cross_entropy(module(x), y)

    for p in module.parameters():
        p.requires_grad_(False)
    prof = profile_step(module, inference_step)
    lowest = next((n for n in costs.names if n in selection), None)
    # The forward's segments from the lowest selected layer on (its forward mark closes its segment).
    labels = [s.label for s in prof.segments]
    start = labels.index(f"fwd {lowest}") if lowest is not None and f"fwd {lowest}" in labels else len(labels)
    transient = max((s.peak_bytes for s in prof.segments[start:]), default=0)

    engine = SparseEngine(module, x[:1], EngineConfig(classifier=costs.classifier, mask_bits=mask_bits))
    engine.select(selection)
    params = engine.parameters()
    saved, budget_act = engine.measure_saved(lambda: F.cross_entropy(module(x), y))
    del saved.loss
    slices = engine.slice_parameters()  # the kept slices' dtype is the slot precision (public view)
    precision = PRECISION_OF_DTYPE.get(slices[0].dtype, "fp32") if slices else "fp32"
    slice_grad = sum(p.nbytes for p in slices)
    analytic_act = costs.selection_bytes(selection, batch_size=b, precision=precision) - slice_grad
    other_grad = sum(p.nbytes for p in params) - slice_grad
    kept_rest = saved.total - budget_act
    budgeted = analytic_act + slice_grad
    peak = max(prof.peak_bytes, transient) + budgeted + kept_rest + other_grad
    share, floor = time_floor(costs, lowest)
    engine.restore()
    return {
        "model": model_name,
        "resolution": resolution,
        "budget": str(budget),
        "batch_size": batch_size,
        "micro_batch_size": micro_batch_size,
        "forward_batch": b,
        "strategy": drawn_by,
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


_mib = functools.partial(mib, digits=1)  # trady.core.formatting


def format_prediction(p: dict) -> str:
    micro = f" in micro-batches of {p['micro_batch_size']}" if p.get("micro_batch_size") else ""
    return "\n".join(
        [
            f"predicted step peak  {_mib(p['predicted_step_peak_bytes'])} at batch {p['batch_size']}{micro} "
            f"(a {p.get('strategy', 'trady')} draw: {p['selected_channels']} channels in "
            f"{p['selected_layers']} layers)",
            f"                     = max(inference working set {_mib(p['inference_working_set_bytes'])}, "
            f"backward transient {_mib(p['backward_transient_bytes'])}) + budgeted {_mib(p['budgeted_bytes'])} "
            f"+ masks and rest kept {_mib(p['kept_rest_bytes'])} + classifier gradients {_mib(p['gradient_bytes'])}",
            f"step-time floor      {p['step_time_floor_forwards']:.2f} forwards (1 + "
            f"{100 * p['forward_flops_share_above_lowest']:.0f}% of forward FLOPs at and above "
            f"{p['lowest_selected_layer']})",
        ]
    )
