"""Reading a folder of run folders: every folder below the root holding summary.json, with config.json
and metrics.jsonl beside it (docs/architecture.md, "Run folder"), sorted into finished runs, failed
ones, incomplete ones (no summary.json yet) and duplicates of an already seen point; also finding the
layer-ranking profile JSON files below the root.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trady.core.errors import TradyError

EFFICIENCY_KEYS = ("activation_sparsity", "weight_sparsity", "flops_reduction", "measured_budgeted_bytes",
                   "measured_saved_bytes", "peak_memory_bytes")
ACC_METRICS = ("test_acc", "best_test_acc")
REPORT_DIRNAME = "report"
_RUN_FILES = ("summary.json", "config.json", "metrics.jsonl")


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
