"""Channel-selection strategies: TraDy and its variants and baselines behind one small interface.

A strategy turns a `SelectionContext` (epoch, cost table, budget, random generator, layer-ranking
profile, gradient statistics, model) into a `Selection` (layer name -> sorted int64 input channels)
whose space cost sum_c (C^W_c + C^A_c) never exceeds the budget. Static strategies (S-...) choose once,
at their first call, and return that choice every epoch; dynamic ones (D-..., trady, medyate) choose
again every epoch. Every sparse strategy fills the budget the same way (`fill_budget`): candidates in
the strategy's order, each added while it fits, one that does not fit is skipped and filling goes on.

Registry: `register(name)` decorates a class, `get(name, **options)` builds one, `available()` lists
the names. Names follow the paper (method.md): trady (= D-TopK Random), s-topk-random, d-full-random,
s-full-random, d-det-rgn, s-det-rgn, medyate, su-magnitude, su-published (Lin et al.'s schemes, in
trady.su_published); and the non-sparse modes full, classifier, bias, whose selection is empty (the
trainer handles their mode).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trady.costs import CostTable, Selection
from trady.errors import TradyError, unknown_name
from trady.ranking import DEFAULT_THRESHOLD, RankingProfile, channel_norms

MODES = ("sparse", "full", "classifier", "bias")
GRAD_SOURCES = (None, "full", "running")


@dataclass
class SelectionContext:
    epoch: int  # 1-based
    costs: CostTable
    budget_units: int | None
    generator: torch.Generator
    profile: RankingProfile | None = None
    grad_stats: dict[str, torch.Tensor] | None = None  # layer -> raw per-input-channel grad norm [C]
    model: nn.Module | None = None


# ----------------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, type[Strategy]] = {}


def register(name: str):
    """Class decorator: make a Strategy subclass available under `name`."""

    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"strategy {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    return list(_REGISTRY)


def strategy_class(name: str) -> type[Strategy]:
    """The class registered as `name`: its attributes (mode, dynamic, grad_source, display_order,
    colour) without building one."""
    if name not in _REGISTRY:
        raise unknown_name("strategy", name, available())
    return _REGISTRY[name]


def get(name: str, **options: Any) -> Strategy:
    """Build the strategy registered as `name` with its options (unknown ones are an error)."""
    if name not in _REGISTRY:
        raise unknown_name("strategy", name, available())
    cls = _REGISTRY[name]
    accepted = option_names(name)
    for key in options:
        if key not in accepted:
            if accepted:
                raise unknown_name(f"option of strategy {name!r}", key, accepted)
            raise TradyError(f"strategy {name!r} takes no options, got {key!r}")
    return cls(**options)


def option_names(name: str) -> list[str]:
    """Keyword options that `get(name, ...)` accepts."""
    if name not in _REGISTRY:
        raise unknown_name("strategy", name, available())
    sig = inspect.signature(_REGISTRY[name].__init__)
    return [p.name for p in sig.parameters.values() if p.name != "self" and p.kind == p.KEYWORD_ONLY]


# ----------------------------------------------------------------------------------------------------
# budget filling


def fill_budget(costs: CostTable, candidates: Iterable[tuple[str, int]], budget_units: int) -> Selection:
    """Greedy fill: take candidates (layer, channel) in order, add each one whose space cost still fits.

    A candidate that does not fit is skipped and filling goes on with the next one; filling stops
    early once the remaining budget is below the cheapest candidate layer. Duplicates count once.
    The selected cost never exceeds `budget_units`.
    """
    cands = list(candidates)
    if not cands:
        return {}
    unit = {}
    for name, _ in cands:
        if name not in unit:
            if name not in costs.by_name:
                raise unknown_name("layer", name, costs.names)
            unit[name] = costs.by_name[name].space_units_per_channel
    cheapest = min(unit.values())
    left = int(budget_units)
    chosen: dict[str, set[int]] = {}
    for name, c in cands:
        if left < cheapest:
            break
        cost = unit[name]
        if cost > left:
            continue
        got = chosen.setdefault(name, set())
        c = int(c)
        if c in got:
            continue
        got.add(c)
        left -= cost
    order = {n: i for i, n in enumerate(costs.names)}
    return {
        n: torch.tensor(sorted(chosen[n]), dtype=torch.int64)
        for n in sorted(chosen, key=order.__getitem__)
        if chosen[n]
    }


def _pool(costs: CostTable, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All channels of `names` as parallel (layer index into names, channel) int64 tensors."""
    sizes = [costs.by_name[n].in_channels for n in names]
    layer_idx = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes, dtype=torch.int64))
    chan = torch.cat([torch.arange(s) for s in sizes]) if sizes else torch.zeros(0, dtype=torch.int64)
    return layer_idx, chan


