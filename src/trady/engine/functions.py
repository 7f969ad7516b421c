"""Autograd Functions that keep for backward only what the update really needs.

Stock PyTorch keeps the whole input of a convolution even when its weight is frozen, and the whole
input (or output) of every eval-mode BatchNorm and ReLU. Here:
- a conv/linear keeps its weight (a parameter: no extra memory) plus, when some of its input channels
  are updated, only those input slices x[:, selected];
- its weight gradient is computed for the selected slice only (convolution_backward with an output
  mask, on the slice), so no full-size gradient is ever allocated;
- a frozen BatchNorm is a fixed per-channel affine map that keeps only its per-channel scale;
- ReLU/ReLU6/Hardtanh and train-mode Dropout keep a bit-packed mask (1 bit per element instead of 32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.nn.grad import conv2d_input, conv2d_weight

from trady.engine import native_codes

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


def pair(v) -> tuple[int, int]:
    """An int or a 2-sequence as an (h, w) pair of ints."""
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_input_grad(input_shape, weight, grad_out, stride, padding, dilation, groups) -> torch.Tensor:
    """Gradient of conv2d with respect to its input, as a transposed convolution.

    torch.nn.grad.conv2d_input passes convolution_backward a stride-0 placeholder input, which sends
    CPU depthwise convolutions down a slow path (about 1.5-3x slower than stock autograd here);
    conv_transpose2d, with the output padding that restores the input size, takes the fast one.
    """
    stride, padding, dilation = pair(stride), pair(padding), pair(dilation)
    cout, cin_g, kh, kw = weight.shape
    if stride == (1, 1):
        if groups == 1 and (kh, kw) == (1, 1) and padding == (0, 0):
            # 1x1: one batched matmul, weight^T @ grad_out[b]; 2-8x faster than mkldnn on NCHW here.
            b, _, ho, wo = grad_out.shape
            if (ho, wo) == tuple(input_shape[2:]):
                return torch.matmul(weight.view(cout, cin_g).t(), grad_out.reshape(b, cout, ho * wo)).view(
                    b, cin_g, ho, wo
                )
        elif cin_g == 1 and cout == groups:
            # Depthwise, stride 1: a forward depthwise conv with the flipped kernel (the CPU's
            # depthwise forward kernel beats its transposed one by up to ~25% for 5x5/7x7 kernels).
            q = (dilation[0] * (kh - 1) - padding[0], dilation[1] * (kw - 1) - padding[1])
            if q[0] >= 0 and q[1] >= 0:
                return F.conv2d(grad_out, weight.flip(-2, -1), None, 1, q, dilation, groups)
    out_pad = []
    for i in range(2):
        k = weight.shape[2 + i]
        full = (grad_out.shape[2 + i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (k - 1) + 1
        out_pad.append(int(input_shape[2 + i]) - full)
    if all(0 <= p < max(s, d) for p, s, d in zip(out_pad, stride, dilation)):
        return F.conv_transpose2d(grad_out, weight, None, stride, padding, tuple(out_pad), groups, dilation)
    return conv2d_input(input_shape, weight, grad_out, stride, padding, dilation, groups)


def conv_weight_grad(x, weight_shape, grad_out, stride, padding, dilation) -> torch.Tensor:
    """Weight gradient of a groups=1 conv2d for input `x` (here: the kept slice of selected channels).

    A 1x1 conv without padding is a batched matmul: sum over samples of grad_out[b] @ x[b]^T. On CPU,
    convolution_backward with a thin slice (few input channels) costs about as much as the whole
    layer's forward (it reorders the full output gradient); the matmul reads it once (10-30x faster).
    """
    kh, kw = weight_shape[2], weight_shape[3]
    st, pd = pair(stride), pair(padding)
    if (kh, kw) == (1, 1) and pd == (0, 0):
        b, cout, ho, wo = grad_out.shape
        if st != (1, 1):
            x = x[:, :, :: st[0], :: st[1]]
        x = x[:, :, :ho, :wo]
        g = grad_out.reshape(b, cout, ho * wo)
        xs = x.reshape(b, x.shape[1], ho * wo)
        return torch.bmm(g, xs.transpose(1, 2)).sum(0).view(weight_shape)
    return conv2d_weight(x, weight_shape, grad_out, stride, padding, dilation, 1)


class ChannelSparseConv2dFn(Function):
    """y = conv2d(x, weight, bias); gradients for x, bias and weight slice `w_slice` (channels `idx`).

    `weight` must already hold the values of `w_slice` at `idx` (the module writes them before the
    call); `w_slice` is the leaf the optimizer updates, so only its small gradient is allocated.
    `padding` is symmetric (ph, pw); `extra_pad` (bottom, right), if given, pads the input at its end
    as well (padding='same' with an even kernel). The kept slice is always of the unpadded input.
    `out_scale` (C' values, no gradient), if given, scales each output channel: y = conv2d(x,
    weight * out_scale[:, None, None, None], bias). That is a frozen BatchNorm folded into the conv
    (bias = its shift); the gradients are those of `weight` / `w_slice` themselves. Only the small
    `out_scale` is kept; the scaled weight is recomputed in backward (weight-sized, not activation-sized).
    """

    @staticmethod
    def forward(
        ctx, x, weight, bias, w_slice, idx, stride, padding, dilation, groups, on_saved, extra_pad=None, out_scale=None
    ):
        xp = F.pad(x, (0, extra_pad[1], 0, extra_pad[0])) if extra_pad else x
        w_eff = weight if out_scale is None else weight * out_scale.view(-1, 1, 1, 1)
        out = F.conv2d(xp, w_eff, bias, stride, padding, dilation, groups)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.x_shape = x.shape
        ctx.xp_shape = xp.shape
        ctx.extra_pad = extra_pad
        ctx.scaled = out_scale is not None
        extra = (out_scale,) if out_scale is not None else ()
        if w_slice is not None and ctx.needs_input_grad[3]:
            x_sel = x.index_select(1, idx)  # the only activation kept: the selected input channels
            if on_saved is not None:
                on_saved(x_sel)
            ctx.save_for_backward(weight, *extra, x_sel, idx)
        else:
            ctx.save_for_backward(weight, *extra)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        stride, padding, dilation, groups = ctx.conv
        saved = ctx.saved_tensors
        weight = saved[0]
        scale = saved[1] if ctx.scaled else None
        grad_x = grad_bias = grad_slice = None
        if ctx.needs_input_grad[0]:
            w_eff = weight if scale is None else weight * scale.view(-1, 1, 1, 1)
            grad_x = conv_input_grad(ctx.xp_shape, w_eff, grad_out, stride, padding, dilation, groups)
            if ctx.extra_pad:
                grad_x = grad_x[:, :, : ctx.x_shape[2], : ctx.x_shape[3]]
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.sum((0, 2, 3))
        if ctx.needs_input_grad[3]:
            x_sel, idx = saved[-2], saved[-1]
            if ctx.extra_pad:
                x_sel = F.pad(x_sel, (0, ctx.extra_pad[1], 0, ctx.extra_pad[0]))
            kh, kw = weight.shape[-2:]
            if groups == 1:
                shape = (weight.shape[0], idx.numel(), kh, kw)
                grad_slice = conv_weight_grad(x_sel, shape, grad_out, stride, padding, dilation)
                if scale is not None:
                    grad_slice.mul_(scale.view(-1, 1, 1, 1))
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
                if scale is not None:
                    grad_slice.mul_(scale.view(groups, cout_g).index_select(0, g_idx).view(idx.numel(), cout_g, 1, 1))
        return grad_x, None, grad_bias, grad_slice, None, None, None, None, None, None, None, None


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
    packed = words * 0x0102040810204080
    packed.bitwise_right_shift_(56)  # in place: one int64 temporary instead of two
    return packed.to(torch.uint8)


def _bit_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8] table: row b holds the 8 bits of byte b (little-endian) as 0/1 values of `dtype`."""
    key = (device, dtype)
    if key not in _BIT_WEIGHTS:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        _BIT_WEIGHTS[key] = bits.to(device=device, dtype=dtype)
    return _BIT_WEIGHTS[key]


