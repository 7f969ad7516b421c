"""`trady report DIR`: tables, paired tests, rankings and plots over a folder of runs."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report",
        help="summarise a folder of runs: accuracy tables, paired tests, ranking, efficiency, plots",
        description=(
            "Read every run folder below DIR (summary.json, config.json, metrics.jsonl), print mean ± std "
            "test accuracy per strategy and budget for each model and dataset, paired t-tests between the "
            "sparse strategies over matched runs (same model, dataset, budget, seed), their average rank, "
            "and efficiency (sparsities, FLOPs saved, measured bytes). Writes DIR/report/report.md, "
            "report.json and PNG plots. Failed and unfinished runs are listed separately."
        ),
    )
    p.add_argument("dir", metavar="DIR", help="results folder (e.g. the --out of trady sweep)")
    p.add_argument("--json", action="store_true", help="print the report as JSON (rows, paired, ranking, failed)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write PNG plots into the report folder (default: yes)")
    p.add_argument("--profile", metavar="FILE",
                   help="layer-ranking profile JSON to plot (default: any profile JSON found under DIR)")
    p.add_argument("--metric", choices=["test_acc", "best_test_acc"], default="test_acc",
                   help="accuracy to summarise: last epoch (default) or best epoch")
    p.add_argument("--out", metavar="DIR", help="where to write the report files (default: DIR/report)")
    p.set_defaults(func=run)


def run(args) -> int:
    from trady.experiments.report import build_report, format_report

    report = build_report(args.dir, plots=args.plots, profile=args.profile, out_dir=args.out, metric=args.metric)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report), end="")
        print(f"\nwrote {report['report_dir']}/report.md, report.json" +
              (f" and {len(report['plots'])} plots" if report["plots"] else ""))
    return 0
