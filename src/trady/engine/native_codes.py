"""Compiled loops for few-bit codes (quantise + pack, decode + multiply) and ReLU masks (clamp mask,
mask times gradient), one pass each.

A few lines of C (below) built once per machine with the system's C compiler (`cc -O3 -march=native`)
into a cache folder ($TRADY_CACHE_DIR, else ~/.cache/trady) and called through ctypes on float32
contiguous CPU tensors. They give the same bits as the PyTorch paths of `trady.engine.packed_codes`
(tests/test_activation_speed.py): a code is the number of borders strictly below the value (NaN: 0),
packed low bits first, padded with zero codes to whole bytes; a decoded gradient is level * gradient,
one float32 multiply, as the PyTorch path computes it. Without a compiler (or TRADY_NATIVE_CODES=0)
`available()` is False and callers keep the PyTorch paths. Single-threaded, as the PyTorch paths are
per call at 1 thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#define CHUNK 4096
/* c[i] = number of borders strictly below d[i] (NaN: 0); the trip count is a constant per case so
   the compiler vectorises over i. */
#define COUNT(NB) for (int64_t i = 0; i < m; ++i) { uint8_t x = 0; \
    for (int j = 0; j < NB; ++j) x += d[i] > bb[j]; c[i] = x; } break;
static void count_below(const float* restrict d, int64_t m, const float* b, int nb, uint8_t* restrict c) {
  float bb[15];
  for (int j = 0; j < nb; ++j) bb[j] = b[j];
  switch (nb) {
    case 1: COUNT(1)
    case 3: COUNT(3)
    case 7: COUNT(7)
    default: COUNT(15)
  }
}
/* codes of d (n values) against nb (1, 3, 7, 15) sorted borders, packed into bytes of 8/w codes of w
   bits, low bits first, zero codes past n; bits 3: a 2-bit array (out0) and a 1-bit array (out1). */
void trady_code_pack(const float* d, int64_t n, const float* b, int nb, int bits, uint8_t* out0, uint8_t* out1) {
  uint8_t c[CHUNK];
  for (int64_t start = 0; start < n; start += CHUNK) {
    int64_t m = n - start < CHUNK ? n - start : CHUNK;
    count_below(d + start, m, b, nb, c);
    int64_t mm = (m + 7) / 8 * 8;
    if (mm > m) memset(c + m, 0, (size_t)(mm - m));
    int64_t k0 = start / 8, bytes = mm / 8;
    if (bits == 4) {
      for (int64_t k = 0; k < 4 * bytes; ++k) out0[4 * k0 + k] = (uint8_t)(c[2 * k] | (c[2 * k + 1] << 4));
    } else if (bits == 2 || bits == 3) {
      for (int64_t k = 0; k < 2 * bytes; ++k)
        out0[2 * k0 + k] = (uint8_t)((c[4 * k] & 3) | ((c[4 * k + 1] & 3) << 2)
                                     | ((c[4 * k + 2] & 3) << 4) | ((c[4 * k + 3] & 3) << 6));
      if (bits == 3)
        for (int64_t k = 0; k < bytes; ++k) {
          uint8_t h = 0;
          for (int j = 0; j < 8; ++j) h |= (uint8_t)((c[8 * k + j] >> 2) << j);
          out1[k0 + k] = h;
        }
    } else {
      for (int64_t k = 0; k < bytes; ++k) {
        uint8_t h = 0;
        for (int j = 0; j < 8; ++j) h |= (uint8_t)(c[8 * k + j] << j);
        out0[k0 + k] = h;
      }
    }
  }
}
/* out[i] = levels[code i] * g[i] for the n codes packed as above. */
void trady_decode_mul(const uint8_t* p0, const uint8_t* p1, int bits, const float* levels,
                      const float* restrict g, float* restrict out, int64_t n) {
  float L[16];
  for (int j = 0; j < (1 << bits); ++j) L[j] = levels[j];
  if (bits == 4) {
    int64_t i = 0;
#ifdef __AVX512F__
    /* 16 codes from 8 bytes, their levels by one permute of the 16-level register */
    __m512 lv = _mm512_loadu_ps(L);
    const __m128i low4 = _mm_set1_epi8(15);
    for (; i + 16 <= n; i += 16) {
      __m128i bytes = _mm_loadl_epi64((const __m128i*)(p0 + (i >> 1)));
      __m128i codes = _mm_unpacklo_epi8(_mm_and_si128(bytes, low4), _mm_and_si128(_mm_srli_epi16(bytes, 4), low4));
      __m512 level = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(codes), lv);
      _mm512_storeu_ps(out + i, _mm512_mul_ps(level, _mm512_loadu_ps(g + i)));
    }
#endif
    for (; i < n; ++i) out[i] = L[(p0[i >> 1] >> ((i & 1) * 4)) & 15] * g[i];
  } else if (bits == 2) {
    for (int64_t i = 0; i < n; ++i) out[i] = L[(p0[i >> 2] >> ((i & 3) * 2)) & 3] * g[i];
  } else if (bits == 3) {
    for (int64_t i = 0; i < n; ++i)
      out[i] = L[((p0[i >> 2] >> ((i & 3) * 2)) & 3) | (((p1[i >> 3] >> (i & 7)) & 1) << 2)] * g[i];
  } else {
    for (int64_t i = 0; i < n; ++i) out[i] = L[(p0[i >> 3] >> (i & 7)) & 1] * g[i];
  }
}
/* ReLU-family masks: bit j of byte k is element 8k+j's "lo < x < hi" for y = clamp(x, lo, hi), computed
   as trady.engine.functions._inside does: (y - lo) != 0 (y != 0 when lo is 0) and (y - hi) != 0, NaN
   passing; zero bits past n. */
void trady_clamp_mask(const float* y, int64_t n, float lo, float hi, int lo_zero, int has_hi, uint8_t* out) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi), zero = _mm512_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m512 v = _mm512_loadu_ps(y + i);
    __mmask16 m = _mm512_cmp_ps_mask(lo_zero ? v : _mm512_sub_ps(v, vlo), zero, _CMP_NEQ_UQ);
    if (has_hi) m &= _mm512_cmp_ps_mask(_mm512_sub_ps(v, vhi), zero, _CMP_NEQ_UQ);
    out[i / 8] = (uint8_t)(m & 0xFF);
    out[i / 8 + 1] = (uint8_t)(m >> 8);
  }
#endif
  for (; i < n; i += 8) {
    uint8_t b = 0;
    for (int j = 0; j < 8 && i + j < n; ++j) {
      float v = y[i + j];
      int inside = lo_zero ? (v != 0.0f) : ((v - lo) != 0.0f);
      if (has_hi) inside &= ((v - hi) != 0.0f);
      b |= (uint8_t)(inside << j);
    }
    out[i / 8] = b;
  }
}
/* out[i] = (bit i ? 1 : 0) * g[i]: the float 0/1 mask times the gradient, as masked_grad multiplies. */
void trady_mask_mul(const uint8_t* mask, const float* restrict g, float* restrict out, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= n; i += 16) {
    __mmask16 m = (__mmask16)(mask[i / 8] | (mask[i / 8 + 1] << 8));
    _mm512_storeu_ps(out + i, _mm512_mul_ps(_mm512_maskz_mov_ps(m, one), _mm512_loadu_ps(g + i)));
  }
#endif
  for (; i < n; ++i) out[i] = (float)((mask[i >> 3] >> (i & 7)) & 1) * g[i];
}
"""

