"""`trady export RUN --out FILE`: the fine-tuned model's weights (safetensors) and a JSON of what they are."""

from __future__ import annotations

import argparse
import json

DESCRIPTION = """\
Write the weights of a run's fine-tuned model (its last checkpoint) to FILE.safetensors: the stock
model's state dict, loadable into a fresh model with trady.models.load_into (or
trady.train.export.load_exported). Beside it, FILE.json says what they are: model (zoo name or builder
file.py:fn), classes, resolution, input normalisation (mean, std), strategy, budget, the checkpoint's
epoch and test accuracy, trady version.
"""


def register(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a run's fine-tuned weights (safetensors) and what they are (JSON)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", metavar="RUN", help="a run folder of trady finetune")
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.safetensors (FILE.json is written beside it)")
    p.add_argument("--json", action="store_true", help="print the JSON description")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from trady.train.export import export_run, info_path

    info = export_run(args.run, args.out)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    acc = "-" if info["test_acc"] is None else f"{info['test_acc']:.4f}"
    state = "finished" if info["finished"] else f"unfinished: epoch {info['epoch']} of {info['epochs']}"
    print(f"model {info['model']} ({info['num_classes']} classes, {info['resolution']} px), strategy "
          f"{info['strategy']}, test accuracy {acc} ({state})")  # fmt: skip
    print(f"  weights      {args.out}")
    print(f"  description  {info_path(args.out)}")
    return 0
