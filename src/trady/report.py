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
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trady.errors import TradyError

EFFICIENCY_KEYS = ("activation_sparsity", "weight_sparsity", "flops_reduction", "measured_budgeted_bytes",
                   "measured_saved_bytes")
ACC_METRICS = ("test_acc", "best_test_acc")

# Display order: baselines and variants as in the paper, then anything else, then the references.
KNOWN_ORDER = ["su", "su-magnitude", "s-full-random", "d-full-random", "s-det-rgn", "d-det-rgn", "s-topk-random",
               "trady", "medyate"]
REFERENCE_ORDER = ["bias", "classifier", "full"]
REPORT_DIRNAME = "report"
_RUN_FILES = ("summary.json", "config.json", "metrics.jsonl")


# ---------------------------------------------------------------------------------------------------
# Reading run folders


@dataclass
class Run:
    path: str  # relative to the report root
    summary: dict
    config: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)

    def get(self, key: str, config_key: str | None = None) -> Any:
        value = self.summary.get(key)
        if value is None and config_key:
            value = self.config.get(config_key)
        return value

    @property
    def model(self) -> str:
        return str(self.get("model", "model"))

    @property
    def dataset(self) -> str:
        return str(self.get("dataset", "data"))

    @property
    def strategy(self) -> str:
        return str(self.get("strategy", "strategy"))

    @property
    def budget_units(self) -> int | None:
        v = self.summary.get("budget_units")
        return None if v is None else int(v)

    @property
    def budget_spec(self) -> str | None:
        v = self.summary.get("budget", self.config.get("budget"))
        return None if v is None else str(v)

    @property
    def seed(self) -> int | None:
        v = self.get("seed", "seed")
        return None if v is None else int(v)

    @property
    def status(self) -> str:
        return str(self.summary.get("status"))

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "model": self.model, "dataset": self.dataset, "strategy": self.strategy,
                "budget": self.budget_spec, "budget_units": self.budget_units, "seed": self.seed}


@dataclass
class RunSet:
    root: str
    runs: list[Run]  # status "ok", one per (model, dataset, strategy, budget, seed)
    failed: list[dict]  # status other than "ok", unreadable summaries, no accuracy
    incomplete: list[dict]  # run folders without summary.json (still running, or killed)
    duplicates: list[dict]  # a second ok run of an already seen point: left out of the numbers


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line of a killed run: keep what came before
    return rows


