"""The module classes a prepared model's layers are switched to (same attributes, same parameters).

`SparseEngine` swaps each supported module's class in place (`module.__class__ = ...`) and attaches
its per-layer state as `module.trady` (Conv2d/Linear) or `module.trady_*` attributes; `restore()`
swaps the original class back and drops every `trady*` attribute. Each class keeps the stock
semantics of the module it replaces (in-place activations stay in place) and runs its training
forward through an autograd Function of `trady.engine.functions` that keeps less for backward.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trady.core.errors import TradyError
from trady.engine import functions, slices


class FrozenBatchNormWarning(UserWarning):
    """model.train() does not train BatchNorm statistics of a prepared model (they stay frozen)."""


@dataclass
class LayerState:
    """Per-layer engine state, attached to the module as `module.trady`."""

    name: str
    # The trainable leaf: the weight entries of the selected input channels (layout: functions.gather_slice).
    # The same tensor object for the engine's whole life, so that an optimizer built before a select()
    # stays valid; select() resizes it in place, and it is empty (0 channels) while nothing is selected.
    w_slice: torch.Tensor
    idx: torch.Tensor | None = None  # selected input channels; None: the layer is frozen
    # The selected channels as ints: the tag of the optimizer state made for them (slices._before_step drops
    # any state, loaded ones included, whose tag differs: another draw's momentum never carries over).
    channels: tuple[int, ...] = ()
    on_saved: Callable[[torch.Tensor], None] | None = None  # measurement callback for kept slices
    fold: nn.Module | None = None  # Conv2d only: the FoldedBatchNorm2d applied to its output, if any

    def __deepcopy__(self, memo):
        raise TradyError(
            f"a model prepared by a SparseEngine cannot be deep-copied (layer {self.name!r}); accepted: copy it "
            "before SparseEngine(model, x) or after engine.restore(), or copy its model.state_dict()"
        )


class _Prepared:
    """Mixin of every engine class: a deepcopy of a prepared module would be driven by no engine."""

    def __deepcopy__(self, memo):
        raise TradyError(
            f"a module prepared by a SparseEngine ({type(self).__name__}) cannot be deep-copied; accepted: copy "
            "the model before SparseEngine(model, x) or after engine.restore(), or copy its model.state_dict()"
        )


def numeric_padding(conv: nn.Conv2d) -> tuple[tuple[int, int], tuple[int, int] | None]:
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


def no_autocast(x: torch.Tensor) -> None:
    if torch.is_autocast_enabled(x.device.type):
        raise TradyError(
            "autocast (automatic mixed precision) is not supported by the engine's training step; "
            "accepted: a model and input of one dtype (e.g. model.to(torch.bfloat16)), or autocast for evaluation"
        )


def current_slice(module: nn.Module) -> torch.Tensor | None:
    """The selected slice leaf, or None. The weight already holds its values after every torch.optim step
    (slices.py); an eager forward also writes a slice updated otherwise (a hand-written update rule)."""
    st: LayerState = module.trady
    if st.idx is None:
        return None
    if not torch.compiler.is_compiling():
        slices.write_slice_if_changed(module)
    return st.w_slice


class SparseConv2d(_Prepared, nn.Conv2d):
    """Reads its weight and passes the slice leaf to the Function, which returns its gradient."""

    trady: LayerState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.trady
        w_slice = current_slice(self)
        bias, scale = self.bias, None
        if st.fold is not None:  # conv -> frozen BN as one conv: weight * scale (per output), bias -> shift
            scale, shift = st.fold.trady_affine()
            bias = shift if bias is None else shift + bias * scale
        bias_trains = bias is not None and bias.requires_grad
        if not torch.is_grad_enabled() or not (x.requires_grad or w_slice is not None or bias_trains):
            weight = self.weight if scale is None else self.weight * scale.view(-1, 1, 1, 1)
            # no graph: a plain conv (padding_mode is 'zeros', checked at preparation)
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        no_autocast(x)
        return functions.ChannelSparseConv2dFn.apply(
            x, self.weight.detach(), bias, w_slice, st.idx,
            self.stride, self.trady_padding, self.dilation, self.groups, st.on_saved, self.trady_extra_pad, scale,
        )  # fmt: skip


class SparseLinear(_Prepared, nn.Linear):
    trady: LayerState

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self.trady
        w_slice = current_slice(self)
        bias = self.bias
        bias_trains = bias is not None and bias.requires_grad
        if not torch.is_grad_enabled() or not (x.requires_grad or w_slice is not None or bias_trains):
            return F.linear(x, self.weight, bias)
        no_autocast(x)
        return functions.ChannelSparseLinearFn.apply(x, self.weight.detach(), bias, w_slice, st.idx, st.on_saved)


class FrozenBatchNorm2d(_Prepared, nn.BatchNorm2d):
    """Uses running statistics in train and eval mode alike; never updates them (warns once in train mode)."""

    trady_notice: list  # shared by one engine's BatchNorms: [True] once the train-mode warning was given

    def trady_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift): y = x * scale + shift per channel; shift is differentiable in the bias only."""
        if self.training and torch.is_grad_enabled() and not self.trady_notice[0]:  # a training forward
            self.trady_notice[0] = True
            warnings.warn(
                "model.train() on a SparseEngine-prepared model: BatchNorm layers stay frozen (running "
                "statistics are used, never updated), as in the paper's recipe",
                FrozenBatchNormWarning,
                stacklevel=3,
            )
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
        return functions.FrozenAffineFn.apply(x, scale, shift)


