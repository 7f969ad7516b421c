"""Reading dataset files: IDX (Fashion-MNIST; gzipped or not, detected by the magic), CIFAR binary
batches, and single images (Pillow, resized and centre-cropped square). Every malformed file is a
one-line TradyError naming the file and what was expected."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from trady.core.errors import TradyError


def read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping it (detected by the gzip magic, not the name)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError as exc:
        raise TradyError(f"missing file {path}") from exc
    except OSError as exc:
        raise TradyError(f"cannot read {path}: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise TradyError(f"corrupt gzip file {path}: {exc} (expected a complete gzip stream)") from exc
    return raw


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or not) into a uint8 array."""
    path = Path(path)
    raw = read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise TradyError(
            f"bad IDX magic in {path}: got {raw[:4].hex() or 'an empty file'} "
            f"(expected 000008NN: unsigned-byte IDX with NN dimensions)"
        )
    nd = raw[3]
    if ndim is not None and nd != ndim:
        raise TradyError(f"{path} has {nd} IDX dimensions (expected {ndim})")
    header = 4 + 4 * nd
    if len(raw) < header:
        raise TradyError(f"truncated IDX header in {path}: {len(raw)} bytes (expected at least {header})")
    dims = struct.unpack(f">{nd}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise TradyError(f"bad IDX size of {path}: {len(raw)} bytes (expected {expected} for shape {list(dims)})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_cifar_binary(
    path: str | os.PathLike, label_bytes: int = 1, label_index: int = 0, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR binary batch: records of `label_bytes` label bytes then 3072 bytes of
    32x32 R, G, B planes. Returns (uint8 images [N, 3, 32, 32], int64 labels [N]) using the
    label byte at `label_index` (CIFAR-100: 0 coarse, 1 fine)."""
    path = Path(path)
    raw = read_bytes(path)
    record = label_bytes + 3 * 32 * 32
    if len(raw) == 0 or len(raw) % record:
        raise TradyError(
            f"truncated CIFAR file {path}: {len(raw)} bytes (expected a positive multiple of the "
            f"{record}-byte record: {label_bytes} label byte(s) + 3072 pixel bytes)"
        )
    data = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels = data[:, label_index].astype(np.int64)
    if labels.size and labels.max() >= num_classes:
        raise TradyError(
            f"bad label {int(labels.max())} in {path} (expected labels 0..{num_classes - 1}; "
            f"is this the right CIFAR version?)"
        )
    images = data[:, label_bytes:].reshape(-1, 3, 32, 32).copy()
    return images, labels


def load_image(path: str | os.PathLike, load_size: int) -> torch.Tensor:
    """Read an image with Pillow as RGB, resize its smaller side to `load_size` (keeping the
    aspect ratio) and centre-crop it square: uint8 [3, load_size, load_size]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (load_size, load_size))  # JPEG: decode at a reduced scale, >= load_size
            im = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise TradyError(f"cannot read image {path}: {exc} (expected an image file that Pillow can open)") from exc
    w, h = im.size
    scale = load_size / min(w, h)
    nw, nh = max(load_size, round(w * scale)), max(load_size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - load_size) // 2, (nh - load_size) // 2
    if (nw, nh) != (load_size, load_size):
        im = im.crop((left, top, left + load_size, top + load_size))
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()
