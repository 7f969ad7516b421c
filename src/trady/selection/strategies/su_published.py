"""Lin et al.'s sparse-update (SU) schemes for the three MCU models, as published, as a static strategy.

Source of every number below: mit-han-lab/tiny-training (Lin et al., "On-Device Training Under 256KB
Memory", NeurIPS 2022), file compilation/mcu_ir_gen.py at commit c29157f55224b805030081d27618ead0dca62cb8,
the dict `sparse_update_config` of each model ("mbv2", "mcunet", "proxyless"): per memory level,
`n_bias_update` (biases of the last n convs), `manual_weight_idx` (convs whose weights are updated,
indexed over all Conv2d of the network from the input, the classifier excluded) and
`weight_update_ratio` (share of each of those convs' input channels that is updated; 0: bias only).
The mcunet "99kb" scheme is also the "100KB scheme" of algorithm/scripts/sparse_update.sh there.
Channel choice as in algorithm/core/utils/partial_backward.py (`prepare_model_for_backward_config`,
criterion "magnitude+", the one all these schemes use): the int(C * ratio) input channels of largest
weight L2 norm.

What trady trains of a scheme: its weight part (layers and channels, through the engine). The bias part
is available as `bias_layers(costs)` but not trained: trady's budget excludes biases (method.md) and
its trainer trains either every bias or none (`train_bias`), like for every other sparse strategy.
Memory levels are Lin et al.'s int8 kB (their accounting); in trady's units a scheme costs
`scheme_units(...)`; `scheme=None` takes the largest level that fits the run's budget.
"""

from __future__ import annotations

import torch

from trady.core.errors import TradyError, unknown_name
from trady.engine.costs import CostTable, Selection
from trady.selection.ranking import channel_norms
from trady.selection.strategies.base import SelectionContext, Strategy, fill_budget, register, require_model

SOURCE = "mit-han-lab/tiny-training compilation/mcu_ir_gen.py (commit c29157f), sparse_update_config"

# net -> level -> (n_bias_update, manual_weight_idx, weight_update_ratio), copied from SOURCE
SCHEMES: dict[str, dict[str, tuple[int, tuple[int, ...], tuple[float, ...]]]] = {
    "mbv2-w0.35": {  # "mbv2"
        "49kb": (16, (36, 39, 40, 41, 42, 45, 48, 49), (1, 1, 0, 0.25, 0.125, 0.125, 0.125, 0.125)),
        "73kb": (20, (32, 33, 36, 39, 41, 42, 45, 48), (0.125, 0.5, 0.5, 1, 0.25, 0.125, 0.125, 1)),
        "99kb": (25, (27, 30, 33, 36, 39, 42, 45, 48), (1, 1, 1, 1, 1, 0.125, 0.5, 1)),
        "123kb": (31, (27, 30, 33, 36, 39, 42, 45, 48), (1, 1, 1, 1, 1, 0.5, 1, 1)),
        "138kb": (34, (27, 30, 33, 36, 39, 42, 45, 48), (1, 1, 1, 1, 1, 1, 1, 1)),
    },
    "mcunet-in1": {  # "mcunet" (mcunet-5fps.pkl)
        "49kb": (20, (23, 24, 27, 30, 33, 39), (0, 0.25, 0.5, 0.5, 0, 0)),
        "74kb": (21, (21, 23, 24, 26, 27, 30), (1, 0, 1, 0, 0.5, 1)),
        "99kb": (22, (21, 24, 27, 30, 36, 39), (1, 1, 1, 1, 0.125, 0.25)),
        "124kb": (24, (21, 24, 27, 30, 33, 39), (0.25, 1, 1, 1, 0.5, 0.5)),
        "148kb": (23, (21, 24, 27, 30, 36, 39), (1, 1, 1, 1, 1, 0.5)),
    },
    "proxyless-w0.3": {  # "proxyless"
        "49kb": (21, (39, 42, 44, 45, 50, 51, 54, 57), (0.25, 1, 0, 1, 0, 0.125, 0.25, 0.25)),
        "74kb": (28, (33, 36, 39, 42, 45, 51, 54, 57), (0.5, 0.25, 1, 1, 1, 0.5, 0.25, 0.5)),
        "98kb": (25, (36, 39, 42, 45, 48, 51, 54, 57), (1, 0.5, 1, 1, 0.25, 0.5, 1, 1)),
        "120kb": (32, (36, 39, 42, 45, 48, 51, 54, 57), (1, 1, 1, 1, 0.5, 1, 1, 1)),
        "148kb": (45, (36, 39, 42, 45, 48, 51, 54, 57), (1, 1, 1, 1, 1, 1, 1, 1)),
    },
}
# How a network is recognised: its conv count and total input channels (trady's float rebuilds of the
# three int8 files; Lin et al.'s conv indexing needs exactly these networks).
FINGERPRINTS = {"mbv2-w0.35": (51, 5651), "mcunet-in1": (42, 5851), "proxyless-w0.3": (60, 5323)}


