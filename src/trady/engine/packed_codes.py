"""b-bit codes packed into bytes (1, 2, 4 bits; 3 bits as a 2-bit and a 1-bit array), low bits first.

`code_of` quantises values by sorted borders, `pack_code` / `unpack_code` pack and unpack, and
`code_levels` decodes packed codes straight to their levels through [256, 8 / b] byte tables.
Used by the few-bit activation derivatives (`trady.engine.activations`).

These are the PyTorch paths; `trady.engine.native_codes` does quantise + pack and decode + multiply
in one compiled pass each where a C compiler exists, with the same bits. Here `pack_code` folds 8 / w
codes into a byte with shifts on a wider integer view (a few passes over 1-byte codes instead of one
per code position; `pack_code_reference` is the one-position-at-a-time original it is tested against),
and `code_levels` gathers a whole byte's levels as one 8- or 16-byte word (a 1-D index_select, several
times faster than F.embedding's row gather).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Codes are packed into whole bytes: 8 / w codes of w bits per byte, lowest code in the lowest bits
# (w = 1, 2, 4); 3 bits are a 2-bit array plus a 1-bit array. Element counts are padded to a multiple
# of 8, so `bits` bits per element is exactly bits * ceil(n / 8) bytes.
_WIDTHS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}


def code_of(d: torch.Tensor, borders: torch.Tensor) -> torch.Tensor:
    """uint8 code of each value: how many borders lie below it (torch.bucketize(d, borders), but one
    compare per border: several times faster on CPU for the 1-3 borders of 1-2 bits)."""
    code = torch.zeros(d.shape, dtype=torch.uint8, device=d.device)
    for b in borders.tolist():
        code.add_(d > b)
    return code


@dataclass(frozen=True)
class _Grid:
    """A uniform grid over the borders' range for 7-15 borders: each bin holds at most one border,
    never within a tenth of a bin of the bin's edges, so `count[bin] + (d > cut[bin])` is exactly the
    number of borders below d even where rounding puts a d next to an edge into the neighbouring bin."""

    lo: float
    inv_width: float
    bins: int
    count: torch.Tensor  # uint8 [bins]: borders below the bin's start
    cut: torch.Tensor  # [bins]: the border inside the bin, +inf where none

    def code(self, d: torch.Tensor) -> torch.Tensor:
        i = torch.sub(d, self.lo).mul_(self.inv_width).nan_to_num_(0.0).clamp_(0, self.bins - 1)
        i = i.to(torch.int32).view(-1)  # truncation: the floor of these non-negative values
        code = self.count.index_select(0, i)
        return code.add_(d.view(-1) > self.cut.index_select(0, i)).view(d.shape)


def grid_of(borders: torch.Tensor) -> _Grid | None:
    b = borders.double().tolist()
    gap = min(hi - lo for lo, hi in zip(b, b[1:]))
    for bins in (256, 320, 384, 448, 512, 640, 768, 1024):
        width = (b[-1] - b[0] + 2 * gap) / bins
        if width >= gap / 2:
            continue
        for k in range(16):  # shift the grid until every border sits well inside its bin
            lo = b[0] - gap - width * k / 16
            pos = [(v - lo) / width for v in b]
            if all(0.1 <= p - math.floor(p) <= 0.9 for p in pos):
                count = torch.zeros(bins, dtype=torch.uint8)
                cut = torch.full((bins,), math.inf, dtype=borders.dtype)
                for j, p in enumerate(pos):
                    count[int(p) + 1 :] += 1
                    cut[int(p)] = borders[j]
                return _Grid(lo, 1 / width, bins, count.to(borders.device), cut.to(borders.device))
    return None


# Folding w-bit codes held one per byte into one byte: view 8 / w bytes as one integer (little-endian),
# then `u |= u >> s` for each s moves every code next to the one below it; the low byte is the packed
# byte (the conversion to uint8 keeps the low 8 bits). Codes are < 2**w, so no fold mixes two codes.
_FOLDS = {4: (torch.int16, (4,)), 2: (torch.int32, (6, 12)), 1: (torch.int64, (7, 14, 28))}


def _fold(part: torch.Tensor, w: int) -> torch.Tensor:
    dtype, shifts = _FOLDS[w]
    u = part.view(dtype)
    for s in shifts:
        u = u | (u >> s)
    return u.to(torch.uint8)


def pack_code(code: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """uint8 codes in [0, 2**bits) -> the packed byte arrays of _WIDTHS[bits] (flat)."""
    flat = code.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if flat.dtype == torch.uint8 and flat.is_contiguous() and flat.device.type == "cpu" and _little_endian():
        out, shift = [], 0
        for w in _WIDTHS[bits]:
            part = (flat >> shift) & (2**w - 1) if shift or w < bits else flat
            out.append(_fold(part, w))
            shift += w
        return tuple(out)
    return pack_code_reference(flat, bits)


def _little_endian() -> bool:
    return sys.byteorder == "little"


def pack_code_reference(code: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """pack_code one code position at a time: the reference the folds are tested against."""
    flat = code.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    out, shift = [], 0
    for w in _WIDTHS[bits]:
        part = (flat >> shift) & (2**w - 1) if shift or w < bits else flat
        cols = part.view(-1, 8 // w)
        packed = cols[:, 0].clone()
        for j in range(1, 8 // w):
            packed |= cols[:, j] << (w * j)
        out.append(packed)
        shift += w
    return tuple(out)


def _byte_table(w: int, values: torch.Tensor) -> torch.Tensor:
    """[256, 8 / w]: row b holds values[code j of byte b] for the 8 / w codes of w bits in it."""
    byte = torch.arange(256, device=values.device).unsqueeze(1)
    codes = (byte >> (w * torch.arange(8 // w, device=values.device))) & (2**w - 1)
    return values[codes]


def unpack_code(packed: tuple[torch.Tensor, ...], bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack_code: int64 codes, flat, `numel` of them."""
    code, shift = None, 0
    for w, part in zip(_WIDTHS[bits], packed):
        table = _byte_table(w, torch.arange(2**w, device=part.device))
        c = table.index_select(0, part.to(torch.int32)).view(-1) << shift
        code = c if code is None else code | c
        shift += w
    return code[:numel]


# A byte table's row as one word: 1-D index_select copies one element per index, fast; a 2-D row
# gather (F.embedding) is several times slower per byte.
_WORDS = {8: torch.int64, 16: torch.complex128}


def code_levels(packed: tuple[torch.Tensor, ...], bits: int, levels: torch.Tensor, numel: int) -> torch.Tensor:
    """The level of every element, flat: one table lookup per byte where the code fills whole bytes."""
    if len(packed) == 1:  # w = bits: a [256, 8 / w] table of levels, one gather per byte
        table = _byte_table(bits, levels)
        word = _WORDS.get(table.shape[1] * table.element_size())
        index = packed[0].to(torch.int32)
        if word is not None and levels.device.type == "cpu":
            out = table.view(word).view(256).index_select(0, index).view(levels.dtype)
        else:
            out = F.embedding(index, table)
        return out.view(-1)[:numel]
    # 3 bits: the low 2 bits pick a level among the lower and the upper four, the high bit which one
    lo, hi = packed[0].to(torch.int32), packed[1].to(torch.int32)
    lower = F.embedding(lo, _byte_table(2, levels[:4])).view(-1)[:numel]
    upper = F.embedding(lo, _byte_table(2, levels[4:])).view(-1)[:numel]
    high = F.embedding(hi, _byte_table(1, torch.tensor([0.0, 1.0], dtype=levels.dtype, device=levels.device)))
    return torch.where(high.view(-1)[:numel] > 0, upper, lower)

