"""Autograd Functions that keep for backward only what the update really needs.

Stock PyTorch keeps the whole input of a convolution even when its weight is frozen, and the whole
input (or output) of every eval-mode BatchNorm and ReLU. Here:
- a conv/linear keeps its weight (a parameter: no extra memory) plus, when some of its input channels
  are updated, only those input slices x[:, selected];
- its weight gradient is computed for the selected slice only (convolution_backward with an output
  mask, on the slice), so no full-size gradient is ever allocated;
- a frozen BatchNorm is a fixed per-channel affine map that keeps only its per-channel scale;
- ReLU/ReLU6/Hardtanh keep a bit-packed mask (1 bit per element instead of 32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.nn.grad import conv2d_input, conv2d_weight

# ---------------------------------------------------------------------------------------------
# Weight slices: which weight entries belong to a set of input channels
# ---------------------------------------------------------------------------------------------
# groups == 1: the slice of input channels `idx` is weight[:, idx] with shape [C', S, kh, kw].
# groups  > 1: input channel c lives in group c // (C/g) at local position c % (C/g) and owns the
#              C'/g output rows of that group: slice shape [S, C'/g, kh, kw] (depthwise: [S, 1, kh, kw]).
# Linear: weight[:, idx], shape [out, S].


def _group_index(idx: torch.Tensor, in_channels: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    cin_g = in_channels // groups
    return torch.div(idx, cin_g, rounding_mode="floor"), idx % cin_g


def gather_slice(weight: torch.Tensor, idx: torch.Tensor, groups: int) -> torch.Tensor:
    if weight.dim() == 2 or groups == 1:
        return weight.index_select(1, idx)
    cout, cin_g, kh, kw = weight.shape
    g_idx, local = _group_index(idx, cin_g * groups, groups)
    return weight.view(groups, cout // groups, cin_g, kh, kw)[g_idx, :, local]


def scatter_slice_(weight: torch.Tensor, idx: torch.Tensor, values: torch.Tensor, groups: int) -> None:
    """weight[slice(idx)] = values, in place (caller holds no_grad)."""
    if weight.dim() == 2 or groups == 1:
        weight.index_copy_(1, idx, values)
        return
    cout, cin_g, kh, kw = weight.shape
    g_idx, local = _group_index(idx, cin_g * groups, groups)
    weight.view(groups, cout // groups, cin_g, kh, kw)[g_idx, :, local] = values


def slice_channel_norms(grad: torch.Tensor, groups: int) -> torch.Tensor:
    """Per selected input channel L2 norm of a slice gradient (layout as gather_slice)."""
    if grad.dim() == 2:
        return grad.norm(dim=0)
    if groups == 1:
        return grad.transpose(0, 1).flatten(1).norm(dim=1)
    return grad.flatten(1).norm(dim=1)


# ---------------------------------------------------------------------------------------------
# Convolution and Linear with channel-sparse weight update
# ---------------------------------------------------------------------------------------------


class ChannelSparseConv2dFn(Function):
    """y = conv2d(x, weight, bias); gradients for x, bias and weight slice `w_slice` (channels `idx`).

    `weight` must already hold the values of `w_slice` at `idx` (the module writes them before the
    call); `w_slice` is the leaf the optimizer updates, so only its small gradient is allocated.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, w_slice, idx, stride, padding, dilation, groups, on_saved):
        out = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.x_shape = x.shape
        if w_slice is not None and ctx.needs_input_grad[3]:
            x_sel = x.index_select(1, idx)  # the only activation kept: the selected input channels
            if on_saved is not None:
                on_saved(x_sel)
            ctx.save_for_backward(weight, x_sel, idx)
        else:
            ctx.save_for_backward(weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        stride, padding, dilation, groups = ctx.conv
        weight = ctx.saved_tensors[0]
        grad_x = grad_bias = grad_slice = None
        if ctx.needs_input_grad[0]:
            grad_x = conv2d_input(ctx.x_shape, weight, grad_out, stride, padding, dilation, groups)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        if ctx.needs_input_grad[3]:
            _, x_sel, idx = ctx.saved_tensors
            kh, kw = weight.shape[-2:]
            if groups == 1:
                shape = (weight.shape[0], idx.numel(), kh, kw)
                grad_slice = conv2d_weight(x_sel, shape, grad_out, stride, padding, dilation, 1)
            else:
                # Each selected channel becomes its own group paired with its group's output rows.
                cout_g = weight.shape[0] // groups
                g_idx, _ = _group_index(idx, weight.shape[1] * groups, groups)
                b, _, ho, wo = grad_out.shape
                g_sel = grad_out.view(b, groups, cout_g, ho, wo).index_select(1, g_idx)
                g_sel = g_sel.reshape(b, idx.numel() * cout_g, ho, wo)
                shape = (idx.numel() * cout_g, 1, kh, kw)
                grad_slice = conv2d_weight(x_sel, shape, g_sel, stride, padding, dilation, idx.numel())
                grad_slice = grad_slice.view(idx.numel(), cout_g, kh, kw)
        return grad_x, None, grad_bias, grad_slice, None, None, None, None, None, None


class ChannelSparseLinearFn(Function):
    """y = x @ weight.T + bias with the weight gradient for input features `idx` only."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_slice, idx, on_saved):
        out = F.linear(x, weight, bias)
        if w_slice is not None and ctx.needs_input_grad[3]:
            x_sel = x.index_select(-1, idx)
            if on_saved is not None:
                on_saved(x_sel)
            ctx.save_for_backward(weight, x_sel)
        else:
            ctx.save_for_backward(weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        weight = ctx.saved_tensors[0]
        grad_x = grad_bias = grad_slice = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out.matmul(weight)
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.needs_input_grad[2]:
            grad_bias = g2.sum(0)
        if ctx.needs_input_grad[3]:
            x_sel = ctx.saved_tensors[1]
            grad_slice = g2.t().matmul(x_sel.reshape(-1, x_sel.shape[-1]))
        return grad_x, None, grad_bias, grad_slice, None, None


# ---------------------------------------------------------------------------------------------
# Frozen BatchNorm: a fixed per-channel affine map
# ---------------------------------------------------------------------------------------------


class FrozenAffineFn(Function):
    """y = x * scale + shift per channel (dim 1); keeps only `scale` (C values)."""

    @staticmethod
    def forward(ctx, x, scale, shift):
        view = (1, -1) + (1,) * (x.dim() - 2)
        ctx.save_for_backward(scale)
        ctx.sum_dims = (0,) + tuple(range(2, x.dim()))
        return torch.addcmul(shift.view(view), x, scale.view(view))

    @staticmethod
    def backward(ctx, grad_out):
        (scale,) = ctx.saved_tensors
        view = (1, -1) + (1,) * (grad_out.dim() - 2)
        grad_x = grad_out * scale.view(view) if ctx.needs_input_grad[0] else None
        grad_shift = grad_out.sum(ctx.sum_dims) if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_shift


# ---------------------------------------------------------------------------------------------
# ReLU family with a bit-packed mask
# ---------------------------------------------------------------------------------------------

_BIT_WEIGHTS = {}


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensor -> uint8 tensor of ceil(n / 8) bytes (little-endian bit order inside a byte)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # Eight 0/1 bytes viewed as one int64 word; a multiply gathers their low bits into the top byte.
    words = flat.view(torch.uint8).view(torch.int64)
    packed = (words * 0x0102040810204080) >> 56
    return packed.to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    key = packed.device
    if key not in _BIT_WEIGHTS:
        _BIT_WEIGHTS[key] = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=key)
    bits = packed.unsqueeze(1).bitwise_and(_BIT_WEIGHTS[key]).ne(0)
    return bits.view(-1)[:numel]


class ClampMaskFn(Function):
    """y = clamp(x, lo, hi) (ReLU: lo=0, hi=None); backward passes grad where lo < x < hi.

    Keeps a mask of 1 bit per element (`bits=1`) or 1 byte (`bits=8`) instead of a float tensor.
    """

    @staticmethod
    def forward(ctx, x, lo, hi, bits):
        y = torch.clamp(x, lo, hi)
        inside = x > lo
        if hi is not None:
            inside &= x < hi
        ctx.shape = x.shape
        ctx.save_for_backward(pack_bits(inside) if bits == 1 else inside)
        ctx.bits = bits
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        if ctx.bits == 1:
            mask = unpack_bits(mask, grad_out.numel()).view(ctx.shape)
        return grad_out * mask, None, None, None
