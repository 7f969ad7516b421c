"""How well does each strategy's cumulative update follow the full gradient? (issue 14 items 1-2)

Real fine-tunes (trady's own setup / selection / epoch loop, see gradlib.py) of the pretrained MCU
models on a Fashion-MNIST subset; at every step the full gradient is also computed (never applied).
Per epoch: cosine(cumulative applied update, cumulative lr-weighted full gradient) over all conv
weights and over the top-K layers, the share of each step's full-gradient squared norm the selection
captured, and the share of channels selected so far.

    # item 1: the strategies at the paper's budgets
    PYTHONPATH=src OMP_NUM_THREADS=1 nice -n 15 .venv/bin/python benchmarks/gradient/run.py \
        --models mbv2-w0.35 mcunet-in1 --budgets 2.2% 5.3% 7.5%
    # item 2: trady redrawn every N steps (N = steps per epoch is plain trady)
    ... benchmarks/gradient/run.py --redraw 1 2 4 8 16 --budgets 2.2%
    # only assemble the JSON, the table and the plots from the finished runs
    ... benchmarks/gradient/run.py --report

Each finished run is kept as results/runs/<key>.json (a local cache, not committed: runs/ is
git-ignored; the grid resumes from it, and two processes with different --models may run side by
side); every invocation then assembles results/gradient.json (item 1 rows) and results/redraw.json
(item 2 rows) from it, prints the tables and draws the PNG plots. Without the cache (a fresh
checkout), --report reads the committed JSON files instead.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gradlib import GradientRun  # noqa: E402

from trady.config import FinetuneConfig  # noqa: E402
from trady.core.files import write_json  # noqa: E402

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
RUNS = RESULTS / "runs"
STRATEGIES = ["trady", "s-topk-random", "d-full-random", "s-full-random", "d-det-rgn", "medyate", "su-magnitude"]
ORDER = STRATEGIES + ["su-published"]  # display order (su-published runs at its own schemes' budgets)
# The project's accuracy-benchmark recipe (benchmarks/accuracy/grid.json): the paper's lr 0.125
# diverges on the float reconstructions of the int8 MCU models (see issue 14 item 5).
BASE = dict(
    data="fashion-mnist", resolution=64, batch_size=32, warmup_epochs=1, lr=0.005, classifier_lr=0.05,
    classifier_init="zeros", progress=False, measure_memory=False,
)  # fmt: skip


def run_key(model: str, strategy: str, budget: str, seed: int, redraw: int | None) -> str:
    b = budget.replace("%", "pct")
    r = f"__every{redraw}" if redraw is not None else ""
    return f"{model}__{strategy}__b{b}__s{seed}{r}"


def one_run(model, strategy, budget, seed, redraw, args) -> list[dict]:
    config = FinetuneConfig(
        model=model, strategy=strategy, budget=budget, seed=seed, epochs=args.epochs, train_size=args.train_size,
        test_size=args.test_size, **BASE,
    )  # fmt: skip
    t0 = time.perf_counter()
    bench = GradientRun(config, redraw_every=redraw)
    steps = len(bench.run.train_loader)
    meta = {
        "model": model, "strategy": strategy, "budget": budget, "budget_units": bench.run.budget_units,
        "full_units": bench.run.costs.full_units, "seed": seed, "redraw_every": redraw, "steps_per_epoch": steps,
        "train_size": args.train_size, "test_size": args.test_size, "resolution": BASE["resolution"],
        "lr": BASE["lr"], "classifier_lr": BASE["classifier_lr"], "epochs": args.epochs,
    }  # fmt: skip

    def show(row):
        print(f"  epoch {row['epoch']:2d}  cos {row['cosine']:.3f}  cos_topk {row['cosine_topk']:.3f}  "
              f"captured {row['captured_share']:.4f}  coverage {row['coverage']:.3f}  acc {row['test_acc']:.3f}",
              flush=True)  # fmt: skip

    rows = [{**meta, **r} for r in bench.fit(show)]
    for r in rows:
        r["wall_time_s"] = time.perf_counter() - t0
    return rows


def collect() -> tuple[list[dict], list[dict]]:
    if not any(RUNS.glob("*.json")):  # a fresh checkout: the committed results
        return [json.loads((RESULTS / f).read_text()) if (RESULTS / f).is_file() else [] for f in
                ("gradient.json", "redraw.json")]  # fmt: skip
    rows = []
    for f in sorted(RUNS.glob("*.json")):
        rows.extend(json.loads(f.read_text()))
    main = [r for r in rows if r["redraw_every"] is None]
    redraw = [r for r in rows if r["redraw_every"] is not None]
    return main, redraw


def _last(rows: list[dict]) -> list[dict]:
    last = {}
    for r in rows:
        k = (r["model"], r["budget"], r["strategy"], r["redraw_every"], r["seed"])
        if k not in last or r["epoch"] > last[k]["epoch"]:
            last[k] = r
    return list(last.values())


def table(rows: list[dict], label: str) -> str:
    cols = ["cosine", "cosine_topk", "captured_share", "captured_share_topk", "coverage_topk", "test_acc"]
    out = [f"{'model':<11} {'budget':<6} {label:<16} {'ep':>3} " + " ".join(f"{c:>19}" for c in cols)]
    groups: dict[tuple, list[dict]] = {}
    for r in _last(rows):
        groups.setdefault((r["model"], r["budget"], r[label] if label in r else r["strategy"]), []).append(r)
    order = {s: i for i, s in enumerate(ORDER)}

    def sort_key(k):
        lab = k[2]
        return (k[0], float(k[1].rstrip("%")), order.get(lab, 99) if isinstance(lab, str) else (lab or 10**6))

    for k in sorted(groups, key=sort_key):
        rs = groups[k]
        cells = []
        for c in cols:
            vals = [r[c] for r in rs]
            m = sum(vals) / len(vals)
            cells.append(f"{m:>19.4f}" if len(vals) == 1 else f"{m:>12.4f} (n={len(vals)})")
        lab = "epoch" if k[2] is None else str(k[2])
        out.append(f"{k[0]:<11} {k[1]:<6} {lab:<16} {rs[0]['epoch']:>3} " + " ".join(cells))
    return "\n".join(out)


def _budget_key(b: str):
    return (b.endswith("%"), float(b.rstrip("%")))


def _label_key(lab):
    if isinstance(lab, str):
        return (0, ORDER.index(lab) if lab in ORDER else len(ORDER), lab)
    return (1, lab if lab is not None else 10**9, "")


def plot(rows: list[dict], label: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    budgets = sorted({r["budget"] for r in rows}, key=_budget_key)
    if not models:
        return
    fig, axes = plt.subplots(len(models), len(budgets), figsize=(4.2 * len(budgets), 3.4 * len(models)),
                             squeeze=False, sharey=True)  # fmt: skip
    for (row_i, model), (col_i, budget) in itertools.product(enumerate(models), enumerate(budgets)):
        ax = axes[row_i][col_i]
        series: dict = {}
        for r in rows:
            if (r["model"], r["budget"]) == (model, budget):
                series.setdefault(r[label], {}).setdefault(r["epoch"], []).append(r["cosine"])
        if not series:
            ax.set_visible(False)
            continue
        for lab in sorted(series, key=_label_key):
            ep = sorted(series[lab])
            ax.plot(ep, [sum(series[lab][e]) / len(series[lab][e]) for e in ep], marker=".",
                    label=("every epoch" if lab is None else str(lab)),
                    linestyle="-" if not isinstance(lab, str) or not lab.startswith("s-") else "--")  # fmt: skip
        ax.set_title(f"{model}, {budget}", fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    for row in axes:
        row[0].set_ylabel("cos(cum. update, cum. full grad.)")
    axes[0][-1].legend(fontsize=7, title=title, title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report() -> None:
    main, redraw = collect()
    if main:
        write_json(RESULTS / "gradient.json", main)
        print("\n== item 1: strategies (last epoch; all conv weights and top-K layers) ==")
        print(table(main, "strategy"))
        plot(main, "strategy", RESULTS / "cosine_vs_epoch.png", "strategy")
    if redraw:
        write_json(RESULTS / "redraw.json", redraw)
        print("\n== item 2: trady redrawn every N steps (last epoch) ==")
        print(table(redraw, "redraw_every"))
        plot(redraw, "redraw_every", RESULTS / "redraw_cosine_vs_epoch.png", "redraw every N steps")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["mbv2-w0.35", "mcunet-in1"])
    ap.add_argument("--budgets", nargs="+", default=["2.2%"])
    ap.add_argument("--strategies", nargs="+", default=STRATEGIES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--train-size", type=int, default=512)
    ap.add_argument("--test-size", type=int, default=256)
    ap.add_argument("--redraw", nargs="+", type=int, default=None, help="item 2: trady redrawn every N steps")
    ap.add_argument("--report", action="store_true", help="only assemble results, tables and plots")
    args = ap.parse_args()
    torch.set_num_threads(1)
    RUNS.mkdir(parents=True, exist_ok=True)
    if not args.report:
        jobs = []
        for seed in args.seeds:
            for model in args.models:
                for budget in args.budgets:
                    if args.redraw:
                        jobs += [(model, "trady", budget, seed, n) for n in args.redraw]
                    else:
                        jobs += [(model, s, budget, seed, None) for s in args.strategies]
        for job in jobs:
            path = RUNS / f"{run_key(*job)}.json"
            if path.is_file():
                continue
            print(f"{run_key(*job)}", flush=True)
            rows = one_run(*job, args)
            write_json(path, rows)
    report()


if __name__ == "__main__":
    main()
