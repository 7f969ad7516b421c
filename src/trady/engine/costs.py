"""Analytic costs of updating input channels: memory units, bytes, FLOPs, sparsities, budgets.

Per input channel c of a layer (method.md): weight units C^W = C' * kh * kw / g, activation units
C^A = H * W of the layer's input, weight-derivative MACs = kh * kw * C' * H' * W' / g. A Linear layer is
the same with input features for channels and tokens for H * W. The classifier is always trained and
sits outside the budget, so it is not in the table.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from trady.core.errors import TradyError, unknown_name
from trady.engine.functions import pair

Selection = dict[str, torch.Tensor]  # layer name -> sorted unique input-channel indices (int64)

BYTES_PER_SLOT = {"fp64": 8, "fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
PRECISION_OF_DTYPE = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int8: "int8",
}


@dataclass(frozen=True)
class LayerInfo:
    name: str
    kind: str  # "conv" | "depthwise" | "linear"
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    groups: int
    input_hw: tuple[int, int]
    output_hw: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def weight_units_per_channel(self) -> int:
        kh, kw = self.kernel_size
        return self.out_channels * kh * kw // self.groups

    @property
    def activation_units_per_channel(self) -> int:
        return self.input_hw[0] * self.input_hw[1]

    @property
    def space_units_per_channel(self) -> int:
        return self.weight_units_per_channel + self.activation_units_per_channel

    @property
    def flops_per_channel(self) -> int:
        kh, kw = self.kernel_size
        return kh * kw * self.out_channels * self.output_hw[0] * self.output_hw[1] // self.groups

    @property
    def full_units(self) -> int:
        return self.in_channels * self.space_units_per_channel

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "groups": self.groups,
            "input_hw": list(self.input_hw),
            "output_hw": list(self.output_hw),
            "stride": list(self.stride),
            "weight_units_per_channel": self.weight_units_per_channel,
            "activation_units_per_channel": self.activation_units_per_channel,
            "flops_per_channel": self.flops_per_channel,
        }


@dataclass
class CostTable:
    layers: list[LayerInfo]
    classifier: str
    by_name: dict[str, LayerInfo] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.by_name = {layer.name: layer for layer in self.layers}

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def full_weight_units(self) -> int:
        return sum(lay.in_channels * lay.weight_units_per_channel for lay in self.layers)

    @property
    def full_activation_units(self) -> int:
        return sum(lay.in_channels * lay.activation_units_per_channel for lay in self.layers)

    @property
    def full_units(self) -> int:
        return self.full_weight_units + self.full_activation_units

    @property
    def full_flops(self) -> int:
        return sum(lay.in_channels * lay.flops_per_channel for lay in self.layers)

    @property
    def min_channel_units(self) -> int:
        return min(lay.space_units_per_channel for lay in self.layers)

    def check_selection(self, selection: Mapping[str, Sequence[int] | torch.Tensor]) -> Selection:
        """Validate names and indices; return the canonical form (sorted unique int64 tensors)."""
        out: Selection = {}
        for name, idx in selection.items():
            if name not in self.by_name:
                if name == self.classifier:
                    raise TradyError(
                        f"layer {name!r} is the classifier, which is always trained in full; "
                        f"accepted: the layers below it ({len(self.names)} layers, e.g. {self.names[0]!r})"
                    )
                raise unknown_name("layer", name, self.names)
            accepted = "accepted: distinct channel numbers (a list, tuple or range of ints, or an integer tensor)"
            try:
                t = torch.as_tensor(idx)
            except (TypeError, ValueError, RuntimeError):
                raise TradyError(
                    f"channel indices of layer {name!r} must be integers, got {idx!r}; {accepted}"
                ) from None
            if t.numel() == 0:  # [] is a float tensor to torch: nothing selected in this layer
                continue
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TradyError(f"channel indices of layer {name!r} must be integers, got {t.tolist()!r}; {accepted}")
            t = t.to(torch.int64).flatten()
            unique, counts = t.unique(sorted=True, return_counts=True)
            if bool((counts > 1).any()):
                repeated = unique[counts > 1].tolist()
                raise TradyError(f"channel indices of layer {name!r} repeat {repeated[:5]}; {accepted}")
            t = unique
            c = self.by_name[name].in_channels
            if int(t[0]) < 0 or int(t[-1]) >= c:
                bad = int(t[0]) if int(t[0]) < 0 else int(t[-1])
                raise TradyError(f"channel {bad} out of range for layer {name!r}: accepted 0..{c - 1}")
            out[name] = t
        return out

    def _sum(self, selection: Mapping[str, torch.Tensor], attr: str) -> int:
        return sum(len(idx) * getattr(self.by_name[n], attr) for n, idx in selection.items())

    def selection_units(self, selection: Mapping[str, torch.Tensor]) -> int:
        return self._sum(selection, "space_units_per_channel")

    def selection_weight_units(self, selection: Mapping[str, torch.Tensor]) -> int:
        return self._sum(selection, "weight_units_per_channel")

    def selection_activation_units(self, selection: Mapping[str, torch.Tensor]) -> int:
        return self._sum(selection, "activation_units_per_channel")

    def selection_bytes(
        self, selection: Mapping[str, torch.Tensor], batch_size: int = 1, precision: str = "fp32"
    ) -> int:
        """Bytes of the budgeted part: weight-gradient slots plus kept input slices for a batch."""
        slot = bytes_per_slot(precision)
        return slot * (
            self.selection_weight_units(selection) + batch_size * self.selection_activation_units(selection)
        )

    def sparsity(self, selection: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {
            "activation_sparsity": 1.0
            - self.selection_activation_units(selection) / max(self.full_activation_units, 1),
            "weight_sparsity": 1.0 - self.selection_weight_units(selection) / max(self.full_weight_units, 1),
            "flops_reduction": 1.0 - self._sum(selection, "flops_per_channel") / max(self.full_flops, 1),
        }

    def all_channels(self) -> Selection:
        return {lay.name: torch.arange(lay.in_channels) for lay in self.layers}

    def as_dict(self) -> dict:
        return {
            "classifier": self.classifier,
            "full_units": self.full_units,
            "full_weight_units": self.full_weight_units,
            "full_activation_units": self.full_activation_units,
            "full_flops": self.full_flops,
            "layers": [lay.as_dict() for lay in self.layers],
        }


def bytes_per_slot(precision: str) -> int:
    if precision not in BYTES_PER_SLOT:
        raise unknown_name("precision", precision, list(BYTES_PER_SLOT))
    return BYTES_PER_SLOT[precision]



def updatable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Conv2d, Linear and MultiheadAttention modules by qualified name (layers whose inputs can be updated).

    A MultiheadAttention stands for its input projection (`in_proj_weight`); its `out_proj`, which it
    calls functionally, is recorded at the same call (see trace_layers).
    """
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.MultiheadAttention))}


