"""Few-bit activations' fast paths give the reference paths' bits (issue 22).

The compiled loops (trady.engine.native_codes: quantise + pack, decode + multiply), the folded pack and
the word-gather decode (trady.engine.packed_codes) are checked against the one-position-at-a-time
pack, the compare-per-border quantiser and the row-gather decode, bit for bit, on values that sit on,
next to and between borders, NaN and infinities, sizes that are not whole bytes or whole chunks.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from trady.engine import activations as A
from trady.engine import native_codes, packed_codes

HAS_CC = shutil.which("cc") is not None or shutil.which("gcc") is not None
needs_cc = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the compiled loops cannot be built here")


def _hard_values(borders: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    spread = torch.randn(n, generator=g) * 0.6 + 0.5
    on = torch.cat([borders, torch.nextafter(borders, borders + 1), torch.nextafter(borders, borders - 1)])
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -1e9, 1e9, 0.0, -0.0])
    return torch.cat([on, special, spread])[torch.randperm(n + on.numel() + 7, generator=g)]


def _reference_packed(d: torch.Tensor, borders: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    return packed_codes.pack_code_reference(packed_codes.code_of(d, borders), bits)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_folded_pack_is_the_reference_pack(bits) -> None:
    g = torch.Generator().manual_seed(bits)
    for n in (8, 1003, 4099):  # whole bytes and a partial last byte
        code = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
        fast, ref = packed_codes.pack_code(code, bits), packed_codes.pack_code_reference(code, bits)
        assert len(fast) == len(ref) and all(torch.equal(a, b) for a, b in zip(fast, ref))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_word_gather_decode_is_the_row_gather(bits) -> None:
    g = torch.Generator().manual_seed(10 + bits)
    code = torch.randint(0, 2**bits, (1003,), generator=g, dtype=torch.uint8)
    levels = torch.randn(2**bits, generator=g)
    packed = packed_codes.pack_code_reference(code, bits)
    assert torch.equal(packed_codes.code_levels(packed, bits, levels, code.numel()), levels[code.long()])


@needs_cc
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_compiled_quantise_and_pack_are_the_reference(bits, monkeypatch) -> None:
    assert native_codes.available()
    monkeypatch.setattr(native_codes, "CHUNK_VALUES", 4096)  # several chunks, the last one partial
    borders, _, _ = A._table_tensors(A.SILU, bits, torch.device("cpu"), torch.float32)
    for n in (5, 4096 * 3 + 13):
        d = _hard_values(borders, n, seed=bits)
        fast = native_codes.code_pack_of(lambda v: v, d, borders, bits)
        ref = _reference_packed(d, borders, bits)
        assert len(fast) == len(ref) and all(torch.equal(a, b) for a, b in zip(fast, ref)), (bits, d.numel())


@needs_cc
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_compiled_decode_is_level_times_gradient(bits) -> None:
    assert native_codes.available()
    g = torch.Generator().manual_seed(20 + bits)
    for n in (7, 16 * 200 + 9):  # the 16-wide vector loop and its scalar tail
        code = torch.randint(0, 2**bits, (n,), generator=g, dtype=torch.uint8)
        levels, grad = torch.randn(2**bits, generator=g), torch.randn(n, generator=g)
        packed = packed_codes.pack_code_reference(code, bits)
        expected = packed_codes.code_levels(packed, bits, levels, n).mul_(grad)
        assert torch.equal(native_codes.decode_mul(packed, bits, levels, grad), expected)


@pytest.mark.parametrize("kind", [A.SILU, A.GELU, A.GELU_TANH, A.HARDSWISH, A.MISH], ids=lambda k: k.key)
def test_coded_derivative_is_stock_autograds(kind) -> None:
    x = torch.randn(4, 8, 33, generator=torch.Generator().manual_seed(5)) * 3
    xr = x.clone().requires_grad_(True)
    kind.forward(xr).backward(torch.ones_like(x))
    assert torch.equal(kind.derivative_to_code(x), xr.grad)  # the very kernel stock's backward runs


@needs_cc
@pytest.mark.parametrize("kind", [A.SILU, A.GELU, A.HARDSWISH], ids=lambda k: k.key)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_few_bit_gradient_is_the_same_with_and_without_compiled_loops(kind, bits, monkeypatch) -> None:
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 7, 11, generator=g)
    grad = torch.randn(x.shape, generator=g)
    results = []
    for native in ("1", "0"):
        monkeypatch.setenv("TRADY_NATIVE_CODES", native)
        xr = x.clone().requires_grad_(True)
        y = A.few_bit(xr, kind, bits)
        y.backward(grad)
        results.append((y.detach(), xr.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][0], kind.forward(x))
    assert torch.equal(results[0][1], results[1][1])
    assert not torch.equal(results[0][1], grad * kind.derivative_to_code(x))  # few bits, not exact


def test_switched_off_means_unavailable(monkeypatch) -> None:
    monkeypatch.setenv("TRADY_NATIVE_CODES", "0")
    assert not native_codes.available()
    x = torch.randn(10, requires_grad=True)
    assert torch.equal(A.few_bit(x, A.SILU, 4), F.silu(x.detach()))  # the PyTorch paths run


def _relu_values(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, generator=g) * 4
    special = torch.tensor([0.0, -0.0, 6.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-40, -1e-40,
                            torch.nextafter(torch.tensor(6.0), torch.tensor(7.0)).item()])  # fmt: skip
    y[: special.numel()] = special
    return y[torch.randperm(n, generator=g)]


@needs_cc
@pytest.mark.parametrize(("lo", "hi"), [(0.0, None), (0.0, 6.0), (-1.0, 1.0)])
@pytest.mark.parametrize("flush", [False, True])
def test_compiled_clamp_mask_and_its_backward_are_the_pytorch_paths(lo, hi, flush, monkeypatch) -> None:
    from trady.engine import functions

    assert native_codes.available()
    torch.set_flush_denormal(flush)  # the engine bench flushes denormals: the same bits either way
    try:
        for n in (13, 4096 + 5):  # the 16-wide loop and the scalar tail
            y = torch.clamp(_relu_values(n, seed=n), lo, hi)
            grad = _relu_values(n, seed=n + 1)
            fast_mask = functions.clamp_mask(y, lo, hi, 1)
            fast_grad = functions.masked_grad(fast_mask, grad, 1)
            monkeypatch.setenv("TRADY_NATIVE_CODES", "0")
            ref_mask = functions.clamp_mask(y, lo, hi, 1)
            ref_grad = functions.masked_grad(ref_mask, grad, 1)
            monkeypatch.delenv("TRADY_NATIVE_CODES")
            assert torch.equal(fast_mask, ref_mask), (lo, hi, n)
            # bit for bit, -0.0 and NaN included
            assert torch.equal(fast_grad.view(torch.int32), ref_grad.view(torch.int32)), (lo, hi, n)
    finally:
        torch.set_flush_denormal(False)