def load_runs(root: str | os.PathLike, metric: str = "test_acc") -> RunSet:
    """Find every run folder below root (recursively; root/report/ is skipped)."""
    if metric not in ACC_METRICS:
        raise TradyError(f"unknown accuracy metric {metric!r}; accepted: {', '.join(ACC_METRICS)}")
    root = Path(root)
    if not root.is_dir():
        raise TradyError(f"results folder {str(root)!r} does not exist or is not a folder")
    runs, failed, incomplete, duplicates = [], [], [], []
    seen: dict[tuple, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == root and REPORT_DIRNAME in dirnames:
            dirnames.remove(REPORT_DIRNAME)
        dirnames.sort()
        if not any(f in filenames for f in _RUN_FILES):
            continue
        dirnames.clear()  # a run folder holds no further runs
        rel = str(here.relative_to(root)) if here != root else "."
        config, metrics = {}, []
        try:
            if "config.json" in filenames:
                config = _read_json(here / "config.json")
            if "metrics.jsonl" in filenames:
                metrics = _read_jsonl(here / "metrics.jsonl")
        except (OSError, json.JSONDecodeError) as err:
            failed.append({"path": rel, "status": "unreadable", "error": f"config.json/metrics.jsonl: {err}"})
            continue
        if "summary.json" not in filenames:
            run = Run(rel, {}, config if isinstance(config, dict) else {}, metrics)
            incomplete.append({**run.describe(), "status": "incomplete", "epochs_done": len(metrics),
                               "error": "no summary.json (still running, or stopped before the end)"})
            continue
        try:
            summary = _read_json(here / "summary.json")
            if not isinstance(summary, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            failed.append({"path": rel, "status": "unreadable", "error": f"summary.json: {err}"})
            continue
        run = Run(rel, summary, config if isinstance(config, dict) else {}, metrics)
        if run.status != "ok":
            err = summary.get("error")
            if err is None and (here / "error.txt").exists():
                err = (here / "error.txt").read_text().strip().splitlines()[-1:] or None
                err = err[0] if err else None
            failed.append({**run.describe(), "status": run.status, "error": err})
            continue
        acc = summary.get(metric)
        if not isinstance(acc, (int, float)) or math.isnan(acc):
            failed.append({**run.describe(), "status": "no-accuracy",
                           "error": f"summary.json has status ok but no numeric {metric}"})
            continue
        key = (run.model, run.dataset, run.strategy, run.budget_units, run.seed)
        if key in seen:
            duplicates.append({**run.describe(), "same_as": seen[key]})
            continue
        seen[key] = rel
        runs.append(run)
    return RunSet(str(root), runs, failed, incomplete, duplicates)


# ---------------------------------------------------------------------------------------------------
# Statistics


def strategy_order(names: Iterable[str]) -> list[str]:
    names = set(names)
    known = [s for s in KNOWN_ORDER if s in names]
    refs = [s for s in REFERENCE_ORDER if s in names]
    rest = sorted(names - set(known) - set(refs))
    return known + rest + refs


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return None if math.isnan(v) or math.isinf(v) else v


def _mean(values: Sequence[Any]) -> float | None:
    vals = [x for x in (_num(v) for v in values) if x is not None]
    return float(np.mean(vals)) if vals else None


def _std(values: Sequence[float]) -> float | None:
    """Sample standard deviation (ddof=1); None for fewer than two values."""
    vals = [float(v) for v in values]
    return float(np.std(vals, ddof=1)) if len(vals) > 1 else None


def _pct_of_full(units: int | None, full_units: Any, fraction: Any) -> float | None:
    if units is None:
        return None
    full = _num(full_units)
    if full:
        return 100.0 * units / full
    frac = _num(fraction)
    return None if frac is None else 100.0 * frac


def summary_rows(runs: Sequence[Run], metric: str = "test_acc") -> list[dict]:
    """One row per (model, dataset, strategy, budget_units) with accuracy and efficiency over seeds."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        groups[(r.model, r.dataset, r.strategy, r.budget_units)].append(r)
    rows = []
    for (model, dataset, strategy, units), members in groups.items():
        members = sorted(members, key=lambda r: (r.seed is None, r.seed))
        accs = [float(r.summary[metric]) for r in members]
        full_units = _mean([r.summary.get("full_units") for r in members])
        specs = sorted({r.budget_spec for r in members if r.budget_spec is not None})
        row = {
            "model": model, "dataset": dataset, "strategy": strategy, "budget_units": units,
            "budget": ", ".join(specs) if units is not None and specs else None,
            "budget_pct": _pct_of_full(units, full_units, _mean([r.summary.get("budget_fraction") for r in members])),
            "full_units": None if full_units is None else int(round(full_units)),
            "seeds": len(members), "seed_list": [r.seed for r in members], "accs": accs,
            "mean_acc": float(np.mean(accs)), "std_acc": _std(accs),
            "mean_best_acc": _mean([r.summary.get("best_test_acc") for r in members]),
        }
        for key in EFFICIENCY_KEYS:
            row[key] = _mean([r.summary.get(key) for r in members])
        row["wall_time_s"] = _mean([r.summary.get("wall_time_s") for r in members])
        row["paths"] = [r.path for r in members]
        rows.append(row)
    order = {s: i for i, s in enumerate(strategy_order(r["strategy"] for r in rows))}
    rows.sort(key=lambda r: (r["model"], r["dataset"], r["budget_units"] is None, r["budget_units"] or 0,
                             order[r["strategy"]]))
    return rows


def _matched(runs: Sequence[Run], metric: str) -> dict[tuple, dict[str, float]]:
    """(model, dataset, budget_units, seed) -> {sparse strategy: accuracy}."""
    groups: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in runs:
        if r.budget_units is None:
            continue
        groups[(r.model, r.dataset, r.budget_units, r.seed)][r.strategy] = float(r.summary[metric])
    return groups


def paired_test(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Paired comparison of matched accuracies a[i] vs b[i]: mean of a - b, t and p (ttest_rel)."""
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = a - b
    out: dict[str, Any] = {"n": int(len(diff)), "mean_a": _mean(a.tolist()), "mean_b": _mean(b.tolist()),
                           "mean_diff": float(diff.mean()) if len(diff) else None,
                           "std_diff": _std(diff.tolist()), "t": None, "p_value": None,
                           "a_wins": int((diff > 0).sum()), "b_wins": int((diff < 0).sum()),
                           "ties": int((diff == 0).sum())}
    if len(diff) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant differences: t is undefined (nan)
            res = stats.ttest_rel(a, b)
        out["t"], out["p_value"] = _num(res.statistic), _num(res.pvalue)
    return out


def paired_comparisons(runs: Sequence[Run], metric: str = "test_acc") -> list[dict]:
    """Every pair of sparse strategies over matched runs: all runs pooled ("all"), and per model/dataset
    when there is more than one."""
    groups = _matched(runs, metric)
    strategies = strategy_order({s for g in groups.values() for s in g})
    scopes: list[tuple[str, Any, Any]] = [("all", None, None)]
    combos = sorted({(k[0], k[1]) for k in groups})
    if len(combos) > 1:
        scopes += [("model/dataset", m, d) for m, d in combos]
    out = []
    for scope, model, dataset in scopes:
        keys = [k for k in sorted(groups, key=str) if scope == "all" or (k[0], k[1]) == (model, dataset)]
        for sa, sb in itertools.combinations(strategies, 2):
            matched = [k for k in keys if sa in groups[k] and sb in groups[k]]
            if not matched:
                continue
            res = paired_test([groups[k][sa] for k in matched], [groups[k][sb] for k in matched])
            out.append({"scope": scope, "model": model, "dataset": dataset, "a": sa, "b": sb, **res})
    return out


def average_ranks(runs: Sequence[Run], metric: str = "test_acc") -> dict[str, Any]:
    """Average rank of each sparse strategy over the matched groups (model, dataset, budget, seed) that
    hold every sparse strategy; rank 1 is the best accuracy, ties share their average rank."""
    from scipy.stats import rankdata

    groups = _matched(runs, metric)
    strategies = strategy_order({s for g in groups.values() for s in g})
    complete = [k for k in sorted(groups, key=str) if all(s in groups[k] for s in strategies)]
    ranks: dict[str, list[float]] = {s: [] for s in strategies}
    for k in complete:
        accs = np.array([groups[k][s] for s in strategies])
        for s, rank in zip(strategies, rankdata(-accs, method="average")):
            ranks[s].append(float(rank))
    table = [{"strategy": s, "mean_rank": _mean(ranks[s]), "std_rank": _std(ranks[s]),
              "firsts": int(sum(r == 1.0 for r in ranks[s])), "n_groups": len(ranks[s])} for s in strategies]
    table.sort(key=lambda e: (e["mean_rank"] is None, e["mean_rank"] or 0.0))
    return {"strategies": table, "n_groups": len(complete), "n_incomplete": len(groups) - len(complete),
            "groups": [{"model": k[0], "dataset": k[1], "budget_units": k[2], "seed": k[3]} for k in complete]}


def epoch_curves(runs: Sequence[Run], key: str = "test_acc") -> list[dict]:
    """Mean (and std) over seeds of a metrics.jsonl column per epoch, per (model, dataset, strategy, budget)."""
    groups: dict[tuple, list[Run]] = defaultdict(list)
    for r in runs:
        if r.metrics:
            groups[(r.model, r.dataset, r.strategy, r.budget_units)].append(r)
    out = []
    for (model, dataset, strategy, units), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
        by_epoch: dict[int, list[float]] = defaultdict(list)
        for r in members:
            for i, m in enumerate(r.metrics):
                v = _num(m.get(key))
                if v is not None:
                    by_epoch[int(m.get("epoch", i + 1))].append(v)
        epochs = sorted(by_epoch)
        out.append({"model": model, "dataset": dataset, "strategy": strategy, "budget_units": units,
                    "epochs": epochs, "mean": [float(np.mean(by_epoch[e])) for e in epochs],
                    "std": [_std(by_epoch[e]) or 0.0 for e in epochs], "seeds": len(members)})
    return out


def _acc_scale(values: Iterable[float]) -> float:
    """Accuracies stored as fractions are shown in percent; ones already in percent as they are."""
    vals = [v for v in values if v is not None]
    return 100.0 if vals and max(vals) <= 1.0 else 1.0


def summarize(root: str | os.PathLike, metric: str = "test_acc", runs: RunSet | None = None) -> dict[str, Any]:
    """Everything the report shows, as one JSON-ready dict (what `trady report --json` prints, less
    "plots" and "report_dir"). acc_scale: 100 when accuracies are stored as fractions (shown in %)."""
    rs = runs if runs is not None else load_runs(root, metric)
    rows = summary_rows(rs.runs, metric)
    return {
        "root": str(root), "metric": metric,
        "acc_scale": _acc_scale(a for r in rows for a in r["accs"]),
        "n_runs": len(rs.runs), "rows": rows,
        "paired": paired_comparisons(rs.runs, metric),
        "ranking": average_ranks(rs.runs, metric),
        "failed": rs.failed, "incomplete": rs.incomplete, "duplicates": rs.duplicates,
    }


# ---------------------------------------------------------------------------------------------------
# Formatting


def budget_label(units: int | None, pct: float | None, sep: str = " ") -> str:
    if units is None:
        return "no budget"
    return f"{units:,}{sep}({pct:.1f}%)" if pct is not None else f"{units:,}"


def _fmt_bytes(v: float | None) -> str:
    if v is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= size:
            return f"{v / size:.1f} {unit}"
    return f"{v:.0f} B"


def _fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _fmt_p(p: float | None) -> str:
    if p is None:
        return "-"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def _render(header: list[str], body: list[list[str]], markdown: bool, align_right_from: int = 1) -> str:
    if markdown:
        seps = ["---" if i < align_right_from else "---:" for i in range(len(header))]
        lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(seps) + " |"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < align_right_from else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, body)])


