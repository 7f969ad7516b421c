"""Few-bit derivatives of smooth activations: tables, packing, error against the exact derivative."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trady.core.errors import TradyError
from trady.engine import activations as A
from trady.engine import packed_codes

KINDS = [*A.DEFAULT_KINDS, A.HARDSIGMOID, A._leaky_kind(0.01)]


def _autograd_derivative(kind: A.ActivationKind, x: torch.Tensor) -> torch.Tensor:
    xr = x.clone().requires_grad_(True)
    kind.forward(xr).sum().backward()
    return xr.grad


@pytest.mark.parametrize("kind", KINDS, ids=[k.key for k in KINDS])
def test_derivative_formula_matches_autograd(kind) -> None:
    x = torch.linspace(-6, 6, 2001, dtype=torch.float64)
    x = x[(x.abs() - 3).abs() > 1e-9]  # Hardswish/Hardsigmoid kinks: one-sided conventions differ
    # (PyTorch computes 1/6 in float32 for Hardsigmoid: 3e-8 relative)
    torch.testing.assert_close(kind.derivative(x), _autograd_derivative(kind, x), rtol=5e-8, atol=1e-12)


@pytest.mark.parametrize("bits", A.BITS_ACCEPTED)
def test_shipped_tables_are_the_fit_and_error_halves_per_bit(bits) -> None:
    for kind in A.DEFAULT_KINDS:
        shipped = A.table(kind, bits)
        fresh = A.fit_table(kind, bits)
        assert len(shipped.levels) == 2**bits and len(shipped.borders) == 2**bits - 1
        assert all(a < b for a, b in zip(shipped.levels, shipped.levels[1:]))
        torch.testing.assert_close(torch.tensor(shipped.levels), torch.tensor(fresh.levels), rtol=0, atol=1e-9)
        # Lloyd-Max on a smooth density: error about halves per added bit; 2 bits under 20 %.
        rel = shipped.rms_error / shipped.rms_derivative
        assert rel < 0.4 * 0.52 ** (bits - 1), (kind.key, bits, rel)


@pytest.mark.parametrize("kind", KINDS, ids=[k.key for k in KINDS])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_backward_is_grad_times_table_level(kind, bits) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 9, generator=g)  # odd sizes: packing pads to whole bytes
    grad = torch.randn(x.shape, generator=g)
    xr = x.clone().requires_grad_(True)
    y = A.few_bit(xr, kind, bits)
    torch.testing.assert_close(y, kind.forward(x), rtol=0, atol=0)  # exact forward
    y.backward(grad)
    t = A.table(kind, bits)
    d = kind.derivative(x.double())
    code = torch.bucketize(d, torch.tensor(t.borders, dtype=torch.float64))
    level = torch.tensor(t.levels, dtype=torch.float64)[code]
    torch.testing.assert_close(xr.grad.double(), grad.double() * level, rtol=1e-5, atol=1e-6)
    # measured error of the derivative on these N(0, 1) inputs: that of the table
    rel = float((level - d).pow(2).mean().sqrt() / d.pow(2).mean().sqrt())
    assert rel <= 1.2 * t.rms_error / t.rms_derivative + 1e-9
    if kind.two_values is not None:  # LeakyReLU, Hardsigmoid: exact with 1 bit
        torch.testing.assert_close(xr.grad, grad * _autograd_derivative(kind, x), rtol=1e-6, atol=1e-7)


def test_kept_bytes_are_bits_per_element() -> None:
    x = torch.randn(4, 8, 10, 10, requires_grad=True)
    for bits in A.BITS_ACCEPTED:
        kept: list[torch.Tensor] = []

        def pack(t, kept=kept):
            kept.append(t)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            A.few_bit(x, A.SILU, bits)
        codes = [t for t in kept if t.dtype == torch.uint8]
        assert sum(t.numel() for t in codes) == bits * math.ceil(x.numel() / 8)
        assert all(t.numel() <= 16 for t in kept if t.dtype != torch.uint8)  # the levels only


def test_pack_code_roundtrip_and_levels() -> None:
    code = torch.randint(0, 16, (1003,), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    levels = torch.linspace(-1, 2, 16)
    for bits in A.BITS_ACCEPTED:
        c = code % (2**bits)
        packed = packed_codes.pack_code(c, bits)
        assert sum(p.numel() for p in packed) == bits * 126  # ceil(1003 / 8) = 126
        assert torch.equal(packed_codes.unpack_code(packed, bits, c.numel()), c.long())
        lv = levels[: 2**bits]
        assert torch.equal(packed_codes.code_levels(packed, bits, lv, c.numel()), lv[c.long()])


@pytest.mark.parametrize("kind", [A.SILU, A.GELU, A.HARDSWISH, A.TANH], ids=lambda k: k.key)
@pytest.mark.parametrize("bits", [3, 4])
def test_grid_code_is_bucketize(kind, bits) -> None:
    borders, _, grid = A._table_tensors(kind, bits, torch.device("cpu"), torch.float32)
    assert grid is not None
    g = torch.Generator().manual_seed(3)
    edges = grid.lo + torch.arange(grid.bins, dtype=torch.float64) / grid.inv_width  # bin edges
    d = torch.cat([
        kind.derivative(torch.randn(20000, generator=g)), borders, torch.nextafter(borders, borders + 1),
        torch.nextafter(borders, borders - 1), edges.float(), torch.tensor([-1e9, 1e9, float("nan")]),
    ])  # fmt: skip
    expected = torch.bucketize(d, borders)
    expected[-1] = 0  # NaN: counted below every border, as the compares do
    assert torch.equal(grid.code(d).long(), expected)


def test_code_is_bucketize() -> None:
    d = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    borders = torch.tensor([-1.0, -0.3, 0.0, 0.2, 0.2000001, 1.5])
    d[:6] = borders  # values on a border go to the cell below it, as bucketize(right=False)
    assert torch.equal(packed_codes.code_of(d, borders).long(), torch.bucketize(d, borders))


def test_inplace_module_modifies_its_input() -> None:
    x = torch.randn(2, 6)
    base = torch.randn(2, 6, requires_grad=True)
    h = base * 1.0
    m = nn.SiLU(inplace=True)
    m.__class__ = A.FewBitSiLU
    m.trady_bits = 3
    out = m(h)
    assert out is h
    torch.testing.assert_close(h, F.silu(base.detach()))
    out.sum().backward()
    assert base.grad is not None and x.shape == base.grad.shape


def test_non_default_parameters_fit_on_first_use() -> None:
    kind = A._elu_kind(0.5)
    t = A.table(kind, 2)
    assert t.levels[-1] == pytest.approx(1.0, abs=0.05) and t.levels[0] < 0.5 * 1.0
    with pytest.raises(TradyError, match="activation_bits must be one of"):
        A.table(A.SILU, 5)


def test_fit_on_samples_and_relative_error() -> None:
    t = A.table(A.GELU, 3)
    assert A.relative_error(A.GELU, t) == pytest.approx(t.rms_error / t.rms_derivative, rel=1e-9)
    narrow = 0.4 * torch.randn(20000, generator=torch.Generator().manual_seed(0))
    own = A.fit_table(A.GELU, 3, samples=narrow)
    # a table fitted on the values themselves beats the N(0, 1) table on them
    assert own.rms_error / own.rms_derivative < A.relative_error(A.GELU, t, narrow)
