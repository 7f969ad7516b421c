"""Turn any nn.Module into one whose training step updates only selected input channels, for real.

`SparseEngine(model, example_input)` prepares the model in place (no copy, no new module tree):
- every Conv2d/Linear except the classifier computes through ChannelSparse*Fn: it keeps its weight
  and, when selected, only x[:, selected]; its weight gradient exists only for the selected slice;
- every BatchNorm2d becomes a frozen per-channel affine map; ReLU/ReLU6/Hardtanh keep bit masks;
- the classifier stays a stock layer and is trained in full; biases only with `train_bias`.
The model keeps its parameter names: `model.state_dict()` is a normal checkpoint (after `sync()`).
Changing the selection is `engine.select(...)`: no rebuild. `engine.restore()` undoes everything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trady import ops
from trady.costs import CostTable, Selection, analyze
from trady.errors import TradyError

# Parameter-free leaf modules whose stock backward keeps nothing (or nothing we could avoid).
_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Flatten, nn.ZeroPad2d, nn.ConstantPad2d, nn.Unflatten)
# Kept by stock autograd; their saved tensors are measured and reported in the "rest".
_STOCK_ALLOWED = (nn.MaxPool2d, nn.AvgPool2d)
SUPPORTED_KINDS = (
    "Conv2d (any groups/stride/dilation/padding), Linear, BatchNorm2d (frozen), ReLU, ReLU6, Hardtanh, "
    "AdaptiveAvgPool2d(1), AvgPool2d, MaxPool2d, Identity, Dropout, Flatten, ZeroPad2d"
)


@dataclass
class EngineConfig:
    classifier: str | None = None  # module name of the head; None: the last Conv2d/Linear called
    train_bias: bool = False  # also train conv/linear biases and BatchNorm shifts (no activation cost)
    mask_bits: int = 1  # ReLU-family masks: 1 = bit-packed, 8 = bool
    strict: bool = True  # unknown layer kinds on the backprop path raise instead of using stock autograd


@dataclass
class LayerState:
    """Per-layer engine state, attached to the module as `module.trady`."""

    name: str
    idx: torch.Tensor | None = None  # selected input channels
    w_slice: torch.Tensor | None = None  # trainable leaf: the weight entries of those channels
    on_saved: Callable[[torch.Tensor], None] | None = None  # measurement callback for kept slices


# ---------------------------------------------------------------------------------------------
# Module classes the prepared model's layers are switched to (same attributes, same parameters)
# ---------------------------------------------------------------------------------------------


def _numeric_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0)
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            if total % 2:
                raise TradyError(
                    f"conv padding='same' with even kernel {conv.kernel_size} is asymmetric; "
                    "accepted: symmetric padding (use an explicit nn.ZeroPad2d before the conv)"
                )
            pads.append(total // 2)
        return tuple(pads)
    return tuple(conv.padding)


class SparseConv2d(nn.Conv2d):
    trady: LayerState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.trady
        if st.w_slice is not None:
            with torch.no_grad():  # the model's own weight always holds the trained values
                ops.scatter_slice_(self.weight, st.idx, st.w_slice, self.groups)
        bias = self.bias
        bias_trains = bias is not None and bias.requires_grad
        if not torch.is_grad_enabled() or not (x.requires_grad or st.w_slice is not None or bias_trains):
            return F.conv2d(x, self.weight, bias, self.stride, self.trady_padding, self.dilation, self.groups)
        return ops.ChannelSparseConv2dFn.apply(
            x, self.weight.detach(), bias, st.w_slice, st.idx,
            self.stride, self.trady_padding, self.dilation, self.groups, st.on_saved,
        )  # fmt: skip


class SparseLinear(nn.Linear):
    trady: LayerState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.trady
        if st.w_slice is not None:
            with torch.no_grad():
                ops.scatter_slice_(self.weight, st.idx, st.w_slice, 1)
        bias = self.bias
        bias_trains = bias is not None and bias.requires_grad
        if not torch.is_grad_enabled() or not (x.requires_grad or st.w_slice is not None or bias_trains):
            return F.linear(x, self.weight, bias)
        return ops.ChannelSparseLinearFn.apply(x, self.weight.detach(), bias, st.w_slice, st.idx, st.on_saved)


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """Uses running statistics in train and eval mode alike; never updates them."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scale = torch.rsqrt(self.running_var + self.eps)
            if self.weight is not None:
                scale = scale * self.weight
            shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias  # differentiable in the bias only (train_bias)
        if not torch.is_grad_enabled() or not (x.requires_grad or shift.requires_grad):
            view = (1, -1, 1, 1)
            return torch.addcmul(shift.view(view), x, scale.view(view))
        return ops.FrozenAffineFn.apply(x, scale, shift)


