"""Which training recipe should be the default? (issue 19 item 5)

Runs `trady.train.finetune` on digits (scikit-learn's 8x8 images, upscaled) for every zoo model the
issue names and the strategies trady, s-topk-random, full and classifier, under candidate recipes:

    paper      lr 0.125 for backbone and head, PyTorch's default head init (the paper's recipe)
    bench      backbone lr 0.005, head lr 0.05 from a zero head (the benchmarks' recipe)
    bXXX-hYY   backbone lr 0.XXX, head lr 0.YY from a zero head (b005-h05: 0.005 and 0.5)
    -w0        no warm-up epoch (FinetuneConfig.warmup_epochs 0 instead of 1)
    -m09       SGD momentum 0.9 (with a tenth of the lr)

Everything else is FinetuneConfig's defaults (plain SGD, cosine with 1 warm-up epoch, batch 32, seed 0),
budget 2.2% for the sparse strategies. One row per run is appended to
benchmarks/recipe/results/recipe.json as it finishes (a killed run keeps the rows before it).

    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/recipe/run.py
    .venv/bin/python benchmarks/recipe/run.py --table     # the table of the rows so far (Markdown)
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "recipe.json"
RECIPES = {
    "paper": {"lr": 0.125, "classifier_lr": None, "classifier_init": "default"},
    "bench": {"lr": 0.005, "classifier_lr": 0.05, "classifier_init": "zeros"},
    "b005-h02": {"lr": 0.005, "classifier_lr": 0.2, "classifier_init": "zeros"},
    "b005-h05": {"lr": 0.005, "classifier_lr": 0.5, "classifier_init": "zeros"},
    "b01-h01": {"lr": 0.01, "classifier_lr": 0.1, "classifier_init": "zeros"},
    "b005-h01": {"lr": 0.005, "classifier_lr": 0.1, "classifier_init": "zeros"},
    "b002-h01": {"lr": 0.002, "classifier_lr": 0.1, "classifier_init": "zeros"},
    "b002-h02": {"lr": 0.002, "classifier_lr": 0.2, "classifier_init": "zeros"},
    "bench-w0": {"lr": 0.005, "classifier_lr": 0.05, "classifier_init": "zeros", "warmup_epochs": 0},
    "b005-h01-w0": {"lr": 0.005, "classifier_lr": 0.1, "classifier_init": "zeros", "warmup_epochs": 0},
    "b003-h01-w0": {"lr": 0.003, "classifier_lr": 0.1, "classifier_init": "zeros", "warmup_epochs": 0},
    "b002-h01-w0": {"lr": 0.002, "classifier_lr": 0.1, "classifier_init": "zeros", "warmup_epochs": 0},
    "b0005-h001-m09": {"lr": 0.0005, "classifier_lr": 0.01, "classifier_init": "zeros", "momentum": 0.9},
    "b01-h05": {"lr": 0.01, "classifier_lr": 0.5, "classifier_init": "zeros"},
}
MODELS = ("mcunet-in1", "mbv2-w0.35", "proxyless-w0.3", "mobilenet_v2", "efficientnet_lite0")
STRATEGIES = ("trady", "s-topk-random", "full", "classifier")
SPARSE = ("trady", "s-topk-random")


def load_rows() -> list[dict]:
    return json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []


def save_row(row: dict) -> None:
    """Append one row to the results file (re-read first: several processes may share it)."""
    from trady.core.files import write_json

    write_json(RESULTS, {"benchmark": "recipe", "issue": 19, "dataset": "digits", "rows": [*load_rows(), row],
                         "recipes": RECIPES, "command": "benchmarks/recipe/run.py"})  # fmt: skip


def one_run(model: str, strategy: str, recipe: str, args: argparse.Namespace) -> dict:
    import torch

    from trady.config import FinetuneConfig
    from trady.core.errors import TradyError
    from trady.train.loop import finetune

    resolution = args.resolution if model in ("mobilenet_v2", "efficientnet_lite0") else None
    config = FinetuneConfig(
        model=model, data="digits", strategy=strategy, budget="2.2%" if strategy in SPARSE else None,
        epochs=args.epochs, train_size=args.train_size, test_size=args.test_size, resolution=resolution,
        seed=args.seed, progress=False, measure_memory=False, threads=1, **RECIPES[recipe],
    )  # fmt: skip
    row = {"model": model, "strategy": strategy, "recipe": recipe, **RECIPES[recipe], "seed": args.seed,
           "epochs": args.epochs, "train_size": args.train_size, "test_size": args.test_size}  # fmt: skip
    t0 = time.perf_counter()
    try:
        summary = finetune(config)
        row.update(resolution=summary["resolution"], test_acc=summary["test_acc"], error=None)
    except TradyError as err:  # a non-finite loss: the recipe diverged
        row.update(resolution=resolution, test_acc=None, error=str(err))
    row["wall_time_s"] = time.perf_counter() - t0
    torch.set_num_threads(1)
    return row


def default_rows(rows: list[dict]) -> list[dict]:
    """The rows run with trady's default recipe (trady.config.RECIPES["default"])."""
    from trady.config import RECIPES as LIBRARY

    ours = LIBRARY["default"]
    return [r for r in rows if all(r.get(k, FIELD_DEFAULTS.get(k)) == v for k, v in ours.items())]


