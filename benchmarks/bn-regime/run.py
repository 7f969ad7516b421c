"""Does train-mode BatchNorm let the paper's lr train where the frozen one collapses, and what does it cost? (issue 23)

The grid: the zoo models with BatchNorm (mobilenet_v2, efficientnet_lite0) on Fashion-MNIST at 64 px,
8 epochs, lr 0.125 / 0.0156 / 0.005 x batchnorm frozen / train x full fine-tuning, trady and s-topk-random at
2.2%, 2 seeds: 72 runs. Each run is one `trady finetune` process (its own measured step peak: a fresh
process, glibc under trady.memory.resident_peak.ALLOCATOR_ENV, the CLI's allocator control), the paper's
recipe otherwise (plain SGD, cosine with one warm-up epoch, batch 32, one lr for backbone and head, the
head's default init). Runs are ordered seed 0 first, so that a cut grid still covers every cell.

    PYTHONPATH=src nice -n 5 .venv/bin/python benchmarks/bn-regime/run.py --jobs 2      # the grid (skips done runs)
    PYTHONPATH=src .venv/bin/python benchmarks/bn-regime/run.py --report-only          # results from the run folders

Writes benchmarks/bn-regime/results/results.json (one row per model, batchnorm, lr, strategy),
results.md (the tables) and accuracy_vs_lr.png; the run folders go to benchmarks/bn-regime/runs/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from trady.core.files import write_json, write_text
from trady.core.formatting import mib, render_table
from trady.memory.resident_peak import ALLOCATOR_ENV

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ROOT = HERE.parents[1]
MODELS = ("mobilenet_v2", "efficientnet_lite0")
LRS = (0.125, 0.0156, 0.005)
BATCHNORMS = ("frozen", "train")
STRATEGIES = ("full", "trady", "s-topk-random")
BUDGET = "2.2%"
CLASSES = 10
CHANCE_MARGIN = 0.05  # a final test accuracy within 5 points of chance (0.10) is a collapsed run


def run_name(model: str, bn: str, lr: float, strategy: str, seed: int) -> str:
    return f"{model}__bn-{bn}__lr{lr:g}__{strategy}__s{seed}"


def grid(args) -> list[tuple]:
    """Seed 0 of every cell first, then seed 1 lr by lr (the paper's 0.125 first) over both models: a grid
    cut short still has every cell, and its second seeds where the question is."""
    return [
        (model, bn, lr, strategy, seed)
        for seed in args.seeds for lr in args.lrs for model in args.models for bn in args.batchnorms
        for strategy in args.strategies
    ]  # fmt: skip


def one_run(point: tuple, args) -> str:
    model, bn, lr, strategy, seed = point
    out = Path(args.runs) / run_name(*point)
    summary = out / "summary.json"
    if summary.is_file() and json.loads(summary.read_text()).get("epochs_done") is not None:
        s = json.loads(summary.read_text())
        if s["status"] == "ok" or "non-finite" in (s.get("error") or ""):
            return f"skip {out.name}"
    if args.skip_started and (out / "config.json").is_file():
        return f"skip {out.name} (started by another driver)"
    cmd = [
        sys.executable, "-m", "trady", "finetune", "--model", model, "--strategy", strategy,
        "--batchnorm", bn, "--lr", str(lr), "--seed", str(seed), "--data", "fashion-mnist", "--resolution", "64",
        "--train-size", str(args.train_size), "--test-size", str(args.test_size), "--epochs", str(args.epochs),
        "--batch-size", "32", "--warmup-epochs", "1", "--threads", str(args.threads), "--no-progress",
        "--out", str(out),
    ] + (["--budget", BUDGET] if strategy != "full" else [])  # fmt: skip
    env = {**os.environ, **ALLOCATOR_ENV, "PYTHONPATH": args.src, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    tail = (proc.stderr.strip().splitlines() or ["ok"])[-1]
    return f"{out.name}: rc {proc.returncode} in {time.perf_counter() - t0:.0f}s ({tail[:120]})"


def load_summaries(runs: Path) -> list[dict]:
    out = []
    for path in sorted(runs.glob("*/summary.json")):
        s = json.loads(path.read_text())
        config = json.loads((path.parent / "config.json").read_text())
        s["lr"], s["batchnorm"] = config["lr"], config.get("batchnorm", "frozen")
        s["run"] = path.parent.name
        out.append(s)
    return out


def final_acc(s: dict) -> float:
    """The last epoch's test accuracy; a run stopped by a non-finite loss counts as chance."""
    if s["status"] != "ok":
        return 1 / CLASSES
    return s["test_acc"]


def rows_from(summaries: list[dict]) -> list[dict]:
    cells: dict[tuple, list[dict]] = {}
    for s in summaries:
        if s["status"] != "ok" and "non-finite" not in (s.get("error") or ""):
            continue  # a run that failed otherwise is no result (reported as missing)
        cells.setdefault((s["model"], s["batchnorm"], s["lr"], s["strategy"]), []).append(s)
    rows = []
    for (model, bn, lr, strategy), runs in sorted(
        cells.items(), key=lambda kv: (kv[0][0], kv[0][1], -kv[0][2], STRATEGIES.index(kv[0][3]))
    ):
        runs.sort(key=lambda s: s["seed"])
        accs = [final_acc(s) for s in runs]
        peaks = [s["peak_memory_bytes"] for s in runs if s.get("peak_memory_bytes") is not None]
        saved = [s["measured_saved_bytes"] for s in runs if s.get("measured_saved_bytes") is not None]
        bn_kept = [s["batchnorm_kept_bytes"] for s in runs if s.get("batchnorm_kept_bytes") is not None]
        rows.append({
            "model": model, "batchnorm": bn, "lr": lr, "strategy": strategy,
            "seeds": [s["seed"] for s in runs],
            "mean_acc": statistics.fmean(accs),
            "collapsed": sum(a <= 1 / CLASSES + CHANCE_MARGIN for a in accs),
            "peak_memory_bytes": int(statistics.median(peaks)) if peaks else None,
            "saved_bytes": int(statistics.median(saved)) if saved else None,
            "batchnorm_kept_bytes": int(statistics.median(bn_kept)) if bn_kept else None,
            "budgeted_bytes": runs[0].get("measured_budgeted_bytes"),
            "accs": accs, "best_accs": [s.get("best_test_acc") for s in runs],
            "diverged": sum(s["status"] != "ok" for s in runs),
            "epochs": runs[0]["epochs"], "train_size": runs[0]["train_size"], "test_size": runs[0]["test_size"],
            "resolution": runs[0]["resolution"], "budget": runs[0].get("budget"),
        })  # fmt: skip
    return rows


def accuracy_table(rows: list[dict]) -> str:
    head = ["model", "lr", "strategy", "frozen: mean acc (seeds)", "collapsed", "train: mean acc (seeds)", "collapsed"]
    by = {(r["model"], r["lr"], r["strategy"], r["batchnorm"]): r for r in rows}
    body = []
    for model in MODELS:
        for lr in LRS:
            for strategy in STRATEGIES:
                cells = []
                for bn in BATCHNORMS:
                    r = by.get((model, lr, strategy, bn))
                    accs = "" if r is None else " / ".join(f"{a:.3f}" for a in r["accs"])
                    cells += (
                        ["missing", "-"]
                        if r is None
                        else [f"{r['mean_acc']:.3f} ({accs})", f"{r['collapsed']}/{len(r['seeds'])}"]
                    )
                if any(c != "missing" for c in cells[::2]):
                    body.append([model, f"{lr:g}", strategy, *cells])
    return render_table(head, body, markdown=True, left=3)


MEMORY_KEYS = ("peak_memory_bytes", "saved_bytes", "batchnorm_kept_bytes", "budgeted_bytes")


def _median(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _ratio(v: dict, frozen: dict | None, key: str) -> str:
    return f"{v[key] / frozen[key]:.2f}x" if frozen and frozen[key] and v[key] is not None else "-"


def memory_table(rows: list[dict]) -> str:
    """Per model and strategy: median over lrs and seeds of the measured step peak and the kept bytes."""
    head = ["model", "strategy", "batchnorm", "step peak (MiB)", "kept for backward (MiB)", "of which BatchNorm (MiB)",
            "budgeted (MiB)", "peak vs frozen", "kept vs frozen"]  # fmt: skip
    body = []
    for model in MODELS:
        for strategy in STRATEGIES:
            med = {}
            for bn in BATCHNORMS:
                sel = [r for r in rows if (r["model"], r["strategy"], r["batchnorm"]) == (model, strategy, bn)]
                if sel:
                    med[bn] = {k: _median(sel, k) for k in MEMORY_KEYS}
            frozen = med.get("frozen")
            for bn, v in med.items():
                body.append([model, strategy, bn, mib(v["peak_memory_bytes"]), mib(v["saved_bytes"]),
                             mib(v["batchnorm_kept_bytes"]), mib(v["budgeted_bytes"]),
                             _ratio(v, frozen, "peak_memory_bytes"), _ratio(v, frozen, "saved_bytes")])  # fmt: skip
    return render_table(head, body, markdown=True, left=3)


def plot(rows: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from trady.selection import strategies

    fig = Figure(figsize=(11, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(MODELS), sharey=True)
    for ax, model in zip(axes, MODELS):
        for strategy in STRATEGIES:
            colour = strategies.strategy_class(strategy).colour or "#333333"
            for bn, style in (("frozen", "--"), ("train", "-")):
                sel = sorted((r for r in rows if (r["model"], r["strategy"], r["batchnorm"]) == (model, strategy, bn)),
                             key=lambda r: r["lr"])  # fmt: skip
                if sel:
                    ax.plot([r["lr"] for r in sel], [r["mean_acc"] for r in sel], style, marker="o", color=colour,
                            label=f"{strategy}, BN {bn}")  # fmt: skip
        ax.axhline(1 / CLASSES, color="#999999", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xticks(LRS, [f"{lr:g}" for lr in LRS])
        ax.set_title(f"{model}, Fashion-MNIST 64 px")
        ax.set_xlabel("learning rate (SGD, cosine, 1 warm-up epoch)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("final test accuracy (mean over seeds)")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.savefig(path)


def report(args) -> None:
    rows = rows_from(load_summaries(Path(args.runs)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(RESULTS / "results.json", rows)
    expected = len(args.models) * len(args.lrs) * len(args.batchnorms) * len(args.strategies)
    runs = sum(len(r["seeds"]) for r in rows)
    text = (
        f"# bn-regime results\n\n{len(rows)} of {expected} cells, {runs} runs "
        f"(train {rows[0]['train_size'] if rows else '-'} / test {rows[0]['test_size'] if rows else '-'} images, "
        f"{rows[0]['epochs'] if rows else '-'} epochs, 64 px, batch 32). mean acc: final test accuracy, mean "
        "over seeds (a run stopped by a non-finite loss counts as chance, 0.100); collapsed: runs within 0.05 of "
        "chance.\n\n## Accuracy\n\n"
        + accuracy_table(rows)
        + "\n\n## Memory (median over lrs and seeds)\n\n"
        + memory_table(rows)
        + "\n"
    )
    write_text(RESULTS / "results.md", text)
    if rows:
        plot(rows, RESULTS / "accuracy_vs_lr.png")
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--lrs", nargs="+", type=float, default=list(LRS))
    ap.add_argument("--batchnorms", nargs="+", default=list(BATCHNORMS))
    ap.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--train-size", type=int, default=256)
    ap.add_argument("--test-size", type=int, default=300)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", default=str(HERE / "runs"))
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--skip-started", action="store_true", help="skip runs another driver has started")
    ap.add_argument("--src", default=str(ROOT / "src"), help="the trady sources the runs import (a frozen copy)")
    args = ap.parse_args()
    if not args.report_only:
        points = grid(args)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.jobs) as pool:
            for i, line in enumerate(pool.map(lambda p: one_run(p, args), points), 1):
                print(f"[{i}/{len(points)} {time.perf_counter() - t0:.0f}s] {line}", flush=True)
    report(args)


if __name__ == "__main__":
    main()