def layer_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight whose input channels a layer of the cost table stands for: a Conv2d's or Linear's
    `weight`, a MultiheadAttention's `in_proj_weight` (None when it has separate q/k/v projections)."""
    if isinstance(module, nn.MultiheadAttention):
        return module.in_proj_weight
    return module.weight


class _NoOpFunctionMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def trace_layers(model: nn.Module, example_input: torch.Tensor) -> list[tuple[str, nn.Module, tuple, tuple]]:
    """Run one forward (no grad) and return (name, module, input shape, output shape) in call order."""
    layers = updatable_layers(model)
    calls: list[tuple[str, nn.Module, tuple, tuple]] = []
    seen: set[str] = set()

    def hook(name):
        def fn(module, args, output):
            if name in seen:
                raise TradyError(
                    f"layer {name!r} is called more than once per forward; shared weights are not supported"
                )
            seen.add(name)
            if isinstance(module, nn.MultiheadAttention):
                shape = tuple(args[0].shape)
                calls.append((name, module, shape, shape[:-1] + (3 * module.embed_dim,)))
                calls.append((f"{name}.out_proj", module.out_proj, shape, shape))
                seen.add(f"{name}.out_proj")
                return
            calls.append((name, module, tuple(args[0].shape), tuple(output.shape)))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        was_training = model.training
        model.eval()
        # Under a (no-op) torch function mode, fused inference fast paths that bypass module calls
        # (nn.TransformerEncoderLayer's) are off, so every layer's forward hook fires.
        with torch.no_grad(), _NoOpFunctionMode():
            model(example_input)
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return calls