def _pairs(names: Sequence[str], layer_idx: torch.Tensor, chan: torch.Tensor) -> list[tuple[str, int]]:
    return [(names[i], c) for i, c in zip(layer_idx.tolist(), chan.tolist())]


def uniform_candidates(costs: CostTable, names: Sequence[str], generator: torch.Generator):
    """Every channel of `names` as (layer, channel) candidates in uniform random order."""
    layer_idx, chan = _pool(costs, names)
    perm = torch.randperm(len(chan), generator=generator)
    return _pairs(names, layer_idx[perm], chan[perm])


def _clone(sel: Selection) -> Selection:
    return {k: v.clone() for k, v in sel.items()}


# ----------------------------------------------------------------------------------------------------
# base classes


class Strategy:
    """Base: subclasses set `dynamic`, `mode`, `grad_source` and implement `_choose(ctx)`.

    `display_order` and `colour` say how reports show the strategy (position in tables and plots,
    lower first; plot colour, None for one of the spare colours): a dynamic variant and its static
    twin sit side by side and share a hue (static lighter).
    """

    name: str = ""
    dynamic: bool = True
    mode: str = "sparse"
    grad_source: str | None = None
    display_order: int = 1000
    colour: str | None = None

    def __init__(self) -> None:
        self._selection: Selection | None = None  # static strategies: the choice made at the first call

    @property
    def needs_grad_stats(self) -> bool:
        return self.grad_source is not None

    def needs_full_gradient(self) -> bool:
        """Whether the next `select` needs grad_stats from a full-gradient pass (grad_source "full").

        A static strategy needs it only until it has chosen (also not after a resumed state).
        """
        return self.grad_source == "full" and (self.dynamic or self._selection is None)

    @property
    def options(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in option_names(self.name)}

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({self.name!r}{', ' + opts if opts else ''})"

    # --- selection
    def select(self, ctx: SelectionContext) -> Selection:
        if self.mode != "sparse":
            return {}
        if not self.dynamic and self._selection is not None:
            return _clone(self._selection)
        check_budget(self.name, ctx.costs, ctx.budget_units)
        sel = self._choose(ctx)
        if not sel:
            raise TradyError(
                f"budget of {ctx.budget_units} units fits no channel that strategy {self.name!r} may "
                f"choose; its cheapest candidate costs {self._cheapest_candidate(ctx)} units"
            )
        units = ctx.costs.selection_units(sel)
        if units > ctx.budget_units:  # pragma: no cover - fill_budget guarantees it
            raise AssertionError(f"{self.name}: selection of {units} units exceeds {ctx.budget_units}")
        if not self.dynamic:
            self._selection = _clone(sel)
        return sel

    def _choose(self, ctx: SelectionContext) -> Selection:
        raise NotImplementedError

    def _candidate_layers(self, ctx: SelectionContext) -> list[str]:
        return ctx.costs.names

    def _cheapest_candidate(self, ctx: SelectionContext) -> int:
        try:
            names = self._candidate_layers(ctx)
        except TradyError:
            names = ctx.costs.names
        return min(ctx.costs.by_name[n].space_units_per_channel for n in names)

    # --- checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "selection": None if self._selection is None else _clone(self._selection),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise TradyError(f"strategy state of {state.get('name')!r} cannot be loaded into {self.name!r}")
        sel = state.get("selection")
        self._selection = None if sel is None else {k: torch.as_tensor(v, dtype=torch.int64) for k, v in sel.items()}