def _by_model_dataset(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[(r["model"], r["dataset"])].append(r)
    return out


def accuracy_tables(report: dict, markdown: bool = False) -> list[tuple[str, str]]:
    """Table 1 shape per model x dataset: rows strategies, columns budgets, cells mean ± std."""
    scale = report["acc_scale"]
    unit = "%" if scale == 100.0 else ""
    out = []
    for (model, dataset), rows in _by_model_dataset(report["rows"]).items():
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
                 f"mean ± std over {max_n} seed{'s' if max_n != 1 else ''}")
        out.append((title, _render(header, body, markdown)))
    return out


def efficiency_tables(report: dict, markdown: bool = False) -> list[tuple[str, str]]:
    out = []
    for (model, dataset), rows in _by_model_dataset(report["rows"]).items():
        header = ["strategy", "budget", "seeds", "act. sparsity", "weight sparsity", "FLOPs saved",
                  "budgeted bytes", "saved bytes"]
        body = [[r["strategy"], budget_label(r["budget_units"], r["budget_pct"]), str(r["seeds"]),
                 _fmt_pct(r["activation_sparsity"]), _fmt_pct(r["weight_sparsity"]),
                 _fmt_pct(r["flops_reduction"]), _fmt_bytes(r["measured_budgeted_bytes"]),
                 _fmt_bytes(r["measured_saved_bytes"])] for r in rows]
        out.append((f"{model} / {dataset}: efficiency (means over seeds)", _render(header, body, markdown, 2)))
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
    return _render(header, body, markdown, 2)