def _same_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """Top/left padding of padding='same' ('valid': 0); an odd total puts the extra at the bottom/right."""
    if conv.padding == "valid":
        return (0, 0)
    kh, kw = pair(conv.kernel_size)
    dh, dw = pair(conv.dilation)
    return (dh * (kh - 1) // 2, dw * (kw - 1) // 2)


def layer_info(name: str, module: nn.Module, in_shape: tuple, out_shape: tuple) -> LayerInfo:
    if isinstance(module, nn.Conv2d):
        groups = module.groups
        depthwise = groups == module.in_channels and groups > 1
        return LayerInfo(
            name=name,
            kind="depthwise" if depthwise else "conv",
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=pair(module.kernel_size),
            groups=groups,
            input_hw=(int(in_shape[-2]), int(in_shape[-1])),
            output_hw=(int(out_shape[-2]), int(out_shape[-1])),
            stride=pair(module.stride),
            padding=pair(module.padding) if not isinstance(module.padding, str) else _same_padding(module),
            dilation=pair(module.dilation),
        )
    # Traced with one sample: every position but the features is a token, whichever dim holds the batch
    # (a sequence-first [L, B, F] input of nn.TransformerEncoderLayer(batch_first=False) has L tokens).
    tokens = int(math.prod(in_shape[:-1]))
    attn = isinstance(module, nn.MultiheadAttention)
    return LayerInfo(
        name=name,
        kind="linear",
        in_channels=module.embed_dim if attn else module.in_features,
        out_channels=3 * module.embed_dim if attn else module.out_features,
        kernel_size=(1, 1),
        groups=1,
        input_hw=(tokens, 1),
        output_hw=(tokens, 1),
    )


def analyze(
    model: nn.Module,
    input_shape: Sequence[int] | None = None,
    classifier: str | None = None,
    example_input: torch.Tensor | None = None,
) -> CostTable:
    """Cost table of every updatable layer (execution order) for one input of the given shape.

    `classifier`: module name of the head (always trained, outside the budget); default: the last
    updatable layer called in the forward pass.
    """
    if example_input is None:
        if input_shape is None:
            raise TradyError("analyze() needs input_shape, e.g. (1, 3, 128, 128), or example_input")
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
        example_input = torch.zeros(tuple(input_shape), device=device)
    calls = trace_layers(model, example_input[:1])
    if not calls:
        raise TradyError(f"model {type(model).__name__} has no Conv2d or Linear layer to update")
    names = [c[0] for c in calls]
    if classifier is None:
        classifier = names[-1]
    elif classifier not in names:
        raise unknown_name("classifier layer", classifier, names)
    infos = [layer_info(*c) for c in calls if c[0] != classifier]
    return CostTable(layers=infos, classifier=classifier)


_UNIT_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z%]*)\s*$")
_BYTE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}


def parse_budget(
    spec: str | int | float, table: CostTable, precision: str = "fp32", batch_size: int = 1
) -> int:
    """Budget in memory units from units ("27946"), bytes ("256KB", "1.5MiB") or a share ("2.2%").

    Bytes are converted with the slot size of `precision`; activation slots count once per sample
    of `batch_size`, so a byte budget buys fewer channels at larger batches. The conversion uses the
    units-per-byte ratio of full fine-tuning, which is exact for budgets quoted per sample (batch 1).
    """
    value, unit = parse_budget_spec(spec)
    if unit in ("", "u", "units"):
        return math.floor(value)
    if unit == "%":
        return math.floor(table.full_units * value / 100)
    if unit in _BYTE_UNITS:
        nbytes = value * _BYTE_UNITS[unit]
        slot = bytes_per_slot(precision)
        # Bytes per unit of a full update at this batch: weights once, activations per sample.
        full_bytes = slot * (table.full_weight_units + batch_size * table.full_activation_units)
        return math.floor(nbytes * table.full_units / full_bytes)
    raise TradyError(f"invalid budget unit {unit!r} in {spec!r}; {BUDGET_ACCEPTED}")  # pragma: no cover


BUDGET_ACCEPTED = "accepted: units (27946), bytes with a unit (256KB, 1.5MiB) or a percentage (2.2%)"


def parse_budget_spec(spec: str | int | float) -> tuple[Fraction, str]:
    """A budget's positive value and its unit ("", "u", "units", "%" or a byte unit), checked without a
    model (so a sweep grid is checked whole before any run); one line naming the value otherwise."""
    accepted = BUDGET_ACCEPTED
    if isinstance(spec, bool):
        raise TradyError(f"invalid budget {spec!r}; {accepted}")
    # Exact rational arithmetic: "100KB" must be 25000 fp32 units, not 24999.
    if isinstance(spec, (int, float)):
        if isinstance(spec, float) and not math.isfinite(spec):
            raise TradyError(f"invalid budget {spec!r}; {accepted}")
        value, unit = Fraction(spec), ""
    else:
        m = _UNIT_RE.match(str(spec))
        if not m:
            raise TradyError(f"invalid budget {spec!r}; {accepted}")
        value, unit = Fraction(m.group(1)), m.group(2).lower()
    if value <= 0:
        raise TradyError(f"invalid budget {spec!r}: must be positive; {accepted}")
    if unit not in ("", "u", "units", "%") and unit not in _BYTE_UNITS:
        raise TradyError(f"invalid budget unit {unit!r} in {spec!r}; {accepted}")
    return value, unit
