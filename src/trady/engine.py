"""Turn any nn.Module into one whose training step updates only selected input channels, for real.

`SparseEngine(model, example_input)` prepares the model in place (no copy, no new module tree):
- every Conv2d/Linear except the classifier computes through ChannelSparse*Fn: it keeps its weight
  and, when selected, only x[:, selected]; its weight gradient exists only for the selected slice;
- every BatchNorm2d becomes a frozen per-channel affine map, folded into the Conv2d right before it
  where there is one (`fold_bn`); ReLU/ReLU6/Hardtanh keep bit masks;
  MaxPool2d keeps a 1-byte window position per output, AvgPool2d and global pooling keep nothing;
- the classifier stays a stock layer and is trained in full; biases only with `train_bias`.
The model keeps its parameter names: `model.state_dict()` is a normal checkpoint (it syncs the trained
slices into the weights first; `sync()` does it explicitly).
Changing the selection is `engine.select(...)`: no rebuild. `engine.restore()` undoes everything.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trady import ops
from trady.costs import PRECISION_OF_DTYPE, CostTable, Selection, analyze
from trady.errors import TradyError

# Parameter-free leaf modules whose stock backward keeps nothing (or nothing we could avoid).
_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Flatten, nn.ZeroPad2d, nn.ConstantPad2d, nn.Unflatten)
# Kept by stock autograd; their saved tensors are measured and reported in the "rest".
_STOCK_ALLOWED = (nn.MaxPool2d, nn.AvgPool2d)  # only variants the engine's own pooling does not cover


def _is_stock_allowed(module: nn.Module) -> bool:
    """A pass-through or stock-allowed kind with its stock forward (a subclass's own forward is unknown)."""
    return any(isinstance(module, b) and type(module).forward is b.forward for b in _PASSTHROUGH + _STOCK_ALLOWED)


SUPPORTED_KINDS = (
    "Conv2d (any groups/stride/dilation/padding), Linear, BatchNorm2d (frozen), ReLU, ReLU6, Hardtanh, "
    "AdaptiveAvgPool2d(1), AvgPool2d, MaxPool2d, Identity, Dropout, Flatten, ZeroPad2d, ConstantPad2d, Unflatten"
)


@dataclass
class EngineConfig:
    classifier: str | None = None  # module name of the head; None: the last Conv2d/Linear called
    train_bias: bool = False  # also train conv/linear biases and BatchNorm shifts (no activation cost)
    mask_bits: int = 1  # ReLU-family masks: 1 = bit-packed, 8 = bool
    strict: bool = True  # unknown layer kinds on the backprop path raise instead of using stock autograd
    # Fold a frozen BatchNorm2d into the Conv2d right before it (same nn.Sequential, checked by one
    # forward): the conv scales its weight per output channel, the BatchNorm becomes the identity, so
    # neither forward nor backward makes a separate pass over the activation. Gradients are unchanged.
    fold_bn: bool = True


@dataclass
class LayerState:
    """Per-layer engine state, attached to the module as `module.trady`."""

    name: str
    idx: torch.Tensor | None = None  # selected input channels
    w_slice: torch.Tensor | None = None  # trainable leaf: the weight entries of those channels
    on_saved: Callable[[torch.Tensor], None] | None = None  # measurement callback for kept slices
    fold: nn.Module | None = None  # Conv2d only: the FoldedBatchNorm2d applied to its output, if any
    # Tensor versions at the last slice <-> weight write: a write happens only when one side changed,
    # so that a forward never bumps the version of a weight an earlier forward saved for backward.
    slice_version: int = -1
    weight_version: int = -1


def _write_slice(module: nn.Module, st: LayerState) -> None:
    """Bring the model's weight and the trainable slice into agreement (caller: no matter grad mode).

    The slice changed (optimizer step): write it into the weight. Otherwise, if the weight changed
    behind the engine's back (load_state_dict, a manual edit), read the slice from it, so that a stale
    slice never silently reverts loaded values.
    """
    if st.w_slice is None:
        return
    groups = getattr(module, "groups", 1)
    with torch.no_grad():
        if st.w_slice._version != st.slice_version:
            ops.scatter_slice_(module.weight, st.idx, st.w_slice, groups)
        elif module.weight._version != st.weight_version:
            st.w_slice.copy_(ops.gather_slice(module.weight, st.idx, groups))
        else:
            return
    st.slice_version = st.w_slice._version
    st.weight_version = module.weight._version


# ---------------------------------------------------------------------------------------------
# Module classes the prepared model's layers are switched to (same attributes, same parameters)
# ---------------------------------------------------------------------------------------------


def _numeric_padding(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """(symmetric padding (ph, pw), extra (bottom, right) padding or None) equal to `conv.padding`.

    padding='same' with an even total (dilation * (kernel - 1) odd) is asymmetric: as stock PyTorch,
    the extra row/column goes at the bottom/right.
    """
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return (0, 0), None
        pads, extra = [], []
        for k, d in zip(conv.kernel_size, conv.dilation):
            total = d * (k - 1)
            pads.append(total // 2)
            extra.append(total - 2 * (total // 2))
        return (pads[0], pads[1]), (extra[0], extra[1]) if any(extra) else None
    return (int(conv.padding[0]), int(conv.padding[1])), None


def _no_autocast(x: torch.Tensor) -> None:
    if torch.is_autocast_enabled(x.device.type):
        raise TradyError(
            "autocast (automatic mixed precision) is not supported by the engine's training step; "
            "accepted: a model and input of one dtype (e.g. model.to(torch.bfloat16)), or autocast for evaluation"
        )


class SparseConv2d(nn.Conv2d):
    trady: LayerState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.trady
        _write_slice(self, st)  # the model's own weight always holds the trained values
        bias, scale = self.bias, None
        if st.fold is not None:  # conv -> frozen BN as one conv: weight * scale (per output), bias -> shift
            scale, shift = st.fold.trady_affine()
            bias = shift if bias is None else shift + bias * scale
        bias_trains = bias is not None and bias.requires_grad
        if not torch.is_grad_enabled() or not (x.requires_grad or st.w_slice is not None or bias_trains):
            weight = self.weight if scale is None else self.weight * scale.view(-1, 1, 1, 1)
            # no graph: a plain conv (padding_mode is 'zeros', checked at preparation)
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        _no_autocast(x)
        return ops.ChannelSparseConv2dFn.apply(
            x, self.weight.detach(), bias, st.w_slice, st.idx,
            self.stride, self.trady_padding, self.dilation, self.groups, st.on_saved, self.trady_extra_pad, scale,
        )  # fmt: skip


class SparseLinear(nn.Linear):
    trady: LayerState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.trady
        _write_slice(self, st)
        bias = self.bias
        bias_trains = bias is not None and bias.requires_grad
        if not torch.is_grad_enabled() or not (x.requires_grad or st.w_slice is not None or bias_trains):
            return F.linear(x, self.weight, bias)
        _no_autocast(x)
        return ops.ChannelSparseLinearFn.apply(x, self.weight.detach(), bias, st.w_slice, st.idx, st.on_saved)


class FrozenBatchNorm2d(nn.BatchNorm2d):
    """Uses running statistics in train and eval mode alike; never updates them."""

    def trady_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift): y = x * scale + shift per channel; shift is differentiable in the bias only."""
        with torch.no_grad():
            scale = torch.rsqrt(self.running_var + self.eps)
            if self.weight is not None:
                scale = scale * self.weight
            shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias  # differentiable in the bias only (train_bias)
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.trady_affine()
        if not torch.is_grad_enabled() or not (x.requires_grad or shift.requires_grad):
            view = (1, -1, 1, 1)
            return torch.addcmul(shift.view(view), x, scale.view(view))
        return ops.FrozenAffineFn.apply(x, scale, shift)


class FoldedBatchNorm2d(FrozenBatchNorm2d):
    """A frozen BatchNorm folded into the Conv2d before it (which applies it): the identity here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


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



class ArgmaxMaxPool2d(nn.MaxPool2d):
    """MaxPool2d whose backward keeps a uint8 window position per output element, not its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = ops.pair(self.kernel_size)
        if not torch.is_grad_enabled() or not x.requires_grad or self.return_indices or k[0] * k[1] > 256:
            return super().forward(x)  # stock (kernels over 256 positions keep int64 indices and the input)
        return ops.MaxPool2dArgmaxFn.apply(
            x, k, ops.pair(self.stride), ops.pair(self.padding), ops.pair(self.dilation), self.ceil_mode
        )


class ShapeOnlyAvgPool2d(nn.AvgPool2d):
    """AvgPool2d whose backward keeps nothing (stock keeps its whole input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        return ops.AvgPool2dFn.apply(
            x, ops.pair(self.kernel_size), ops.pair(self.stride), ops.pair(self.padding), self.ceil_mode,
            self.count_include_pad, self.divisor_override,
        )  # fmt: skip


_SWAPS: dict[type, type] = {
    nn.MaxPool2d: ArgmaxMaxPool2d,
    nn.AvgPool2d: ShapeOnlyAvgPool2d,
    nn.Conv2d: SparseConv2d,
    nn.Linear: SparseLinear,
    nn.BatchNorm2d: FrozenBatchNorm2d,
    nn.ReLU: MaskedReLU,
    nn.ReLU6: MaskedReLU6,
    nn.Hardtanh: MaskedHardtanh,
}


_ENGINE_CLASSES = frozenset(_SWAPS.values()) | {GlobalAvgPool2d, FoldedBatchNorm2d}


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
        prepared = next((n for n, m in model.named_modules() if type(m) in _ENGINE_CLASSES), None)
        if prepared is not None:
            raise TradyError(
                f"module {prepared!r} is already prepared by a SparseEngine; call that engine's restore() first"
            )
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
        self.restored = False
        try:
            self._prepare()
            if self.config.fold_bn:
                self._fold_batchnorms(example_input)
        except BaseException:
            self.restore()  # never leave a half-prepared model behind
            raise

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
                    module.trady_padding, module.trady_extra_pad = _numeric_padding(module)
                if isinstance(module, MaskedClamp):
                    module.trady_bits = cfg.mask_bits
                if cfg.train_bias and isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d)):
                    if module.bias is not None:
                        module.bias.requires_grad_(True)
            elif self._is_leaf(module) and not _is_stock_allowed(module):
                self._hooks.append(module.register_forward_pre_hook(self._guard(name, type(module).__name__)))
        self.layers = {n: model.get_submodule(n) for n in self.costs.names}
        # Pending slice updates are written into the weights before a state_dict is read (it always holds
        # the trained values, even right after optimizer.step()) and before one is loaded (the load is then
        # the newest change, and the next forward reads it into the slice, never the reverse).
        engine = weakref.ref(self)

        def sync_first(*_):
            e = engine()
            if e is not None and not e.restored:
                e.sync()

        self._hooks.append(model.register_state_dict_pre_hook(sync_first))
        self._hooks.append(model.register_load_state_dict_pre_hook(sync_first))

    def _fold_batchnorms(self, example_input: torch.Tensor) -> None:
        """Fold each frozen BatchNorm that takes exactly the output of the prepared Conv2d before it.

        Candidates are adjacent (conv, BN) children of an nn.Sequential with the stock forward, where the
        conv's output goes nowhere else; one no-grad forward then checks that each such BN is called
        once, on that very output tensor (a BN reused elsewhere, or called out of order, stays as is).
        """
        pairs: dict[str, tuple[nn.Module, nn.Module]] = {}
        for pname, parent in self.model.named_modules():
            if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
                continue
            kids = list(parent.named_children())
            for (a, conv), (_, bn) in zip(kids, kids[1:]):
                name = f"{pname}.{a}" if pname else a
                if (
                    type(conv) is SparseConv2d
                    and name in self.costs.by_name
                    and type(bn) is FrozenBatchNorm2d
                    and bn.num_features == conv.out_channels
                ):
                    pairs[name] = (conv, bn)
        if not pairs:
            return
        outputs: dict[str, torch.Tensor] = {}
        calls: dict[str, list[bool]] = {name: [] for name in pairs}
        handles = []
        for name, (conv, bn) in pairs.items():
            handles.append(conv.register_forward_hook(lambda m, a, out, n=name: outputs.__setitem__(n, out)))
            handles.append(bn.register_forward_pre_hook(lambda m, a, n=name: calls[n].append(a[0] is outputs.get(n))))
        try:
            with torch.no_grad():
                self.model(example_input[:1])
        finally:
            for h in handles:
                h.remove()
            outputs.clear()
        for name, (conv, bn) in pairs.items():
            if calls[name] == [True]:
                conv.trady.fold = bn
                bn.__class__ = FoldedBatchNorm2d  # restore() returns it to its original class

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
            for attr in ("trady", "trady_padding", "trady_extra_pad", "trady_bits"):
                module.__dict__.pop(attr, None)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self._orig_requires_grad[n])
        self._orig_class.clear()
        self._hooks.clear()
        self.layers = {}  # a restored engine drives nothing: select() then raises
        self.restored = True
        return self.model

    # -- selection ---------------------------------------------------------------------------
    def select(self, selection: Mapping[str, Sequence[int] | torch.Tensor] | None) -> Selection:
        """Update exactly these input channels from now on (None or {}: the classifier only)."""
        if self.restored:
            raise TradyError("this engine was restored; prepare the model again with SparseEngine(model, x)")
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
            st.slice_version, st.weight_version = st.w_slice._version, module.weight._version
        self.selection = canonical
        return canonical

    def sync(self) -> None:
        """Write the current slice values into the model's own weights."""
        for module in self.layers.values():
            _write_slice(module, module.trady)

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
    def _precision(self) -> str:
        """Slot precision of the updated weights (the kept slices share their dtype)."""
        for module in self.layers.values():
            return PRECISION_OF_DTYPE.get(module.weight.dtype, "fp32")
        return "fp32"

    def measure_saved(self, step: Callable[[], torch.Tensor]) -> tuple[SavedTensors, int]:
        """Run `step()` (forward + loss) counting every byte kept for backward.

        Returns the count and the bytes of its budgeted part (the kept input slices of selected channels).
        """
        budget_keys: set[tuple] = set()

        def on_saved(t: torch.Tensor) -> None:
            budget_keys.add(_storage_key(t))

        for module in self.layers.values():
            module.trady.on_saved = on_saved
        try:
            # The slices and their channel indices are engine state that lives on anyway: no extra memory.
            persistent = self.slice_parameters()
            persistent += [m.trady.idx for m in self.layers.values() if m.trady.idx is not None]
            saved = measure_saved_bytes(self.model, step, exclude=persistent)
        finally:
            for module in self.layers.values():
                module.trady.on_saved = None
        return saved, sum(saved.per_storage.get(k, 0) for k in budget_keys)

    def measure_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> MemoryReport:
        """One real forward/backward (and optimizer step, if given) with every kept byte counted."""
        params = self.parameters()
        for p in params:
            p.grad = None
        saved, budget_act = self.measure_saved(lambda: loss_fn(self.model(x), y))
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
            budgeted_activation_bytes=budget_act,
            budgeted_grad_bytes=budget_grad,
            other_grad_bytes=other_grad,
            optimizer_state_bytes=opt_bytes,
            analytic_budgeted_bytes=self.costs.selection_bytes(
                self.selection, batch_size=int(x.shape[0]), precision=self._precision()
            ),
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
