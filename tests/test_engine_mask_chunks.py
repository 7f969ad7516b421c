"""ReLU-family masks made and applied chunk by chunk give dense autograd's gradient exactly."""

from __future__ import annotations

import pytest
import torch

from trady.engine import functions


@pytest.mark.parametrize("bounds", [(0.0, None), (0.0, 6.0), (-1.0, 1.0)])
@pytest.mark.parametrize("bits", [1, 8])
@pytest.mark.parametrize("shape", [(3, 5, 7, 3), (2, 4, 8, 8), (1, 1, 1, 13)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("chunked", [True, False])
def test_chunked_masks_equal_dense_autograd(monkeypatch, bounds, bits, shape, channels_last, chunked):
    if chunked:
        monkeypatch.setattr(functions, "MASK_CHUNK_MIN", 8)  # 16 chunks of a multiple of 8, a last one partial
    lo, hi = bounds
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 4
    x.view(-1)[::5] = lo  # exact boundaries: no gradient there, as stock
    if hi is not None:
        x.view(-1)[1::7] = hi
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    grad = torch.randn(shape, generator=g)
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    out = functions.ClampMaskFn.apply(a, lo, hi, bits)
    ref = torch.nn.functional.hardtanh(b, lo, hi) if hi is not None else torch.relu(b)  # stock ReLU6 = hardtanh
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_packed_mask_is_one_bit_per_element():
    y = torch.rand(4, 3, 5, 5)
    assert functions.clamp_mask(y, 0.0, None, 1).numel() == (y.numel() + 7) // 8


@pytest.mark.parametrize("bounds", [(0.0, None), (0.0, 6.0)])
def test_in_place_chunked_masks_equal_dense_autograd(monkeypatch, bounds):
    monkeypatch.setattr(functions, "MASK_CHUNK_MIN", 8)
    lo, hi = bounds
    x = torch.randn(2, 3, 7, 5, generator=torch.Generator().manual_seed(1)) * 4
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    out = functions.ClampMaskInplaceFn.apply(a * 1.0, lo, hi, 1)  # in place on a non-leaf, as a ReLU after a conv
    ref = torch.nn.functional.hardtanh(b * 1.0, lo, hi) if hi is not None else torch.relu(b * 1.0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.backward(grad)
    ref.backward(grad)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
