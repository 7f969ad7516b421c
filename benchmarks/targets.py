"""The targets issues set for a benchmark, kept beside it (benchmarks/<name>/targets.json), never in trady.

    targets = load_targets(Path(__file__).parent)           # {"targets": {ratio key: [op, bound]}, ...}
    result["targets"] = check_targets(result["ratios"], targets["targets"])
"""

from __future__ import annotations

import json
from pathlib import Path


def load_targets(bench_dir: str | Path) -> dict:
    return json.loads((Path(bench_dir) / "targets.json").read_text())


def check_targets(ratios: dict[str, float], targets: dict[str, list]) -> dict[str, dict]:
    """{key: {value, target, met}} for each target whose ratio was measured."""
    out = {}
    for key, (op, bound) in targets.items():
        if key not in ratios:
            continue
        value = ratios[key]
        met = value >= bound if op == ">=" else value <= bound
        out[key] = {"value": value, "target": f"{op} {bound:g}", "met": bool(met)}
    return out


def format_targets(checked: dict[str, dict]) -> str:
    return "\n".join(
        f"{key:<40}{t['value']:>9.2f}  target {t['target']:<8} {'met' if t['met'] else 'MISSED'}"
        for key, t in checked.items()
    )
