"""The engine's autograd Functions against stock autograd (gradcheck in float64, direct comparison)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from helpers import fp32_sum_tolerance
from trady.engine import functions

# ---------------------------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------------------------


def _reference_pack(mask: torch.Tensor) -> np.ndarray:
    return np.packbits(mask.reshape(-1).numpy().astype(np.uint8), bitorder="little")


@pytest.mark.parametrize("n", list(range(18)) + [63, 64, 65, 1000, 100_003])
def test_pack_unpack_round_trip(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) > 0.5
    packed = functions.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 8)
    assert np.array_equal(packed.numpy(), _reference_pack(mask))  # element i -> bit i % 8 of byte i // 8
    out = functions.unpack_bits(packed, n)
    assert out.dtype == torch.bool and torch.equal(out, mask)


@pytest.mark.parametrize("fill", [True, False])
def test_pack_all_ones_and_zeros(fill: bool) -> None:
    mask = torch.full((3, 5, 7), fill)  # 105 elements: the top bit of a byte, the padded last byte
    packed = functions.pack_bits(mask)
    assert packed.numel() == 14
    assert torch.equal(functions.unpack_bits(packed, mask.numel()).view(mask.shape), mask)
    if fill:
        assert packed[:-1].eq(255).all() and int(packed[-1]) == 0b1


def test_pack_multi_dim_and_non_contiguous() -> None:
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(4, 3, 9, 5, generator=g) > 0.3
    t = mask.transpose(1, 3)  # non-contiguous input packs in its logical order
    packed = functions.pack_bits(t)
    assert torch.equal(functions.unpack_bits(packed, t.numel()).view(t.shape), t)


# ---------------------------------------------------------------------------------------------
# Channel-sparse conv
# ---------------------------------------------------------------------------------------------

# (cin, cout, kernel, stride, padding, dilation, groups, extra_pad, idx)
CONVS = {
    "3x3": (4, 5, 3, 1, 1, 1, 1, None, [0, 2]),
    "stride2": (4, 5, 3, 2, 1, 1, 1, None, [1, 3]),
    "dilation2": (4, 3, 3, 1, 2, 2, 1, None, [0, 1, 3]),
    "rect": (4, 3, (1, 3), (2, 1), (0, 1), 1, 1, None, [2]),
    "grouped4": (8, 8, 3, 1, 1, 1, 4, None, [0, 1, 5, 6]),
    "depthwise": (4, 4, 3, 2, 1, 1, 4, None, [1, 2]),
    "depthwise_mult2": (4, 8, 3, 1, 1, 1, 4, None, [0, 3]),
    "1x1": (4, 6, 1, 1, 0, 1, 1, None, [0, 1, 2, 3]),
    "same_even": (4, 3, 4, 1, 1, 1, 1, (1, 1), [1, 3]),
    "same_even_dw": (4, 4, 2, 1, 0, 1, 4, (1, 1), [0, 2]),
}


def _conv_setup(cfg, dtype, seed=0):
    cin, cout, k, stride, padding, dilation, groups, extra, idx = cfg
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(2, cin, 7, 6, generator=g, dtype=dtype)
    w = torch.randn(cout, cin // groups, kh, kw, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype)
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    return x, w, b, torch.tensor(idx), (pair(stride), pair(padding), pair(dilation), groups, extra)


def _conv_sparse(x, w_base, b, w_slice, idx, conv, on_saved=None):
    """The engine's contract: the full weight holds the slice values, the slice is the trained leaf."""
    stride, padding, dilation, groups, extra = conv
    w = w_base.detach().clone()
    functions.scatter_slice_(w, idx, w_slice.detach(), groups)
    fn = functions.ChannelSparseConv2dFn
    return fn.apply(x, w, b, w_slice, idx, stride, padding, dilation, groups, on_saved, extra)


