"""The TraDy paper's three MCU models, rebuilt as float PyTorch modules from their int8 files.

Files (mit-han-lab/tiny-training, algorithm/assets/mcu_models; MIT): mbv2-w0.35.pkl,
mcunet-5fps.pkl (registered as "mcunet-in1"), proxyless-w0.3.pkl. Each is a torch.save zip archive
whose pickle holds plain containers and numpy arrays only. It is read with zipfile and a restricted
unpickler that resolves exactly the globals those files use (numpy's ndarray reconstruction, numpy
dtype, _codecs.encode) and refuses everything else: unpickling can otherwise run arbitrary code.
torch.load is never called on these files. Each file's SHA-256 is checked first.

Float reconstruction (the README beside the files):
- weight = int8 weight * w_scales (per output channel); bias = int32 bias * w_scales * x_scale;
- padding (k - 1) // 2; after each conv a clamp to [(-128 - y_zero) y_scale, (127 - y_zero) y_scale]:
  nn.ReLU6 where that is [0, 6], else nn.Hardtanh(lo, hi) (ReLU6-like caps after pointwise1,
  depthwise and the first conv; the clamp after pointwise2 is the int8 output range, bounded in all
  three files, so it stays a Hardtanh; a range wider than +-1e4 would be left out as a no-op);
- a block with a `residual` entry adds its input to its output;
- input: x = (255 * image - 128 - x_zero) * x_scale, i.e. mean (128 + x_zero) / 255 and std
  1 / (255 x_scale) on [0, 1] images (all three files: x_zero = 0, x_scale = 1 / 127.5);
- global average pooling, then the 1x1 classifier conv as the nn.Linear `classifier` (its int8
  output clamp is not applied: logits stay unbounded).

The architecture itself (channels, kernels, strides, residuals, clamp ranges) is read from the file,
so even `create(name)` without pretrained weights needs it (its weights are then freshly initialised).

Module names: first_conv.conv / first_conv.act, blocks.N.{pointwise1,depthwise,pointwise2}.{conv,act},
feature_mix.* (when the file has one), classifier.
"""

from __future__ import annotations

import codecs
import importlib
import math
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from trady.core.errors import TradyError
from trady.models.base import ZooModel, init_weights
from trady.models.registry import ModelSpec, register
from trady.models.weights import verify_sha256

# Registered name: (file name, SHA-256 from the README beside the files).
MCU_FILES = {
    "mbv2-w0.35": ("mbv2-w0.35.pkl", "310d2871c50a89af9f11928e28418729984c2e402cf68560a19b6cbb75854163"),
    "mcunet-in1": ("mcunet-5fps.pkl", "4de2e06ed39041fc3609de806461a9e1d1f82f186927474bd9e9b0de756a0f00"),
    "proxyless-w0.3": ("proxyless-w0.3.pkl", "0da06d029506a36e5a5d0822493cdae11f37ba78662f9aca25ba5b3c958cf8e1"),
}
RESOLUTION = 128
# Input quantisation of first_conv, the same in all three files (checked on every build).
INPUT_X_ZERO = 0
INPUT_X_SCALE = 1 / 127.5
UNBOUNDED = 1e4  # a clamp whose range contains [-1e4, 1e4] is a no-op and is left out
SOURCE_HINT = "mit-han-lab/tiny-training, algorithm/assets/mcu_models"
ENV_VAR = "TRADY_MCU_DIR"


# ----------------------------------------------------------------------------- safe reading


def _numpy_reconstruct():
    try:  # numpy >= 2 keeps it in numpy._core; importing numpy.core there warns
        return importlib.import_module("numpy._core.multiarray")._reconstruct
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module("numpy.core.multiarray")._reconstruct


