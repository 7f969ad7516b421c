"""Seed derivation for the data pipeline: one stream per use (split, train/test subsets, shuffling,
augmentation), so that they never share draws and each is a pure function of the seed."""

from __future__ import annotations

import numpy as np
import torch

SPLIT, TRAIN_SUBSET, TEST_SUBSET, SHUFFLE, AUGMENT = range(5)


def seeded_rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *stream]))


def torch_generator(seed: int, *stream: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))
