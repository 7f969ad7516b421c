"""Functional calls on the backprop path (F.silu, torch.sigmoid, x * gate, F.layer_norm, ...).

Module swaps only see modules; a forward that calls `F.silu(x)` or `x * self.gate(x)` keeps what stock
autograd keeps, unseen. While the prepared model runs a forward with grad enabled, a
torch.overrides.TorchFunctionMode (public API) sees every torch call made by the forward code of its
container modules (calls inside leaf modules and engine classes are theirs and pass through):
- smooth activations -> activations.few_bit (EngineConfig.activation_bits; None: stock),
  ReLU/ReLU6 -> the packed-mask ClampMaskFn, F.dropout -> the bit-mask DropoutMaskFn,
  adaptive_avg_pool2d(x, 1) -> a mean (keeps nothing);
- x * gate with a broadcast gate that needs a gradient (squeeze-excitation) -> kept_tensors.gate_mul;
- F.layer_norm and F.scaled_dot_product_attention -> kept_tensors (EngineConfig.kept_precision, as the gate);
- attention written out: matmul of two activations (neither a parameter or buffer) and softmax -> kept_tensors;
- anything else runs stock; with strict=True, calls that keep a tensor for backward (other than a
  parameter or buffer) raise one TradyError at the end of the forward naming each function, its module
  and the tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from trady.core.errors import TradyError
from trady.engine import activations, functions, kept_tensors

_MUL = {torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.Tensor.mul, torch.mul}
_RELU = {F.relu, torch.relu, torch.Tensor.relu}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_SOFTMAX = {F.softmax, torch.softmax, torch.Tensor.softmax}


def _requires_grad(args, kwargs) -> bool:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            return True
        if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in a):
            return True
    return False


def _name(func) -> str:
    """torch.softmax, Tensor.mul, F.gelu, or module.qualname for anything else."""
    name = getattr(func, "__name__", repr(func))
    qual = getattr(func, "__qualname__", name)
    module = getattr(func, "__module__", None) or ""
    if qual.startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    if module == "torch.nn.functional" or module.startswith("torch._C._nn"):
        return f"F.{name}"
    if module.startswith("torch") or qual.startswith("_VariableFunctions"):
        return f"torch.{name}"
    return f"{module}.{qual}" if module else qual


def _arg(args, kwargs, i: int, name: str, default):
    return args[i] if len(args) > i else kwargs.get(name, default)


class FunctionalCalls(TorchFunctionMode):
    """The mode active during a prepared model's forward; `stack` holds (module name, passes through)."""

    def __init__(self, activation_bits, kept_precision: str, mask_bits: int, strict: bool) -> None:
        super().__init__()
        self.activation_bits = activation_bits
        self.kept_precision = kept_precision
        self.mask_bits = mask_bits
        self.strict = strict
        self.stack: list[tuple[str, bool]] = []
        self.skip: set[tuple] = set()  # storages of parameters and buffers
        self.active = False
        self.roots: list[int] = []  # the stack's length at each (nested) root forward: only the outermost enters
        self.offenders: dict[str, str] = {}  # strict: "function in module" -> what it keeps, this forward

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.stack or self.stack[-1][1] or not torch.is_grad_enabled() or not _requires_grad(args, kwargs):
            return func(*args, **kwargs)
        out = self._route(func, args, kwargs)
        if out is not NotImplemented:
            return out
        if not self.strict:
            return func(*args, **kwargs)
        kept: list[torch.Tensor] = []

        def pack(t):
            if _storage_key(t) not in self.skip:
                kept.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = func(*args, **kwargs)
        if kept:  # named, with every other one, at the end of the forward (raise_offenders)
            where = f"{_name(func)} in module {self.stack[-1][0] or '<root>'!r}"
            self.offenders.setdefault(where, f"{str(kept[0].dtype).replace('torch.', '')} {list(kept[0].shape)}")
        return out

    def raise_offenders(self) -> None:
        if not self.offenders:
            return
        calls = ", ".join(f"{where} (keeps {what})" for where, what in self.offenders.items())
        self.offenders.clear()
        raise TradyError(
            f"functional call(s) on the backprop path keep tensors for backward: {calls}; handled: smooth "
            "activations, relu, dropout, x * broadcast gate, layer_norm, scaled_dot_product_attention, matmul of "
            "two activations, softmax, adaptive_avg_pool2d(x, 1) (or EngineConfig(strict=False) to let stock "
            "autograd keep them)"
        )

    def _route(self, func, args, kwargs):
        found = activations.functional_kind(func, args, kwargs)
        if found is not None:
            kind, x, inplace = found
            if self.activation_bits is None:  # exact mode: stock autograd keeps what it keeps
                return func(*args, **kwargs)
            return activations.few_bit(x, kind, self.activation_bits, inplace)
        if func in _RELU and not _arg(args, kwargs, 1, "inplace", False):
            return functions.ClampMaskFn.apply(args[0], 0.0, None, self.mask_bits)
        if func is F.relu6 and not _arg(args, kwargs, 1, "inplace", False):
            return functions.ClampMaskFn.apply(args[0], 0.0, 6.0, self.mask_bits)
        if func is F.dropout:
            p, training = float(_arg(args, kwargs, 1, "p", 0.5)), bool(_arg(args, kwargs, 2, "training", True))
            if training and 0 < p < 1:  # a bit mask, as nn.Dropout's (sparse_modules.MaskedDropout)
                return functions.DropoutMaskFn.apply(args[0], p, bool(_arg(args, kwargs, 3, "inplace", False)))
            return func(*args, **kwargs)
        if func in _MUL and len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args):
            out = kept_tensors.gate_mul(args[0], args[1], self.kept_precision)
            return NotImplemented if out is None else out
        if func is F.adaptive_avg_pool2d and _arg(args, kwargs, 1, "output_size", None) in (1, (1, 1), [1, 1]):
            return args[0].mean((-2, -1), keepdim=True)
        if func is F.layer_norm:
            x, shape = args[0], _arg(args, kwargs, 1, "normalized_shape", None)
            weight, bias = _arg(args, kwargs, 2, "weight", None), _arg(args, kwargs, 3, "bias", None)
            eps = _arg(args, kwargs, 4, "eps", 1e-5)
            return kept_tensors.layer_norm(x, shape, weight, bias, eps, self.kept_precision)
        if func in _MATMUL and len(args) == 2 and all(isinstance(a, torch.Tensor) for a in args):
            if any(_storage_key(a) in self.skip for a in args):
                return NotImplemented  # a weight: a functional linear layer, not attention
            out = kept_tensors.matmul(args[0], args[1], self.kept_precision)
            return NotImplemented if out is None else out
        if func in _SOFTMAX and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            dim = _arg(args, kwargs, 1, "dim", None)
            if dim is None:  # (F.softmax's implicit dim is deprecated: left to stock autograd)
                return NotImplemented
            dtype = _arg(args, kwargs, 3 if func is F.softmax else 2, "dtype", None)
            return kept_tensors.softmax(args[0], dim, dtype, self.kept_precision)
        if func is F.scaled_dot_product_attention and not kwargs.get("enable_gqa", False):
            q, k, v = args[:3]
            return kept_tensors.attention(
                q, k, v, _arg(args, kwargs, 3, "attn_mask", None), _arg(args, kwargs, 4, "dropout_p", 0.0),
                _arg(args, kwargs, 5, "is_causal", False), kwargs.get("scale"), self.kept_precision,
            )  # fmt: skip
        return NotImplemented


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.device.type, t.untyped_storage().data_ptr())