def check_budget(name: str, costs: CostTable, budget_units: int | None, spec: Any = None) -> None:
    """The one budget-fits check: a sparse strategy needs a budget of at least the network's cheapest channel.

    `spec`: the budget as the user gave it ("2.2%", "256KB"), named in the message when given."""
    cheapest = min(costs.layers, key=lambda lay: lay.space_units_per_channel)
    units = cheapest.space_units_per_channel
    if budget_units is None or budget_units < units:
        given = f" ({spec!r})" if spec is not None and str(spec) != str(budget_units) else ""
        got = "no budget" if budget_units is None else f"a budget of {budget_units} units{given}, which fits no channel"
        raise TradyError(
            f"strategy {name!r} got {got}: the cheapest channel costs {units} units "
            f"(layer {cheapest.name!r}); accepted: a budget of at least {units} units"
        )


def _require_profile(name: str, ctx: SelectionContext) -> RankingProfile:
    if ctx.profile is None:
        raise TradyError(f"strategy {name!r} needs a layer-ranking profile: trady.rank(model, batches) or "
                         "`trady rank` (zoo models ship one)")  # fmt: skip
    # matched by layer name; RGN / LaRa re-weighted to the context's units when they differ
    # (e.g. a profile computed at another resolution)
    return ctx.profile.for_costs(ctx.costs)


def _require_model(name: str, ctx: SelectionContext) -> nn.Module:
    if ctx.model is None:
        raise TradyError(f"strategy {name!r} needs the model (its weights) in the selection context")
    return ctx.model


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
        profile = _require_profile(self.name, ctx)
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


# ----------------------------------------------------------------------------------------------------
# deterministic RGN (oracle that needs the full gradient)


def _stats_for(name: str, ctx: SelectionContext, layer: str) -> torch.Tensor:
    stats = ctx.grad_stats
    if stats is None:
        raise TradyError(f"strategy {name!r} needs gradient statistics (grad_source {_REGISTRY[name].grad_source!r})")
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
        layer_idx, chan = _pool(ctx.costs, names)
        rgn = torch.cat([_stats_for(self.name, ctx, n) / ctx.costs.by_name[n].space_units_per_channel for n in names])
        rgn = torch.nan_to_num(rgn, nan=-math.inf)
        order = torch.sort(rgn, descending=True, stable=True).indices
        return fill_budget(ctx.costs, _pairs(names, layer_idx[order], chan[order]), ctx.budget_units)


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
        profile = _require_profile(self.name, ctx)
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
        layer_idx, chan = _pool(ctx.costs, names)
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
        return fill_budget(ctx.costs, _pairs(names, layer_idx[order], chan[order]), ctx.budget_units)

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
        model = _require_model(self.name, ctx)
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


# ----------------------------------------------------------------------------------------------------
# non-sparse modes: the trainer handles them; no channel selection


class _Mode(Strategy):
    dynamic = False

    def select(self, ctx: SelectionContext) -> Selection:
        return {}


@register("full")
class Full(_Mode):
    """Full fine-tuning (every weight; no budget)."""

    display_order, colour = 92, "#000000"
    mode = "full"


@register("classifier")
class ClassifierOnly(_Mode):
    """Only the classifier is trained."""

    display_order, colour = 91, "#7f7f7f"
    mode = "classifier"


@register("bias")
class BiasAndClassifier(_Mode):
    """Biases and the classifier are trained (TinyTL-style)."""

    display_order, colour = 90, "#8c564b"
    mode = "bias"


# Lin et al.'s published schemes (data + strategy "su-published") live in their own module; importing it
# here registers the strategy with every `import trady.strategies`.
from trady import su_published as _su_published  # noqa: E402,F401

__all__ = [
    "DEFAULT_THRESHOLD",
    "GRAD_SOURCES",
    "MODES",
    "SelectionContext",
    "Strategy",
    "available",
    "check_budget",
    "fill_budget",
    "uniform_candidates",
    "get",
    "option_names",
    "register",
    "strategy_class",
]
