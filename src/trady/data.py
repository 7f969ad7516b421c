"""Datasets and batch loading.

`load_dataset` reads Fashion-MNIST (IDX, gzipped or not), scikit-learn's bundled 8x8 digits,
CIFAR-10/100 (their binary versions) and image folders (one subfolder per class), and makes
seeded, stratified train/test subsets. Each split is an `ImageDataset` whose `get_batch` returns
uint8 images [B, C, H, W] and int64 labels; `BatchLoader` shuffles, shards (data parallel) and
transforms batches as a pure function of (seed, epoch).

Nothing here downloads anything: the files must already be on disk.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import math
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trady.errors import TradyError, unknown_name

__all__ = [
    "BatchLoader",
    "DATASETS",
    "DatasetPair",
    "ImageDataset",
    "ImageFolderDataset",
    "TensorImageDataset",
    "FASHION_MNIST_DIR",
    "load_dataset",
    "read_cifar_binary",
    "read_idx",
    "stratified_split",
    "stratified_subset",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "digits", "cifar10", "cifar100")
_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
]  # fmt: skip

# Seed-derivation streams (so that split, subsets, shuffling and augmentation never share draws).
_SPLIT, _TRAIN_SUBSET, _TEST_SUBSET, _SHUFFLE, _AUGMENT = range(5)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), *stream]))


def _torch_generator(seed: int, *stream: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), *stream]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _as_index(indices: Any) -> torch.Tensor:
    if torch.is_tensor(indices):
        return indices.to(torch.long).reshape(-1)
    return torch.from_numpy(np.asarray(indices, dtype=np.int64).reshape(-1))


def _sorted_cat(parts: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64))


# --------------------------------------------------------------------------------------------
# Datasets


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

    def class_counts(self, num_classes: int = 0) -> list[int]:
        """Number of samples of each label 0..max(label, num_classes - 1)."""
        return torch.bincount(self.labels, minlength=num_classes).tolist()


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
        idx = _as_index(indices)
        return self.images[idx], self.labels[idx]

    def subset(self, indices: Any) -> TensorImageDataset:
        idx = _as_index(indices)
        return TensorImageDataset(self.images[idx], self.labels[idx])

    def __repr__(self) -> str:
        return f"TensorImageDataset(n={len(self)}, shape={self.image_shape})"


def load_image(path: str | os.PathLike, load_size: int) -> torch.Tensor:
    """Read an image with Pillow as RGB, resize its smaller side to `load_size` (keeping the
    aspect ratio) and centre-crop it square: uint8 [3, load_size, load_size]."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.draft("RGB", (load_size, load_size))  # JPEG: decode at a reduced scale, >= load_size
            im = im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise TradyError(f"cannot read image {path}: {exc} (expected an image file that Pillow can open)") from exc
    w, h = im.size
    scale = load_size / min(w, h)
    nw, nh = max(load_size, round(w * scale)), max(load_size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - load_size) // 2, (nh - load_size) // 2
    if (nw, nh) != (load_size, load_size):
        im = im.crop((left, top, left + load_size, top + load_size))
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


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
        idx = _as_index(indices)
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
        idx = _as_index(indices).tolist()
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


# --------------------------------------------------------------------------------------------
# Stratified subsets and splits


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


def stratified_subset(labels: Any, size: int, seed: int = 0, _stream: int = _TRAIN_SUBSET) -> torch.Tensor:
    """Indices (sorted, int64) of `size` samples with classes as balanced as the data allows.

    Deterministic for a given (labels, size, seed); which samples of a class are taken depends
    only on their order within the class, never on the order of the other classes."""
    y = torch.as_tensor(labels).cpu().numpy().astype(np.int64).reshape(-1)
    n = y.shape[0]
    if not 0 <= size <= n:
        raise TradyError(f"cannot take {size} samples out of {n}")
    classes, counts = np.unique(y, return_counts=True)
    rng = _rng(seed, _stream)
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
    rng = _rng(seed, _SPLIT)
    train, test = [], []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        m = members.shape[0]
        k = min(max(int(round(test_fraction * m)), min(1, m - 1)), m - 1)
        perm = members[rng.permutation(m)]
        test.append(perm[:k])
        train.append(perm[k:])
    return _sorted_cat(train), _sorted_cat(test)


# --------------------------------------------------------------------------------------------
# File formats


