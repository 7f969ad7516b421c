"""Labelled image splits: `ImageDataset` (the interface: labels, channels, get_batch, subset), the
in-memory `TensorImageDataset`, the lazily read `ImageFolderDataset`, and `DatasetPair`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trady.data.formats import load_image


def as_index(indices: Any) -> torch.Tensor:
    if torch.is_tensor(indices):
        return indices.to(torch.long).reshape(-1)
    return torch.from_numpy(np.asarray(indices, dtype=np.int64).reshape(-1))


class ImageDataset:
    """A labelled image split. Subclasses provide `labels`, `channels` and `get_batch`.

    `labels`: int64 tensor [N]; `channels`: 1 or 3;
    `get_batch(indices) -> (uint8 images [B, C, H, W], int64 labels [B])`.
    """

    labels: torch.Tensor
    channels: int

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def get_batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def subset(self, indices: Any) -> ImageDataset:
        """A new dataset holding the given samples, in the given order."""
        raise NotImplementedError



class TensorImageDataset(ImageDataset):
    """In-memory split: one uint8 tensor [N, C, H, W] and int64 labels [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"images must be a uint8 tensor [N, 1 or 3, H, W], got {images.dtype} {tuple(images.shape)}"
            )
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if labels.shape[0] != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
        self.images = images
        self.labels = labels
        self.channels = int(images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def get_batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx = as_index(indices)
        return self.images[idx], self.labels[idx]

    def subset(self, indices: Any) -> TensorImageDataset:
        idx = as_index(indices)
        return TensorImageDataset(self.images[idx], self.labels[idx])

    def __repr__(self) -> str:
        return f"TensorImageDataset(n={len(self)}, shape={self.image_shape})"


class ImageFolderDataset(ImageDataset):
    """Image files loaded lazily: each `get_batch` reads its images with Pillow (RGB), resizes the
    smaller side to `load_size` and centre-crops a square, so batches stack to [B, 3, S, S]."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        labels: Any,
        load_size: int = 256,
        workers: int | None = None,
    ) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        if self.labels.shape[0] != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {self.labels.shape[0]} labels")
        if int(load_size) < 1:
            raise ValueError(f"load_size must be a positive integer, got {load_size}")
        self.load_size = int(load_size)
        self.channels = 3
        self.workers = workers if workers is not None else min(4, os.cpu_count() or 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.load_size, self.load_size)

    def get_batch(self, indices: Any) -> tuple[torch.Tensor, torch.Tensor]:
        idx = as_index(indices)
        paths = [self.paths[i] for i in idx.tolist()]
        if self.workers > 1 and len(paths) > 1:  # Pillow releases the GIL while decoding
            with ThreadPoolExecutor(max_workers=min(self.workers, len(paths))) as pool:
                images = list(pool.map(lambda p: load_image(p, self.load_size), paths))
        else:
            images = [load_image(p, self.load_size) for p in paths]
        if not images:
            return torch.empty(0, 3, self.load_size, self.load_size, dtype=torch.uint8), self.labels[idx]
        return torch.stack(images), self.labels[idx]

    def subset(self, indices: Any) -> ImageFolderDataset:
        idx = as_index(indices).tolist()
        return ImageFolderDataset(
            [self.paths[i] for i in idx], self.labels[idx], load_size=self.load_size, workers=self.workers
        )

    def __repr__(self) -> str:
        return f"ImageFolderDataset(n={len(self)}, load_size={self.load_size})"


@dataclass
class DatasetPair:
    """The train and test splits of a dataset, its class names and its canonical name."""

    train: ImageDataset
    test: ImageDataset
    classes: list[str]
    name: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)
