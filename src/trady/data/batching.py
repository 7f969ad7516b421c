"""`BatchLoader`: seeded shuffling, data-parallel sharding and per-batch transforms, as a pure
function of (seed, epoch)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from trady.core.errors import TradyError
from trady.data.datasets import ImageDataset
from trady.data.seeding import AUGMENT, SHUFFLE, torch_generator


class BatchLoader:
    """Iterate over (float images, int64 labels) batches of a dataset.

    The order (when `shuffle`) and the augmentation of an epoch are a pure function of
    (seed, epoch): call `set_epoch(e)` before iterating; iterating twice replays the same epoch.

    Data parallel: with `world_size` W > 1 each epoch's permutation is cut into global batches of
    batch_size * W samples and rank r takes the r-th contiguous block of each, so the union of the
    ranks' batches at a step is exactly the single-process batch of size batch_size * W, in order
    (and, with an `ImageTransform`, identically augmented). All ranks get the same number of
    equal-size batches: without drop_last the epoch is cut to a multiple of W samples (at most
    W - 1 left out) and the last global batch is split evenly. `len()` is 0 (and nothing is
    yielded) when the dataset is smaller than one batch with drop_last; callers check it.

    `transform(images, generator=...)` receives the uint8 batch; an `ImageTransform` gets rows of
    `sample_params` drawn for the global batch. Without a transform, batches are float in [0, 1].
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        transform: Callable[..., torch.Tensor] | None = None,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if int(batch_size) < 1:
            raise TradyError(f"batch_size must be a positive integer, got {batch_size}")
        if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
            raise TradyError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.transform = transform
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.epoch = 0

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _epoch_samples(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            return n - n % self.global_batch_size
        return n - n % self.world_size

    def __len__(self) -> int:
        return math.ceil(self._epoch_samples() / self.global_batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate (its order and augmentation depend only on seed and epoch)."""
        self.epoch = int(epoch)

    def _global_batches(self) -> list[torch.Tensor]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch_generator(self.seed, SHUFFLE, self.epoch))
        else:
            order = torch.arange(n)
        order = order[: self._epoch_samples()]
        return list(order.split(self.global_batch_size)) if order.numel() else []

    def batch_indices(self) -> list[torch.Tensor]:
        """This rank's dataset indices of each batch of the current epoch (all batches)."""
        out = []
        for g in self._global_batches():
            k = g.shape[0] // self.world_size
            out.append(g[self.rank * k : (self.rank + 1) * k])
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for step, g in enumerate(self._global_batches()):
            k = g.shape[0] // self.world_size
            lo, hi = self.rank * k, (self.rank + 1) * k
            images, labels = self.dataset.get_batch(g[lo:hi])
            yield self._apply(images, step, g.shape[0], lo, hi), labels

    def _apply(self, images: torch.Tensor, step: int, global_n: int, lo: int, hi: int) -> torch.Tensor:
        t = self.transform
        if t is None:
            return images.to(torch.float32).mul_(1.0 / 255.0)
        gen = torch_generator(self.seed, AUGMENT, self.epoch, step)
        sample_params = getattr(t, "sample_params", None)
        if sample_params is not None:
            return t(images, params=sample_params(global_n, gen)[lo:hi])
        if self.world_size > 1:
            gen = torch_generator(self.seed, AUGMENT, self.epoch, step, self.rank)
        return t(images, generator=gen)

    def __repr__(self) -> str:
        return (
            f"BatchLoader(n={len(self.dataset)}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"seed={self.seed}, drop_last={self.drop_last}, rank={self.rank}, world_size={self.world_size})"
        )
