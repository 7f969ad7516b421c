"""The report as text: accuracy tables (the paper's Table 1 shape), efficiency, paired tests, ranks,
failed runs; plain text for the terminal or Markdown for report.md.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from trady.core.formatting import fmt_bytes, pct, render_table
from trady.experiments.report.stats import strategy_order


def budget_label(units: int | None, pct: float | None, sep: str = " ") -> str:
    if units is None:
        return "no budget"
    return f"{units:,}{sep}({pct:.1f}%)" if pct is not None else f"{units:,}"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def by_model_dataset(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["model"], r["dataset"])].append(r)
    return out


def seeds_heading(n: int) -> str:
    """What a cell over n seeds is: "mean ± std over 3 seeds", or "1 seed" (no std exists)."""
    return f"mean ± std over {n} seeds" if n > 1 else "1 seed"


def accuracy_tables(report: dict, markdown: bool = False) -> list[tuple[str, str]]:
    """Table 1 shape per model x dataset: rows strategies, columns budgets, cells mean ± std."""
    scale = report["acc_scale"]
    unit = "%" if scale == 100.0 else ""
    out = []
    for (model, dataset), rows in by_model_dataset(report["rows"]).items():
        budgets = sorted({r["budget_units"]: r["budget_pct"] for r in rows if r["budget_units"] is not None}.items())
        has_ref = any(r["budget_units"] is None for r in rows)
        cols = [u for u, _ in budgets] + ([None] if has_ref else [])
        header = ["strategy"] + [budget_label(u, p) for u, p in budgets] + (["reference"] if has_ref else [])
        max_n = max(r["seeds"] for r in rows)
        cell = {(r["strategy"], r["budget_units"]): r for r in rows}
        body = []
        for s in strategy_order(r["strategy"] for r in rows):
            line = [s]
            for u in cols:
                r = cell.get((s, u))
                if r is None:
                    line.append("")
                    continue
                txt = f"{scale * r['mean_acc']:.2f}"
                if r["std_acc"] is not None:
                    txt += f" ± {scale * r['std_acc']:.2f}"
                if r["seeds"] != max_n:
                    txt += f" (n={r['seeds']})"
                line.append(txt)
            body.append(line)
        title = (f"{model} / {dataset}: {report['metric']}{' (' + unit + ')' if unit else ''}, "
                 f"{seeds_heading(max_n)}")
        out.append((title, render_table(header, body, markdown=markdown)))
    return out


def efficiency_tables(report: dict, markdown: bool = False) -> list[tuple[str, str]]:
    """Per model x dataset: sparsities, FLOPs saved, the measured bytes kept for backward and, when the
    summaries carry it (`peak_memory_bytes`), the measured peak memory of a training step."""
    out = []
    for (model, dataset), rows in by_model_dataset(report["rows"]).items():
        peak = any(r.get("peak_memory_bytes") is not None for r in rows)
        header = ["strategy", "budget", "seeds", "act. sparsity", "weight sparsity", "FLOPs saved",
                  "budgeted bytes", "kept for backward"] + (["measured step peak"] if peak else [])
        body = [[r["strategy"], budget_label(r["budget_units"], r["budget_pct"]), str(r["seeds"]),
                 pct(r["activation_sparsity"]), pct(r["weight_sparsity"]),
                 pct(r["flops_reduction"]), fmt_bytes(r["measured_budgeted_bytes"]),
                 fmt_bytes(r["measured_saved_bytes"])] + ([fmt_bytes(r.get("peak_memory_bytes"))] if peak else [])
                for r in rows]
        table = render_table(header, body, markdown=markdown, left=2)
        seeds = max(r["seeds"] for r in rows)
        over = "means over seeds" if seeds > 1 else "1 seed"
        out.append((f"{model} / {dataset}: efficiency ({over}; bytes measured at each run's first step)", table))
    return out


def paired_table(report: dict, markdown: bool = False) -> str | None:
    if not report["paired"]:
        return None
    scale = report["acc_scale"]
    header = ["scope", "A vs B", "n", "mean A", "mean B", "mean A-B", "t", "p (paired t)", "A wins/ties/B wins"]
    body = []
    for e in report["paired"]:
        scope = "all" if e["scope"] == "all" else f"{e['model']} / {e['dataset']}"
        t = "-" if e["t"] is None else f"{e['t']:.2f}"
        body.append([scope, f"{e['a']} vs {e['b']}", str(e["n"]), f"{scale * e['mean_a']:.2f}",
                     f"{scale * e['mean_b']:.2f}", f"{scale * e['mean_diff']:+.2f}", t, _fmt_p(e["p_value"]),
                     f"{e['a_wins']}/{e['ties']}/{e['b_wins']}"])
    return render_table(header, body, markdown=markdown, left=2)


def ranking_table(report: dict, markdown: bool = False) -> str | None:
    rk = report["ranking"]
    if not rk["n_groups"]:
        return None
    header = ["strategy", "mean rank", "std", "firsts", "groups"]
    body = [[e["strategy"], f"{e['mean_rank']:.2f}", "-" if e["std_rank"] is None else f"{e['std_rank']:.2f}",
             str(e["firsts"]), str(e["n_groups"])] for e in rk["strategies"]]
    return render_table(header, body, markdown=markdown)


def problems_table(report: dict, markdown: bool = False) -> str | None:
    items = report["failed"] + report["incomplete"]
    if not items:
        return None
    header = ["run", "status", "strategy", "budget", "seed", "error"]
    body = []
    for e in items:
        err = str(e.get("error") or "").strip().splitlines()
        body.append([e["path"], str(e.get("status")), str(e.get("strategy", "-")),
                     str(e.get("budget") if e.get("budget") is not None else "-"),
                     str(e.get("seed", "-")), (err[0] if err else "")[:100]])
    return render_table(header, body, markdown=markdown, left=6)


def format_report(report: dict, markdown: bool = False) -> str:
    h = (lambda t: f"## {t}") if markdown else (lambda t: f"== {t} ==")
    sub = (lambda t: f"### {t}") if markdown else (lambda t: t)
    diverged = sum(e.get("status") == "diverged" for e in report["failed"])  # finished, but the loss blew up
    parts = [("# trady report: " if markdown else "trady report: ") + report["root"],
             f"{report['n_runs']} finished runs, " + (f"{diverged} diverged, " if diverged else "")
             + f"{len(report['failed']) - diverged} failed, "
             f"{len(report['incomplete'])} incomplete" + (f", {len(report['duplicates'])} duplicates left out"
                                                          if report["duplicates"] else "")]
    if report["rows"]:
        parts.append(h("Test accuracy (rows: strategies, columns: budget units (% of full fine-tuning))"))
        for title, table in accuracy_tables(report, markdown):
            parts += [sub(title), table]
        parts.append(h("Efficiency"))
        for title, table in efficiency_tables(report, markdown):
            parts += [sub(title), table]
    t = paired_table(report, markdown)
    if t:
        parts += [h("Paired comparison of sparse strategies (matched model, dataset, budget, seed)"), t]
    t = ranking_table(report, markdown) if len(report["ranking"]["strategies"]) > 1 else None
    if t:
        rk = report["ranking"]
        note = f"over {rk['n_groups']} matched groups holding every sparse strategy; rank 1 = best"
        if rk["n_incomplete"]:
            note += f"; {rk['n_incomplete']} groups missing a strategy left out"
        parts += [h("Average rank"), note, t]
    t = problems_table(report, markdown)
    if t:
        parts += [h("Failed and incomplete runs (not in the numbers above)"), t]
    if report["duplicates"]:
        body = [[d["path"], d["same_as"]] for d in report["duplicates"]]
        parts += [h("Duplicate runs left out"), render_table(["run", "same point as"], body, markdown=markdown, left=2)]
    if report.get("plots"):
        parts.append(h("Plots"))
        parts.append("\n\n".join(f"![{Path(p).stem}]({Path(p).name})" for p in report["plots"]) if markdown
                     else "\n".join(report["plots"]))
    return "\n\n".join(parts) + "\n"