class MaskedClamp(nn.Module):
    """Shared forward for the ReLU family: a clamp whose backward keeps a packed mask."""

    trady_bits: int = 1

    def _bounds(self) -> tuple[float, float | None]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._bounds()
        if not torch.is_grad_enabled() or not x.requires_grad:
            return torch.clamp(x, lo, hi)
        return ops.ClampMaskFn.apply(x, lo, hi, self.trady_bits)


class MaskedReLU(MaskedClamp, nn.ReLU):
    def _bounds(self):
        return 0.0, None


class MaskedReLU6(MaskedClamp, nn.ReLU6):
    def _bounds(self):
        return 0.0, 6.0


class MaskedHardtanh(MaskedClamp, nn.Hardtanh):
    def _bounds(self):
        return float(self.min_val), float(self.max_val)


class GlobalAvgPool2d(nn.AdaptiveAvgPool2d):
    """AdaptiveAvgPool2d(1) as a mean: its backward keeps no input (adaptive pooling keeps it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1), keepdim=True)


_SWAPS: dict[type, type] = {
    nn.Conv2d: SparseConv2d,
    nn.Linear: SparseLinear,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.ReLU: MaskedReLU,
    nn.ReLU6: MaskedReLU6,
    nn.Hardtanh: MaskedHardtanh,
}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


@dataclass
class MemoryReport:
    """Bytes kept between forward and backward of one step, plus gradient/optimizer bytes."""

    batch_size: int
    saved_bytes: int  # every tensor kept for backward, each storage once, parameters/buffers excluded
    budgeted_activation_bytes: int  # the kept input slices of selected channels
    budgeted_grad_bytes: int  # gradients of the selected weight slices
    other_grad_bytes: int  # classifier (and biases): outside the budget
    optimizer_state_bytes: int
    analytic_budgeted_bytes: int
    saved_by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def budgeted_bytes(self) -> int:
        return self.budgeted_activation_bytes + self.budgeted_grad_bytes

    @property
    def rest_saved_bytes(self) -> int:
        return self.saved_bytes - self.budgeted_activation_bytes

    @property
    def total_bytes(self) -> int:
        return self.saved_bytes + self.budgeted_grad_bytes + self.other_grad_bytes + self.optimizer_state_bytes

    def as_dict(self) -> dict:
        return {
            "batch_size": self.batch_size,
            "saved_bytes": self.saved_bytes,
            "budgeted_bytes": self.budgeted_bytes,
            "budgeted_activation_bytes": self.budgeted_activation_bytes,
            "budgeted_grad_bytes": self.budgeted_grad_bytes,
            "rest_saved_bytes": self.rest_saved_bytes,
            "other_grad_bytes": self.other_grad_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "total_bytes": self.total_bytes,
            "analytic_budgeted_bytes": self.analytic_budgeted_bytes,
            "saved_by_kind": dict(self.saved_by_kind),
        }


def _storage_key(t: torch.Tensor) -> tuple:
    s = t.untyped_storage()
    return (t.device.type, s.data_ptr())


@dataclass
class SavedTensors:
    loss: torch.Tensor  # its graph is still alive: call backward on it
    per_storage: dict[tuple, int]  # storage key -> bytes
    by_dtype: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.per_storage.values())


def measure_saved_bytes(
    model: nn.Module, step: Callable[[], torch.Tensor], exclude: Sequence[torch.Tensor] = ()
) -> SavedTensors:
    """Run `step()` (forward + loss) under saved-tensor hooks and count the bytes kept for backward.

    Each storage counts once; parameters, buffers and `exclude` are left out.
    """
    skip = {_storage_key(t) for t in list(model.parameters()) + list(model.buffers()) + list(exclude)}
    seen: dict[tuple, int] = {}
    by_kind: dict[str, int] = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in skip and key not in seen:
            nbytes = t.untyped_storage().nbytes()
            seen[key] = nbytes
            kind = str(t.dtype).replace("torch.", "")
            by_kind[kind] = by_kind.get(kind, 0) + nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    return SavedTensors(loss=loss, per_storage=seen, by_dtype=by_kind)


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------


class SparseEngine:
    def __init__(
        self,
        model: nn.Module,
        example_input: torch.Tensor,
        config: EngineConfig | None = None,
    ) -> None:
        self.model = model
        self.config = config or EngineConfig()
        if self.config.mask_bits not in (1, 8):
            raise TradyError(f"mask_bits must be 1 or 8, got {self.config.mask_bits}")
        self.costs: CostTable = analyze(model, example_input=example_input, classifier=self.config.classifier)
        self.classifier_name = self.costs.classifier
        self.classifier = model.get_submodule(self.classifier_name)
        self._orig_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        self._orig_class: dict[str, type] = {}
        self._hooks: list = []
        self.layers: dict[str, nn.Module] = {}
        self.selection: Selection = {}
        self._prepare()

    # -- preparation ------------------------------------------------------------------------
    def _prepare(self) -> None:
        model, cfg = self.model, self.config
        for p in model.parameters():
            p.requires_grad_(False)
        for p in self.classifier.parameters():
            p.requires_grad_(True)
        classifier_modules = {self.classifier_name} | {
            f"{self.classifier_name}.{n}" for n, _ in self.classifier.named_modules() if n
        }
        for name, module in model.named_modules():
            if name in classifier_modules:
                continue
            target = self._swap_target(name, module)
            if target is not None:
                self._swap(name, module, target)
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    module.trady = LayerState(name)
                if isinstance(module, nn.Conv2d):
                    module.trady_padding = _numeric_padding(module)
                if isinstance(module, MaskedClamp):
                    module.trady_bits = cfg.mask_bits
                if cfg.train_bias and isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                    if module.bias is not None:
                        module.bias.requires_grad_(True)
            elif self._is_leaf(module) and not isinstance(module, _PASSTHROUGH + _STOCK_ALLOWED):
                self._hooks.append(module.register_forward_pre_hook(self._guard(name, type(module).__name__)))
        self.layers = {n: model.get_submodule(n) for n in self.costs.names}

    def _swap_target(self, name: str, module: nn.Module) -> type | None:
        """The engine class this module becomes, None to leave it alone; raises if it cannot be handled."""
        if type(module) is nn.AdaptiveAvgPool2d and module.output_size in (1, (1, 1)):
            return GlobalAvgPool2d
        base = next((b for b in _SWAPS if type(module) is b), None)
        if base is None:
            base = next((b for b in _SWAPS if isinstance(module, b)), None)
            if base is None:
                return None
            if type(module).forward is not base.forward:
                if isinstance(module, (nn.Conv2d, nn.Linear)) and name in self.costs.by_name:
                    raise TradyError(
                        f"layer {name!r} is a {type(module).__name__} with its own forward, which the engine "
                        f"cannot run channel-sparse; supported kinds: {SUPPORTED_KINDS}"
                    )
                return None
        if base in (nn.Conv2d, nn.Linear) and name not in self.costs.by_name:
            return None  # never called in the forward pass: nothing to update
        if base is nn.Conv2d and module.padding_mode != "zeros":
            raise TradyError(f"layer {name!r} uses padding_mode={module.padding_mode!r}; accepted: 'zeros'")
        if base is nn.BatchNorm2d and module.running_var is None:
            raise TradyError(
                f"BatchNorm {name!r} has no running statistics (track_running_stats=False); "
                "accepted: BatchNorm2d with running statistics, which trady freezes"
            )
        return _SWAPS[base]

    @staticmethod
    def _is_leaf(module: nn.Module) -> bool:
        return next(module.children(), None) is None

    def _swap(self, name: str, module: nn.Module, new_class: type) -> None:
        self._orig_class[name] = type(module)
        module.__class__ = new_class

    def _guard(self, name: str, kind: str):
        strict = self.config.strict

        def hook(module, args):
            if not torch.is_grad_enabled():
                return None
            on_path = any(isinstance(a, torch.Tensor) and a.requires_grad for a in args) or any(
                p.requires_grad for p in module.parameters(recurse=False)
            )
            if on_path and strict:
                raise TradyError(
                    f"module {name!r} of kind {kind} lies on the backprop path; supported kinds: "
                    f"{SUPPORTED_KINDS} (or EngineConfig(strict=False) to let stock autograd keep its inputs)"
                )
            return None

        return hook

    def restore(self) -> nn.Module:
        """Write the trained slices back and return the model to its stock classes and flags."""
        self.sync()
        for h in self._hooks:
            h.remove()
        for name, cls in self._orig_class.items():
            module = self.model.get_submodule(name)
            module.__class__ = cls
            for attr in ("trady", "trady_padding", "trady_bits"):
                module.__dict__.pop(attr, None)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._orig_requires_grad[n])
        self._orig_class.clear()
        return self.model

    # -- selection ---------------------------------------------------------------------------
    def select(self, selection: Mapping[str, Sequence[int] | torch.Tensor] | None) -> Selection:
        """Update exactly these input channels from now on (None or {}: the classifier only)."""
        canonical = self.costs.check_selection(selection or {})
        self.sync()
        for name, module in self.layers.items():
            st: LayerState = module.trady
            idx = canonical.get(name)
            if idx is None:
                st.idx = st.w_slice = None
                continue
            idx = idx.to(module.weight.device)
            st.idx = idx
            groups = getattr(module, "groups", 1)
            st.w_slice = ops.gather_slice(module.weight.detach(), idx, groups).clone().requires_grad_(True)
        self.selection = canonical
        return canonical

    def sync(self) -> None:
        """Write the current slice values into the model's own weights."""
        with torch.no_grad():
            for module in self.layers.values():
                st: LayerState = module.trady
                if st.w_slice is not None:
                    ops.scatter_slice_(module.weight, st.idx, st.w_slice, getattr(module, "groups", 1))

    def slice_parameters(self) -> list[torch.Tensor]:
        return [m.trady.w_slice for m in self.layers.values() if m.trady.w_slice is not None]

    def parameters(self) -> list[torch.Tensor]:
        """Everything the optimizer should update: selected slices, classifier, enabled biases."""
        params = self.slice_parameters()
        ids = {id(p) for p in params}
        for p in self.model.parameters():
            if p.requires_grad and id(p) not in ids:
                params.append(p)
        return params

    def slice_grad_norms(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (channel indices, per-channel weight-gradient L2 norm)} after a backward."""
        out = {}
        for name, module in self.layers.items():
            st: LayerState = module.trady
            if st.w_slice is not None and st.w_slice.grad is not None:
                norms = ops.slice_channel_norms(st.w_slice.grad, getattr(module, "groups", 1))
                out[name] = (st.idx, norms)
        return out

    # -- measurement -------------------------------------------------------------------------
    def measure_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> MemoryReport:
        """One real forward/backward (and optimizer step, if given) with every kept byte counted."""
        budget_keys: set[tuple] = set()

        def on_saved(t: torch.Tensor) -> None:
            budget_keys.add(_storage_key(t))

        for module in self.layers.values():
            module.trady.on_saved = on_saved
        params = self.parameters()
        for p in params:
            p.grad = None
        try:
            saved = measure_saved_bytes(
                self.model, lambda: loss_fn(self.model(x), y), exclude=self.slice_parameters()
            )
        finally:
            for module in self.layers.values():
                module.trady.on_saved = None
        saved.loss.backward()
        slice_ids = {id(p) for p in self.slice_parameters()}
        budget_grad = sum(p.grad.nbytes for p in params if id(p) in slice_ids and p.grad is not None)
        other_grad = sum(p.grad.nbytes for p in params if id(p) not in slice_ids and p.grad is not None)
        opt_bytes = 0
        if optimizer is not None:
            optimizer.step()
            opt_bytes = optimizer_state_bytes(optimizer)
        return MemoryReport(
            batch_size=int(x.shape[0]),
            saved_bytes=saved.total,
            budgeted_activation_bytes=sum(saved.per_storage.get(k, 0) for k in budget_keys),
            budgeted_grad_bytes=budget_grad,
            other_grad_bytes=other_grad,
            optimizer_state_bytes=opt_bytes,
            analytic_budgeted_bytes=self.costs.selection_bytes(self.selection, batch_size=int(x.shape[0])),
            saved_by_kind=saved.by_dtype,
        )


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                total += v.nbytes
    return total


def prepare(model: nn.Module, example_input: torch.Tensor, config: EngineConfig | None = None) -> SparseEngine:
    """Prepare `model` in place for channel-sparse training; returns the engine that drives it."""
    return SparseEngine(model, example_input, config)
