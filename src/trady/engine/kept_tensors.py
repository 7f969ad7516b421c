"""Ops whose backward needs a float tensor no code can replace: keep it at 8 bits, or recompute.

Precision "int8" (8 bits) or "fp32" (the tensor as it is: exact), EngineConfig.kept_precision:
- squeeze-excitation `x * gate` (gate [B, C, 1, 1] computed from x): the gradient of x needs only the
  small gate; the gate's gradient, sum over H, W of grad * x, needs x: kept at that precision;
- LayerNorm: keeps its input and recomputes its statistics in backward (stock keeps the input plus
  per-row mean and 1/std);
- scaled dot-product attention: keeps q, k, v and recomputes the attention in backward (stock keeps
  q, k, v, the output and the softmax statistics), replaying dropout's RNG;
- attention written out (transformers' eager attention): `matmul` of two activations keeps each operand
  the other's gradient needs, softmax keeps its output (in [0, 1]: 8 bits are 1/255 steps per row).
8 bits: asymmetric uint8 per row of the last dimension(s) (x ~ lo + code * step), with an fp32 lo and
step per row. Everything kept goes through save_for_backward, so the engine's measurement sees it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import Function

from trady.core.errors import TradyError

MODES = ("int8", "fp32")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise TradyError(f"kept_precision must be one of {MODES}, got {mode!r}")


def quantize_rows(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes, lo, step): x ~ lo + codes * step, lo and step reduced over `dims` (keepdim)."""
    lo = x.amin(dims, keepdim=True)
    step = (x.amax(dims, keepdim=True) - lo) / 255
    step = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.round((x - lo) / step).clamp_(0, 255).to(torch.uint8)
    return codes, lo, step


def dequantize(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(lo, codes.to(lo.dtype), step)


def _keep(ctx, x: torch.Tensor, bits: int, dims: tuple[int, ...], *extra) -> None:
    ctx.bits = bits
    if bits == 8:
        ctx.save_for_backward(*quantize_rows(x.detach(), dims), *extra)
    else:
        ctx.save_for_backward(x.detach(), *extra)


def _kept(ctx) -> tuple[torch.Tensor, tuple]:
    saved = ctx.saved_tensors
    if ctx.bits == 8:
        return dequantize(*saved[:3]), saved[3:]
    return saved[0], saved[1:]


class GateMulFn(Function):
    """y = x * gate with gate broadcast over x (squeeze-excitation); keeps the gate, and x at `bits` (8:
    one offset and step per gate element) where the gate needs a gradient."""

    @staticmethod
    def forward(ctx, x, gate, bits):
        ctx.bcast = tuple(i for i in range(x.dim()) if gate.shape[i] == 1 and x.shape[i] != 1)
        ctx.gate_needs = gate.requires_grad
        if gate.requires_grad:  # (x no larger than the gate, e.g. 1 x 1 maps: as it is)
            _keep(ctx, x, bits if ctx.bcast else 32, ctx.bcast, gate)
        else:
            ctx.bits = 32
            ctx.save_for_backward(gate)
        return x * gate

    @staticmethod
    def backward(ctx, grad_out):
        x, (gate,) = _kept(ctx) if ctx.gate_needs else (None, ctx.saved_tensors)
        grad_x = grad_out * gate if ctx.needs_input_grad[0] else None
        grad_gate = None
        if ctx.needs_input_grad[1]:
            grad_gate = grad_out * x
            if ctx.bcast:  # (sum over an empty tuple of dims would reduce every dim)
                grad_gate = grad_gate.sum(ctx.bcast, keepdim=True)
        return grad_x, grad_gate, None


def gate_mul(a: torch.Tensor, b: torch.Tensor, mode: str = "int8") -> torch.Tensor | None:
    """a * b through GateMulFn when one is a broadcast gate of the other that needs a gradient, else None."""
    if a.dim() != b.dim() or a.dtype != b.dtype or not a.is_floating_point():
        return None
    if a.numel() >= b.numel():
        x, gate = a, b
    else:
        x, gate = b, a
    # A gate: much smaller than x, or of the squeeze-excitation form [B, C, 1, 1] (x may be 1 x 1 too)
    se_form = gate.dim() == 4 and gate.shape[2:] == (1, 1)
    if not gate.requires_grad or not (se_form or gate.numel() * 4 <= x.numel()):
        return None
    if any(g not in (1, s) for g, s in zip(gate.shape, x.shape)):
        return None
    return GateMulFn.apply(x, gate, 8 if mode == "int8" else 32)


class LayerNormFn(Function):
    """F.layer_norm keeping its input (32 or 8 bits); backward recomputes it from the kept input."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, bias, eps, bits):
        dims = tuple(range(x.dim() - len(normalized_shape), x.dim()))
        _keep(ctx, x, bits, dims, *(t for t in (weight, bias) if t is not None))
        ctx.args = (tuple(normalized_shape), weight is not None, bias is not None, eps)
        return F.layer_norm(x, normalized_shape, weight, bias, eps)

    @staticmethod
    def backward(ctx, grad_out):
        x, extra = _kept(ctx)
        shape, has_w, has_b, eps = ctx.args
        weight = extra[0] if has_w else None
        bias = extra[-1] if has_b else None
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            br = bias.detach().requires_grad_(True) if has_b and ctx.needs_input_grad[3] else bias
            wr = weight.detach().requires_grad_(True) if has_w and ctx.needs_input_grad[2] else weight
            y = F.layer_norm(xr, shape, wr, br, eps)
            inputs = [xr] + [t for t in (wr, br) if t is not None and t.requires_grad]
            grads = list(torch.autograd.grad(y, inputs, grad_out))
        grad_x = grads.pop(0)
        grad_w = grads.pop(0) if wr is not None and wr.requires_grad else None
        grad_b = grads.pop(0) if br is not None and br.requires_grad else None
        return grad_x, None, grad_w, grad_b, None, None


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5, mode: str = "int8") -> torch.Tensor:
    return LayerNormFn.apply(x, tuple(normalized_shape), weight, bias, eps, 8 if mode == "int8" else 32)


class LowBitLayerNorm(nn.LayerNorm):
    """nn.LayerNorm through LayerNormFn (`trady_mode`: "int8" or "fp32")."""

    trady_mode: str = "int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or not (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return super().forward(x)
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, self.trady_mode)


class AttentionFn(Function):
    """F.scaled_dot_product_attention keeping q, k, v (32 or 8 bits); backward recomputes the attention."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, bits):
        extra = (attn_mask,) if attn_mask is not None else ()
        rng = None
        if dropout_p > 0:
            rng = torch.cuda.get_rng_state(q.device) if q.is_cuda else torch.get_rng_state()
            extra = extra + (rng,)
        ctx.bits = bits
        ctx.args = (attn_mask is not None, dropout_p, is_causal, scale, q.device)
        # One scale per token over all heads ([B, heads, L, d]: dims 1 and 3): a head's row alone is short.
        rows = (1, q.dim() - 1) if q.dim() == 4 else (q.dim() - 1,)
        if bits == 8:
            ctx.save_for_backward(*quantize_rows(q, rows), *quantize_rows(k, rows), *quantize_rows(v, rows), *extra)
        else:
            ctx.save_for_backward(q, k, v, *extra)
        return F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal, scale=scale)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        has_mask, dropout_p, is_causal, scale, device = ctx.args
        if ctx.bits == 8:
            qkv, rest = [dequantize(*saved[i : i + 3]) for i in (0, 3, 6)], saved[9:]
        else:
            qkv, rest = list(saved[:3]), saved[3:]
        mask = rest[0] if has_mask else None
        with torch.enable_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if dropout_p > 0:
                if device.type == "cuda":
                    torch.cuda.set_rng_state(rest[-1], device)
                else:
                    torch.set_rng_state(rest[-1])
            leaves = [t.detach().requires_grad_(True) for t in qkv]
            out = F.scaled_dot_product_attention(*leaves, mask, dropout_p, is_causal, scale=scale)
            grads = torch.autograd.grad(out, leaves, grad_out)
        return (*grads, None, None, None, None, None)