def _read_bytes(path: Path) -> bytes:
    """Read a file, transparently gunzipping it (detected by the gzip magic, not the name)."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError as exc:
        raise TradyError(f"missing file {path}") from exc
    except OSError as exc:
        raise TradyError(f"cannot read {path}: {exc}") from exc
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise TradyError(f"corrupt gzip file {path}: {exc} (expected a complete gzip stream)") from exc
    return raw


def read_idx(path: str | os.PathLike, ndim: int | None = None) -> np.ndarray:
    """Read an IDX file of unsigned bytes (gzipped or not) into a uint8 array."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise TradyError(
            f"bad IDX magic in {path}: got {raw[:4].hex() or 'an empty file'} "
            f"(expected 000008NN: unsigned-byte IDX with NN dimensions)"
        )
    nd = raw[3]
    if ndim is not None and nd != ndim:
        raise TradyError(f"{path} has {nd} IDX dimensions (expected {ndim})")
    header = 4 + 4 * nd
    if len(raw) < header:
        raise TradyError(f"truncated IDX header in {path}: {len(raw)} bytes (expected at least {header})")
    dims = struct.unpack(f">{nd}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise TradyError(f"bad IDX size of {path}: {len(raw)} bytes (expected {expected} for shape {list(dims)})")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_cifar_binary(
    path: str | os.PathLike, label_bytes: int = 1, label_index: int = 0, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Read a CIFAR binary batch: records of `label_bytes` label bytes then 3072 bytes of
    32x32 R, G, B planes. Returns (uint8 images [N, 3, 32, 32], int64 labels [N]) using the
    label byte at `label_index` (CIFAR-100: 0 coarse, 1 fine)."""
    path = Path(path)
    raw = _read_bytes(path)
    record = label_bytes + 3 * 32 * 32
    if len(raw) == 0 or len(raw) % record:
        raise TradyError(
            f"truncated CIFAR file {path}: {len(raw)} bytes (expected a positive multiple of the "
            f"{record}-byte record: {label_bytes} label byte(s) + 3072 pixel bytes)"
        )
    data = np.frombuffer(raw, dtype=np.uint8).reshape(-1, record)
    labels = data[:, label_index].astype(np.int64)
    if labels.size and labels.max() >= num_classes:
        raise TradyError(
            f"bad label {int(labels.max())} in {path} (expected labels 0..{num_classes - 1}; "
            f"is this the right CIFAR version?)"
        )
    images = data[:, label_bytes:].reshape(-1, 3, 32, 32).copy()
    return images, labels


# --------------------------------------------------------------------------------------------
# Loaders


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        kind = "is not a folder" if path.exists() else "does not exist"
        raise TradyError(f"dataset folder {path} {kind} (expected {what})")


def _find_file(folder: Path, names: Sequence[str], what: str) -> Path:
    for name in names:
        p = folder / name
        if p.is_file():
            return p
    raise TradyError(f"missing file {folder / names[0]} (expected {what}; also accepted: {', '.join(names[1:])})")


def _load_fashion_mnist(data_dir: str | os.PathLike | None) -> tuple[TensorImageDataset, TensorImageDataset]:
    folder = Path(data_dir if data_dir is not None else FASHION_MNIST_DIR).expanduser()
    for sub in ("fashion-mnist", "FashionMNIST/raw"):  # a parent folder is accepted too
        if not any(folder.glob("train-images*")) and (folder / sub).is_dir():
            folder = folder / sub
            break
    what = "the Fashion-MNIST IDX files train-/t10k-images-idx3-ubyte[.gz], train-/t10k-labels-idx1-ubyte[.gz]"
    _require_dir(folder, what)
    splits = []
    for prefix, split in (("train", "training"), ("t10k", "test")):
        arrays = {}
        for kind, nd in (("images", 3), ("labels", 1)):
            stem = f"{prefix}-{kind}-idx{nd}-ubyte"
            alt = f"{prefix}-{kind}.idx{nd}-ubyte"
            names = [f"{stem}.gz", stem, f"{alt}.gz", alt]
            arrays[kind] = read_idx(_find_file(folder, names, f"the Fashion-MNIST {split} {kind} (IDX)"), nd)
        images, labels = arrays["images"], arrays["labels"]
        if images.shape[0] != labels.shape[0]:
            raise TradyError(
                f"{folder}: {prefix} has {images.shape[0]} images but {labels.shape[0]} labels (expected equal counts)"
            )
        if labels.size and labels.max() >= 10:
            raise TradyError(f"bad label {int(labels.max())} in {folder}/{prefix} labels (expected 0..9)")
        splits.append(TensorImageDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels)))
    return splits[0], splits[1]


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits as uint8 (0..16 scaled to 0..255) and int64 labels.

    Reads sklearn/datasets/data/digits.csv.gz directly (what load_digits reads) to avoid the
    seconds-long import of sklearn.datasets; falls back to load_digits if the file moved."""
    spec = importlib.util.find_spec("sklearn")
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",", dtype=np.float64)
        values, target = table[:, :-1].reshape(-1, 8, 8), table[:, -1]
    else:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        values, target = bunch.images, bunch.target
    images = np.rint(values * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, target.astype(np.int64)


def _load_digits(seed: int) -> tuple[TensorImageDataset, TensorImageDataset]:
    images, labels = _digits_arrays()
    full = TensorImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.copy()))
    train_idx, test_idx = stratified_split(full.labels, 0.25, seed)
    return full.subset(train_idx), full.subset(test_idx)