def _conv_stock(x, w, b, conv):
    stride, padding, dilation, groups, extra = conv
    if extra:
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    return F.conv2d(x, w, b, stride, padding, dilation, groups)


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_gradcheck(name: str) -> None:
    x, w, b, idx, conv = _conv_setup(CONVS[name], torch.float64)
    w_slice = functions.gather_slice(w, idx, conv[3]).clone()
    x.requires_grad_(True)
    b.requires_grad_(True)
    w_slice.requires_grad_(True)
    assert gradcheck(lambda x, b, s: _conv_sparse(x, w, b, s, idx, conv), (x, b, w_slice), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("name", list(CONVS))
def test_conv_matches_stock_autograd(name: str) -> None:
    x, w, b, idx, conv = _conv_setup(CONVS[name], torch.float32, seed=1)
    groups = conv[3]
    # stock: everything trainable
    xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out_s = _conv_stock(xs, ws, b, conv)
    gout = torch.randn_like(out_s)
    out_s.backward(gout)
    # sparse: only the slice and the input
    xe = x.clone().requires_grad_(True)
    w_slice = functions.gather_slice(w, idx, groups).clone().requires_grad_(True)
    kept = []
    out_e = _conv_sparse(xe, w, b, w_slice, idx, conv, on_saved=kept.append)
    torch.testing.assert_close(out_e, out_s.detach())
    out_e.backward(gout)
    # fp32 sums in another order: the input gradient adds out-channels x kernel taps (<= 8 x 9 terms), the
    # weight gradient batch x output positions (2 x 7 x 6 = 84)
    torch.testing.assert_close(xe.grad, xs.grad, **fp32_sum_tolerance(xs.grad, 8 * 9))
    expected = functions.gather_slice(ws.grad, idx, groups)
    torch.testing.assert_close(w_slice.grad, expected, **fp32_sum_tolerance(expected, 2 * 7 * 6))
    # the kept activation: the unpadded input at the selected channels
    assert len(kept) == 1 and torch.equal(kept[0], x[:, idx])


def test_conv_frozen_keeps_only_weight_and_no_slice_gradient() -> None:
    x, w, b, _, conv = _conv_setup(CONVS["stride2"], torch.float32)
    x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = functions.ChannelSparseConv2dFn.apply(x, w, b, None, None, *conv[:4], None, None)
    assert len(saved) == 1 and saved[0].untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
    out.sum().backward()
    xs = x.detach().clone().requires_grad_(True)
    F.conv2d(xs, w, b, *conv[:4]).sum().backward()
    torch.testing.assert_close(x.grad, xs.grad)


def test_gather_scatter_and_channel_norms() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 2, 3, 3, generator=g)  # groups=4: channel c in group c // 2
    idx = torch.tensor([1, 4, 7])
    sl = functions.gather_slice(w, idx, 4)
    assert sl.shape == (3, 2, 3, 3)
    assert torch.equal(sl[0], w[0:2, 1]) and torch.equal(sl[1], w[4:6, 0]) and torch.equal(sl[2], w[6:8, 1])
    w2 = w.clone()
    functions.scatter_slice_(w2, idx, torch.zeros_like(sl), 4)
    assert w2[0:2, 1].eq(0).all() and w2[6:8, 1].eq(0).all() and torch.equal(w2[2:4], w[2:4])
    norms = functions.slice_channel_norms(sl, 4)
    torch.testing.assert_close(norms, torch.stack([w[0:2, 1].norm(), w[4:6, 0].norm(), w[6:8, 1].norm()]))
    w1 = torch.randn(5, 4, 3, 3, generator=g)
    sl1 = functions.gather_slice(w1, torch.tensor([1, 3]), 1)
    assert torch.equal(sl1, w1[:, [1, 3]])
    torch.testing.assert_close(functions.slice_channel_norms(sl1, 1), torch.stack([w1[:, 1].norm(), w1[:, 3].norm()]))
    lin = torch.randn(3, 6, generator=g)
    torch.testing.assert_close(
        functions.slice_channel_norms(functions.gather_slice(lin, idx[:2], 1), 1), lin[:, [1, 4]].norm(dim=0)
    )


# ---------------------------------------------------------------------------------------------
# Channel-sparse linear
# ---------------------------------------------------------------------------------------------


def _linear_sparse(x, w_base, b, w_slice, idx, on_saved=None):
    w = w_base.detach().clone()
    w[:, idx] = w_slice.detach()
    return functions.ChannelSparseLinearFn.apply(x, w, b, w_slice, idx, on_saved)


@pytest.mark.parametrize("shape", [(3, 6), (2, 4, 6), (2, 3, 2, 6)])
def test_linear_gradcheck_and_stock(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    idx = torch.tensor([0, 2, 5])
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, generator=g, dtype=torch.float64)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    s = w[:, idx].clone().requires_grad_(True)
    assert gradcheck(lambda x, b, s: _linear_sparse(x, w, b, s, idx), (x, b, s), eps=1e-6, atol=1e-5)

    xf, wf = x.detach().float(), w.float()
    xs, ws = xf.clone().requires_grad_(True), wf.clone().requires_grad_(True)
    out_s = F.linear(xs, ws)
    gout = torch.randn_like(out_s)
    out_s.backward(gout)
    xe, se = xf.clone().requires_grad_(True), wf[:, idx].clone().requires_grad_(True)
    kept = []
    out_e = _linear_sparse(xe, wf, None, se, idx, on_saved=kept.append)
    torch.testing.assert_close(out_e, out_s.detach())
    out_e.backward(gout)
    torch.testing.assert_close(xe.grad, xs.grad)
    n_terms = xf[..., 0].numel()  # the weight gradient sums over every leading position of the input
    torch.testing.assert_close(se.grad, ws.grad[:, idx], **fp32_sum_tolerance(ws.grad[:, idx], n_terms))
    assert torch.equal(kept[0], xf[..., idx])


# ---------------------------------------------------------------------------------------------
# Frozen affine (BatchNorm) and masked clamp (ReLU family)
# ---------------------------------------------------------------------------------------------