_ENV = "TRADY_NATIVE_CODES"
_lock = threading.Lock()
_lib: ctypes.CDLL | None | bool = None  # False: unavailable (no compiler, build failed, switched off)


def _cache_dir() -> Path:
    return Path(os.environ.get("TRADY_CACHE_DIR") or Path.home() / ".cache" / "trady")


def _machine_key() -> str:
    # -march=native: a build is for this CPU's instruction set only
    flags = ""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        pass
    return hashlib.sha256((_SOURCE + platform.machine() + flags).encode()).hexdigest()[:16]


def _build() -> ctypes.CDLL | bool:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or platform.system() != "Linux":
        return False
    target = _cache_dir() / f"native_codes-{_machine_key()}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "codes.c"
            src.write_text(_SOURCE)
            built = Path(tmp) / "codes.so"
            cmd = [compiler, "-O3", "-march=native", "-std=c99", "-shared", "-fPIC", str(src), "-o", str(built)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=120)
            os.replace(built, target)  # atomic: a concurrent process sees the old state or the whole file
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.trady_code_pack.argtypes = [ptr, i64, ptr, ctypes.c_int, ctypes.c_int, ptr, ptr]
    lib.trady_code_pack.restype = None
    lib.trady_decode_mul.argtypes = [ptr, ptr, ctypes.c_int, ptr, ptr, ptr, i64]
    lib.trady_decode_mul.restype = None
    lib.trady_clamp_mask.argtypes = [ptr, i64, ctypes.c_float, ctypes.c_float, ctypes.c_int, ctypes.c_int, ptr]
    lib.trady_clamp_mask.restype = None
    lib.trady_mask_mul.argtypes = [ptr, ptr, ptr, i64]
    lib.trady_mask_mul.restype = None
    return lib


