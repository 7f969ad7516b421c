"""Smooth activations with an exact forward and a few-bit derivative for backward.

Stock autograd keeps the whole float input (or output) of SiLU, GELU, Sigmoid, ... for backward. Here
the forward computes the exact activation and its exact derivative d = f'(x), then keeps only a b-bit
code of d per element (b = 1..4, bit-packed as the ReLU masks are: 8 / b codes per byte, low bits
first; 3 bits as a 2-bit and a 1-bit array). Backward multiplies the output gradient by the code's
level, looked up per byte (a [256, 8 / b] table of levels) where the code fills whole bytes.

The code is a scalar quantiser of d itself, fitted by Lloyd-Max under the distribution of d = f'(X) for
pre-activations X ~ N(0, 1): borders between levels minimise the mean squared error of the derivative
(the best b-bit code of x for that error groups x by the value of f'(x), whatever the shape of f').
Published few-bit backward work (Novikov et al., 2023) fits piecewise-constant derivatives over
x-intervals; quantising d directly needs no intervals and handles non-monotone f' (SiLU, GELU, Mish).
Derivatives that take only two values (LeakyReLU, Hardsigmoid) are exact with 1 bit whatever `bits`.
Tables for the default parameters ship in activation_tables.json (written by
scripts/fit_activations.py); other parameters (ELU alpha, ...) are fitted on first use, the same way.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from trady.core.errors import TradyError
from trady.engine import native_codes
from trady.engine.packed_codes import code_levels, code_of, grid_of, pack_code

TABLES_PATH = Path(__file__).with_name("activation_tables.json")
BITS_ACCEPTED = (1, 2, 3, 4)


def _gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    c = math.sqrt(2.0 / math.pi)
    inner = c * (x + 0.044715 * x**3)
    t = torch.tanh(inner)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)


def _silu_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return torch.rsub(s, 1).mul_(x).add_(1).mul_(s)  # s * (1 + x * (1 - s)), one temporary


def _gelu_grad(x: torch.Tensor) -> torch.Tensor:
    # Phi(x) + x phi(x), in place on two temporaries
    cdf = torch.mul(x, 1 / math.sqrt(2.0)).erf_().add_(1).mul_(0.5)
    return torch.mul(x, x).mul_(-0.5).exp_().mul_(x).mul_(1 / math.sqrt(2 * math.pi)).add_(cdf)


def _hardswish_grad(x: torch.Tensor) -> torch.Tensor:
    # As PyTorch's hardswish_backward: 0 below -3, x / 3 + 0.5 on [-3, 3], 1 above 3.
    return torch.div(x, 3).add_(0.5).masked_fill_(x < -3, 0.0).masked_fill_(x > 3, 1.0)


def _sigmoid_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return torch.rsub(s, 1).mul_(s)


def _hardsigmoid_grad(x: torch.Tensor) -> torch.Tensor:
    return ((x > -3) & (x < 3)).to(x.dtype) / 6


def _tanh_grad(x: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(x)
    return t.mul_(t).neg_().add_(1)


def _mish_grad(x: torch.Tensor) -> torch.Tensor:
    t = torch.tanh(F.softplus(x))
    return t + x * torch.sigmoid(x) * (1 - t * t)


def _ones(x: torch.Tensor) -> torch.Tensor:
    return x.new_ones(()).expand(x.shape)  # one element, broadcast: no pass over memory


def _by_backward_op(op, **kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """f'(x) as PyTorch's own backward kernel computes it for an output gradient of ones: one pass
    over memory, and the very derivative stock autograd multiplies the gradient by."""
    return lambda x: op(_ones(x), x, **kwargs)


@dataclass(frozen=True)
class ActivationKind:
    """One activation with its parameters: exact forward, exact derivative, table key."""

    key: str  # e.g. "silu", "gelu_tanh", "elu(alpha=1.0)": names the table
    forward: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor], torch.Tensor]
    two_values: tuple[float, float] | None = None  # f' takes only these values: 1 bit, exact
    # the derivative the forward quantises (fitting uses `derivative`): stock's backward kernel
    coded_derivative: Callable[[torch.Tensor], torch.Tensor] | None = None

    def derivative_to_code(self, x: torch.Tensor) -> torch.Tensor:
        return (self.coded_derivative or self.derivative)(x)


def _leaky(slope: float) -> ActivationKind:
    lo, hi = sorted((float(slope), 1.0))
    return ActivationKind(
        f"leaky_relu(negative_slope={float(slope)})",
        lambda x: F.leaky_relu(x, slope),
        lambda x: torch.where(x > 0, 1.0, float(slope)).to(x.dtype),
        two_values=(lo, hi) if lo != hi else None,
    )


def _elu(alpha: float) -> ActivationKind:
    alpha = float(alpha)
    return ActivationKind(
        f"elu(alpha={alpha})",
        lambda x: F.elu(x, alpha),
        lambda x: torch.where(x > 0, torch.ones_like(x), alpha * torch.exp(torch.clamp(x, max=0))),
    )


_ATEN = torch.ops.aten
SILU = ActivationKind("silu", F.silu, _silu_grad, coded_derivative=_by_backward_op(_ATEN.silu_backward))
GELU = ActivationKind("gelu", F.gelu, _gelu_grad, coded_derivative=_by_backward_op(_ATEN.gelu_backward))
GELU_TANH = ActivationKind(
    "gelu_tanh", lambda x: F.gelu(x, approximate="tanh"), _gelu_tanh_grad,
    coded_derivative=_by_backward_op(_ATEN.gelu_backward, approximate="tanh"),
)  # fmt: skip
HARDSWISH = ActivationKind(
    "hardswish", F.hardswish, _hardswish_grad, coded_derivative=_by_backward_op(_ATEN.hardswish_backward)
)
SIGMOID = ActivationKind("sigmoid", torch.sigmoid, _sigmoid_grad)
HARDSIGMOID = ActivationKind("hardsigmoid", F.hardsigmoid, _hardsigmoid_grad, two_values=(0.0, 1.0 / 6.0))
TANH = ActivationKind("tanh", torch.tanh, _tanh_grad)
MISH = ActivationKind("mish", F.mish, _mish_grad, coded_derivative=_by_backward_op(_ATEN.mish_backward))

# The kinds whose tables ship (default parameters); fit_activations.py writes exactly these.
DEFAULT_KINDS = (SILU, GELU, GELU_TANH, HARDSWISH, SIGMOID, TANH, MISH, _elu(1.0))


def gelu_kind(approximate: str) -> ActivationKind:
    if approximate == "none":
        return GELU
    if approximate == "tanh":
        return GELU_TANH
    raise TradyError(f"GELU approximate={approximate!r}; accepted: 'none', 'tanh'")


# ---------------------------------------------------------------------------------------------
# Lloyd-Max tables
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """levels[i] stands for d in (borders[i-1], borders[i]]; len(levels) == 2 ** bits."""

    borders: tuple[float, ...]
    levels: tuple[float, ...]
    rms_error: float  # sqrt(E[(f'(X) - level)^2]), X ~ N(0, 1)
    rms_derivative: float  # sqrt(E[f'(X)^2]): the error's scale


def _quadrature(n: int = 400_001, span: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid and N(0, 1) weights (summing to 1) on [-span, span]: deterministic, no sampling."""
    x = torch.linspace(-span, span, n, dtype=torch.float64)
    w = torch.exp(-0.5 * x * x)
    return x, w / w.sum()


