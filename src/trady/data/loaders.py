"""`load_dataset`: Fashion-MNIST, scikit-learn's digits, CIFAR-10/100 and image folders by name or
path, with seeded stratified subsets. Nothing is downloaded: the files must already be on disk.

Fashion-MNIST is read from `data_dir`, else from $TRADY_FASHION_MNIST_DIR, else from Debian's
/usr/share/datasets/fashion-mnist (package dataset-fashion-mnist).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from trady.core.errors import TradyError, unknown_name
from trady.data.datasets import DatasetPair, ImageDataset, ImageFolderDataset, TensorImageDataset
from trady.data.formats import read_cifar_binary, read_idx
from trady.data.seeding import TEST_SUBSET, TRAIN_SUBSET
from trady.data.splits import stratified_split, stratified_subset

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_ENV = "TRADY_FASHION_MNIST_DIR"
DATASETS = ("fashion-mnist", "digits", "cifar10", "cifar100")
_ALIASES = {
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
}


def dataset_key(name: str) -> str | None:
    """The dataset that `name` names ("FMNIST" -> "fashion-mnist"), or None when it is not a name (a path)."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    return key if key in DATASETS else None

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


def default_fashion_mnist_dir() -> Path:
    """$TRADY_FASHION_MNIST_DIR when set (and not empty), else Debian's FASHION_MNIST_DIR."""
    return Path(os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR).expanduser()


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
    folder = Path(data_dir).expanduser() if data_dir is not None else default_fashion_mnist_dir()
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

    data_dir: folder of the files (fashion-mnist defaults to $TRADY_FASHION_MNIST_DIR, else Debian's
    /usr/share/datasets/fashion-mnist; cifar10/cifar100 need the folder holding cifar-10-batches-bin/ or
    cifar-100-binary/, or that folder itself). train_size/test_size: number of samples, classes
    as balanced as possible, deterministic for the seed. load_size: side of the square that image
    folder pictures are resized/cropped to when loaded. Digits and single image folders are split
    75/25 and 80/20 (stratified, seeded).
    """
    raw = os.fspath(name_or_path)
    key = dataset_key(raw)
    if key is not None:
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
    train = _take(train, train_size, "train_size", name, seed, TRAIN_SUBSET)
    test = _take(test, test_size, "test_size", name, seed, TEST_SUBSET)
    return DatasetPair(train=train, test=test, classes=classes, name=name)
