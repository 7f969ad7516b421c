"""`trady models`: list the model zoo (name, resolution, normalisation, pretrained source, parameters)."""

from __future__ import annotations

import argparse
import json

import torch

from trady.core.errors import TradyError
from trady.core.formatting import render_table


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the model zoo",
        description=(
            "List the registered models: default input resolution, input normalisation, where the "
            "pretrained weights come from, whether they are available here, and the parameter count "
            "(with the pretrained head)."
        ),
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "--mcu-dir",
        default=None,
        help="folder of the MCU int8 files (default: $TRADY_MCU_DIR, else ../shared/models/mcu)",
    )
    parser.set_defaults(func=run)


def _param_count(name: str, mcu_dir) -> int | None:
    from trady.models import create

    try:
        with torch.no_grad():
            model = create(name, mcu_dir=mcu_dir)
    except TradyError:
        return None  # e.g. an MCU file is missing: its architecture is read from the file
    return sum(p.numel() for p in model.parameters())


def rows(mcu_dir=None) -> list[dict]:
    from trady.models import available, spec, weights_status

    out = []
    for name in available():
        s = spec(name)
        out.append(
            {
                "name": name,
                "resolution": s.resolution,
                "mean": list(s.mean),
                "std": list(s.std),
                "num_classes": s.num_classes,
                "params": _param_count(name, mcu_dir),
                "pretrained_source": s.pretrained_source,
                "weights": weights_status(name, mcu_dir),
            }
        )
    return out


def run(args: argparse.Namespace) -> int:
    table = rows(getattr(args, "mcu_dir", None))
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    header = ("name", "res", "params", "weights", "pretrained source")
    lines = [
        (
            r["name"],
            str(r["resolution"]),
            "?" if r["params"] is None else f"{r['params'] / 1e6:.2f}M",
            r["weights"],
            r["pretrained_source"],
        )
        for r in table
    ]
    print(render_table(header, lines, left=len(header)))
    return 0
