"""Seeded stratified subsets and train/test splits (class balance as far as the data allows)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from trady.core.errors import TradyError
from trady.data.seeding import SPLIT, TRAIN_SUBSET, seeded_rng


def _sorted_cat(parts: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64))


def _balanced_allocation(counts: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """How many samples to take per class: as equal as the class counts allow (water filling);
    the last few left over go to randomly chosen classes that still have samples."""
    alloc = np.zeros_like(counts)
    remaining = int(size)
    while remaining > 0:
        open_ = np.flatnonzero(alloc < counts)
        share = remaining // len(open_)
        if share == 0:
            alloc[rng.choice(open_, size=remaining, replace=False)] += 1
            break
        add = np.minimum(share, counts[open_] - alloc[open_])
        alloc[open_] += add
        remaining -= int(add.sum())
    return alloc


def stratified_subset(labels: Any, size: int, seed: int = 0, _stream: int = TRAIN_SUBSET) -> torch.Tensor:
    """Indices (sorted, int64) of `size` samples with classes as balanced as the data allows.

    Deterministic for a given (labels, size, seed); which samples of a class are taken depends
    only on their order within the class, never on the order of the other classes."""
    y = torch.as_tensor(labels).cpu().numpy().astype(np.int64).reshape(-1)
    n = y.shape[0]
    if not 0 <= size <= n:
        raise TradyError(f"cannot take {size} samples out of {n}")
    classes, counts = np.unique(y, return_counts=True)
    rng = seeded_rng(seed, _stream)
    alloc = _balanced_allocation(counts, size, rng)
    chosen = []
    for c, k in zip(classes, alloc):
        members = np.flatnonzero(y == c)
        chosen.append(members[rng.permutation(members.shape[0])[:k]])
    return _sorted_cat(chosen)


def stratified_split(labels: Any, test_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stratified split: (train indices, test indices), both sorted. Each class puts
    round(test_fraction * count) samples into test, keeping at least one in train (and one in
    test when the class has two or more)."""
    y = torch.as_tensor(labels).cpu().numpy().astype(np.int64).reshape(-1)
    rng = seeded_rng(seed, SPLIT)
    train, test = [], []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        m = members.shape[0]
        k = min(max(int(round(test_fraction * m)), min(1, m - 1)), m - 1)
        perm = members[rng.permutation(m)]
        test.append(perm[:k])
        train.append(perm[k:])
    return _sorted_cat(train), _sorted_cat(test)
