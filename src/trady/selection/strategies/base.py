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
trady.selection.strategies.su_published); and the non-sparse modes full, classifier, bias, whose selection is empty (the
trainer handles their mode).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from trady.core.errors import TradyError, unknown_name
from trady.engine.costs import CostTable, Selection
from trady.selection.ranking import RankingProfile

MODES = ("sparse", "full", "classifier", "bias", "adapter")
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
    defaults = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()}
    for key, value in options.items():
        _check_option_type(name, key, value, defaults.get(key, inspect.Parameter.empty))
    return cls(**options)


def _check_option_type(strategy: str, key: str, value: Any, default: Any) -> None:
    """An option's value has its default's type (a number for a float option): one line otherwise."""
    if default is inspect.Parameter.empty or default is None:
        return
    if isinstance(default, bool):
        ok, what = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, what = isinstance(value, str), "a string"
    else:
        return
    if not ok:
        raise TradyError(f"option {key}={value!r} of strategy {strategy!r}: accepted {what} (default {default!r})")


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


def channel_pool(costs: CostTable, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """All channels of `names` as parallel (layer index into names, channel) int64 tensors."""
    sizes = [costs.by_name[n].in_channels for n in names]
    layer_idx = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(sizes, dtype=torch.int64))
    chan = torch.cat([torch.arange(s) for s in sizes]) if sizes else torch.zeros(0, dtype=torch.int64)
    return layer_idx, chan


def channel_pairs(names: Sequence[str], layer_idx: torch.Tensor, chan: torch.Tensor) -> list[tuple[str, int]]:
    return [(names[i], c) for i, c in zip(layer_idx.tolist(), chan.tolist())]


def uniform_candidates(costs: CostTable, names: Sequence[str], generator: torch.Generator):
    """Every channel of `names` as (layer, channel) candidates in uniform random order."""
    layer_idx, chan = channel_pool(costs, names)
    perm = torch.randperm(len(chan), generator=generator)
    return channel_pairs(names, layer_idx[perm], chan[perm])


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


def require_profile(name: str, ctx: SelectionContext) -> RankingProfile:
    if ctx.profile is None:
        raise TradyError(f"strategy {name!r} needs a layer-ranking profile: trady.rank(model, batches) or "
                         "`trady rank` (zoo models ship one)")  # fmt: skip
    # matched by layer name; RGN / LaRa re-weighted to the context's units when they differ
    # (e.g. a profile computed at another resolution)
    return ctx.profile.for_costs(ctx.costs)


def require_model(name: str, ctx: SelectionContext) -> nn.Module:
    if ctx.model is None:
        raise TradyError(f"strategy {name!r} needs the model (its weights) in the selection context")
    return ctx.model


def draw_once(costs: CostTable, budget: Any, *, profile: RankingProfile | None = None, model: nn.Module | None = None,
              seed: int = 0) -> tuple[Selection, str]:
    """One first-epoch draw through the registry, as a run's first epoch draws it: TraDy with a ranking
    profile, D-Full Random (all layers) without one. Returns (selection, strategy name). `budget`: as
    `parse_budget` reads it (units, bytes, "2.2%")."""
    from trady.engine.costs import parse_budget

    name = "trady" if profile is not None else "d-full-random"
    units = parse_budget(budget, costs)
    check_budget(name, costs, units, budget)
    ctx = SelectionContext(epoch=1, costs=costs, budget_units=units, generator=torch.Generator().manual_seed(seed),
                           profile=profile, model=model)  # fmt: skip
    return get(name).select(ctx), name