def _read_names(path: Path, expected: int, default: list[str]) -> list[str]:
    if path.is_file():
        names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
        if len(names) == expected:
            return names
    return list(default)


def _load_cifar(name: str, data_dir: str | os.PathLike | None) -> tuple[ImageDataset, ImageDataset, list[str]]:
    inner = "cifar-10-batches-bin" if name == "cifar10" else "cifar-100-binary"
    if data_dir is None:
        raise TradyError(f"dataset {name} needs data_dir: the folder holding {inner}/ (the binary version)")
    folder = Path(data_dir).expanduser()
    if (folder / inner).is_dir():
        folder = folder / inner
    _require_dir(folder, f"the {name} binary files, or a folder holding {inner}/")
    if name == "cifar10":
        train_files = [f"data_batch_{i}.bin" for i in range(1, 6)]
        test_files = ["test_batch.bin"]
        label_bytes, label_index, n_classes = 1, 0, 10
        classes = _read_names(folder / "batches.meta.txt", 10, CIFAR10_CLASSES)
    else:
        train_files, test_files = ["train.bin"], ["test.bin"]
        label_bytes, label_index, n_classes = 2, 1, 100  # coarse byte, then fine byte
        classes = _read_names(folder / "fine_label_names.txt", 100, CIFAR100_CLASSES)

    def read(files: list[str]) -> TensorImageDataset:
        parts = []
        for f in files:
            p = folder / f
            if not p.is_file():
                raise TradyError(f"missing file {p} (expected a {name} binary batch)")
            parts.append(read_cifar_binary(p, label_bytes, label_index, n_classes))
        images = np.concatenate([im for im, _ in parts])
        labels = np.concatenate([lb for _, lb in parts])
        return TensorImageDataset(torch.from_numpy(images), torch.from_numpy(labels))

    return read(train_files), read(test_files), classes