# The only globals these files reference, resolved lazily; anything else is refused.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: codecs.encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler for data-only pickles: numpy arrays, dtypes and builtin containers.

    Use as `RestrictedUnpickler(fh, source=name).load()`. Any other global (a class or function the
    pickle would call, e.g. os.system) and any persistent id raises TradyError instead of loading.
    """

    def __init__(self, file, *, source: str = "pickle"):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        resolve = _ALLOWED_GLOBALS.get((module, name))
        if resolve is None:
            raise TradyError(
                f"refusing to unpickle {self.source}: it references {module}.{name}; only numpy "
                "arrays (numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype) and "
                "_codecs.encode are allowed"
            )
        return resolve()

    def persistent_load(self, pid):
        raise TradyError(
            f"refusing to unpickle {self.source}: it holds a persistent reference ({pid!r}), "
            "which the MCU model format never uses"
        )


def read_archive(path: str | os.PathLike) -> dict:
    """The pickled object of a torch.save-style zip archive, read with RestrictedUnpickler only."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            members = [n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(members) != 1:
                raise TradyError(f"{path} is not a torch.save archive: expected one data.pkl, found {members}")
            with zf.open(members[0]) as fh:
                obj = RestrictedUnpickler(fh, source=str(path)).load()
    except TradyError:
        raise
    except (zipfile.BadZipFile, OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise TradyError(f"cannot read {path} as an MCU model archive: {err}") from err
    return obj


# ----------------------------------------------------------------------------- locating the files


def default_mcu_dir() -> Path:
    """$TRADY_MCU_DIR, else ../shared/models/mcu beside the repository (src/trady/models/ -> repo)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "models" / "mcu"


def mcu_file(name: str, mcu_dir: str | os.PathLike | None = None) -> Path:
    """The SHA-256-verified int8 file of MCU model `name`."""
    filename, digest = MCU_FILES[name]
    folder = Path(mcu_dir) if mcu_dir is not None else default_mcu_dir()
    path = folder / filename
    if not path.is_file():
        raise TradyError(
            f"MCU model file {filename} not found in {folder}; pass mcu_dir=... (CLI: --mcu-dir) or set "
            f"{ENV_VAR} to the folder holding it (the files come from {SOURCE_HINT})"
        )
    verify_sha256(path, digest)
    return path


def _require(cond: bool, path, what: str) -> None:
    if not cond:
        raise TradyError(f"{path} is not an MCU model file: {what}")


def _check_conv(desc, path, where: str) -> None:
    _require(isinstance(desc, dict), path, f"{where} is not a dict")
    for key in ("in_channel", "out_channel", "kernel_size", "stride", "groups", "params"):
        _require(key in desc, path, f"{where} lacks {key!r}")
    params = desc["params"]
    for key in ("weight", "bias", "w_scales", "x_scale", "x_zero", "y_scale", "y_zero"):
        _require(key in params, path, f"{where}.params lacks {key!r}")
    w = params["weight"]
    _require(isinstance(w, np.ndarray) and w.ndim == 4, path, f"{where} weight is not a 4-d array")
    _require(w.shape[0] == desc["out_channel"], path, f"{where} weight shape {w.shape} vs out_channel")


def read_mcu(name: str, mcu_dir: str | os.PathLike | None = None) -> dict:
    """The verified, parsed description of MCU model `name` (see the module docstring)."""
    path = mcu_file(name, mcu_dir)
    desc = read_archive(path)
    _require(isinstance(desc, dict), path, "top level is not a dict")
    for key in ("first_conv", "blocks", "feature_mix", "classifier"):
        _require(key in desc, path, f"top level lacks {key!r}")
    _check_conv(desc["first_conv"], path, "first_conv")
    _check_conv(desc["classifier"], path, "classifier")
    if desc["feature_mix"] is not None:
        _check_conv(desc["feature_mix"], path, "feature_mix")
    _require(isinstance(desc["blocks"], list), path, "blocks is not a list")
    for i, block in enumerate(desc["blocks"]):
        _require(isinstance(block, dict) and "pointwise2" in block, path, f"block {i} malformed")
        _require(block.get("se") is None, path, f"block {i} has squeeze-excitation (unsupported)")
        for key in ("pointwise1", "depthwise", "pointwise2"):
            if block.get(key) is not None:
                _check_conv(block[key], path, f"blocks[{i}].{key}")
    p = desc["first_conv"]["params"]
    if p["x_zero"] != INPUT_X_ZERO or not math.isclose(p["x_scale"], INPUT_X_SCALE, rel_tol=1e-9):
        raise TradyError(
            f"{path}: input quantisation x_zero={p['x_zero']}, x_scale={p['x_scale']} differs from the "
            f"registered normalisation (x_zero={INPUT_X_ZERO}, x_scale=1/127.5)"
        )
    return desc


# ----------------------------------------------------------------------------- float model


def _clamp_module(params) -> nn.Module | None:
    """The activation an int8 conv's output range implies (see the module docstring)."""
    y_scale, y_zero = float(params["y_scale"]), float(params["y_zero"])
    lo, hi = (-128 - y_zero) * y_scale, (127 - y_zero) * y_scale
    if lo == 0.0 and math.isclose(hi, 6.0, rel_tol=0, abs_tol=1e-9):
        return nn.ReLU6()
    if lo <= -UNBOUNDED and hi >= UNBOUNDED:
        return None
    return nn.Hardtanh(lo, hi)


def _conv_unit(desc) -> nn.Sequential:
    k = desc["kernel_size"]
    k = (k, k) if isinstance(k, int) else tuple(k)
    conv = nn.Conv2d(
        desc["in_channel"],
        desc["out_channel"],
        k,
        desc["stride"],
        ((k[0] - 1) // 2, (k[1] - 1) // 2),
        groups=desc["groups"],
        bias=True,
    )
    layers = OrderedDict(conv=conv)
    act = _clamp_module(desc["params"])
    if act is not None:
        layers["act"] = act
    return nn.Sequential(layers)


class MCUBlock(nn.Module):
    def __init__(self, desc):
        super().__init__()
        for key in ("pointwise1", "depthwise", "pointwise2"):
            if desc.get(key) is not None:
                setattr(self, key, _conv_unit(desc[key]))
        self.use_residual = desc.get("residual") is not None

    def forward(self, x):
        h = x
        for key in ("pointwise1", "depthwise", "pointwise2"):
            unit = getattr(self, key, None)
            if unit is not None:
                h = unit(h)
        return x + h if self.use_residual else h


class MCUNet(ZooModel):
    """A float model with the structure, activation ranges and (when loaded) weights of an int8 file."""

    def __init__(self, desc: dict, num_classes: int = 1000):
        super().__init__()
        self.first_conv = _conv_unit(desc["first_conv"])
        self.blocks = nn.Sequential(*[MCUBlock(b) for b in desc["blocks"]])
        if desc["feature_mix"] is not None:
            self.feature_mix = _conv_unit(desc["feature_mix"])
        else:
            self.feature_mix = None
        self.classifier = nn.Linear(desc["classifier"]["in_channel"], num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.blocks(self.first_conv(x))
        if self.feature_mix is not None:
            x = self.feature_mix(x)
        x = x.mean((2, 3))  # global average pooling; its backward keeps nothing
        return self.classifier(x)


def _float_params(params) -> tuple[torch.Tensor, torch.Tensor]:
    w_scales = np.asarray(params["w_scales"], dtype=np.float64)
    weight = np.asarray(params["weight"], dtype=np.float64) * w_scales[:, None, None, None]
    bias = np.asarray(params["bias"], dtype=np.float64) * w_scales * float(params["x_scale"])
    return torch.from_numpy(weight.astype(np.float32)), torch.from_numpy(bias.astype(np.float32))


def float_state_dict(desc: dict) -> dict[str, torch.Tensor]:
    """The de-quantised weights of a parsed MCU file, named as MCUNet's state dict."""
    out: dict[str, torch.Tensor] = {}

    def put(prefix: str, conv_desc) -> None:
        out[f"{prefix}.weight"], out[f"{prefix}.bias"] = _float_params(conv_desc["params"])

    put("first_conv.conv", desc["first_conv"])
    for i, block in enumerate(desc["blocks"]):
        for key in ("pointwise1", "depthwise", "pointwise2"):
            if block.get(key) is not None:
                put(f"blocks.{i}.{key}.conv", block[key])
    if desc["feature_mix"] is not None:
        put("feature_mix.conv", desc["feature_mix"])
    weight, bias = _float_params(desc["classifier"]["params"])
    out["classifier.weight"], out["classifier.bias"] = weight.flatten(1), bias
    return out


def _register(name: str) -> None:
    def build(num_classes: int, mcu_dir=None) -> MCUNet:
        return MCUNet(read_mcu(name, mcu_dir), num_classes)

    def pretrained(mcu_dir=None) -> dict[str, torch.Tensor]:
        return float_state_dict(read_mcu(name, mcu_dir))

    register(
        ModelSpec(
            name=name,
            resolution=RESOLUTION,
            mean=((128 + INPUT_X_ZERO) / 255,) * 3,
            std=(1 / (255 * INPUT_X_SCALE),) * 3,
            pretrained_source=f"mcu:{MCU_FILES[name][0]} (int8, from {SOURCE_HINT})",
            num_classes=1000,
        ),
        build,
        pretrained,
        needs_mcu_dir=True,
    )


for _name in MCU_FILES:
    _register(_name)
