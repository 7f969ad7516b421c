"""What a budget buys on a model: the per-layer cost table, the totals of full fine-tuning and the
budget in units, share and bytes, as the JSON-ready dict that `trady plan --json` prints.

Keys (an interface other tools read; stable):
  model, resolution, classifier, full_units, full_weight_units, full_activation_units, full_flops,
  layers: [{name, kind, in_channels, out_channels, kernel_size, groups, input_hw, output_hw, stride,
            weight_units_per_channel, activation_units_per_channel, flops_per_channel, full_units}],
  full_bytes_fp32: {batch_1, batch_<B>}, batch_size,
  with a budget: budget (as given), budget_units, budget_fraction (of full fine-tuning),
                 budget_bytes_fp32: {batch_1, batch_<B>}.
Units follow the paper (one slot each, activations per sample); bytes at a batch count activation
slots once per sample. A budget given in bytes is read per sample (batch 1), as `trady finetune` does.
"""

from __future__ import annotations

from torch import nn

from trady.core.errors import TradyError
from trady.engine.costs import CostTable, analyze, bytes_per_slot, parse_budget

PRECISION = "fp32"


def _bytes_at(weight_units: float, activation_units: float, batch: int) -> int:
    return round(bytes_per_slot(PRECISION) * (weight_units + batch * activation_units))


def plan(
    model_name: str | nn.Module,
    resolution: int | None = None,
    budget: str | None = None,
    batch_size: int = 32,
    mcu_dir: str | None = None,
) -> dict:
    """The plan of a zoo model (built without pretrained weights) or of a user model
    (`path/to/file.py:build_fn`, `package.module:build_fn`: runs that code; or the nn.Module itself; give
    `resolution`) as a JSON-ready dict. The head of a user model is the last Conv2d/Linear its forward calls."""
    import torch

    from trady import models

    model, classifier, default_res = build_for_plan(model_name, resolution, mcu_dir)
    if not isinstance(model_name, str):
        model_name = type(model_name).__name__
    res = default_res if resolution is None else resolution
    if isinstance(res, bool) or not isinstance(res, int) or res < 1:
        example = default_res or 128
        raise TradyError(f"invalid resolution {res!r}; accepted: a positive number of pixels, e.g. {example}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TradyError(f"invalid batch size {batch_size!r}; accepted: a positive integer")
    try:
        zoo = model_name in models.available()  # a zoo model's own kind of input (token ids for text models)
        example = models.example_input(model_name, res) if zoo else torch.zeros(1, 3, res, res)
        table = analyze(model, example_input=example, classifier=classifier)
    except RuntimeError as err:  # e.g. a resolution too small for the network's strides
        raise TradyError(f"model {model_name!r} cannot run at resolution {res}: {err}") from None
    return plan_from_table(table, model_name, res, budget, batch_size)


def build_for_plan(model_name: str, resolution: int | None, mcu_dir: str | None = None):
    """(model, classifier name or None, default resolution or None) of a zoo name, a user entry point or
    an nn.Module (analysed as it is: costs need only one no-grad forward)."""
    from trady import models
    from trady.models import entry

    if isinstance(model_name, nn.Module):
        if resolution is None:
            raise TradyError(f"model {type(model_name).__name__} is a user model: give its input resolution")
        return model_name, None, None
    if entry.is_entry_point(model_name):
        if resolution is None:
            raise TradyError(f"model {model_name!r} is a user model: give its input resolution (--resolution)")
        return entry.build(model_name).eval(), None, None
    spec = models.spec(model_name)
    model = models.create(model_name, pretrained=False, mcu_dir=mcu_dir)
    return model, models.classifier_name(model), spec.resolution


def plan_from_table(table: CostTable, model_name: str, resolution: int, budget, batch_size: int) -> dict:
    """The plan of an analysed model (any nn.Module: see costs.analyze)."""
    layers = []
    for lay in table.layers:
        d = lay.as_dict()
        d["full_units"] = lay.full_units
        layers.append(d)
    batches = sorted({1, batch_size})
    out = {
        "model": model_name,
        "resolution": resolution,
        "classifier": table.classifier,
        "full_units": table.full_units,
        "full_weight_units": table.full_weight_units,
        "full_activation_units": table.full_activation_units,
        "full_flops": table.full_flops,
        "batch_size": batch_size,
        "full_bytes_fp32": {
            f"batch_{b}": _bytes_at(table.full_weight_units, table.full_activation_units, b) for b in batches
        },
        "layers": layers,
    }
    if budget is not None:
        units = parse_budget(budget, table, precision=PRECISION, batch_size=1)
        share = units / table.full_units
        # Bytes at a batch: the budget's units split into weights and activations as in full fine-tuning
        # (the split of the selection a strategy draws varies; at batch 1 bytes = 4 x units exactly).
        out["budget"] = str(budget)
        out["budget_units"] = units
        out["budget_fraction"] = share
        out["budget_bytes_fp32"] = {
            f"batch_{b}": _bytes_at(share * table.full_weight_units, share * table.full_activation_units, b)
            for b in batches
        }
    return out