def install(
    model: nn.Module, mode: FunctionalCalls, passes_through: Callable[[nn.Module], bool], sync: Callable[[], None]
) -> list:
    """Hooks that keep `mode.stack` and enter the mode for each forward of `model` with grad enabled.

    A forward without grad (evaluation) first syncs the trained slices into the weights: fused inference
    paths (nn.TransformerEncoderLayer's) read weights without calling the layers that would.
    """
    handles = []

    def root_pre(module, args):
        # Re-entrant: a forward run inside the model's forward (a hook's select() -> strict path check)
        # neither enters nor leaves the mode; only the outermost call does.
        if not mode.roots and not mode.active:
            if torch.is_grad_enabled():
                mode.offenders.clear()
                mode.skip = {_storage_key(t) for t in (*model.parameters(), *model.buffers())}
                mode.__enter__()
                mode.active = True
            else:
                sync()
        mode.roots.append(len(mode.stack))
        mode.stack.append(("", passes_through(model)))

    def root_post(module, args, output):
        # Also after an exception (always_call): each root call drops what it pushed; the outermost leaves the mode.
        if mode.roots:
            del mode.stack[mode.roots.pop() :]
        if not mode.roots and mode.active:
            mode.active = False
            mode.__exit__(None, None, None)
            mode.raise_offenders()

    handles.append(model.register_forward_pre_hook(root_pre))
    handles.append(model.register_forward_hook(root_post, always_call=True))
    for name, m in model.named_modules():
        if m is model:
            continue
        entry = (name, passes_through(m))

        def pop(module, args, output, e=entry) -> None:
            if mode.stack and mode.stack[-1] is e:  # not pushed when an earlier pre-hook raised
                mode.stack.pop()

        handles.append(m.register_forward_pre_hook(lambda mod, a, e=entry: mode.stack.append(e)))
        handles.append(m.register_forward_hook(pop, always_call=True))
    return handles