def available() -> bool:
    """Whether the compiled loops can run here (built on first call; False without a C compiler)."""
    global _lib
    if os.environ.get(_ENV, "1") == "0":
        return False
    if _lib is None:
        with _lock:
            if _lib is None:
                try:
                    _lib = _build()
                except (OSError, subprocess.SubprocessError) as exc:
                    warnings.warn(f"trady: compiled code loops unavailable ({exc}); PyTorch paths", stacklevel=2)
                    _lib = False
    return _lib is not False


def fits(*tensors: torch.Tensor) -> bool:
    """Plain contiguous CPU tensors with memory behind them: what the loops take (not the fake or
    functional tensors that torch.compile traces with, which have no data pointer)."""
    if torch.compiler.is_compiling():
        return False
    return all(type(t) is torch.Tensor and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


_PARTS = {1: (1,), 2: (2,), 3: (2, 1), 4: (4,)}


# Values per chunk of code_pack_of: 1 MiB of float32 derivative, reused from cache, never a full-size
# temporary (a full-size one costs a pass to memory and, freshly mapped, a page fault per 4 KiB).
CHUNK_VALUES = 1 << 18


def code_pack_of(derivative, x: torch.Tensor, borders: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """pack_code(code_of(derivative(x), borders), bits), the derivative taken chunk by chunk (x:
    float32, contiguous, CPU; `derivative` elementwise)."""
    if borders.numel() != 2**bits - 1:
        raise ValueError(f"{borders.numel()} borders for {bits} bits; accepted: 2 ** bits - 1")
    flat = x.reshape(-1)
    n = flat.numel()
    nbytes = (n + 7) // 8
    outs = tuple(torch.empty(nbytes * w, dtype=torch.uint8) for w in _PARTS[bits])
    for start in range(0, n, CHUNK_VALUES):
        d = derivative(flat[start : start + CHUNK_VALUES]).contiguous()
        ptrs = [o.data_ptr() + start * w // 8 for o, w in zip(outs, _PARTS[bits])]
        _lib.trady_code_pack(d.data_ptr(), d.numel(), borders.data_ptr(), borders.numel(), bits, ptrs[0], ptrs[-1])
    return outs


def decode_mul(packed: tuple[torch.Tensor, ...], bits: int, levels: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """code_levels(packed, bits, levels, n) * grad in one pass (float32, contiguous, CPU)."""
    out = torch.empty_like(grad)
    p1 = packed[1].data_ptr() if len(packed) > 1 else None
    n = grad.numel()
    _lib.trady_decode_mul(packed[0].data_ptr(), p1, bits, levels.data_ptr(), grad.data_ptr(), out.data_ptr(), n)
    return out


def clamp_mask(y: torch.Tensor, lo: float, hi: float | None) -> torch.Tensor:
    """trady.engine.functions.clamp_mask(y, lo, hi, bits=1) in one pass (y: float32, contiguous, CPU)."""
    n = y.numel()
    out = torch.empty((n + 7) // 8, dtype=torch.uint8)
    _lib.trady_clamp_mask(y.data_ptr(), n, float(lo), 0.0 if hi is None else float(hi), lo == 0, hi is not None,
                          out.data_ptr())  # fmt: skip
    return out


def mask_mul(mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """trady.engine.functions.masked_grad(mask, grad, bits=1) in one pass (grad: float32, contiguous, CPU)."""
    out = torch.empty(grad.numel(), dtype=grad.dtype)
    _lib.trady_mask_mul(mask.data_ptr(), grad.data_ptr(), out.data_ptr(), grad.numel())
    return out
