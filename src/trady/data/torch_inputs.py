"""A user's torch Dataset or DataLoader as trady's training and test batches (`finetune(train_data=...)`).

- A `torch.utils.data.Dataset` (map-style: `len()` and `dataset[i] -> (input, target)`) goes through
  trady's own `BatchLoader`: its order is a pure function of (seed, epoch), so a resumed run sees the
  same batches, and data-parallel ranks split each global batch as a single process would see it.
  Samples are stacked with torch's `default_collate`; inputs are used as they come (no transform).
- A `torch.utils.data.DataLoader` (or any re-iterable of (input, target) batches) is iterated as it is;
  `set_epoch(epoch)` is forwarded to its sampler when that has one (DistributedSampler). Its order is
  the user's: a resume is exact when that order depends only on the epoch (or on torch's global RNG,
  whose state the checkpoint restores).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from trady.core.errors import TradyError
from trady.data import BatchLoader


class DatasetBatches:
    """A map-style torch Dataset with the `get_batch(indices)` that `BatchLoader` reads."""

    def __init__(self, dataset: Dataset) -> None:
        try:
            self.size = len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise TradyError(f"dataset {type(dataset).__name__} has no len(); accepted: a map-style "
                             "torch Dataset (len and [i] -> (input, target)) or a DataLoader") from None  # fmt: skip
        self.dataset = dataset

    def __len__(self) -> int:
        return self.size

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.dataset[int(i)] for i in indices]
        if not items or not isinstance(items[0], (tuple, list)) or len(items[0]) < 2:
            raise TradyError(f"dataset {type(self.dataset).__name__}[i] must be (input, target); "
                             f"got {type(items[0]).__name__ if items else 'nothing'}")  # fmt: skip
        x, y = default_collate([(it[0], it[1]) for it in items])
        return x, torch.as_tensor(y)


def _as_is(images: torch.Tensor, **_: Any) -> torch.Tensor:
    return images


class UserLoader:
    """A DataLoader (or list of batches) iterated as it is; `set_epoch` reaches its sampler."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        for owner in (self.loader, getattr(self.loader, "sampler", None), getattr(self.loader, "batch_sampler", None)):
            fn = getattr(owner, "set_epoch", None)
            if owner is not self.loader and callable(fn):
                fn(epoch)
                return

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise TradyError(f"a batch must be (input, target); got {type(batch).__name__}")
            yield batch[0], batch[1]


def batches_of(
    data: Any, batch_size: int, *, train: bool, seed: int, rank: int = 0, world_size: int = 1
) -> BatchLoader | UserLoader:
    """Training (shuffled, full batches only) or test batches of a user's Dataset or DataLoader."""
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return BatchLoader(DatasetBatches(data), batch_size, _as_is, shuffle=train, seed=seed, drop_last=train,
                           rank=rank if train else 0, world_size=world_size if train else 1)  # fmt: skip
    if isinstance(data, DataLoader) or (hasattr(data, "__iter__") and hasattr(data, "__len__")):
        return UserLoader(data)
    raise TradyError(f"train_data/test_data must be a torch Dataset or DataLoader, got {type(data).__name__}")


def num_samples(data: Any) -> int | None:
    """How many samples a user's Dataset or DataLoader holds (None when it cannot tell)."""
    inner = getattr(data, "dataset", data)
    try:
        return len(inner)
    except TypeError:
        return None


def first_input(loader: Any) -> torch.Tensor:
    """One input sample (batch of 1) for the cost table."""
    for x, _ in loader:
        return x[:1]
    raise TradyError("the training data yielded no batch; accepted: at least one full batch")
