"""Statistics over finished runs: mean ± std over seeds per (model, dataset, strategy, budget), paired
t-tests of the sparse strategies over matched runs, their average rank, per-epoch curves, and the
whole JSON-ready summary (`summarize`).
"""

from __future__ import annotations

import itertools
import math
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from trady.experiments.report.runs import EFFICIENCY_KEYS, Run, RunSet, load_runs


def strategy_order(names: Iterable[str]) -> list[str]:
    """Strategy names in the order reports show them, from the registry's attributes: the sparse
    strategies by `display_order`, then names the registry does not know (alphabetically), then the
    non-sparse references (mode full, classifier, bias) by `display_order`."""
    from trady.selection import strategies

    names = set(names)
    known = {n: strategies.strategy_class(n) for n in names if n in strategies.available()}

    def by_order(group: Iterable[str]) -> list[str]:
        return sorted(group, key=lambda n: (known[n].display_order, n))

    return (by_order(n for n in known if known[n].mode == "sparse") + sorted(names - set(known))
            + by_order(n for n in known if known[n].mode != "sparse"))


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