def _scan_classes(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _scan_images(folder: Path, classes: list[str], split: str) -> tuple[list[str], list[int]]:
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        cdir = folder / cls
        if not cdir.is_dir():
            continue
        found = []
        for root, dirs, files in os.walk(cdir, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in files:
                if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
                    found.append(os.path.join(root, f))
        found.sort()  # independent of the file system's listing order
        if not found and split != "test":
            raise TradyError(
                f"class folder {cdir} holds no images (expected files ending in {', '.join(IMAGE_EXTENSIONS)})"
            )
        paths += found
        labels += [label] * len(found)
    return paths, labels


def _load_image_folder(path: Path, seed: int, load_size: int) -> tuple[ImageDataset, ImageDataset, list[str]]:
    layout = "one subfolder per class, or train/ and test/ folders each holding one subfolder per class"
    _require_dir(path, f"an image folder: {layout}")
    test_dir = next((path / t for t in ("test", "val") if (path / t).is_dir()), None)
    if (path / "train").is_dir() and test_dir is not None:
        classes = _scan_classes(path / "train")
        if not classes:
            raise TradyError(f"image folder {path / 'train'} has no class subfolders (expected {layout})")
        extra = sorted(set(_scan_classes(test_dir)) - set(classes))
        if extra:
            raise TradyError(
                f"{test_dir} has class folders missing from {path / 'train'}: {', '.join(extra)} "
                f"(expected the same classes in both)"
            )
        train = ImageFolderDataset(*_scan_images(path / "train", classes, "train"), load_size=load_size)
        test = ImageFolderDataset(*_scan_images(test_dir, classes, "test"), load_size=load_size)
        return train, test, classes
    classes = _scan_classes(path)
    if not classes:
        raise TradyError(f"image folder {path} has no class subfolders (expected {layout})")
    full = ImageFolderDataset(*_scan_images(path, classes, "all"), load_size=load_size)
    train_idx, test_idx = stratified_split(full.labels, 0.2, seed)
    return full.subset(train_idx), full.subset(test_idx), classes


def _take(split: ImageDataset, size: int | None, what: str, name: str, seed: int, stream: int) -> ImageDataset:
    if size is None:
        return split
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise TradyError(f"{what} must be a positive integer, got {size!r}")
    if size > len(split):
        split_name = "training" if what == "train_size" else "test"
        raise TradyError(f"{what} {size} is larger than the {len(split)} {split_name} samples available in {name}")
    if size == len(split):
        return split
    return split.subset(stratified_subset(split.labels, int(size), seed, stream))


def load_dataset(
    name_or_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    train_size: int | None = None,
    test_size: int | None = None,
    seed: int = 0,
    *,
    load_size: int = 256,
) -> DatasetPair:
    """Load a dataset by name ("fashion-mnist", "digits", "cifar10", "cifar100") or from a path
    to an image folder, optionally taking seeded stratified subsets of its splits.

    data_dir: folder of the files (fashion-mnist defaults to Debian's /usr/share/datasets/
    fashion-mnist; cifar10/cifar100 need the folder holding cifar-10-batches-bin/ or
    cifar-100-binary/, or that folder itself). train_size/test_size: number of samples, classes
    as balanced as possible, deterministic for the seed. load_size: side of the square that image
    folder pictures are resized/cropped to when loaded. Digits and single image folders are split
    75/25 and 80/20 (stratified, seeded).
    """
    raw = os.fspath(name_or_path)
    key = raw.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in DATASETS:
        if key == "fashion-mnist":
            train, test = _load_fashion_mnist(data_dir)
            classes = list(FASHION_MNIST_CLASSES)
        elif key == "digits":
            train, test = _load_digits(seed)
            classes = [str(i) for i in range(10)]
        else:
            train, test, classes = _load_cifar(key, data_dir)
        name = key
    else:
        looks_like_path = isinstance(name_or_path, os.PathLike) or any(c in raw for c in ("/", "\\", "~"))
        path = Path(raw).expanduser()
        if not path.exists() and not looks_like_path:
            err = unknown_name("dataset", raw, list(DATASETS))
            raise TradyError(f"{err}; a path to an image folder (one subfolder per class) is also accepted")
        train, test, classes = _load_image_folder(path, seed, load_size)
        name = raw
    train = _take(train, train_size, "train_size", name, seed, _TRAIN_SUBSET)
    test = _take(test, test_size, "test_size", name, seed, _TEST_SUBSET)
    return DatasetPair(train=train, test=test, classes=classes, name=name)


# --------------------------------------------------------------------------------------------
# Batching


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
        self.start_batch = 0

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

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch to iterate (its order and augmentation depend only on seed and epoch);
        `start_batch` skips the first batches, to resume in the middle of an epoch."""
        self.epoch = int(epoch)
        self.start_batch = int(start_batch)

    def _global_batches(self) -> list[torch.Tensor]:
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=_torch_generator(self.seed, _SHUFFLE, self.epoch))
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
            if step < self.start_batch:
                continue
            k = g.shape[0] // self.world_size
            lo, hi = self.rank * k, (self.rank + 1) * k
            images, labels = self.dataset.get_batch(g[lo:hi])
            yield self._apply(images, step, g.shape[0], lo, hi), labels

    def _apply(self, images: torch.Tensor, step: int, global_n: int, lo: int, hi: int) -> torch.Tensor:
        t = self.transform
        if t is None:
            return images.to(torch.float32).mul_(1.0 / 255.0)
        gen = _torch_generator(self.seed, _AUGMENT, self.epoch, step)
        sample_params = getattr(t, "sample_params", None)
        if sample_params is not None:
            return t(images, params=sample_params(global_n, gen)[lo:hi])
        if self.world_size > 1:
            gen = _torch_generator(self.seed, _AUGMENT, self.epoch, step, self.rank)
        return t(images, generator=gen)

    def __repr__(self) -> str:
        return (
            f"BatchLoader(n={len(self.dataset)}, batch_size={self.batch_size}, shuffle={self.shuffle}, "
            f"seed={self.seed}, drop_last={self.drop_last}, rank={self.rank}, world_size={self.world_size})"
        )
