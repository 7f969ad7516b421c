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

from trady.core.errors import TradyError
from trady.engine.costs import CostTable, analyze, bytes_per_slot, parse_budget

PRECISION = "fp32"


def _bytes_at(weight_units: float, activation_units: float, batch: int) -> int:
    return round(bytes_per_slot(PRECISION) * (weight_units + batch * activation_units))


def plan(
    model_name: str,
    resolution: int | None = None,
    budget: str | None = None,
    batch_size: int = 32,
    mcu_dir: str | None = None,
) -> dict:
    """The plan of a zoo model (built without pretrained weights) as a JSON-ready dict."""
    from trady import models

    spec = models.spec(model_name)
    res = spec.resolution if resolution is None else resolution
    if isinstance(res, bool) or not isinstance(res, int) or res < 1:
        raise TradyError(f"invalid resolution {res!r}; accepted: a positive number of pixels, e.g. {spec.resolution}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TradyError(f"invalid batch size {batch_size!r}; accepted: a positive integer")
    model = models.create(model_name, pretrained=False, mcu_dir=mcu_dir)
    try:
        table = analyze(model, example_input=models.example_input(model_name, res),
                        classifier=models.classifier_name(model))  # fmt: skip
    except RuntimeError as err:  # e.g. a resolution too small for the network's strides
        raise TradyError(f"model {model_name!r} cannot run at resolution {res}: {err}") from None
    return plan_from_table(table, model_name, res, budget, batch_size)


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
