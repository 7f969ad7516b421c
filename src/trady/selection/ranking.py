"""Layer ranking: RGN / LaRa accumulated over a short full fine-tuning, the top-K rule, profiles (JSON).

Per input channel c of layer i (method.md):
  ||g_c||  = norm of dL/dW_i over every weight dimension except the input channel
  RGN_c    = ||g_c|| / (C^W_c + C^A_c)
  layer RGN = sum_c RGN_c;  LaRa_i = ||dL/dW_i|| / sum_c (C^W_c + C^A_c)
Both are accumulated (summed) over every iteration of the profiling run (trady.selection.rank_run runs it:
`trady.rank(model, batches)` for any model, `compute_profile(name)` for a zoo model). Finding 1 of the paper: the
order of layers by layer RGN depends on the architecture, hardly on the task, so one profile per model
is computed offline and shipped in `trady/profiles/<model>.json`; K = the smallest number of layers
whose cumulated RGN reaches 97% of the total.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from trady.core.errors import TradyError, unknown_name
from trady.core.files import write_json
from trady.engine.costs import CostTable, LayerInfo, layer_weight

DEFAULT_THRESHOLD = 0.97
PROFILE_KEYS = ("rgn", "lara", "grad_norm")


# ----------------------------------------------------------------------------------------------------
# per-input-channel norms


def channel_norms(weight: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """Per-input-channel L2 norm of a conv/linear weight (or its gradient), shape [C_in] (global index).

    Conv weight [C', C/g, kh, kw]: input channel c = gi * (C/g) + l owns the rows of group gi
    (out channels gi*C'/g .. (gi+1)*C'/g - 1) at local column l. groups == 1 is the norm over dims
    0, 2, 3; depthwise (g = C) is the norm of weight[c]; Linear [out, in] is the norm over dim 0.
    """
    w = weight.detach()
    if w.dim() < 2:
        raise TradyError(f"expected a conv or linear weight (>= 2 dims), got shape {tuple(w.shape)}")
    c_out, c_local = w.shape[0], w.shape[1]
    if c_out % groups:
        raise TradyError(f"out channels {c_out} not divisible by groups {groups}")
    w = w.reshape(groups, c_out // groups, c_local, -1).float()
    return w.pow(2).sum(dim=(1, 3)).sqrt().reshape(groups * c_local)


# ----------------------------------------------------------------------------------------------------
# the top-K rule


def top_k_count(values: Sequence[float] | torch.Tensor, threshold: float = DEFAULT_THRESHOLD) -> int:
    """Smallest K such that the K largest values sum to at least `threshold` of the total."""
    if not 0.0 < threshold <= 1.0:
        raise TradyError(f"threshold must be in (0, 1], got {threshold}")
    v = sorted((float(x) for x in values), reverse=True)
    if not v:
        return 0
    total = sum(v)
    if total <= 0.0 or not math.isfinite(total):
        return len(v)
    acc = 0.0
    for k, x in enumerate(v, start=1):
        acc += x
        if acc >= threshold * total * (1.0 - 1e-12):
            return k
    return len(v)


# ----------------------------------------------------------------------------------------------------
# the profile


@dataclass
class LayerRank:
    name: str
    kind: str
    in_channels: int
    grad_norm: float  # sum over iterations of ||dL/dW_i|| (Frobenius)
    rgn: float  # sum over iterations and channels of ||g_c|| / (C^W_c + C^A_c)
    lara: float  # grad_norm / sum_c (C^W_c + C^A_c)
    weight_units: int  # C^W per channel
    activation_units: int  # C^A per channel (at the profile's resolution)

    @property
    def space_units(self) -> int:
        return self.weight_units + self.activation_units

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "in_channels": self.in_channels,
            "grad_norm": self.grad_norm,
            "rgn": self.rgn,
            "lara": self.lara,
            "weight_units": self.weight_units,
            "activation_units": self.activation_units,
        }


@dataclass
class RankingProfile:
    """Layer statistics of one profiling run, in execution order (classifier excluded)."""

    model: str
    resolution: int
    dataset: str
    epochs: int
    seed: int
    layers: list[LayerRank]
    threshold: float = DEFAULT_THRESHOLD
    iterations: int | None = None
    extra: dict = field(default_factory=dict)  # free-form provenance (lr, batch size, train size, time)

    def __post_init__(self) -> None:
        names = [lay.name for lay in self.layers]
        if len(set(names)) != len(names):
            raise TradyError("profile has duplicate layer names")
        if not 0.0 < self.threshold <= 1.0:
            raise TradyError(f"profile threshold must be in (0, 1], got {self.threshold}")
        for lay in self.layers:  # a NaN would rank every layer arbitrarily, silently
            for key in ("grad_norm", "rgn", "lara"):
                value = getattr(lay, key)
                if not math.isfinite(value) or value < 0:
                    raise TradyError(f"profile layer {lay.name!r} has {key} {value!r}; accepted: a finite number >= 0 "
                                     "(rank the model again with `trady rank`)")  # fmt: skip

    # --- views
    @property
    def names(self) -> list[str]:
        return [lay.name for lay in self.layers]

    @property
    def by_name(self) -> dict[str, LayerRank]:
        return {lay.name: lay for lay in self.layers}

    def values(self, key: str = "rgn") -> list[float]:
        if key not in PROFILE_KEYS:
            raise unknown_name("ranking key", key, PROFILE_KEYS)
        return [float(getattr(lay, key)) for lay in self.layers]

    def order_by(self, key: str = "rgn") -> list[str]:
        """Layer names by decreasing `key` (ties: execution order)."""
        vals = self.values(key)
        idx = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
        return [self.layers[i].name for i in idx]

    @property
    def order(self) -> list[str]:
        return self.order_by("rgn")

    def cumulative_share(self, key: str = "rgn") -> list[float]:
        by = self.by_name
        vals = [float(getattr(by[n], key)) for n in self.order_by(key)]
        total = sum(vals)
        out, acc = [], 0.0
        for v in vals:
            acc += v
            out.append(acc / total if total > 0 else 0.0)
        return out

    def k(self, threshold: float | None = None) -> int:
        return top_k_count(self.values("rgn"), self.threshold if threshold is None else threshold)

    def top_k(self, threshold: float | None = None, k: int | None = None) -> list[str]:
        """The top-K layers by layer RGN (K by the threshold rule unless given), in ranking order."""
        if k is None:
            k = self.k(threshold)
        if k < 1:
            raise TradyError(f"k must be >= 1, got {k}")
        return self.order[:k]

    def check_layers(self, costs: CostTable) -> None:
        """Raise if the profile's layers are not exactly the cost table's (matched by name)."""
        mine = set(self.names)
        for name in costs.names:
            if name not in mine:
                raise TradyError(
                    f"layer-ranking profile of {self.model!r} does not match the model: "
                    f"model layer {name!r} is missing from the profile"
                )
        theirs = set(costs.names)
        for name in self.names:
            if name not in theirs:
                raise TradyError(
                    f"layer-ranking profile of {self.model!r} does not match the model: "
                    f"profile layer {name!r} is not in the model"
                )

    def matched_to(self, costs: CostTable) -> RankingProfile:
        """This profile under the cost table's layer names: itself when the names are the same; renamed
        when every layer matches exactly one model layer by a dotted suffix, either way round (a profile
        ranked on the bare network used on a wrapper holding it, e.g. `conv1` on `net.conv1`, or the
        reverse); otherwise one line naming the first layer that matches none or several."""
        if set(self.names) == set(costs.names):
            return self
        rename, taken = {}, set()
        for name in self.names:
            hits = [c for c in costs.names if c == name or c.endswith("." + name) or name.endswith("." + c)]
            if len(hits) != 1 or hits[0] in taken:
                found = ("no model layer" if not hits else "model layers " + ", ".join(repr(h) for h in hits[:3])
                         if len(hits) > 1 else f"model layer {hits[0]!r}, which another profile layer matched")
                raise TradyError(
                    f"layer-ranking profile of {self.model!r} does not match the model: profile layer {name!r} "
                    f"matches {found}; accepted: a profile ranked on this model or on the network it wraps "
                    "(layer names matched by a unique dotted suffix)"
                )  # fmt: skip
            rename[name] = hits[0]
            taken.add(hits[0])
        if len(taken) != len(costs.names):
            missing = next(c for c in costs.names if c not in taken)
            raise TradyError(f"layer-ranking profile of {self.model!r} does not match the model: model layer "
                             f"{missing!r} is missing from the profile")  # fmt: skip
        layers = [dataclasses.replace(lay, name=rename[lay.name]) for lay in self.layers]
        return dataclasses.replace(self, layers=layers, extra={**self.extra, "names_matched_by_suffix": True})

    def for_costs(self, costs: CostTable, resolution: int | None = None) -> RankingProfile:
        """The profile re-weighted to another cost table of the same model (e.g. another resolution).

        Within a layer every channel has the same space cost, so layer RGN = (sum_c ||g_c||) / space
        units: the accumulated gradient norms are kept and divided by the new units (LaRa likewise).
        Returns self when the units already match; layer names must match (`check_layers`).
        `resolution`: the resolution the new costs were computed at (recorded in the result).
        """
        self.check_layers(costs)
        if all(
            (lay.weight_units, lay.activation_units)
            == (costs.by_name[lay.name].weight_units_per_channel, costs.by_name[lay.name].activation_units_per_channel)
            for lay in self.layers
        ):
            return self
        layers = []
        for lay in self.layers:
            info = costs.by_name[lay.name]
            new_space = info.space_units_per_channel
            layers.append(
                LayerRank(
                    name=lay.name,
                    kind=lay.kind,
                    in_channels=lay.in_channels,
                    grad_norm=lay.grad_norm,
                    rgn=lay.rgn * lay.space_units / new_space,
                    lara=lay.grad_norm / (info.in_channels * new_space),
                    weight_units=info.weight_units_per_channel,
                    activation_units=info.activation_units_per_channel,
                )
            )
        extra = dict(self.extra)
        extra["reweighted_from_resolution"] = self.resolution
        return dataclasses.replace(
            self, layers=layers, resolution=self.resolution if resolution is None else int(resolution), extra=extra
        )

    # --- JSON
    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "resolution": self.resolution,
            "dataset": self.dataset,
            "epochs": self.epochs,
            "seed": self.seed,
            "threshold": self.threshold,
            "k": self.k(),
            "iterations": self.iterations,
            "layers": [lay.to_dict() for lay in self.layers],
            "order": self.order,
            "cumulative_share": self.cumulative_share(),
            "extra": self.extra,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict) -> RankingProfile:
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list):
            raise TradyError(
                "invalid layer-ranking profile: this JSON is not a layer-ranking profile (no 'layers' list)"
            )
        try:
            layers = [
                LayerRank(
                    name=str(d["name"]),
                    kind=str(d["kind"]),
                    in_channels=int(d["in_channels"]),
                    grad_norm=float(d["grad_norm"]),
                    rgn=float(d["rgn"]),
                    lara=float(d["lara"]),
                    weight_units=int(d["weight_units"]),
                    activation_units=int(d["activation_units"]),
                )
                for d in data["layers"]
            ]
            return cls(
                model=str(data["model"]),
                resolution=int(data["resolution"]),
                dataset=str(data["dataset"]),
                epochs=int(data["epochs"]),
                seed=int(data["seed"]),
                layers=layers,
                threshold=float(data.get("threshold", DEFAULT_THRESHOLD)),
                iterations=data.get("iterations"),
                extra=dict(data.get("extra") or {}),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise TradyError(f"invalid layer-ranking profile: {type(err).__name__}: {err}") from None

    @classmethod
    def from_json(cls, text: str) -> RankingProfile:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise TradyError(f"invalid layer-ranking profile JSON: {err}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RankingProfile:
        path = Path(path)
        if not path.is_file():
            raise TradyError(f"layer-ranking profile {str(path)!r} not found")
        try:
            return cls.from_json(path.read_text())
        except TradyError as err:
            raise TradyError(f"{path}: {err}") from None


def shipped_profiles() -> list[str]:
    """Model names with a profile shipped in trady/profiles/."""
    folder = resources.files("trady.selection") / "profiles"
    if not folder.is_dir():
        return []
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_profile(model_name: str) -> RankingProfile:
    """The profile shipped for a zoo model (src/trady/profiles/<model>.json)."""
    res = resources.files("trady.selection") / "profiles" / f"{model_name}.json"
    if not res.is_file():
        raise unknown_name("layer-ranking profile (model)", model_name, shipped_profiles())
    return RankingProfile.from_json(res.read_text())


def spearman_layer_order(a: RankingProfile, b: RankingProfile, key: str = "rgn") -> float:
    """Spearman rank correlation of the layer RGN (or `key`) of two profiles over their common layers."""
    from scipy.stats import spearmanr

    bb = b.by_name
    common = [lay.name for lay in a.layers if lay.name in bb]
    if len(common) < 2:
        raise TradyError(f"profiles share {len(common)} layers; Spearman needs at least 2")
    aa = a.by_name
    x = [float(getattr(aa[n], key)) for n in common]
    y = [float(getattr(bb[n], key)) for n in common]
    return float(spearmanr(x, y).statistic)


# ----------------------------------------------------------------------------------------------------
# accumulation


class RankAccumulator:
    """Accumulates per-channel gradient norms, RGN and LaRa of every layer of a cost table.

    Call `update()` after each backward of a stock-autograd step (weight.grad must be filled).
    """

    def __init__(self, model: nn.Module, costs: CostTable) -> None:
        self.costs = costs
        self.modules: dict[str, nn.Module] = {}
        for lay in costs.layers:
            try:
                self.modules[lay.name] = model.get_submodule(lay.name)
            except AttributeError:
                raise TradyError(f"layer {lay.name!r} of the cost table is not a module of the model") from None
        self.iterations = 0
        self.channel_norm_sum = {lay.name: torch.zeros(lay.in_channels, dtype=torch.float64) for lay in costs.layers}
        self.grad_norm_sum = {lay.name: 0.0 for lay in costs.layers}

    def update(self) -> None:
        for lay in self.costs.layers:
            module = self.modules[lay.name]
            weight = layer_weight(module)  # a MultiheadAttention's layer is its in_proj_weight
            grad = None if weight is None else weight.grad
            if grad is None:
                continue  # no gradient reached this layer: it contributes zero
            cn = channel_norms(grad, getattr(module, "groups", 1)).to("cpu", torch.float64)
            self.channel_norm_sum[lay.name] += cn
            # ||dL/dW|| = sqrt(sum_c ||g_c||^2)
            self.grad_norm_sum[lay.name] += float(cn.pow(2).sum().sqrt())
        self.iterations += 1

    # --- results
    def channel_rgn(self, name: str) -> torch.Tensor:
        lay = self.costs.by_name[name]
        return self.channel_norm_sum[name] / lay.space_units_per_channel

    def layer_rgn(self, name: str) -> float:
        return float(self.channel_rgn(name).sum())

    def lara(self, name: str) -> float:
        return self.grad_norm_sum[name] / self.costs.by_name[name].full_units

    def layer_ranks(self) -> list[LayerRank]:
        return [self._rank(lay) for lay in self.costs.layers]

    def _rank(self, lay: LayerInfo) -> LayerRank:
        return LayerRank(
            name=lay.name,
            kind=lay.kind,
            in_channels=lay.in_channels,
            grad_norm=self.grad_norm_sum[lay.name],
            rgn=self.layer_rgn(lay.name),
            lara=self.lara(lay.name),
            weight_units=lay.weight_units_per_channel,
            activation_units=lay.activation_units_per_channel,
        )

    def profile(
        self,
        model: str,
        resolution: int,
        dataset: str,
        epochs: int,
        seed: int,
        threshold: float = DEFAULT_THRESHOLD,
        extra: dict | None = None,
    ) -> RankingProfile:
        return RankingProfile(
            model=model,
            resolution=resolution,
            dataset=dataset,
            epochs=epochs,
            seed=seed,
            layers=self.layer_ranks(),
            threshold=threshold,
            iterations=self.iterations,
            extra=dict(extra or {}),
        )
