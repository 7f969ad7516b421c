"""Random selections: TopK Random (TraDy, s-topk-random) and Full Random (d-/s-full-random)."""

from __future__ import annotations

from trady.core.errors import TradyError
from trady.engine.costs import Selection
from trady.selection.strategies.base import (
    SelectionContext,
    Strategy,
    fill_budget,
    register,
    require_profile,
    uniform_candidates,
)

# ----------------------------------------------------------------------------------------------------
# random selections: TopK (TraDy) and Full


class _TopKRandom(Strategy):
    def __init__(self, *, threshold: float | None = None, k: int | None = None) -> None:
        super().__init__()
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise TradyError(f"threshold must be in (0, 1], got {threshold}")
        if k is not None and k < 1:
            raise TradyError(f"k must be >= 1, got {k}")
        self.threshold = threshold
        self.k = k

    def _candidate_layers(self, ctx: SelectionContext) -> list[str]:
        profile = require_profile(self.name, ctx)
        return profile.top_k(self.threshold, self.k)

    def _choose(self, ctx: SelectionContext) -> Selection:
        names = self._candidate_layers(ctx)
        return fill_budget(ctx.costs, uniform_candidates(ctx.costs, names, ctx.generator), ctx.budget_units)


@register("trady")
class TraDy(_TopKRandom):
    """D-TopK Random: uniform random channels of the profile's top-K layers, redrawn every epoch."""

    display_order, colour = 51, "#d62728"
    dynamic = True


@register("s-topk-random")
class STopKRandom(_TopKRandom):
    """S-TopK Random: uniform random channels of the top-K layers, chosen once."""

    display_order, colour = 50, "#ff9896"
    dynamic = False


class _FullRandom(Strategy):
    def _choose(self, ctx: SelectionContext) -> Selection:
        names = ctx.costs.names
        return fill_budget(ctx.costs, uniform_candidates(ctx.costs, names, ctx.generator), ctx.budget_units)


@register("d-full-random")
class DFullRandom(_FullRandom):
    """Uniform random channels over every layer, redrawn every epoch."""

    display_order, colour = 31, "#2ca02c"
    dynamic = True


@register("s-full-random")
class SFullRandom(_FullRandom):
    """Uniform random channels over every layer, chosen once."""

    display_order, colour = 30, "#98df8a"
    dynamic = False
