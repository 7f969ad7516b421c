"""trady.experiments.report on synthetic run folders: statistics against hand computation, JSON shape, plots."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from trady.cli import report as report_cli
from trady.core.errors import TradyError
from trady.experiments.report import average_ranks, build_report, load_runs, paired_test, summarize

FULL_UNITS = 1_252_320
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(root: Path, strategy: str, budget_units: int | None, seed: int, acc: float, *,
              model: str = "mbv2-w0.35", dataset: str = "fashion-mnist", status: str = "ok", epochs: int = 3,
              error: str | None = None, sparsity: float = 0.9) -> Path:
    """A run folder as trady.train.finetune writes it (docs/architecture.md, "Run folder")."""
    name = f"{model}__{dataset}__{strategy}__" + (f"b{budget_units}__" if budget_units else "") + f"s{seed}"
    d = root / name
    d.mkdir(parents=True)
    budget = None if budget_units is None else str(budget_units)
    (d / "config.json").write_text(json.dumps({"model": model, "data": dataset, "strategy": strategy,
                                               "budget": budget, "seed": seed, "epochs": epochs}))
    ref = budget_units is None
    rows = [{"epoch": e, "test_acc": acc - 0.1 * (epochs - e) / epochs, "train_loss": 1.0 / e,
             "activation_sparsity": 0.0 if ref else sparsity, "weight_sparsity": 0.0 if ref else sparsity - 0.05,
             "flops_reduction": 0.0 if ref else sparsity - 0.02} for e in range(1, epochs + 1)]
    if status == "ok":
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {
        "model": model, "dataset": dataset, "strategy": strategy, "budget": budget, "budget_units": budget_units,
        "budget_fraction": None if ref else budget_units / FULL_UNITS, "full_units": FULL_UNITS, "seed": seed,
        "epochs": epochs, "test_acc": acc if status == "ok" else None, "best_test_acc": acc if status == "ok" else None,
        "wall_time_s": 10.0 + seed, "activation_sparsity": 0.0 if ref else sparsity,
        "weight_sparsity": 0.0 if ref else sparsity - 0.05, "flops_reduction": 0.0 if ref else sparsity - 0.02,
        "measured_budgeted_bytes": None if ref else budget_units * 4,
        "measured_saved_bytes": None if ref else 3_000_000 + seed, "status": status, "error": error,
    }
    (d / "summary.json").write_text(json.dumps(summary))
    return d


# accuracies per (strategy, budget) over seeds 0, 1, 2
ACCS = {
    ("d-full-random", 27946): [0.80, 0.82, 0.87],
    ("trady", 27946): [0.83, 0.84, 0.86],
    ("d-det-rgn", 27946): [0.81, 0.85, 0.84],
    ("d-full-random", 93696): [0.84, 0.85, 0.86],
    ("trady", 93696): [0.86, 0.88, 0.87],
    ("d-det-rgn", 93696): [0.85, 0.86, 0.88],
    ("full", None): [0.90, 0.91, 0.92],
    ("classifier", None): [0.70, 0.72, 0.71],
}


@pytest.fixture()
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    for (strategy, units), accs in ACCS.items():
        for seed, acc in enumerate(accs):
            write_run(root, strategy, units, seed, acc)
    write_run(root, "trady", 27946, 3, 0.0, status="failed", error="RuntimeError: budget fits no channel")
    # a run killed before it finished: config and metrics, no summary
    d = root / "mbv2-w0.35__fashion-mnist__trady__b93696__s3"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model": "mbv2-w0.35", "data": "fashion-mnist",
                                               "strategy": "trady", "budget": "93696", "seed": 3}))
    (d / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "test_acc": 0.5}) + "\n")
    return root


def _row(report, strategy, units):
    [row] = [r for r in report["rows"] if r["strategy"] == strategy and r["budget_units"] == units]
    return row


def test_mean_std_by_hand(results):
    report = summarize(results)
    assert report["n_runs"] == 24
    row = _row(report, "d-full-random", 27946)
    # by hand: mean (0.80 + 0.82 + 0.87) / 3 = 0.83; deviations -0.03, -0.01, 0.04;
    # sample variance (0.0009 + 0.0001 + 0.0016) / 2 = 0.0013
    assert row["seeds"] == 3
    assert row["mean_acc"] == pytest.approx(0.83)
    assert row["std_acc"] == pytest.approx(math.sqrt(0.0013))
    assert row["budget_pct"] == pytest.approx(100 * 27946 / FULL_UNITS)
    assert row["activation_sparsity"] == pytest.approx(0.9)
    assert row["measured_saved_bytes"] == pytest.approx(3_000_001)
    ref = _row(report, "full", None)
    assert ref["mean_acc"] == pytest.approx(0.91) and ref["std_acc"] == pytest.approx(0.01)
    assert len(report["rows"]) == len(ACCS)


def test_paired_t_test_by_hand(results):
    a, b = ACCS[("trady", 27946)] + ACCS[("trady", 93696)], ACCS[("d-full-random", 27946)] + ACCS[
        ("d-full-random", 93696)]
    d = np.array(a) - np.array(b)  # 0.03, 0.02, -0.01, 0.02, 0.03, 0.01
    n = len(d)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(n))
    p = 2 * stats.t.sf(abs(t), n - 1)
    assert p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    [entry] = [e for e in summarize(results)["paired"]
               if {e["a"], e["b"]} == {"trady", "d-full-random"} and e["scope"] == "all"]
    sign = 1 if entry["a"] == "trady" else -1
    assert entry["n"] == 6
    assert entry["mean_diff"] == pytest.approx(sign * d.mean())
    assert entry["t"] == pytest.approx(sign * t)
    assert entry["p_value"] == pytest.approx(p)
    wins = (entry["a_wins"], entry["b_wins"]) if sign == 1 else (entry["b_wins"], entry["a_wins"])
    assert wins == (5, 1) and entry["ties"] == 0
    # only sparse strategies are compared (3 of them: 3 pairs), no reference strategy
    pairs = {frozenset((e["a"], e["b"])) for e in summarize(results)["paired"]}
    assert pairs == {frozenset(p) for p in [("trady", "d-full-random"), ("trady", "d-det-rgn"),
                                            ("d-full-random", "d-det-rgn")]}


def test_paired_test_edge_cases():
    one = paired_test([0.5], [0.4])
    assert one["n"] == 1 and one["p_value"] is None and one["mean_diff"] == pytest.approx(0.1)
    same = paired_test([0.5, 0.6], [0.5, 0.6])  # no difference at all: t undefined
    assert same["p_value"] is None and same["t"] is None and same["ties"] == 2 and same["mean_diff"] == 0


def test_ranking_hand_example(tmp_path):
    # group seed 0: C 0.9 > A 0.8 > B 0.7   -> A 2, B 3, C 1
    # group seed 1: A 0.85 = B 0.85 > C 0.6 -> A 1.5, B 1.5, C 3
    # group seed 2: B missing -> left out of the ranking
    for seed, accs in enumerate([{"a": 0.8, "b": 0.7, "c": 0.9}, {"a": 0.85, "b": 0.85, "c": 0.6},
                                 {"a": 0.9, "c": 0.1}]):
        for s, acc in accs.items():
            write_run(tmp_path, s, 5000, seed, acc)
    write_run(tmp_path, "full", None, 0, 0.99)  # references are not ranked
    rk = average_ranks(load_runs(tmp_path).runs)
    assert rk["n_groups"] == 2 and rk["n_incomplete"] == 1
    got = {e["strategy"]: e["mean_rank"] for e in rk["strategies"]}
    assert got == {"a": pytest.approx(1.75), "b": pytest.approx(2.25), "c": pytest.approx(2.0)}
    assert [e["strategy"] for e in rk["strategies"]] == ["a", "c", "b"]
    assert {e["strategy"]: e["firsts"] for e in rk["strategies"]} == {"a": 0, "b": 0, "c": 1}


def test_failed_and_incomplete_runs_are_listed(results):
    report = build_report(results, plots=False)
    assert [f["seed"] for f in report["failed"]] == [3]
    assert report["failed"][0]["status"] == "failed"
    assert "budget fits no channel" in report["failed"][0]["error"]
    assert [i["path"] for i in report["incomplete"]] == ["mbv2-w0.35__fashion-mnist__trady__b93696__s3"]
    md = (results / "report" / "report.md").read_text()
    assert "Failed and incomplete runs" in md and "budget fits no channel" in md
    assert "mbv2-w0.35__fashion-mnist__trady__b93696__s3" in md
    # the failed seed is not in the numbers
    assert _row(report, "trady", 27946)["seeds"] == 3


def test_markdown_tables(results):
    report = build_report(results, plots=False)
    md = (results / "report" / "report.md").read_text()
    # Table 1 shape: budgets as units and % of full fine-tuning, cells mean ± std in percent
    assert "| strategy | 27,946 (2.2%) | 93,696 (7.5%) | reference |" in md
    assert "| d-full-random | 83.00 ± 3.61 | 85.00 ± 1.00 |  |" in md
    assert "| full |  |  | 91.00 ± 1.00 |" in md
    assert json.loads((results / "report" / "report.json").read_text())["rows"] == json.loads(
        json.dumps(report["rows"]))


def _parse(argv):
    parser = argparse.ArgumentParser()
    report_cli.register(parser.add_subparsers())
    return parser.parse_args(argv)


def test_cli_json_rows(results, capsys):
    args = _parse(["report", str(results), "--json", "--no-plots"])
    assert args.func(args) == 0
    out = json.loads(capsys.readouterr().out)
    keys = {"model", "dataset", "strategy", "budget_units", "seeds", "mean_acc", "std_acc",
            "activation_sparsity", "weight_sparsity", "flops_reduction", "measured_budgeted_bytes",
            "measured_saved_bytes"}
    assert out["rows"] and all(keys <= set(r) for r in out["rows"])
    assert {"paired", "ranking", "failed", "incomplete"} <= set(out)
    assert out["plots"] == []


def test_cli_text(results, capsys):
    args = _parse(["report", str(results), "--no-plots"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert "mbv2-w0.35 / fashion-mnist" in text and "Average rank" in text and "budget fits no channel" in text


def _profile(n: int = 20, k: int = 8) -> dict:
    rng = np.random.default_rng(0)
    rgn = rng.pareto(1.5, n) + 0.1
    names = [f"features.{i}.conv" for i in range(n)]
    order = [names[i] for i in np.argsort(-rgn)]
    share = np.cumsum(np.sort(rgn)[::-1]) / rgn.sum()
    return {"model": "mbv2-w0.35", "resolution": 128, "dataset": "digits", "epochs": 3, "seed": 0,
            "threshold": 0.97, "k": k,
            "layers": [{"name": nm, "kind": "conv", "in_channels": 8, "grad_norm": float(r), "rgn": float(r),
                        "lara": float(r), "weight_units": 10, "activation_units": 100}
                       for nm, r in zip(names, rgn)],
            "order": order, "cumulative_share": share.tolist()}


def test_plots_are_valid_pngs(results):
    (results / "mbv2-profile.json").write_text(json.dumps(_profile()))
    report = build_report(results, plots=True)
    names = sorted(Path(p).name for p in report["plots"])
    assert names == sorted([
        "accuracy_vs_budget__mbv2-w0.35__fashion-mnist.png", "sparsity__mbv2-w0.35__fashion-mnist.png",
        "curves__mbv2-w0.35__fashion-mnist.png", "ranking.png", "profile__mbv2-w0.35.png"])
    for p in report["plots"]:
        data = Path(p).read_bytes()
        assert data[:8] == PNG_SIGNATURE, p
        assert len(data) > 10_000, p
        assert Path(p).parent == results / "report"
    assert "![ranking](ranking.png)" in (results / "report" / "report.md").read_text()


def test_profile_given_explicitly(tmp_path):
    root = tmp_path / "one"
    write_run(root, "classifier", None, 0, 0.7)
    prof = tmp_path / "elsewhere.json"
    prof.write_text(json.dumps(_profile(60, 35)))
    report = build_report(root, plots=True, profile=prof)
    assert [Path(p).name for p in report["plots"]] == ["curves__mbv2-w0.35__fashion-mnist.png",
                                                       "profile__mbv2-w0.35.png"]
    assert Path(report["plots"][1]).read_bytes()[:8] == PNG_SIGNATURE
    with pytest.raises(TradyError, match="not a layer-ranking profile"):
        build_report(root, plots=True, profile=root / "mbv2-w0.35__fashion-mnist__classifier__s0" / "summary.json")


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(TradyError, match="does not exist"):
        summarize(tmp_path / "nope")


def test_peak_memory_column_only_when_summaries_carry_it(results):
    plain = build_report(results, plots=False)
    assert "step peak" not in (results / "report" / "report.md").read_text()
    assert all(r["peak_memory_bytes"] is None for r in plain["rows"])
    for seed, peak in enumerate([3 * 2**20, 4 * 2**20, 5 * 2**20]):  # trady at 27946 units: mean 4 MiB
        path = results / f"mbv2-w0.35__fashion-mnist__trady__b27946__s{seed}" / "summary.json"
        summary = json.loads(path.read_text())
        summary["peak_memory_bytes"] = peak
        path.write_text(json.dumps(summary))
    report = build_report(results, plots=False)
    assert _row(report, "trady", 27946)["peak_memory_bytes"] == 4 * 2**20
    assert _row(report, "trady", 93696)["peak_memory_bytes"] is None
    md = (results / "report" / "report.md").read_text()
    assert "| measured step peak |" in md
    assert "| trady | 27,946 (2.2%) | 3 | 90.0% | 85.0% | 88.0% | 109.2 KiB | 2.9 MiB | 4.0 MiB |" in md
    assert "| trady | 93,696 (7.5%) | 3 | 90.0% | 85.0% | 88.0% | 366.0 KiB | 2.9 MiB | - |" in md


def test_strategy_order_comes_from_the_registry():
    from trady.experiments.report import strategy_order
    from trady.selection import strategies

    names = ["full", "zz-unregistered", "trady", "s-topk-random", "bias", "d-det-rgn"]
    order = strategy_order(names)
    sparse = [n for n in order if n in strategies.available() and strategies.strategy_class(n).mode == "sparse"]
    assert sparse == sorted(sparse, key=lambda n: strategies.strategy_class(n).display_order)
    assert order[len(sparse)] == "zz-unregistered"  # unknown names after the sparse strategies
    assert order[len(sparse) + 1:] == ["bias", "full"]  # the references last
    assert order.index("s-topk-random") + 1 == order.index("trady")  # static twin right before its dynamic
