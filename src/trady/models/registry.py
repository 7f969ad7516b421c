"""The model registry: `create(name, ...)`, `available()`, `spec(name)`.

Each architecture file registers its models with `register(spec, build, pretrained_weights)`:
- `build(num_classes, mcu_dir=None, **options)` returns a freshly initialised ZooModel;
- `pretrained_weights(mcu_dir=None)` returns its pretrained state dict (in any layout the model's
  loader accepts), or is None where weights come only from a user file.
Pretrained weights and user files go through the same strict loader (`weights.load_into`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trady.core.errors import TradyError, unknown_name
from trady.models.base import ZooModel, check_num_classes
from trady.models.weights import head_size, load_into, load_state_dict_file


@dataclass(frozen=True)
class ModelSpec:
    """A model's input contract: images in [0, 1], resized to `resolution`, then (x - mean) / std; or,
    with `inputs == "tokens"`, int64 token ids [B, L] (padding id 0) and `resolution` the default L."""

    name: str
    resolution: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pretrained_source: str
    num_classes: int  # size of the pretrained head
    inputs: str = "image"  # "image" | "tokens"


@dataclass(frozen=True)
class _Entry:
    spec: ModelSpec
    build: Callable[..., ZooModel]
    pretrained_weights: Callable[..., dict[str, torch.Tensor]] | None
    needs_mcu_dir: bool = False
    encoder: Callable[[int], Callable[[list[str]], torch.Tensor]] | None = None  # token models: length -> encode


_REGISTRY: dict[str, _Entry] = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def register(
    spec: ModelSpec,
    build: Callable[..., ZooModel],
    pretrained_weights: Callable[..., dict[str, torch.Tensor]] | None = None,
    needs_mcu_dir: bool = False,
    encoder: Callable[[int], Callable[[list[str]], torch.Tensor]] | None = None,
) -> None:
    if spec.name in _REGISTRY:
        raise ValueError(f"model {spec.name!r} registered twice")
    _REGISTRY[spec.name] = _Entry(spec, build, pretrained_weights, needs_mcu_dir, encoder)


def text_encoder(name: str, length: int | None = None) -> Callable[[list[str]], torch.Tensor]:
    """A token model's encoder: list of strings -> int64 ids [B, length] (default: spec(name).resolution)."""
    entry = _entry(name)
    if entry.encoder is None:
        raise TradyError(f"model {name!r} takes images, not texts; text models: "
                         f"{', '.join(n for n, e in _REGISTRY.items() if e.encoder is not None)}")  # fmt: skip
    return entry.encoder(length or entry.spec.resolution)


def available() -> list[str]:
    """Names of the registered models, in registration order."""
    return list(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise unknown_name("model", name, available())
    return _REGISTRY[name]


def spec(name: str) -> ModelSpec:
    """Default resolution, input normalisation, pretrained source and head size of a model."""
    return _entry(name).spec


def create(
    name: str,
    pretrained: bool = False,
    num_classes: int | None = None,
    weights: str | os.PathLike | None = None,
    mcu_dir: str | os.PathLike | None = None,
    **options,
) -> ZooModel:
    """Build a zoo model.

    pretrained: load the model's own pretrained weights (weight package or MCU int8 file).
    weights: a local .safetensors/.pth/.pt state dict (torchvision or trady layout) instead; its
      head size is taken from the file.
    num_classes: None keeps the loaded head (pretrained or file); an integer gives a fresh
      classifier of that size.
    mcu_dir: folder of the MCU int8 files (default: $TRADY_MCU_DIR, then ../shared/models/mcu
      beside the repository).
    options: architecture options (e.g. `width_mult` for mobilenet_v2, `resolution` for the
      static TF padding of EfficientNet-Lite); with weights, the strict loader rejects options
      that change parameter shapes.
    """
    entry = _entry(name)
    if pretrained and weights is not None:
        raise TradyError("give either pretrained=True or weights=PATH, not both")
    if pretrained and entry.pretrained_weights is None:
        raise TradyError(
            f"model {name!r} has no bundled pretrained weights ({entry.spec.pretrained_source}); "
            "pass weights=PATH to a .pth/.pt/.safetensors state dict in torchvision layout"
        )
    if num_classes is not None:
        num_classes = check_num_classes(num_classes)
    kwargs = dict(options)
    if entry.needs_mcu_dir:
        kwargs["mcu_dir"] = mcu_dir
    # With weights to load, start from the pretrained head size; a fresh head comes after loading.
    loading = pretrained or weights is not None
    first_head = entry.spec.num_classes if loading or num_classes is None else num_classes
    model = entry.build(num_classes=first_head, **kwargs)
    if pretrained:
        state = entry.pretrained_weights(mcu_dir=mcu_dir) if entry.needs_mcu_dir else entry.pretrained_weights()
        load_into(model, state, source=f"pretrained weights of {name}")
    elif weights is not None:
        state = load_state_dict_file(weights)
        n = head_size(model, state)
        if n is not None and n != model.classifier.out_features:
            model.reset_classifier(n)
        load_into(model, state, source=f"weights {os.fspath(weights)!r}")
    if loading and num_classes is not None:
        model.reset_classifier(num_classes)
    return model


def example_input(name: str, size: int | None = None, batch: int = 1) -> torch.Tensor:
    """An input of the model's kind for tracing costs: zeros [batch, 3, size, size] for images, the token ids
    of a sentence padded to `size` for token models (default size: spec(name).resolution)."""
    entry = _entry(name)
    size = size or entry.spec.resolution
    if entry.spec.inputs == "tokens":
        return text_encoder(name, size)(["an example sentence of the text this model reads"] * batch)
    return torch.zeros(batch, 3, size, size)
