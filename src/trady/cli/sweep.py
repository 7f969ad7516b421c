"""`trady sweep`: run a grid of fine-tunes (models x datasets x budgets x strategies x seeds)."""

from __future__ import annotations

import argparse
import json
import sys

from trady.core.errors import TradyError

# FinetuneConfig fields settable directly on the command line: (flag, field, type, metavar).
COMMON_FIELDS = [
    ("--epochs", "epochs", int, "N"),
    ("--batch-size", "batch_size", int, "N"),
    ("--lr", "lr", float, "LR"),
    ("--train-size", "train_size", int, "N"),
    ("--test-size", "test_size", int, "N"),
    ("--resolution", "resolution", int, "PX"),
    ("--warmup-epochs", "warmup_epochs", int, "N"),
    ("--data-dir", "data_dir", str, "DIR"),
    ("--mcu-dir", "mcu_dir", str, "DIR"),
]


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _seeds(value: str) -> list[int]:
    seeds = []
    for part in _csv(value):
        if "-" in part[1:]:  # "0-4": a range, both ends included
            lo, hi = part.split("-", 1)
            try:
                seeds.extend(range(int(lo), int(hi) + 1))
            except ValueError:
                raise argparse.ArgumentTypeError(f"bad seed range {part!r}; e.g. 0,1,2 or 0-4") from None
            continue
        try:
            seeds.append(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seed {part!r}; e.g. 0,1,2 or 0-4") from None
    return seeds


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep",
        help="run a grid of fine-tunes into one results folder (resumable, parallel)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Run every combination of models x datasets x budgets x strategies x seeds, one run folder\n"
            "each under --out (named like mcunet-in1__fashion-mnist__trady__b2.2pct__s0). Non-sparse\n"
            "strategies (full, classifier, bias) ignore budgets: once per model, dataset and seed.\n"
            "Finished runs (summary.json status ok) are skipped, so the same command resumes a sweep;\n"
            "failed runs are recorded (summary.json + error.txt) and run again next time. The grid comes\n"
            "from the flags, from --grid FILE, or both (flags win). Then: trady report DIR."
        ),
        epilog=(
            "example:\n"
            "  trady sweep --out results/mcunet --models mcunet-in1 --datasets fashion-mnist \\\n"
            "      --budgets 2.2%,5.3%,7.5% --strategies trady,d-full-random,full --seeds 0,1,2 --epochs 20\n"
            "grid file (--grid FILE):\n"
            '  {"base": {"epochs": 20, "train_size": 2000}, "models": ["mcunet-in1"],\n'
            '   "datasets": ["fashion-mnist"], "budgets": ["2.2%", "5.3%"], "strategies": ["trady", "full"],\n'
            '   "seeds": [0, 1, 2]}'
        ),
    )
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="results folder (created if needed)")
    p.add_argument("--grid", metavar="FILE", help="JSON grid: {base, models, datasets, budgets, strategies, seeds}")
    grid = p.add_argument_group("grid axes (comma-separated)")
    grid.add_argument("--models", type=_csv, metavar="A,B", help="model names (trady models)")
    grid.add_argument("--datasets", type=_csv, metavar="D,E", help="dataset names or image-folder paths")
    grid.add_argument("--budgets", type=_csv, metavar="B,C",
                      help="budgets as units (27946), bytes (256KB) or shares of full fine-tuning (2.2%%)")
    grid.add_argument("--strategies", type=_csv, metavar="S,T", help="strategy names, e.g. trady,d-full-random,full")
    grid.add_argument("--seeds", type=_seeds, metavar="0,1,2", help="seeds: a list or a range like 0-4")
    base = p.add_argument_group("common settings of every run (FinetuneConfig fields)")
    for flag, name, typ, metavar in COMMON_FIELDS:
        base.add_argument(flag, dest=name, type=typ, default=None, metavar=metavar)
    base.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="any other FinetuneConfig field (VALUE parsed as JSON, else a string); repeatable")
    ex = p.add_argument_group("execution")
    ex.add_argument("--jobs", "-j", type=int, default=None,
                     help="runs at a time, each in its own process (default: cores // --threads)")
    ex.add_argument("--threads", type=int, default=None,
                     help="torch threads per run (default: 1, or cores // --jobs when --jobs is given)")
    ex.add_argument("--dry-run", action="store_true", help="list the runs and whether each would run or be skipped")
    ex.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=run)


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise TradyError(f"--set expects KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip().replace("-", "_"), parsed


def build_grid(args):
    from trady.experiments.sweep import SweepGrid

    data = SweepGrid.load(args.grid).to_dict() if args.grid else {"base": {}}
    base = dict(data.get("base") or {})
    for _, name, _, _ in COMMON_FIELDS:
        if getattr(args, name) is not None:
            base[name] = getattr(args, name)
    for text in args.overrides:
        key, value = _parse_override(text)
        base[key] = value
    data["base"] = base
    for axis in ("models", "datasets", "budgets", "strategies", "seeds"):
        if getattr(args, axis) is not None:
            data[axis] = getattr(args, axis)
    return SweepGrid.from_dict(data)


def run(args) -> int:
    from trady.experiments import sweep

    grid = build_grid(args)
    if args.dry_run:
        sweep.validate_names(grid)
        planned = sweep.plan(grid, args.out)
        if args.json:
            print(json.dumps([{**p.as_dict(), "action": a} for p, a in planned], indent=2))
        else:
            width = max(len(p.name) for p, _ in planned)
            for p, action in planned:
                print(f"{p.name.ljust(width)}  {action}")
            n_run = sum(a == "run" for _, a in planned)
            n_stale = sum(a.startswith("stale") for _, a in planned)
            print(f"{len(planned)} runs: {n_run} to run, {len(planned) - n_run - n_stale} already finished"
                  + (f", {n_stale} finished with other settings (a sweep would refuse them)" if n_stale else ""))
        return 0
    result = sweep.run_sweep(grid, args.out, jobs=args.jobs, threads=args.threads, progress=args.progress)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(result.table())
    sys.stdout.flush()
    return 1 if result.failed else 0