def test_frozen_affine_gradcheck_and_saved() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    shift = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x, sh: functions.FrozenAffineFn.apply(x, scale, sh), (x, shift), eps=1e-6, atol=1e-5)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = functions.FrozenAffineFn.apply(x, scale, shift)
    torch.testing.assert_close(y, x * scale.view(1, 3, 1, 1) + shift.view(1, 3, 1, 1))
    assert len(saved) == 1 and saved[0].shape == (3,)  # only the per-channel scale


CLAMPS = {"relu": (0.0, None, F.relu), "relu6": (0.0, 6.0, F.relu6), "hardtanh": (-1.0, 2.0, F.hardtanh)}


def _hardtanh(x):
    return F.hardtanh(x, -1.0, 2.0)


@pytest.mark.parametrize("bits", [1, 8])
@pytest.mark.parametrize("kind", list(CLAMPS))
def test_clamp_mask(kind: str, bits: int) -> None:
    lo, hi, stock = CLAMPS[kind]
    stock = _hardtanh if kind == "hardtanh" else stock
    g = torch.Generator().manual_seed(0)
    # away from the kinks for gradcheck
    x = torch.randn(2, 3, 5, 3, generator=g, dtype=torch.float64) * 4
    for edge in (lo, hi):
        if edge is not None:
            x = torch.where((x - edge).abs() < 0.05, x + 0.1, x)
    x.requires_grad_(True)
    assert gradcheck(lambda t: functions.ClampMaskFn.apply(t, lo, hi, bits), (x,), eps=1e-6, atol=1e-5)

    # direct comparison, exact boundary values included (stock: no gradient at the boundary)
    xf = torch.cat([x.detach().float().flatten(), torch.tensor([lo, hi if hi is not None else 7.0, 0.0])])
    xs, xe = xf.clone().requires_grad_(True), xf.clone().requires_grad_(True)
    gout = torch.randn(xf.shape, generator=g)
    out_s = stock(xs)
    out_s.backward(gout)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out_e = functions.ClampMaskFn.apply(xe, lo, hi, bits)
    out_e.backward(gout)
    assert torch.equal(out_e, out_s)
    assert torch.equal(xe.grad, xs.grad)
    (mask,) = saved
    n = xf.numel()
    if bits == 1:
        assert mask.dtype == torch.uint8 and mask.numel() == math.ceil(n / 8)
    else:
        assert mask.dtype == torch.bool and mask.numel() == n


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------

# (kernel, stride, padding, dilation, ceil_mode)
POOLS = {
    "2x2": ((2, 2), (2, 2), (0, 0), (1, 1), False),
    "3x3s2p1": ((3, 3), (2, 2), (1, 1), (1, 1), False),
    "3x3s2p1_ceil": ((3, 3), (2, 2), (1, 1), (1, 1), True),
    "rect_dilated": ((3, 2), (1, 2), (1, 0), (2, 1), False),
    "overlap_s1": ((3, 3), (1, 1), (1, 1), (1, 1), False),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_max_pool_argmax(name: str) -> None:
    k, s, p, d, ceil = POOLS[name]
    g = torch.Generator().manual_seed(0)
    xd = torch.randn(2, 2, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: functions.MaxPool2dArgmaxFn.apply(t, k, s, p, d, ceil), (xd,), eps=1e-6, atol=1e-5)
    x = torch.randn(2, 3, 9, 8, generator=g)
    xs, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_s = F.max_pool2d(xs, k, s, p, d, ceil)
    gout = torch.randn(out_s.shape, generator=g)
    out_s.backward(gout)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out_e = functions.MaxPool2dArgmaxFn.apply(xe, k, s, p, d, ceil)
    assert torch.equal(out_e, out_s)
    out_e.backward(gout)
    torch.testing.assert_close(xe.grad, xs.grad)
    assert [(t.dtype, t.shape) for t in saved] == [(torch.uint8, out_s.shape)]


@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("name", ["2x2", "3x3s2p1", "3x3s2p1_ceil"])
def test_avg_pool_keeps_nothing(name: str, count_include_pad: bool) -> None:
    k, s, p, _, ceil = POOLS[name]
    g = torch.Generator().manual_seed(0)
    xd = torch.randn(2, 2, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    args = (k, s, p, ceil, count_include_pad, None)
    assert gradcheck(lambda t: functions.AvgPool2dFn.apply(t, *args), (xd,), eps=1e-6, atol=1e-5)
    x = torch.randn(2, 3, 9, 8, generator=g)
    xs, xe = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_s = F.avg_pool2d(xs, *args)
    gout = torch.randn(out_s.shape, generator=g)
    out_s.backward(gout)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out_e = functions.AvgPool2dFn.apply(xe, *args)
    assert saved == []
    torch.testing.assert_close(out_e, out_s)
    out_e.backward(gout)
    torch.testing.assert_close(xe.grad, xs.grad)