def fit_table(kind: ActivationKind, bits: int, iterations: int = 500, samples: torch.Tensor | None = None) -> Table:
    """Lloyd-Max quantiser of d = f'(X), X ~ N(0, 1) (or X uniform over `samples`), with 2 ** bits levels."""
    x, w = _quadrature() if samples is None else _empirical(samples)
    d = kind.derivative(x)
    if kind.two_values is not None:
        lo, hi = kind.two_values
        levels = torch.tensor([lo, hi], dtype=torch.float64)
        borders = torch.tensor([(lo + hi) / 2], dtype=torch.float64)
    else:
        order = torch.argsort(d)
        d, w = d[order], w[order]
        cw = torch.cat([w.new_zeros(1), torch.cumsum(w, 0)])
        cwd = torch.cat([w.new_zeros(1), torch.cumsum(w * d, 0)])
        k = 2**bits
        best = None
        # Two starts (quantiles of d, uniform over its range); keep the lower error.
        quantiles = (torch.arange(k, dtype=torch.float64) + 0.5) / k
        starts = [
            d[torch.searchsorted(cw[1:], quantiles).clamp(max=len(d) - 1)],
            torch.linspace(float(d[0]), float(d[-1]), k + 2, dtype=torch.float64)[1:-1],
        ]
        for levels in starts:
            for _ in range(iterations):
                borders = (levels[1:] + levels[:-1]) / 2
                inner = torch.searchsorted(d, borders, right=True)
                cuts = torch.cat([inner.new_zeros(1), inner, inner.new_full((1,), len(d))])
                mass = cw[cuts[1:]] - cw[cuts[:-1]]
                new = torch.where(mass > 0, (cwd[cuts[1:]] - cwd[cuts[:-1]]) / mass.clamp(min=1e-300), levels)
                new, _ = torch.sort(new)
                if torch.allclose(new, levels, rtol=0, atol=1e-13):
                    levels = new
                    break
                levels = new
            err = _mse(d, w, (levels[1:] + levels[:-1]) / 2, levels)
            if best is None or err < best[0]:
                best = (err, levels)
        levels = best[1]
        borders = (levels[1:] + levels[:-1]) / 2
    err = _mse(d, w, borders, levels)
    return Table(
        borders=tuple(float(b) for b in borders),
        levels=tuple(float(v) for v in levels),
        rms_error=math.sqrt(err),
        rms_derivative=math.sqrt(float((w * d * d).sum())),
    )


