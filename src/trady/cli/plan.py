"""`trady plan`: the per-layer, per-input-channel costs of a model and what a budget buys.

The numbers come from trady.train.plan (its docstring lists the `--json` keys, a stable interface);
this module parses the options and prints the table.
"""

from __future__ import annotations

import argparse
import json

from trady.core.errors import TradyError
from trady.core.formatting import fmt_bytes, render_table
from trady.train.plan import plan


def register(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="per-layer memory units and FLOPs per input channel; what a budget buys",
        description="Print every updatable layer of a zoo model with its cost per input channel (weight "
        "units C'*k*k/g, activation units H*W of its input, weight-derivative FLOPs) and the totals of full "
        "fine-tuning; with --budget, the budget in units, its share of full fine-tuning and its bytes, and "
        "for one TraDy draw the predicted step peak (max(inference working set, backward transient) + "
        "budgeted bytes + the rest kept for backward + classifier gradients; trady.train.prediction, one no-grad "
        "forward profiled here) and the step-time floor (1 + the share of forward FLOPs at and above the "
        "lowest selected layer, in forwards); --micro-batch (needs --budget) predicts them per micro-batch.",
    )
    p.add_argument("--model", required=True,
                   help="zoo model name (see `trady models`), or your own: path/to/file.py:build_fn or "
                   "package.module:build_fn (this imports and RUNS that code; give --resolution)")  # fmt: skip
    p.add_argument("--resolution", type=int, help="input resolution in pixels (default: the model's)")
    p.add_argument("--budget", help="units (27946), bytes (256KB, 1.5MiB) or share of full fine-tuning (2.2%%); "
                   "also prints the predicted step peak and step-time floor")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="batch for the byte figures (default 32)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="needs --budget: predict the step peak for micro-batches of this size")  # fmt: skip
    p.add_argument("--profile", help="with --budget: the layer-ranking profile (JSON of `trady rank`) the draw "
                   "uses (default: the zoo model's shipped one; none: a D-Full Random draw over all layers)")
    p.add_argument("--mcu-dir", help="folder of the paper's int8 MCU models (default ../shared/models/mcu)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


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
    b = p["batch_size"]
    lines = [
        f"model {p['model']} at {p['resolution']}x{p['resolution']}: {len(p['layers'])} updatable layers "
        f"(classifier {p['classifier']!r} always trained, outside the budget)",
        "",
        render_table(head, rows, left=2),
        "",
        f"full fine-tuning   {p['full_units']:,} units = {p['full_weight_units']:,} weight + "
        f"{p['full_activation_units']:,} activation (per sample)",
        f"                   {p['full_flops']:,} weight-derivative FLOPs (MACs) per sample",
        f"                   fp32: {fmt_bytes(p['full_bytes_fp32']['batch_1'], 2)} at batch 1, "
        f"{fmt_bytes(p['full_bytes_fp32'][f'batch_{b}'], 2)} at batch {b}",
    ]
    if "budget_units" in p:
        lines += [
            f"budget {p['budget']!s:<11} {p['budget_units']:,} units = {100 * p['budget_fraction']:.2f}% of full "
            "fine-tuning",
            f"                   fp32: {fmt_bytes(p['budget_bytes_fp32']['batch_1'], 2)} at batch 1, "
            f"{fmt_bytes(p['budget_bytes_fp32'][f'batch_{b}'], 2)} at batch {b} "
            "(weight/activation split of full fine-tuning)",
        ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.micro_batch is not None and args.budget is None:
        raise TradyError(f"--micro-batch {args.micro_batch} needs --budget (it sizes the predicted step peak)")
    p = plan(args.model, args.resolution, args.budget, args.batch_size, args.mcu_dir)
    if args.budget is not None:  # the predicted step peak and step-time floor of a TraDy draw (trady.train.prediction)
        from trady.train.prediction import format_prediction, predict_step_peak

        p["step_peak"] = predict_step_peak(
            args.model, p["resolution"], args.budget, args.batch_size, args.micro_batch, mcu_dir=args.mcu_dir,
            profile=args.profile,
        )
    print(json.dumps(p, indent=2) if args.json else format_plan(p))
    if args.budget is not None and not args.json:
        print(format_prediction(p["step_peak"]))
    return 0
