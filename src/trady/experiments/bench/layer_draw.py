"""The benchmarks' selection: candidate layers (shipped profile's top-K, a top fraction, all) and a
uniform random draw of their channels that fills the budget (TraDy's draw)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from trady.core.errors import TradyError, unknown_name
from trady.engine.costs import CostTable, Selection

LAYER_CHOICES = ("auto", "profile", "top-fraction", "all")


def top_layers(costs: CostTable, fraction: float) -> list[str]:
    """The last ceil(fraction * n) layers by execution order (closest to the classifier)."""
    n = len(costs.layers)
    k = max(1, min(n, math.ceil(fraction * n)))
    return costs.names[n - k :]


def candidate_layers(
    costs: CostTable, choice: str, model_name: str | None = None, top_fraction: float = 0.5
) -> tuple[list[str], str]:
    """(layer names to draw channels from, in execution order; a description of where they come from)."""
    if choice not in LAYER_CHOICES:
        raise unknown_name("layer choice", choice, LAYER_CHOICES)
    if choice == "all":
        return list(costs.names), "all layers"
    if choice in ("auto", "profile"):
        profile = None
        if model_name is not None:
            try:
                from trady.selection import ranking

                profile = ranking.load_profile(model_name)
            except (ImportError, TradyError):
                if choice == "profile":
                    raise
        elif choice == "profile":
            raise TradyError("layers='profile' needs a zoo model name with a shipped ranking profile")
        if profile is not None:
            profile.check_layers(costs)
            chosen = set(profile.top_k())
            names = [n for n in costs.names if n in chosen]
            return names, f"profile top-K (K={len(names)} of {len(costs.names)})"
    names = top_layers(costs, top_fraction)
    return names, f"top {top_fraction:.0%} by execution order ({len(names)} of {len(costs.names)})"


def random_selection(
    costs: CostTable, layers: Sequence[str], budget_units: int, generator: torch.Generator
) -> Selection:
    """Channels of `layers` in uniform random order, each added while its space cost still fits."""
    from trady.selection.strategies import fill_budget, uniform_candidates

    if not layers:
        return {}
    cheapest = min(costs.by_name[n].space_units_per_channel for n in layers)
    if budget_units < cheapest:
        raise TradyError(
            f"budget of {budget_units} units fits no channel of the chosen layers (cheapest: {cheapest} units)"
        )
    return fill_budget(costs, uniform_candidates(costs, layers, generator), budget_units)