def _empirical(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = samples.detach().flatten().double()
    return x, torch.full_like(x, 1.0 / x.numel())


def relative_error(kind: ActivationKind, table_: Table, samples: torch.Tensor | None = None) -> float:
    """rms(f'(X) - q(f'(X))) / rms(f'(X)) of a table, X ~ N(0, 1) or uniform over `samples`."""
    x, w = _quadrature() if samples is None else _empirical(samples)
    d = kind.derivative(x)
    levels = torch.tensor(table_.levels, dtype=torch.float64)
    return math.sqrt(_mse(d, w, torch.tensor(table_.borders, dtype=torch.float64), levels) / float((w * d * d).sum()))


def _mse(d: torch.Tensor, w: torch.Tensor, borders: torch.Tensor, levels: torch.Tensor) -> float:
    q = levels[torch.bucketize(d, borders)]
    return float((w * (d - q) ** 2).sum())


@cache
def _shipped() -> dict:
    if not TABLES_PATH.exists():
        return {}
    return json.loads(TABLES_PATH.read_text())["tables"]


@cache
def table(kind: ActivationKind, bits: int) -> Table:
    """The shipped table for (kind, bits), fitted on first use where none ships."""
    if bits not in BITS_ACCEPTED:
        raise TradyError(f"activation_bits must be one of {BITS_ACCEPTED} or None (exact), got {bits!r}")
    if kind.two_values is not None:
        bits = 1
    entry = _shipped().get(kind.key, {}).get(str(bits))
    if entry is not None:
        return Table(tuple(entry["borders"]), tuple(entry["levels"]), entry["rms_error"], entry["rms_derivative"])
    return fit_table(kind, bits)


@cache
def _table_tensors(kind: ActivationKind, bits: int, device: torch.device, dtype: torch.dtype):
    """(borders, levels, grid or None) in the activation's dtype."""
    t = table(kind, bits)
    borders = torch.tensor(t.borders, dtype=dtype, device=device)
    grid = grid_of(borders) if len(t.borders) >= 7 and dtype == torch.float32 else None
    return borders, torch.tensor(t.levels, dtype=dtype, device=device), grid


# ---------------------------------------------------------------------------------------------
# The autograd Function and the code's packing
# ---------------------------------------------------------------------------------------------


class FewBitDerivativeFn(Function):
    """y = f(x) exactly; backward: grad * level[code(f'(x))], keeping `bits` bits per element."""

    @staticmethod
    def forward(ctx, x, kind: ActivationKind, bits: int, inplace: bool = False):
        borders, levels, grid = _table_tensors(kind, bits, x.device, x.dtype)
        bits = len(borders).bit_length()  # two-valued derivatives: 1 bit whatever was asked
        if x.dtype == torch.float32 and native_codes.fits(x) and native_codes.available():
            # the derivative in cache-sized chunks, each quantised and packed in one compiled pass
            packed = native_codes.code_pack_of(kind.derivative_to_code, x, borders, bits)
        else:
            d = kind.derivative_to_code(x)
            packed = pack_code(grid.code(d) if grid is not None else code_of(d, borders), bits)
            del d
        ctx.save_for_backward(*packed, levels)
        ctx.shape, ctx.bits = x.shape, bits
        if inplace:
            x.copy_(kind.forward(x))
            ctx.mark_dirty(x)
            return x
        return kind.forward(x)

    @staticmethod
    def backward(ctx, grad_out):
        *packed, levels = ctx.saved_tensors
        if grad_out.dtype == torch.float32 and native_codes.fits(grad_out) and native_codes.available():
            return native_codes.decode_mul(tuple(packed), ctx.bits, levels, grad_out), None, None, None
        scale = code_levels(tuple(packed), ctx.bits, levels, grad_out.numel()).view(ctx.shape)
        return scale.mul_(grad_out), None, None, None


def few_bit(x: torch.Tensor, kind: ActivationKind, bits: int | None, inplace: bool = False) -> torch.Tensor:
    """The activation with a few-bit backward; stock autograd where bits is None or no graph is built."""
    if bits is None or not torch.is_grad_enabled() or not x.requires_grad:
        if inplace:
            return x.copy_(kind.forward(x))
        return kind.forward(x)
    return FewBitDerivativeFn.apply(x, kind, bits, inplace)


# ---------------------------------------------------------------------------------------------
# Module classes the prepared model's activations are switched to (same attributes)
# ---------------------------------------------------------------------------------------------


class FewBitActivation(nn.Module):
    """Shared forward: the module's own kind through few_bit(); `trady_bits` None keeps stock autograd."""

    trady_bits: int | None = None

    def trady_kind(self) -> ActivationKind:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.trady_bits is None:
            return super().forward(x)  # exact mode: stock autograd keeps what stock keeps
        return few_bit(x, self.trady_kind(), self.trady_bits, bool(getattr(self, "inplace", False)))


class FewBitSiLU(FewBitActivation, nn.SiLU):
    def trady_kind(self):
        return SILU


class FewBitGELU(FewBitActivation, nn.GELU):
    def trady_kind(self):
        return gelu_kind(self.approximate)


class FewBitHardswish(FewBitActivation, nn.Hardswish):
    def trady_kind(self):
        return HARDSWISH


class FewBitSigmoid(FewBitActivation, nn.Sigmoid):
    def trady_kind(self):
        return SIGMOID


class FewBitHardsigmoid(FewBitActivation, nn.Hardsigmoid):
    def trady_kind(self):
        return HARDSIGMOID


class FewBitTanh(FewBitActivation, nn.Tanh):
    def trady_kind(self):
        return TANH


class FewBitMish(FewBitActivation, nn.Mish):
    def trady_kind(self):
        return MISH


class FewBitLeakyReLU(FewBitActivation, nn.LeakyReLU):
    def trady_kind(self):
        return _leaky_kind(self.negative_slope)


class FewBitELU(FewBitActivation, nn.ELU):
    def trady_kind(self):
        return _elu_kind(self.alpha)


@cache
def _leaky_kind(slope: float) -> ActivationKind:
    return _leaky(slope)


@cache
def _elu_kind(alpha: float) -> ActivationKind:
    return _elu(alpha)


SWAPS: dict[type, type] = {
    nn.SiLU: FewBitSiLU,
    nn.GELU: FewBitGELU,
    nn.Hardswish: FewBitHardswish,
    nn.Sigmoid: FewBitSigmoid,
    nn.Hardsigmoid: FewBitHardsigmoid,
    nn.Tanh: FewBitTanh,
    nn.Mish: FewBitMish,
    nn.LeakyReLU: FewBitLeakyReLU,
    nn.ELU: FewBitELU,
}


def functional_kind(func, args: tuple, kwargs: dict) -> tuple[ActivationKind, torch.Tensor, bool] | None:
    """(kind, input, inplace) for a functional activation call (F.silu, torch.sigmoid, ...), else None."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]

    def arg(i: int, name: str, default):
        return args[i] if len(args) > i else kwargs.get(name, default)

    if func is F.silu:
        return SILU, x, bool(arg(1, "inplace", False))
    if func is F.gelu:
        return gelu_kind(arg(1, "approximate", "none")), x, False
    if func is F.hardswish:
        return HARDSWISH, x, bool(arg(1, "inplace", False))
    if func in (torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid):
        return SIGMOID, x, False
    if func is F.hardsigmoid:
        return HARDSIGMOID, x, bool(arg(1, "inplace", False))
    if func in (torch.tanh, torch.Tensor.tanh, F.tanh):
        return TANH, x, False
    if func is F.mish:
        return MISH, x, bool(arg(1, "inplace", False))
    if func is F.leaky_relu:
        return _leaky_kind(float(arg(1, "negative_slope", 0.01))), x, bool(arg(2, "inplace", False))
    if func is F.elu:
        return _elu_kind(float(arg(1, "alpha", 1.0))), x, bool(arg(2, "inplace", False))
    return None


def check_bits(bits) -> None:
    if bits is not None and bits not in BITS_ACCEPTED:
        raise TradyError(f"activation_bits must be one of {BITS_ACCEPTED} or None (exact), got {bits!r}")
