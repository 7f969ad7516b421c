"""The sweep grid: models x datasets x budgets x strategies x seeds, its points and their run-folder names.

Read and validated whole (names against the registries, budgets parsed) before any run starts; run by
`trady.experiments.sweep`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trady.config import FinetuneConfig
from trady.core.errors import TradyError, unknown_name
from trady.core.formatting import sanitise

# Grid axes and the FinetuneConfig field each one sets.
AXES = {"models": "model", "datasets": "data", "budgets": "budget", "strategies": "strategy", "seeds": "seed"}




def _check_budgets(budgets: list[str]) -> None:
    """Every budget of the grid parses (units, bytes or a share): a bad one stops the sweep before its first
    run, not after the valid ones trained."""
    from trady.engine.costs import parse_budget_spec

    for budget in budgets:
        try:
            parse_budget_spec(budget)
        except TradyError as err:
            raise TradyError(f"grid budgets {budgets}: {err}") from None


def is_sparse(strategy: str) -> bool:
    """Whether a strategy updates a budgeted channel selection (and so runs once per budget); the
    non-sparse modes (full, classifier, bias: registry `mode`) run once per (model, dataset, seed) with
    budget null. A name the registry does not know counts as sparse (the run then fails on it)."""
    from trady.selection import strategies

    if strategy not in strategies.available():
        return True
    return strategies.strategy_class(strategy).mode == "sparse"


@dataclass(frozen=True)
class GridPoint:
    model: str
    dataset: str
    strategy: str
    budget: str | None  # as given ("27946", "2.2%", "256KB"); None for non-sparse strategies
    seed: int

    @property
    def name(self) -> str:
        parts = [sanitise(self.model), sanitise(self.dataset), sanitise(self.strategy)]
        if self.budget is not None:
            parts.append("b" + sanitise(self.budget))
        parts.append(f"s{self.seed}")
        return "__".join(p.replace("__", "_") for p in parts)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _unique(values: Sequence) -> list:
    seen, out = set(), []
    for v in values:
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


@dataclass
class SweepGrid:
    """What to run. Empty axes fall back on the base config's own value (e.g. base["model"])."""

    base: dict[str, Any] = field(default_factory=dict)
    models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    budgets: list[str] = field(default_factory=list)
    strategies: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.base = dict(self.base or {})
        if "out" in self.base and self.base["out"] is not None:
            raise TradyError("grid base must not set 'out': each run gets its own folder in the results folder")
        self.base.pop("out", None)
        FinetuneConfig.from_dict(self.base)  # unknown keys fail here, with the accepted ones listed
        self.models = _unique(str(m) for m in _as_list(self.models))
        self.datasets = _unique(str(d) for d in _as_list(self.datasets))
        self.budgets = _unique(str(b) for b in _as_list(self.budgets) if b is not None)
        _check_budgets(self.budgets)
        self.strategies = _unique(str(s) for s in _as_list(self.strategies))
        seeds = []
        for s in _as_list(self.seeds):
            try:
                seeds.append(int(s))
            except (TypeError, ValueError):
                raise TradyError(f"seeds must be integers, got {s!r}") from None
        self.seeds = _unique(seeds)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepGrid:
        if not isinstance(data, dict):
            raise TradyError(f"a grid must be a JSON object, got {type(data).__name__}")
        accepted = {"base", *AXES}
        ignored = {"runs", "version"}  # written into sweep.json by us; harmless when read back
        unknown = sorted(set(data) - accepted - ignored)
        if unknown:
            raise TradyError(f"unknown grid keys {unknown}; accepted: {sorted(accepted)}")
        return cls(**{k: v for k, v in data.items() if k in accepted})

    @classmethod
    def load(cls, path: str | os.PathLike) -> SweepGrid:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise TradyError(f"grid file {str(path)!r} does not exist") from None
        except json.JSONDecodeError as err:
            raise TradyError(f"grid file {str(path)!r} is not valid JSON: {err}") from None
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def axis(self, name: str) -> list:
        values = getattr(self, name)
        if values:
            return values
        default = self.base.get(AXES[name], getattr(FinetuneConfig, AXES[name], None))
        return [] if default is None else [default if name == "seeds" else str(default)]

    def points(self) -> list[GridPoint]:
        """Expand the grid in a stable order; non-sparse strategies once per (model, dataset, seed)."""
        budgets = self.axis("budgets")
        points = []
        for model in self.axis("models"):
            for dataset in self.axis("datasets"):
                for strategy in self.axis("strategies"):
                    sparse = is_sparse(strategy)
                    if sparse and not budgets:
                        raise TradyError(
                            f"strategy {strategy!r} needs a budget: give --budgets (units like 27946, "
                            f"bytes like 256KB or a share like 2.2%)"
                        )
                    for budget in budgets if sparse else [None]:
                        for seed in self.axis("seeds"):
                            points.append(GridPoint(model, dataset, strategy, budget, int(seed)))
        if not points:
            raise TradyError("the grid is empty: give at least one model, dataset, strategy and seed")
        names = [p.name for p in points]
        clashes = sorted({n for n in names if names.count(n) > 1})
        if clashes:
            raise TradyError(f"grid values give the same run folder name twice: {clashes[:5]}")
        return points

    def config(self, point: GridPoint, out: str | os.PathLike | None = None) -> FinetuneConfig:
        data = dict(self.base)
        data.update(model=point.model, data=point.dataset, strategy=point.strategy, budget=point.budget,
                    seed=point.seed, out=None if out is None else str(out))
        cfg = FinetuneConfig.from_dict(data)
        cfg.validate()
        return cfg


def validate_names(grid: SweepGrid) -> None:
    """Reject misspelled models and strategies before hours of runs fail one by one.

    Only names the registries can check (a registry that does not import yet is skipped)."""
    checks = [("strategy", "strategies", "trady.selection.strategies"), ("model", "models", "trady.models")]
    for kind, axis, module in checks:
        try:
            mod = __import__(module, fromlist=["available"])
            valid = list(mod.available())
        except Exception:
            continue
        for name in grid.axis(axis):
            if name not in valid and not (kind == "model" and _is_builder(name)):
                raise unknown_name(kind, name, valid)


def _is_builder(name: str) -> bool:
    """A user model builder (`file.py:fn`, `package.module:fn`): trady.models.entry builds it at run time."""
    from trady.models.entry import is_entry_point

    return is_entry_point(name)