class FoldedBatchNorm2d(FrozenBatchNorm2d):
    """A frozen BatchNorm folded into the Conv2d before it (which applies it): the identity here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class TrainBatchNorm2d(_Prepared, nn.BatchNorm2d):
    """EngineConfig(batchnorm="train"): the stock BatchNorm2d (train mode: batch statistics, running
    statistics updated; eval mode: running statistics). Stock autograd keeps its input and the batch mean
    and inverse std for backward wherever it is on the backprop path (trady.engine.batchnorm)."""


class MaskedClamp(_Prepared, nn.Module):
    """Shared forward for the ReLU family: a clamp whose backward keeps a packed mask.

    `inplace=True` stays in place (the input tensor itself is clamped and returned), as stock.
    """

    trady_bits: int = 1

    def _bounds(self) -> tuple[float, float | None]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self._bounds()
        if not torch.is_grad_enabled() or not x.requires_grad:
            return torch.clamp_(x, lo, hi) if self.inplace else torch.clamp(x, lo, hi)
        fn = functions.ClampMaskInplaceFn if self.inplace else functions.ClampMaskFn
        return fn.apply(x, lo, hi, self.trady_bits)


class MaskedReLU(MaskedClamp, nn.ReLU):
    def _bounds(self):
        return 0.0, None


class MaskedReLU6(MaskedClamp, nn.ReLU6):
    def _bounds(self):
        return 0.0, 6.0


class MaskedHardtanh(MaskedClamp, nn.Hardtanh):
    def _bounds(self):
        return float(self.min_val), float(self.max_val)


class MaskedDropout(_Prepared, nn.Dropout):
    """Train-mode Dropout keeping a bit mask for backward (stock CPU dropout keeps a float mask)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and 0 < self.p < 1 and torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)  # identity, p in {0, 1}, or no graph: stock
        return functions.DropoutMaskFn.apply(x, float(self.p), self.inplace)


class GlobalAvgPool2d(_Prepared, nn.AdaptiveAvgPool2d):
    """AdaptiveAvgPool2d(1) as a mean: its backward keeps no input (adaptive pooling keeps it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((-2, -1), keepdim=True)


class ArgmaxMaxPool2d(_Prepared, nn.MaxPool2d):
    """MaxPool2d whose backward keeps a uint8 window position per output element, not its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = functions.pair(self.kernel_size)
        if not torch.is_grad_enabled() or not x.requires_grad or self.return_indices or k[0] * k[1] > 256:
            return super().forward(x)  # stock (kernels over 256 positions keep int64 indices and the input)
        return functions.MaxPool2dArgmaxFn.apply(
            x, k, functions.pair(self.stride), functions.pair(self.padding), functions.pair(self.dilation),
            self.ceil_mode,
        )


class ShapeOnlyAvgPool2d(_Prepared, nn.AvgPool2d):
    """AvgPool2d whose backward keeps nothing (stock keeps its whole input)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not x.requires_grad:
            return super().forward(x)
        return functions.AvgPool2dFn.apply(
            x, functions.pair(self.kernel_size), functions.pair(self.stride), functions.pair(self.padding),
            self.ceil_mode,
            self.count_include_pad, self.divisor_override,
        )  # fmt: skip
