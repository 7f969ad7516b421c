"""Selections by gradients or weights: deterministic RGN (d-/s-det-rgn), MeDyate, su-magnitude."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from trady.core.errors import TradyError
from trady.engine.costs import Selection
from trady.selection.ranking import channel_norms
from trady.selection.strategies.base import (
    SelectionContext,
    Strategy,
    channel_pairs,
    channel_pool,
    fill_budget,
    register,
    require_model,
    require_profile,
    strategy_class,
)

# ----------------------------------------------------------------------------------------------------
# deterministic RGN (oracle that needs the full gradient)


def _stats_for(name: str, ctx: SelectionContext, layer: str) -> torch.Tensor:
    stats = ctx.grad_stats
    if stats is None:
        source = strategy_class(name).grad_source
        raise TradyError(f"strategy {name!r} needs gradient statistics (grad_source {source!r})")
    if layer not in stats:
        raise TradyError(f"strategy {name!r}: gradient statistics miss layer {layer!r}")
    t = torch.as_tensor(stats[layer]).detach().to("cpu", torch.float64).flatten()
    c = ctx.costs.by_name[layer].in_channels
    if t.numel() != c:
        raise TradyError(f"gradient statistics of layer {layer!r} have {t.numel()} values, the layer has {c} channels")
    return t


class _DetRGN(Strategy):
    grad_source = "full"

    def _choose(self, ctx: SelectionContext) -> Selection:
        names = ctx.costs.names
        layer_idx, chan = channel_pool(ctx.costs, names)
        rgn = torch.cat([_stats_for(self.name, ctx, n) / ctx.costs.by_name[n].space_units_per_channel for n in names])
        rgn = torch.nan_to_num(rgn, nan=-math.inf)
        order = torch.sort(rgn, descending=True, stable=True).indices
        return fill_budget(ctx.costs, channel_pairs(names, layer_idx[order], chan[order]), ctx.budget_units)


@register("d-det-rgn")
class DDetRGN(_DetRGN):
    """Channels by decreasing RGN_c = ||g_c|| / (C^W_c + C^A_c) of a full gradient, every epoch."""

    display_order, colour = 41, "#1f77b4"
    dynamic = True


@register("s-det-rgn")
class SDetRGN(_DetRGN):
    """Channels by decreasing RGN_c of a full gradient computed once, at the start."""

    display_order, colour = 40, "#aec7e8"
    dynamic = False


# ----------------------------------------------------------------------------------------------------
# MeDyate


@register("medyate")
class MeDyate(Strategy):
    """MeDyate: layers by LaRa, K adapted to the budget, channels sampled by their gradient norm.

    K is the smallest count with B_mem / M_K <= `ratio` (M_K: full memory units of the top-K layers by
    LaRa; all layers if none qualifies; K also grows until one channel of those layers fits the
    budget). Epoch 1: uniform channels of those layers. Later epochs:
    channels drawn without replacement with probability proportional to their last measured raw
    gradient norm; channels never measured get the largest measured norm so that they are explored.
    """

    display_order, colour = 60, "#ff7f0e"
    dynamic = True
    grad_source = "running"

    def __init__(self, *, ratio: float = 0.2) -> None:
        super().__init__()
        if not 0.0 < ratio <= 1.0:
            raise TradyError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio
        self._norms: dict[str, torch.Tensor] = {}

    def layers_for_budget(self, ctx: SelectionContext) -> list[str]:
        profile = require_profile(self.name, ctx)
        order = profile.order_by("lara")
        budget = ctx.budget_units
        mem = 0
        fits = False  # some channel of the top-K layers fits the budget (else K grows until one does)
        for k, n in enumerate(order, start=1):
            lay = ctx.costs.by_name[n]
            mem += lay.full_units
            fits = fits or (budget is not None and lay.space_units_per_channel <= budget)
            if fits and budget <= self.ratio * mem:
                return order[:k]
        return order

    _candidate_layers = layers_for_budget

    def _update_norms(self, ctx: SelectionContext, names: Sequence[str]) -> None:
        for n in names:
            if n not in self._norms:
                self._norms[n] = torch.full((ctx.costs.by_name[n].in_channels,), math.nan, dtype=torch.float64)
        if ctx.grad_stats is None:
            return
        for n, t in ctx.grad_stats.items():
            if n not in ctx.costs.by_name:
                continue
            t = _stats_for(self.name, ctx, n)
            cur = self._norms.setdefault(n, torch.full_like(t, math.nan))
            seen = torch.isfinite(t)
            cur[seen] = t[seen]

    def _choose(self, ctx: SelectionContext) -> Selection:
        names = self.layers_for_budget(ctx)
        self._update_norms(ctx, names)
        layer_idx, chan = channel_pool(ctx.costs, names)
        w = torch.cat([self._norms[n] for n in names])
        measured = torch.isfinite(w)
        if ctx.epoch <= 1 or not bool(measured.any()):
            if ctx.epoch > 1 and ctx.grad_stats is None:
                raise TradyError(
                    f"strategy {self.name!r} needs the running gradient norms (grad_source 'running') "
                    f"from epoch 2 on; got none at epoch {ctx.epoch}"
                )
            order = torch.randperm(len(chan), generator=ctx.generator)
        else:
            w = torch.where(measured, w, w[measured].max()).clamp_min(0.0)
            # Efraimidis-Spirakis: sorting u^(1/w) (u uniform) descending draws without replacement
            # with probability proportional to w; zero weights come last, in random order.
            u = torch.rand(len(w), generator=ctx.generator, dtype=torch.float64).clamp_min(1e-300)
            top = float(w.max())
            floor = top * 1e-12 if top > 0 else 1.0
            keys = torch.log(u) / w.clamp_min(floor)
            order = torch.sort(keys, descending=True, stable=True).indices
        return fill_budget(ctx.costs, channel_pairs(names, layer_idx[order], chan[order]), ctx.budget_units)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["norms"] = {k: v.clone() for k, v in self._norms.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._norms = {k: torch.as_tensor(v, dtype=torch.float64).clone() for k, v in state.get("norms", {}).items()}


# ----------------------------------------------------------------------------------------------------
# sparse-update baseline (Lin et al.), simplified: top layers, fixed ratio, largest-magnitude channels


@register("su-magnitude")
class SUMagnitude(Strategy):
    """Static: layers from the classifier end downwards, `ratio` of each layer's input channels with
    the largest weight magnitude (L2 norm of the channel's weight slice), until the budget is full."""

    display_order, colour = 20, "#9467bd"
    dynamic = False

    def __init__(self, *, ratio: float = 0.5) -> None:
        super().__init__()
        if not 0.0 < ratio <= 1.0:
            raise TradyError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio = ratio

    def _choose(self, ctx: SelectionContext) -> Selection:
        model = require_model(self.name, ctx)
        cands: list[tuple[str, int]] = []
        for lay in reversed(ctx.costs.layers):
            try:
                module = model.get_submodule(lay.name)
            except AttributeError:
                raise TradyError(f"strategy {self.name!r}: layer {lay.name!r} is not a module of the model") from None
            mag = channel_norms(module.weight, getattr(module, "groups", 1))
            take = max(1, int(round(self.ratio * lay.in_channels)))
            top = torch.sort(mag, descending=True, stable=True).indices[:take]
            cands.extend((lay.name, int(c)) for c in top)
        return fill_budget(ctx.costs, cands, ctx.budget_units)