def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, mode: str = "int8"):
    if attn_mask is not None and attn_mask.requires_grad:
        raise TradyError("scaled_dot_product_attention with an attention mask that needs a gradient is not supported")
    return AttentionFn.apply(q, k, v, attn_mask, float(dropout_p), bool(is_causal), scale, 8 if mode == "int8" else 32)


class MatmulFn(Function):
    """torch.matmul(a, b) of two activations, keeping (32 or 8 bits) only the operand each gradient needs:
    b for a's gradient, a for b's; backward recomputes the product's gradient by autograd (broadcasting)."""

    @staticmethod
    def forward(ctx, a, b, bits):
        ctx.needs = (a.requires_grad, b.requires_grad)
        ctx.bits = bits
        kept = [t for t, other_needs in ((a, b.requires_grad), (b, a.requires_grad)) if other_needs]
        ctx.kept_a, ctx.kept_b = b.requires_grad, a.requires_grad
        ctx.shapes = (a.shape, b.shape, a.dtype)
        if bits == 8:
            ctx.save_for_backward(*(q for t in kept for q in quantize_rows(t.detach(), (t.dim() - 1,))))
        else:
            ctx.save_for_backward(*(t.detach() for t in kept))
        return torch.matmul(a, b)

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        if ctx.bits == 8:
            saved = [dequantize(*saved[i : i + 3]) for i in range(0, len(saved), 3)]
        a_shape, b_shape, dtype = ctx.shapes
        a = saved.pop(0) if ctx.kept_a else torch.zeros(a_shape, dtype=dtype, device=grad_out.device)
        b = saved.pop(0) if ctx.kept_b else torch.zeros(b_shape, dtype=dtype, device=grad_out.device)
        with torch.enable_grad():
            leaves = [a.detach().requires_grad_(ctx.needs[0]), b.detach().requires_grad_(ctx.needs[1])]
            out = torch.matmul(*leaves)
            wanted = [t for t in leaves if t.requires_grad]
            grads = list(torch.autograd.grad(out, wanted, grad_out))
        grad_a = grads.pop(0) if ctx.needs[0] else None
        grad_b = grads.pop(0) if ctx.needs[1] else None
        return grad_a, grad_b, None


class SoftmaxFn(Function):
    """softmax over `dim` keeping its output (32 bits, or 8: uint8 codes per row over dim)."""

    @staticmethod
    def forward(ctx, x, dim, bits):
        y = torch.softmax(x, dim)
        ctx.dim = dim if dim >= 0 else dim + x.dim()
        _keep(ctx, y, bits, (ctx.dim,))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        y, _ = _kept(ctx)
        return y * (grad_out - (grad_out * y).sum(ctx.dim, keepdim=True)), None, None


def matmul(a: torch.Tensor, b: torch.Tensor, mode: str = "int8") -> torch.Tensor | None:
    """a @ b through MatmulFn when both are floating activations (None: not this function's case)."""
    if not (a.is_floating_point() and b.is_floating_point()) or a.dim() < 2 or b.dim() < 2:
        return None
    return MatmulFn.apply(a, b, 8 if mode == "int8" else 32)


def softmax(x: torch.Tensor, dim: int, dtype=None, mode: str = "int8") -> torch.Tensor:
    if dtype is not None:
        x = x.to(dtype)
    return SoftmaxFn.apply(x, int(dim), 8 if mode == "int8" else 32)