FIELD_DEFAULTS = {"warmup_epochs": 1, "momentum": 0.0}  # of the rows whose recipe does not name them


def check(rows: list[dict]) -> dict:
    """The issue's targets (targets.json) on the default recipe's rows: the done-criterion (mcunet-in1, trady)
    and the lowest test accuracy over every model and strategy (no collapse to chance, 0.1)."""
    import sys

    sys.path.insert(0, str(HERE.parent))
    from targets import check_targets, load_targets

    ours = default_rows(rows)
    ratios = {f"{r['model']} {r['strategy']} test_acc": r["test_acc"] or 0.0 for r in ours}
    if ours:
        ratios["lowest test_acc over models and strategies"] = min(r["test_acc"] or 0.0 for r in ours)
    return check_targets(ratios, load_targets(HERE)["targets"])


def table(rows: list[dict]) -> str:
    recipes = [r for r in RECIPES if any(row["recipe"] == r for row in rows)]
    lines = ["| model | strategy | " + " | ".join(recipes) + " |", "|---|---|" + "---|" * len(recipes)]
    seen = []
    for row in rows:
        key = (row["model"], row["strategy"])
        if key not in seen:
            seen.append(key)
    for model, strategy in seen:
        cells = []
        for recipe in recipes:
            hits = [r for r in rows if (r["model"], r["strategy"], r["recipe"]) == (model, strategy, recipe)]
            if not hits:
                cells.append("")
            elif hits[-1]["test_acc"] is None or not math.isfinite(hits[-1]["test_acc"]):
                cells.append("diverged")
            else:
                cells.append(f"{100 * hits[-1]['test_acc']:.1f}")
        lines.append(f"| {model} | {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--train-size", type=int, default=400)
    p.add_argument("--test-size", type=int, default=400)
    p.add_argument("--resolution", type=int, default=128, help="of mobilenet_v2 and efficientnet_lite0 "
                   "(the MCU models run at their own 128)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", action="store_true", help="print the table of the rows so far and stop")
    args = p.parse_args()
    if args.table:
        write_table(load_rows())
        return
    rows = load_rows()
    for model in args.models:
        for strategy in args.strategies:
            for recipe in args.recipes:
                done = [r for r in rows if (r["model"], r["strategy"], r["recipe"], r["seed"], r["epochs"],
                                            r["train_size"]) == (model, strategy, recipe, args.seed, args.epochs,
                                                                 args.train_size)]  # fmt: skip
                if done:
                    continue
                row = one_run(model, strategy, recipe, args)
                rows.append(row)
                save_row(row)
                acc = "diverged" if row["test_acc"] is None else f"{row['test_acc']:.3f}"
                print(f"{model:<20}{strategy:<16}{recipe:<10}{acc:>9}  {row['wall_time_s']:.0f} s", flush=True)
    write_table(load_rows())


def write_table(rows: list[dict]) -> None:
    """Print the table and the targets; write them to results/table.md and the targets into the JSON."""
    import sys

    from trady.core.files import write_json, write_text

    sys.path.insert(0, str(HERE.parent))
    from targets import format_targets

    checked = check(rows)
    text = table(rows)
    print(text + "\n\n" + format_targets(checked))
    write_text(RESULTS.parent / "table.md", text + "\n")
    write_json(RESULTS, {**json.loads(RESULTS.read_text()), "targets": checked})


if __name__ == "__main__":
    main()