def ranking_table(report: dict, markdown: bool = False) -> str | None:
    rk = report["ranking"]
    if not rk["n_groups"]:
        return None
    header = ["strategy", "mean rank", "std", "firsts", "groups"]
    body = [[e["strategy"], f"{e['mean_rank']:.2f}", "-" if e["std_rank"] is None else f"{e['std_rank']:.2f}",
             str(e["firsts"]), str(e["n_groups"])] for e in rk["strategies"]]
    return _render(header, body, markdown)


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
    return _render(header, body, markdown, 6)


def format_report(report: dict, markdown: bool = False) -> str:
    h = (lambda t: f"## {t}") if markdown else (lambda t: f"== {t} ==")
    sub = (lambda t: f"### {t}") if markdown else (lambda t: t)
    parts = [("# trady report: " if markdown else "trady report: ") + report["root"],
             f"{report['n_runs']} finished runs, {len(report['failed'])} failed, "
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
        parts += [h("Duplicate runs left out"), _render(["run", "same point as"], body, markdown, 2)]
    if report.get("plots"):
        parts.append(h("Plots"))
        parts.append("\n\n".join(f"![{Path(p).stem}]({Path(p).name})" for p in report["plots"]) if markdown
                     else "\n".join(report["plots"]))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------
# Plots (matplotlib, Agg canvas, no pyplot state)


# Fixed colours so that a strategy looks the same in every plot: a dynamic variant and its static
# twin share a hue (static lighter); the references are black/grey/brown.
COLOURS = {
    "trady": "#d62728", "s-topk-random": "#ff9896", "d-full-random": "#2ca02c", "s-full-random": "#98df8a",
    "d-det-rgn": "#1f77b4", "s-det-rgn": "#aec7e8", "medyate": "#ff7f0e", "su": "#9467bd",
    "su-magnitude": "#9467bd", "full": "#000000", "classifier": "#7f7f7f", "bias": "#8c564b",
}
_SPARE_COLOURS = ["#17becf", "#e377c2", "#bcbd22", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#c5b0d5"]


def _colours(strategies: Iterable[str]) -> dict[str, Any]:
    out, spare = {}, iter(_SPARE_COLOURS * 4)
    for s in strategy_order(strategies):
        out[s] = COLOURS.get(s) or next(spare, "#333333")
    return out


def _marker(strategy: str) -> str:
    return "s" if strategy.startswith("s-") else "o"  # static variants: squares


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _fname(*parts: Any) -> str:
    from trady.sweep import sanitise

    return "__".join(sanitise(p) for p in parts) + ".png"


def _budget_axis(ax, budgets: list[tuple[int, float | None]]) -> None:
    units = [u for u, _ in budgets]
    if len(units) > 1 and max(units) / max(min(units), 1) > 8:
        ax.set_xscale("log")
        ax.minorticks_off()
    ax.set_xticks(units)
    ax.set_xticklabels([budget_label(u, p, "\n") for u, p in budgets], fontsize=8)
    ax.set_xlabel("budget (memory units, % of full fine-tuning)")
    if len(units) == 1:
        ax.set_xlim(units[0] * 0.8, units[0] * 1.2)


def plot_accuracy_vs_budget(report: dict, out_dir: Path) -> list[str]:
    scale, files = report["acc_scale"], []
    ylabel = "test accuracy (%)" if scale == 100.0 else "test accuracy"
    for (model, dataset), rows in _by_model_dataset(report["rows"]).items():
        sparse = [r for r in rows if r["budget_units"] is not None]
        if not sparse:
            continue
        colours = _colours(r["strategy"] for r in report["rows"])
        budgets = sorted({r["budget_units"]: r["budget_pct"] for r in sparse}.items())
        fig = _figure(7.5, 4.2)
        ax = fig.add_subplot()
        for s in strategy_order(r["strategy"] for r in sparse):
            pts = sorted((r for r in sparse if r["strategy"] == s), key=lambda r: r["budget_units"])
            ax.errorbar([r["budget_units"] for r in pts], [scale * r["mean_acc"] for r in pts],
                        yerr=[scale * (r["std_acc"] or 0.0) for r in pts], marker=_marker(s), capsize=3,
                        color=colours[s], label=s)
        refs = [r for r in rows if r["budget_units"] is None]
        order = {s: i for i, s in enumerate(strategy_order(r["strategy"] for r in rows))}
        for r in sorted(refs, key=lambda r: order[r["strategy"]], reverse=True):  # full first
            m, sd = scale * r["mean_acc"], scale * (r["std_acc"] or 0.0)
            ax.axhline(m, color=colours[r["strategy"]], linestyle="--", linewidth=1.2,
                       label=f"{r['strategy']} (reference)")
            if sd:
                ax.axhspan(m - sd, m + sd, color=colours[r["strategy"]], alpha=0.08, linewidth=0)
        _budget_axis(ax, budgets)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{model} / {dataset}: accuracy vs budget (mean ± std over seeds)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        path = out_dir / _fname("accuracy_vs_budget", model, dataset)
        fig.savefig(path)
        files.append(str(path))
    return files


def plot_sparsity(report: dict, out_dir: Path) -> list[str]:
    metrics = [("activation_sparsity", "activation sparsity"), ("weight_sparsity", "weight-derivative sparsity"),
               ("flops_reduction", "weight-derivative FLOPs saved")]
    bar_colours = ["#4C72B0", "#DD8452", "#55A868"]
    files = []
    for (model, dataset), rows in _by_model_dataset(report["rows"]).items():
        sparse = [r for r in rows if r["budget_units"] is not None
                  and any(r[k] is not None for k, _ in metrics)]
        if not sparse:
            continue
        budgets = sorted({r["budget_units"]: r["budget_pct"] for r in sparse}.items())
        strategies = strategy_order(r["strategy"] for r in sparse)
        # one panel per budget, stacked, sharing the strategy axis (labels once, at the bottom)
        fig = _figure(max(6.0, 0.95 * len(strategies) + 1.8), 2.3 * len(budgets) + 1.3)
        axes = fig.subplots(len(budgets), 1, squeeze=False, sharex=True)[:, 0]
        cell = {(r["strategy"], r["budget_units"]): r for r in sparse}
        x = np.arange(len(strategies))
        w = 0.8 / len(metrics)
        for i, (units, pct) in enumerate(budgets):
            ax = axes[i]
            for j, (key, label) in enumerate(metrics):
                vals = [cell.get((s, units), {}).get(key) for s in strategies]
                heights = [100 * v if v is not None else 0.0 for v in vals]
                bars = ax.bar(x + (j - 1) * w, heights, w, color=bar_colours[j], label=label if i == 0 else None)
                for b, v in zip(bars, vals):
                    if v is not None:
                        ax.text(b.get_x() + b.get_width() / 2, b.get_height() + 1, f"{100 * v:.0f}",
                                ha="center", va="bottom", fontsize=6.5)
            ax.set_xticks(x)
            ax.set_xticklabels(strategies, rotation=25, ha="right", fontsize=8)
            ax.set_ylim(0, 115)
            ax.set_yticks(range(0, 101, 25))
            ax.set_title(f"budget {budget_label(units, pct)}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            ax.set_ylabel("%")
        fig.suptitle(f"{model} / {dataset}: sparsity of the update, higher = cheaper\n"
                     f"(means over epochs and seeds)", fontsize=10)
        fig.legend(loc="outside lower center", ncols=len(metrics), fontsize=8, frameon=False)
        path = out_dir / _fname("sparsity", model, dataset)
        fig.savefig(path)
        files.append(str(path))
    return files


def plot_curves(report: dict, out_dir: Path, runs: Sequence[Run]) -> list[str]:
    scale, files = report["acc_scale"], []
    curves = epoch_curves(runs)
    by_md: dict[tuple, list[dict]] = defaultdict(list)
    for c in curves:
        if c["epochs"]:
            by_md[(c["model"], c["dataset"])].append(c)
    pct = {(r["model"], r["dataset"], r["budget_units"]): r["budget_pct"] for r in report["rows"]}
    colours = _colours(r["strategy"] for r in report["rows"])
    for (model, dataset), cs in by_md.items():
        refs = [c for c in cs if c["budget_units"] is None]
        budgets = sorted({c["budget_units"] for c in cs if c["budget_units"] is not None})
        panels = budgets or [None]
        ncols = min(len(panels), 3)
        nrows = math.ceil(len(panels) / ncols)
        fig = _figure(4.6 * ncols + 1.8, 3.4 * nrows + 0.6)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
        for i, units in enumerate(panels):
            ax = axes[i // ncols][i % ncols]
            mine = [c for c in cs if c["budget_units"] == units] if units is not None else []
            order = {s: k for k, s in enumerate(strategy_order(c["strategy"] for c in cs))}
            for c in sorted(mine, key=lambda c: order[c["strategy"]]) + refs:
                ref = c["budget_units"] is None
                m, sd = scale * np.array(c["mean"]), scale * np.array(c["std"])
                ax.plot(c["epochs"], m, color=colours[c["strategy"]], linestyle="--" if ref else "-",
                        marker="o" if len(c["epochs"]) < 5 else None, markersize=4,
                        linewidth=1.2 if ref else 1.6, label=f"{c['strategy']}{' (reference)' if ref else ''}")
                if sd.any():
                    ax.fill_between(c["epochs"], m - sd, m + sd, color=colours[c["strategy"]], alpha=0.12,
                                    linewidth=0)
            title = "references" if units is None else f"budget {budget_label(units, pct.get((model, dataset, units)))}"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch")
            if i % ncols == 0:
                ax.set_ylabel("test accuracy (%)" if scale == 100.0 else "test accuracy")
            ax.grid(alpha=0.3)
            epochs = sorted({e for c in cs for e in c["epochs"]})
            if len(epochs) <= 10:
                ax.set_xticks(epochs)
                ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
            else:
                ax.xaxis.get_major_locator().set_params(integer=True)
        for k in range(len(panels), nrows * ncols):
            axes[k // ncols][k % ncols].set_visible(False)
        handles, labels = {}, []
        for ax in axes.flat:
            for hd, lb in zip(*ax.get_legend_handles_labels()):
                if lb not in handles:
                    handles[lb] = hd
                    labels.append(lb)
        fig.legend([handles[lb] for lb in labels], labels, loc="outside lower center", ncols=min(len(labels), 5),
                   fontsize=8, frameon=False)
        fig.suptitle(f"{model} / {dataset}: test accuracy per epoch (mean ± std over seeds)", fontsize=10)
        path = out_dir / _fname("curves", model, dataset)
        fig.savefig(path)
        files.append(str(path))
    return files


def plot_ranking(report: dict, out_dir: Path) -> list[str]:
    rk = report["ranking"]
    entries = [e for e in rk["strategies"] if e["mean_rank"] is not None]
    if not rk["n_groups"] or len(entries) < 2:
        return []
    colours = _colours(r["strategy"] for r in report["rows"])
    fig = _figure(6.5, 0.45 * len(entries) + 1.5)
    ax = fig.add_subplot()
    y = np.arange(len(entries))[::-1]
    ax.barh(y, [e["mean_rank"] for e in entries], xerr=[e["std_rank"] or 0.0 for e in entries], capsize=3,
            color=[colours[e["strategy"]] for e in entries], height=0.7)
    for yi, e in zip(y, entries):
        ax.text(e["mean_rank"] + (e["std_rank"] or 0.0) + 0.06, yi, f"{e['mean_rank']:.2f}", va="center",
                ha="left", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels([e["strategy"] for e in entries], fontsize=9)
    ax.set_xlim(0, len(entries) + 0.7)
    ax.set_xlabel("average rank (1 = best accuracy; error bar: std)")
    ax.set_title(f"average rank over {rk['n_groups']} matched groups (model, dataset, budget, seed)",
                 fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    path = out_dir / "ranking.png"
    fig.savefig(path)
    return [str(path)]


def find_profiles(root: str | os.PathLike) -> list[Path]:
    """Layer-ranking profile JSON files anywhere below root (recognised by their keys)."""
    found = []
    skip = {"config.json", "summary.json", "sweep.json", "report.json"}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == Path(root) and REPORT_DIRNAME in dirnames:
            dirnames.remove(REPORT_DIRNAME)
        dirnames.sort()
        for f in sorted(filenames):
            p = Path(dirpath) / f
            if not f.endswith(".json") or f in skip or p.stat().st_size > 5_000_000:
                continue
            try:
                data = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(data, dict) and {"layers", "order", "cumulative_share"} <= set(data):
                found.append(p)
    return found


def load_profile_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise TradyError(f"profile {str(path)!r} does not exist") from None
    except ValueError as err:
        raise TradyError(f"profile {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not {"layers", "order"} <= set(data):
        raise TradyError(f"{str(path)!r} is not a layer-ranking profile (needs 'layers' and 'order')")
    return data


def plot_profile(profile: dict, out_dir: Path, name: str | None = None) -> str:
    layers = profile["layers"]
    names = [lay["name"] for lay in layers]
    rgn = {lay["name"]: float(lay.get("rgn") or 0.0) for lay in layers}
    order = [n for n in profile["order"] if n in rgn]
    k = int(profile.get("k") or 0)
    top = set(order[:k])
    total = sum(rgn.values()) or 1.0
    share = profile.get("cumulative_share")
    if not share or len(share) != len(order):
        share = np.cumsum([rgn[n] for n in order]) / total
    threshold = profile.get("threshold")
    n = len(names)
    fig = _figure(max(8.0, 0.16 * n + 2.0), 7.2)
    ax1, ax2 = fig.subplots(2, 1)
    hi, lo = "#C44E52", "#9AA5B1"
    ax1.bar(range(n), [rgn[x] for x in names], color=[hi if x in top else lo for x in names])
    ax1.set_xticks(range(n))
    ax1.set_xticklabels(names, rotation=90, fontsize=5.5 if n > 40 else 7)
    ax1.set_xlim(-0.7, n - 0.3)
    ax1.set_ylabel("layer RGN")
    ax1.set_title("layer RGN in execution order", fontsize=9)
    from matplotlib.patches import Patch

    ax1.legend(handles=[Patch(color=hi, label=f"top-K (K = {k})"), Patch(color=lo, label="not selected")],
               fontsize=8, loc="upper right", frameon=False)
    ax2.bar(range(len(order)), [rgn[x] for x in order], color=[hi if x in top else lo for x in order])
    ax2.set_xlim(-0.7, len(order) - 0.3)
    ax2.set_xlabel("layers ranked by RGN (rank)")
    ax2.set_ylabel("layer RGN")
    tw = ax2.twinx()
    tw.plot(range(len(order)), 100 * np.asarray(share, dtype=float), color="black", marker=".", linewidth=1.2,
            label="cumulative share")
    if threshold is not None:
        tw.axhline(100 * float(threshold), color="black", linestyle=":", linewidth=1,
                   label=f"threshold {100 * float(threshold):.0f}%")
    if k:
        tw.axvline(k - 0.5, color=hi, linestyle="--", linewidth=1, label=f"K = {k}")
    tw.set_ylim(0, 105)
    tw.set_ylabel("cumulative share of RGN (%)")
    tw.legend(loc="center right", fontsize=8, frameon=False)
    ax2.set_title("ranked layers and cumulative RGN share", fontsize=9)
    meta = ", ".join(f"{key} {profile[key]}" for key in ("dataset", "resolution", "epochs", "seed")
                     if profile.get(key) is not None)
    fig.suptitle(f"layer-ranking profile: {profile.get('model', '?')}" + (f" ({meta})" if meta else ""),
                 fontsize=10)
    path = out_dir / (name or _fname("profile", profile.get("model", "model")))
    fig.savefig(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------
# The whole report


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
    from trady.io import write_json, write_text

    root = Path(root)
    runs = load_runs(root, metric)
    report = summarize(root, metric, runs)
    out = Path(out_dir) if out_dir is not None else root / REPORT_DIRNAME
    out.mkdir(parents=True, exist_ok=True)
    files: list[str] = []
    if plots:
        profiles = [Path(profile)] if profile is not None else find_profiles(root)
        loaded = [(p, load_profile_json(p)) for p in profiles]
        files += plot_accuracy_vs_budget(report, out)
        files += plot_sparsity(report, out)
        files += plot_curves(report, out, runs.runs)
        files += plot_ranking(report, out)
        used: set[str] = set()
        for p, data in loaded:
            name = _fname("profile", data.get("model", p.stem))
            if name in used:
                name = _fname("profile", data.get("model", "model"), p.stem)
            used.add(name)
            files.append(plot_profile(data, out, name))
    report["plots"] = files
    report["report_dir"] = str(out)
    write_json(out / "report.json", report)
    write_text(out / "report.md", format_report(report, markdown=True))
    return report
