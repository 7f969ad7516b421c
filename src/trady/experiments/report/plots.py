"""The report's PNG plots (matplotlib on an Agg canvas, no pyplot state): accuracy vs budget, sparsity
of the update, per-epoch curves, average ranks, and the layer-ranking profile (also `trady rank --plot`).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trady.core.formatting import sanitise
from trady.experiments.report.runs import Run
from trady.experiments.report.stats import epoch_curves, strategy_order
from trady.experiments.report.tables import budget_label, by_model_dataset, seeds_heading
from trady.selection.ranking import RankingProfile

# Strategies the registry does not know (and registered ones without a colour) take these in turn.
_SPARE_COLOURS = ["#17becf", "#e377c2", "#bcbd22", "#c49c94", "#f7b6d2", "#dbdb8d", "#9edae5", "#c5b0d5"]


def _registered(strategy: str):
    from trady.selection import strategies

    return strategies.strategy_class(strategy) if strategy in strategies.available() else None


def _colours(names: Iterable[str]) -> dict[str, Any]:
    """Each strategy's registered `colour` (the same in every plot), else a spare one."""
    out, spare = {}, iter(_SPARE_COLOURS * 4)
    for s in strategy_order(names):
        cls = _registered(s)
        out[s] = (cls.colour if cls is not None else None) or next(spare, "#333333")
    return out


def _marker(strategy: str) -> str:
    cls = _registered(strategy)
    return "s" if cls is not None and not cls.dynamic else "o"  # static strategies: squares


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def file_name(*parts: Any) -> str:
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
    for (model, dataset), rows in by_model_dataset(report["rows"]).items():
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
        seeds = max(r["seeds"] for r in rows)
        ax.set_title(f"{model} / {dataset}: accuracy vs budget ({seeds_heading(seeds)})", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
        path = out_dir / file_name("accuracy_vs_budget", model, dataset)
        fig.savefig(path)
        files.append(str(path))
    return files


def _alike(values: list, tol: float = 0.005) -> bool:
    """Whether the values agree to half a percentage point (None counts as missing)."""
    got = [v for v in values if v is not None]
    return not got or max(got) - min(got) <= tol


SPARSITY_METRICS = [("activation_sparsity", "activation sparsity"), ("weight_sparsity", "weight-derivative sparsity"),
                    ("flops_reduction", "weight-derivative FLOPs saved")]


def sparsity_series(rows: list[dict]) -> list[tuple[str, str]]:
    """The bars per strategy of the sparsity plot: the three metrics, or one bar where they agree in every
    row (three equal bars say nothing more than one)."""
    if all(_alike([r.get(k) for k, _ in SPARSITY_METRICS]) for r in rows):
        return [("activation_sparsity", "sparsity (activation, weight-derivative and FLOPs alike)")]
    return SPARSITY_METRICS


def plot_sparsity(report: dict, out_dir: Path) -> list[str]:
    metrics = SPARSITY_METRICS
    bar_colours = ["#4C72B0", "#DD8452", "#55A868"]
    files = []
    for (model, dataset), rows in by_model_dataset(report["rows"]).items():
        sparse = [r for r in rows if r["budget_units"] is not None
                  and any(r[k] is not None for k, _ in metrics)]
        if not sparse:
            continue
        budgets = sorted({r["budget_units"]: r["budget_pct"] for r in sparse}.items())
        strategies = strategy_order(r["strategy"] for r in sparse)
        shown = sparsity_series(sparse)
        # one panel per budget, stacked, sharing the strategy axis (labels once, at the bottom)
        fig = _figure(max(6.0, 0.95 * len(strategies) + 1.8), 2.3 * len(budgets) + 1.3)
        axes = fig.subplots(len(budgets), 1, squeeze=False, sharex=True)[:, 0]
        cell = {(r["strategy"], r["budget_units"]): r for r in sparse}
        x = np.arange(len(strategies))
        w = 0.8 / len(shown)
        for i, (units, pct) in enumerate(budgets):
            ax = axes[i]
            for j, (key, label) in enumerate(shown):
                vals = [cell.get((s, units), {}).get(key) for s in strategies]
                heights = [100 * v if v is not None else 0.0 for v in vals]
                offset = (j - (len(shown) - 1) / 2) * w
                bars = ax.bar(x + offset, heights, w, color=bar_colours[j], label=label if i == 0 else None)
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
        fig.legend(loc="outside lower center", ncols=len(shown), fontsize=8, frameon=False)
        path = out_dir / file_name("sparsity", model, dataset)
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
        seeds = max((r["seeds"] for r in report["rows"] if (r["model"], r["dataset"]) == (model, dataset)), default=1)
        fig.suptitle(f"{model} / {dataset}: test accuracy per epoch ({seeds_heading(seeds)})", fontsize=10)
        path = out_dir / file_name("curves", model, dataset)
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


def plot_profile(profile: RankingProfile, path: str | Path, threshold: float | None = None) -> str:
    """PNG at `path`: layer RGN in execution order (top-K highlighted), and the layers ranked by RGN
    with the cumulative share and the threshold rule that sets K. Returns the path written."""
    thr = profile.threshold if threshold is None else float(threshold)
    k = profile.k(thr)
    names = profile.names
    rgn = dict(zip(names, profile.values("rgn")))
    order = profile.order
    top = set(order[:k])
    share = profile.cumulative_share()
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
    tw.axhline(100 * thr, color="black", linestyle=":", linewidth=1, label=f"threshold {100 * thr:.0f}%")
    tw.axvline(k - 0.5, color=hi, linestyle="--", linewidth=1, label=f"K = {k}")
    tw.set_ylim(0, 105)
    tw.set_ylabel("cumulative share of RGN (%)")
    tw.legend(loc="center right", fontsize=8, frameon=False)
    ax2.set_title("ranked layers and cumulative RGN share", fontsize=9)
    meta = f"{profile.dataset}, {profile.resolution} px, {profile.epochs} epochs, seed {profile.seed}"
    fig.suptitle(f"layer-ranking profile: {profile.model} ({meta})", fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return str(path)