def unpack_bits(packed: torch.Tensor, numel: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Inverse of pack_bits: a flat tensor of `numel` 0/1 values (bool, or `dtype`, e.g. the gradient's).

    One table lookup per byte (an embedding gather of 8-value rows): much faster than broadcasting
    bitwise_and + ne, and it yields the float 0/1 mask the backward multiplies with directly.
    """
    rows = packed.reshape(-1).to(torch.int32)
    if dtype == torch.bool:
        out = _bit_table(packed.device, torch.uint8).index_select(0, rows).view(torch.bool)
    else:
        out = F.embedding(rows, _bit_table(packed.device, dtype))
    return out.view(-1)[:numel]


# Masks are made in MASK_PIECES chunks per tensor (of at least MASK_CHUNK_MIN elements, a multiple
# of 8: a chunk starts on a byte of the packed mask), so that the temporaries of making them (the
# shifted float y - hi, two bool tensors, an int64 word per 8 elements) are a quarter of what they
# would be for the whole tensor, at three more small kernel calls per op and layer.
MASK_PIECES = 4
MASK_CHUNK_MIN = 1 << 18  # smaller tensors in one piece: a kernel call costs more than its temporaries


def _chunk(n: int) -> int:
    return max(MASK_CHUNK_MIN, -(-n // MASK_PIECES) + 7 & ~7)


def _inside(y: torch.Tensor, lo: float, hi: float | None) -> torch.Tensor:
    """Bool: lo < x < hi for y = clamp(x, lo, hi).

    inside <=> y != lo and y != hi. A float -> bool cast is a vectorised "!= 0" and far cheaper on CPU
    than a comparison; y - c == 0 exactly iff y == c (Sterbenz / gradual underflow), so the mask is
    exact, boundaries and NaN (passes, as stock) alike.
    """
    inside = (y if lo == 0 else y - lo).to(torch.bool)
    if hi is not None:
        inside &= (y - hi).to(torch.bool)
    return inside


def clamp_mask(y: torch.Tensor, lo: float, hi: float | None, bits: int) -> torch.Tensor:
    """The mask ClampMaskFn keeps: bit-packed uint8 (bits=1) or bool (bits=8), in y's logical order."""
    if bits == 1 and y.dtype == torch.float32 and native_codes.fits(y) and native_codes.available():
        return native_codes.clamp_mask(y, lo, hi)  # one compiled pass, the same bits
    if not y.is_contiguous():  # rare (e.g. channels_last): one whole-tensor pass, in logical order
        inside = _inside(y, lo, hi).reshape(-1)
        return pack_bits(inside) if bits == 1 else inside
    flat = y.view(-1)
    n = flat.numel()
    if bits == 8 and lo == 0 and hi is None:
        return flat.to(torch.bool)  # ReLU: the cast is the mask, no temporary
    chunk = _chunk(n)
    if chunk >= n:  # one piece
        inside = _inside(flat, lo, hi)
        return pack_bits(inside) if bits == 1 else inside
    out = torch.empty((n + 7) // 8 if bits == 1 else n, dtype=torch.uint8 if bits == 1 else torch.bool, device=y.device)
    for start in range(0, n, chunk):
        inside = _inside(flat[start : start + chunk], lo, hi)
        if bits == 1:
            packed = pack_bits(inside)
            out[start // 8 : start // 8 + packed.numel()] = packed
        else:
            out[start : start + inside.numel()] = inside
    return out


def masked_grad(mask: torch.Tensor, grad_out: torch.Tensor, bits: int) -> torch.Tensor:
    """grad_out where the mask is set, else 0 (flat, grad_out's dtype).

    One table lookup per mask byte yields a fresh float 0/1 tensor that takes the product in place:
    it is the input gradient's own buffer (which backward allocates anyway), so unpacking costs no
    activation-sized temporary (only the int32 byte indices, 1/8 of it). Unchunked: chunks would only
    add kernel calls here.
    """
    g = grad_out.contiguous().view(-1)
    if bits == 1 and g.dtype == torch.float32 and native_codes.fits(g, mask) and native_codes.available():
        return native_codes.mask_mul(mask, g)  # one compiled pass, the same products
    m = unpack_bits(mask, g.numel(), g.dtype) if bits == 1 else mask.view(torch.uint8).to(g.dtype)
    return m.mul_(g)  # same-dtype in-place multiply: no mixed bool * float kernel, no extra allocation


class ClampMaskFn(Function):
    """y = clamp(x, lo, hi) (ReLU: lo=0, hi=None); backward passes grad where lo < x < hi.

    Keeps a mask of 1 bit per element (`bits=1`) or 1 byte (`bits=8`) instead of a float tensor.
    """

    @staticmethod
    def forward(ctx, x, lo, hi, bits):
        y = torch.clamp(x, lo, hi)
        ctx.shape = x.shape
        ctx.save_for_backward(clamp_mask(y, lo, hi, bits))
        ctx.bits = bits
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        return masked_grad(mask, grad_out, ctx.bits).view(ctx.shape), None, None, None


class ClampMaskInplaceFn(ClampMaskFn):
    """ClampMaskFn in place (nn.ReLU(inplace=True) and kin): clamps `x` itself and returns it, as stock.

    The mask is that of clamp(x) == clamp(clamp(x)), so it is made from the clamped x itself (no
    activation-sized copy). The backward is ClampMaskFn's.
    """

    @staticmethod
    def forward(ctx, x, lo, hi, bits):
        x.clamp_(lo, hi)
        ctx.shape, ctx.bits = x.shape, bits
        ctx.save_for_backward(clamp_mask(x, lo, hi, bits))  # from the clamped x itself: no output copy
        ctx.mark_dirty(x)
        return x


class DropoutMaskFn(Function):
    """Train-mode dropout keeping its mask as 1 bit per element (stock CPU dropout keeps a float mask).

    The same draws as stock CPU dropout (bernoulli_(1 - p) on an input-shaped tensor, scaled by
    1 / (1 - p)), so that a seeded run drops the same elements; `inplace` writes into `x` as stock.
    """

    @staticmethod
    def forward(ctx, x, p, inplace):
        noise = torch.empty_like(x).bernoulli_(1 - p)
        keep = noise.to(torch.bool)
        noise.div_(1 - p)
        if inplace:
            y = x.mul_(noise)
            ctx.mark_dirty(x)
        else:
            y = x * noise
        ctx.shape, ctx.p = x.shape, p
        ctx.save_for_backward(pack_bits(keep))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        (packed,) = ctx.saved_tensors
        noise = unpack_bits(packed, grad_out.numel(), grad_out.dtype).view(ctx.shape)
        return noise.div_(1 - ctx.p).mul_(grad_out), None, None


# ---------------------------------------------------------------------------------------------
# Pooling that keeps no float activation
# ---------------------------------------------------------------------------------------------


class MaxPool2dArgmaxFn(Function):
    """max_pool2d keeping, per output element, the argmax position inside its window as one uint8.

    Stock max pooling keeps its whole float input plus int64 indices (for 2x2 windows: 6 bytes per
    input element); this keeps 1 byte per output element and rebuilds the indices in backward.
    Needs kernel area <= 256. Arguments are int pairs.
    """

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        out, idx = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
        h_in, w_in = x.shape[-2:]
        ho, wo = out.shape[-2:]
        origin_h, origin_w = _window_origins(ho, wo, stride, padding, x.device)
        dh = torch.div(torch.div(idx, w_in, rounding_mode="floor") - origin_h, dilation[0], rounding_mode="floor")
        dw = torch.div(idx % w_in - origin_w, dilation[1], rounding_mode="floor")
        pos = (dh * kernel_size[1] + dw).to(torch.uint8)
        del idx, dh, dw
        ctx.save_for_backward(pos)
        ctx.geom = (x.shape, kernel_size, stride, padding, dilation)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (pos,) = ctx.saved_tensors
        x_shape, kernel_size, stride, padding, dilation = ctx.geom
        h_in, w_in = x_shape[-2:]
        ho, wo = grad_out.shape[-2:]
        origin_h, origin_w = _window_origins(ho, wo, stride, padding, grad_out.device)
        pos = pos.long()
        rows = origin_h + torch.div(pos, kernel_size[1], rounding_mode="floor") * dilation[0]
        cols = origin_w + (pos % kernel_size[1]) * dilation[1]
        flat = (rows * w_in + cols).reshape(-1, ho * wo)
        grad_x = grad_out.new_zeros(flat.shape[0], h_in * w_in)
        grad_x.scatter_add_(1, flat, grad_out.reshape(-1, ho * wo))
        return grad_x.view(x_shape), None, None, None, None, None


def _window_origins(ho: int, wo: int, stride, padding, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-left input coordinates of every pooling window, shapes [ho, 1] and [1, wo]."""
    origin_h = torch.arange(ho, device=device).view(ho, 1) * stride[0] - padding[0]
    origin_w = torch.arange(wo, device=device).view(1, wo) * stride[1] - padding[1]
    return origin_h, origin_w


class AvgPool2dFn(Function):
    """avg_pool2d that keeps nothing for backward (stock keeps its input, only for its shape)."""

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        ctx.args = (x.shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        return F.avg_pool2d(x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)

    @staticmethod
    def backward(ctx, grad_out):
        x_shape, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override = ctx.args
        shape_only = grad_out.new_empty(1).expand(x_shape)  # the kernel reads only the input's sizes
        grad_x = torch.ops.aten.avg_pool2d_backward(
            grad_out.contiguous(), shape_only, kernel_size, stride, padding, ceil_mode, count_include_pad,
            divisor_override,
        )  # fmt: skip
        return grad_x, None, None, None, None, None, None