def fingerprint(costs: CostTable) -> tuple[int, int]:
    return len(costs.names), sum(lay.in_channels for lay in costs.layers)


def identify(costs: CostTable) -> str:
    fp = fingerprint(costs)
    for net, known in FINGERPRINTS.items():
        if fp == known:
            return net
    raise TradyError(
        f"strategy 'su-published' knows Lin et al.'s schemes for {', '.join(SCHEMES)} only; this network "
        f"({fp[0]} convs, {fp[1]} input channels) is none of them; accepted: one of those MCU models "
        "(or su-magnitude for any network)"
    )


def scheme_channels(net: str, level: str, costs: CostTable, model) -> Selection:
    """The channels a published scheme updates: per listed conv, the int(C * ratio) of largest weight norm."""
    if level not in SCHEMES[net]:
        raise unknown_name(f"su-published scheme of {net}", level, list(SCHEMES[net]))
    _, idx, ratios = SCHEMES[net][level]
    out: Selection = {}
    for i, ratio in zip(idx, ratios):
        name = costs.names[i]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise TradyError(f"strategy 'su-published': layer {name!r} is not a module of the model") from None
        keep = int(costs.by_name[name].in_channels * ratio)  # as partial_backward.py: int(), not round()
        if keep == 0:
            continue
        norms = channel_norms(module.weight, getattr(module, "groups", 1))
        top = torch.sort(norms, descending=True, stable=True).indices[:keep]
        out[name] = torch.sort(top).values.to(torch.int64)
    return out


def scheme_units(net: str, level: str, costs: CostTable, model) -> int:
    return costs.selection_units(scheme_channels(net, level, costs, model))


def bias_layers(net: str, level: str, costs: CostTable) -> list[str]:
    """The convs whose biases the scheme updates (the last n_bias_update)."""
    n = SCHEMES[net][level][0]
    return costs.names[len(costs.names) - n :]


@register("su-published")
class SUPublished(Strategy):
    """Static: Lin et al.'s published sparse-update scheme of the model (weight part), see su_published.py.

    scheme: a memory level of the model's schemes (e.g. "49kb"); None: the largest that fits the budget.
    """

    display_order, colour = 10, "#9467bd"  # first in reports; the SU family's hue (su-magnitude)
    dynamic = False

    def __init__(self, *, scheme: str | None = None) -> None:
        super().__init__()
        self.scheme = scheme
        self.chosen_scheme: str | None = None

    def _choose(self, ctx: SelectionContext) -> Selection:
        model = require_model(self.name, ctx)
        net = identify(ctx.costs)
        levels = [self.scheme] if self.scheme is not None else list(SCHEMES[net])
        fits = []
        for level in levels:
            sel = scheme_channels(net, level, ctx.costs, model)
            units = ctx.costs.selection_units(sel)
            if units <= ctx.budget_units:
                fits.append((units, level, sel))
            elif self.scheme is not None:
                raise TradyError(
                    f"su-published scheme {level!r} of {net} costs {units} units, over the budget of "
                    f"{ctx.budget_units} units; accepted: a budget of at least {units} units, or scheme=None "
                    "(the largest scheme that fits)"
                )
        if not fits:
            cheapest = min(scheme_units(net, lv, ctx.costs, model) for lv in SCHEMES[net])
            raise TradyError(
                f"no su-published scheme of {net} fits the budget of {ctx.budget_units} units; the smallest "
                f"costs {cheapest} units ({', '.join(SCHEMES[net])}); accepted: a budget of at least {cheapest}"
            )
        units, level, sel = max(fits, key=lambda f: f[0])
        self.chosen_scheme = level
        return fill_budget(ctx.costs, [(n, int(c)) for n, idx in sel.items() for c in idx], ctx.budget_units)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["chosen_scheme"] = self.chosen_scheme
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.chosen_scheme = state.get("chosen_scheme")
