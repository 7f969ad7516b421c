"""Tables, paired tests, rankings and plots over a folder of run folders (a sweep, or any tree of runs).

What it reads (docs/architecture.md, "Run folder"): every folder below the root holding summary.json,
with config.json and metrics.jsonl beside it. What it computes:
- per (model, dataset, strategy, budget): mean ± std (sample std, ddof=1) of the final test accuracy
  over seeds, and the means of the efficiency figures (the paper's Table 1 shape);
- paired comparisons of the sparse strategies over matched runs (same model, dataset, budget, seed):
  mean difference, paired t-test (scipy.stats.ttest_rel), wins;
- the average rank of each sparse strategy over the matched groups that hold all of them (rank 1 =
  best accuracy, ties share the average rank; the paper's Fig. 4 shape).
Failed runs, and run folders that never finished, are listed on their own, never dropped silently.
Budgets are shown as units and as a share of full fine-tuning (full_units).

Modules: runs (reading run folders), stats (numbers), tables (text), plots (PNG); this one writes
the report folder (`build_report`) and re-exports the public functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trady.experiments.report.plots import (
    file_name,
    plot_accuracy_vs_budget,
    plot_curves,
    plot_profile,
    plot_ranking,
    plot_sparsity,
)
from trady.experiments.report.runs import (
    ACC_METRICS,
    EFFICIENCY_KEYS,
    REPORT_DIRNAME,
    Run,
    RunSet,
    find_profiles,
    load_runs,
)
from trady.experiments.report.stats import (
    average_ranks,
    epoch_curves,
    paired_comparisons,
    paired_test,
    strategy_order,
    summarize,
    summary_rows,
)
from trady.experiments.report.tables import budget_label, format_report
from trady.selection.ranking import RankingProfile


def build_report(
    root: str | os.PathLike,
    *,
    plots: bool = True,
    profile: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    metric: str = "test_acc",
) -> dict[str, Any]:
    """Summarise the runs under root and write report.md, report.json and the PNG plots into
    root/report/ (or out_dir). Returns the report dict (as written to report.json)."""
    from trady.core.files import write_json, write_text

    root = Path(root)
    runs = load_runs(root, metric)
    report = summarize(root, metric, runs)
    out = Path(out_dir) if out_dir is not None else root / REPORT_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    if plots:
        profiles = [Path(profile)] if profile is not None else find_profiles(root)
        loaded = [(p, RankingProfile.load(p)) for p in profiles]
        files += plot_accuracy_vs_budget(report, out)
        files += plot_sparsity(report, out)
        files += plot_curves(report, out, runs.runs)
        files += plot_ranking(report, out)
        used: set[str] = set()
        for p, prof in loaded:
            name = file_name("profile", prof.model)
            if name in used:
                name = file_name("profile", prof.model, p.stem)
            used.add(name)
            files.append(plot_profile(prof, out / name))
    report["plots"] = files
    report["report_dir"] = str(out)
    write_json(out / "report.json", report)
    write_text(out / "report.md", format_report(report, markdown=True))
    return report


__all__ = [
    "ACC_METRICS",
    "EFFICIENCY_KEYS",
    "REPORT_DIRNAME",
    "Run",
    "RunSet",
    "average_ranks",
    "budget_label",
    "build_report",
    "epoch_curves",
    "find_profiles",
    "format_report",
    "load_runs",
    "paired_comparisons",
    "paired_test",
    "plot_profile",
    "strategy_order",
    "summarize",
    "summary_rows",
]
