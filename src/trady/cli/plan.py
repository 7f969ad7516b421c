"""`trady plan`: the per-layer, per-input-channel costs of a model and what a budget buys.

JSON (`--json`), an interface other tools read; keys are stable:
  model, resolution, classifier, full_units, full_weight_units, full_activation_units, full_flops,
  layers: [{name, kind, in_channels, out_channels, kernel_size, groups, input_hw, output_hw, stride,
            weight_units_per_channel, activation_units_per_channel, flops_per_channel, full_units}],
  full_bytes_fp32: {batch_1, batch_<B>}, batch_size,
  with --budget: budget (as given), budget_units, budget_fraction (of full fine-tuning),
                 budget_bytes_fp32: {batch_1, batch_<B>}.
Units follow the paper (one slot each, activations per sample); bytes at a batch count activation
slots once per sample. A budget given in bytes is read per sample (batch 1), as `trady finetune` does.
"""

from __future__ import annotations

import argparse
import json

from trady.costs import CostTable, analyze, bytes_per_slot, parse_budget

PRECISION = "fp32"


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="per-layer memory units and FLOPs per input channel; what a budget buys",
        description="Print every updatable layer of a zoo model with its cost per input channel (weight "
        "units C'*k*k/g, activation units H*W of its input, weight-derivative FLOPs) and the totals of full "
        "fine-tuning; with --budget, the budget in units, its share of full fine-tuning and its bytes.",
    )
    p.add_argument("--model", required=True, help="zoo model name (see `trady models`)")
    p.add_argument("--resolution", type=int, help="input resolution in pixels (default: the model's)")
    p.add_argument("--budget", help="units (27946), bytes (256KB, 1.5MiB) or share of full fine-tuning (2.2%%)")
    p.add_argument("--batch-size", type=int, default=32, help="batch for the byte figures (default 32)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="with --budget: predict the step peak for micro-batches of this size")  # fmt: skip
    p.add_argument("--mcu-dir", help="folder of the paper's int8 MCU models (default ../shared/models/mcu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _bytes_at(weight_units: float, activation_units: float, batch: int) -> int:
    return round(bytes_per_slot(PRECISION) * (weight_units + batch * activation_units))


def plan(
    model_name: str,
    resolution: int | None = None,
    budget: str | None = None,
    batch_size: int = 32,
    mcu_dir: str | None = None,
) -> dict:
    """The plan as a JSON-ready dict (the keys of `trady plan --json`)."""
    from trady import models
    from trady.errors import TradyError

    spec = models.spec(model_name)
    res = spec.resolution if resolution is None else resolution
    if isinstance(res, bool) or not isinstance(res, int) or res < 1:
        raise TradyError(f"invalid resolution {res!r}; accepted: a positive number of pixels, e.g. {spec.resolution}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TradyError(f"invalid batch size {batch_size!r}; accepted: a positive integer")
    model = models.create(model_name, pretrained=False, mcu_dir=mcu_dir)
    try:
        table = analyze(model, (1, 3, res, res), classifier=models.classifier_name(model))
    except RuntimeError as err:  # e.g. a resolution too small for the network's strides
        raise TradyError(f"model {model_name!r} cannot run at resolution {res}: {err}") from None
    return plan_from_table(table, model_name, res, budget, batch_size)


def plan_from_table(table: CostTable, model_name: str, resolution: int, budget, batch_size: int) -> dict:
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


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_plan(p: dict) -> str:
    head = ["name", "kind", "C", "C'", "k", "groups", "input HxW", "W units/ch", "A units/ch", "FLOPs/ch", "full units"]
    rows = [
        [
            lay["name"],
            lay["kind"],
            str(lay["in_channels"]),
            str(lay["out_channels"]),
            "x".join(map(str, lay["kernel_size"])),
            str(lay["groups"]),
            "x".join(map(str, lay["input_hw"])),
            f"{lay['weight_units_per_channel']:,}",
            f"{lay['activation_units_per_channel']:,}",
            f"{lay['flops_per_channel']:,}",
            f"{lay['full_units']:,}",
        ]
        for lay in p["layers"]
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    left = {0, 1}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    b = p["batch_size"]
    lines = [
        f"model {p['model']} at {p['resolution']}x{p['resolution']}: {len(p['layers'])} updatable layers "
        f"(classifier {p['classifier']!r} always trained, outside the budget)",
        "",
        line(head),
        line(["-" * w for w in widths]),
        *(line(r) for r in rows),
        "",
        f"full fine-tuning   {p['full_units']:,} units = {p['full_weight_units']:,} weight + "
        f"{p['full_activation_units']:,} activation (per sample)",
        f"                   {p['full_flops']:,} weight-derivative FLOPs (MACs) per sample",
        f"                   fp32: {_fmt_bytes(p['full_bytes_fp32']['batch_1'])} at batch 1, "
        f"{_fmt_bytes(p['full_bytes_fp32'][f'batch_{b}'])} at batch {b}",
    ]
    if "budget_units" in p:
        lines += [
            f"budget {p['budget']!s:<11} {p['budget_units']:,} units = {100 * p['budget_fraction']:.2f}% of full "
            "fine-tuning",
            f"                   fp32: {_fmt_bytes(p['budget_bytes_fp32']['batch_1'])} at batch 1, "
            f"{_fmt_bytes(p['budget_bytes_fp32'][f'batch_{b}'])} at batch {b} "
            "(weight/activation split of full fine-tuning)",
        ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    p = plan(args.model, args.resolution, args.budget, args.batch_size, args.mcu_dir)
    if args.budget is not None:  # the predicted step peak and step-time floor of a TraDy draw (trady.step_peak)
        from trady.step_peak import format_prediction, predict_step_peak

        p["step_peak"] = predict_step_peak(
            args.model, p["resolution"], args.budget, args.batch_size, args.micro_batch, mcu_dir=args.mcu_dir
        )
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    if args.budget is not None and not args.json:
        print(format_prediction(p["step_peak"]))
    return 0
