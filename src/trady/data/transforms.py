"""Batched tensor transforms for uint8 image batches [B, C, H, W] (C = 1 or 3).

One `ImageTransform` call turns a whole batch into the model's input, float32 [B, 3, R, R]:
uint8 -> float in [0, 1], centre square crop if the images are not square, resize to R
(bilinear with antialiasing), for training a random-resized crop and a random horizontal flip,
grey -> RGB, and the model's normalisation (x - mean) / std. There is no per-sample Python loop.

Training randomness comes only from the `torch.Generator` passed in the call (or from explicit
`params` drawn with `sample_params`), so a batch is reproducible from the generator's seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["ImageTransform", "center_square", "resize", "to_float"]

# Number of uniform draws per sample: area scale, log aspect ratio, x offset, y offset, flip.
_N_PARAMS = 5


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float32 in [0, 1]; float input is taken to be in [0, 1] already."""
    if images.dtype == torch.uint8:
        return images.to(torch.float32).mul_(1.0 / 255.0)
    if images.is_floating_point():
        return images.to(torch.float32)
    raise TypeError(f"expected a uint8 or float image batch, got dtype {images.dtype}")


def center_square(images: torch.Tensor) -> torch.Tensor:
    """Centre crop [B, C, H, W] to a square of side min(H, W) (a view; no copy)."""
    h, w = images.shape[-2:]
    if h == w:
        return images
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    return images[..., top : top + s, left : left + s]


def resize(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """Resize a float batch to resolution x resolution: bilinear, antialiased when shrinking."""
    if tuple(images.shape[-2:]) == (resolution, resolution):
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)


def _check_triple(name: str, values: Sequence[float]) -> tuple[float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 3:
        raise ValueError(f"{name} must have 3 values (one per RGB channel), got {len(vals)}")
    return vals  # type: ignore[return-value]


class ImageTransform:
    """uint8 batch [B, C, H, W] (C = 1 or 3) -> normalised float32 batch [B, 3, R, R].

    Args:
        resolution: output side R.
        mean, std: the model's per-channel normalisation (3 floats each, for inputs in [0, 1]).
        train: apply the random crop and flip (otherwise deterministic: resize + normalise).
        crop_scale: (min, max) fraction of the image area kept by the random-resized crop;
            None disables the crop (then training only flips).
        crop_ratio: (min, max) aspect ratio of the crop box, sampled log-uniformly.
        flip: random horizontal flip with probability 1/2 during training.

    The crop is done with one batched `affine_grid`/`grid_sample` (bilinear) per batch: sources
    larger than R are first shrunk to R with antialiased interpolation, so the crop only ever
    zooms in and never aliases; sources up to R are sampled directly (a single resampling).
    """

    def __init__(
        self,
        resolution: int,
        mean: Sequence[float],
        std: Sequence[float],
        train: bool = False,
        crop_scale: tuple[float, float] | None = (0.35, 1.0),
        crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip: bool = True,
    ) -> None:
        if int(resolution) < 1:
            raise ValueError(f"resolution must be a positive integer, got {resolution}")
        self.resolution = int(resolution)
        self.mean = _check_triple("mean", mean)
        self.std = _check_triple("std", std)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        if crop_scale is not None:
            lo, hi = float(crop_scale[0]), float(crop_scale[1])
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
            crop_scale = (lo, hi)
        rlo, rhi = float(crop_ratio[0]), float(crop_ratio[1])
        if not 0.0 < rlo <= rhi:
            raise ValueError(f"crop_ratio must satisfy 0 < min <= max, got {crop_ratio}")
        self.train = bool(train)
        self.crop_scale = crop_scale
        self.crop_ratio = (rlo, rhi)
        self.flip = bool(flip)
        # Folded normalisation: x01 * scale + shift == (x01 - mean) / std.
        std_t = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        self._scale = 1.0 / std_t
        self._shift = -torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1) / std_t

    @property
    def random(self) -> bool:
        """Whether calls consume randomness (training with a crop or a flip)."""
        return self.train and (self.crop_scale is not None or self.flip)

    def sample_params(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw the augmentation parameters of n samples: uniforms in [0, 1), shape [n, 5].

        Row i only depends on the generator state and i, so slicing rows of a draw for a larger
        batch gives the same augmentation as drawing for the whole batch (used for data-parallel
        shards). Returns an empty [n, 0] tensor when the transform is not random.
        """
        if not self.random:
            return torch.empty(n, 0)
        return torch.rand(n, _N_PARAMS, generator=generator)

    def __call__(
        self,
        images: torch.Tensor,
        generator: torch.Generator | None = None,
        params: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Transform a batch. In training mode, randomness comes from `params` if given (rows
        from `sample_params`), else from `generator` (None: torch's global generator)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected an image batch [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
        b = images.shape[0]
        x = center_square(to_float(images))
        r = self.resolution
        if self.random:
            if params is None:
                params = self.sample_params(b, generator)
            if params.shape != (b, _N_PARAMS):
                raise ValueError(f"params must have shape ({b}, {_N_PARAMS}), got {tuple(params.shape)}")
            flip = params[:, 4] < 0.5 if self.flip else torch.zeros(b, dtype=torch.bool)
            if self.crop_scale is None:
                x = resize(x, r)
                x = torch.where(flip.view(b, 1, 1, 1), x.flip(-1), x)
            else:
                if x.shape[-1] > r:
                    x = resize(x, r)
                theta = self._crop_theta(params, flip)
                grid = F.affine_grid(theta, [b, x.shape[1], r, r], align_corners=False)
                x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        else:
            x = resize(x, r)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x * self._scale + self._shift

    def _crop_theta(self, params: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
        """Affine maps (output -> input, normalised coordinates) of random-resized crops."""
        lo, hi = self.crop_scale  # type: ignore[misc]
        area = lo + (hi - lo) * params[:, 0].double()
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * params[:, 1].double())
        # Width/height of the crop as fractions of the image side (box area = area * image area).
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        # Centre anywhere that keeps the box inside the image: [-(1 - w), 1 - w] in [-1, 1] units.
        cx = (1.0 - w) * (2.0 * params[:, 2].double() - 1.0)
        cy = (1.0 - h) * (2.0 * params[:, 3].double() - 1.0)
        sx = torch.where(flip, -w, w)
        theta = torch.zeros(params.shape[0], 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = sx
        theta[:, 0, 2] = cx
        theta[:, 1, 1] = h
        theta[:, 1, 2] = cy
        return theta.to(torch.float32)

    def __repr__(self) -> str:
        return (
            f"ImageTransform(resolution={self.resolution}, mean={self.mean}, std={self.std}, "
            f"train={self.train}, crop_scale={self.crop_scale}, crop_ratio={self.crop_ratio}, "
            f"flip={self.flip})"
        )
