"""Datasets and batch loading.

`load_dataset` reads Fashion-MNIST (IDX, gzipped or not; folder: `data_dir`, else
$TRADY_FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist), scikit-learn's bundled 8x8
digits, CIFAR-10/100 (their binary versions) and image folders (one subfolder per class), and makes
seeded, stratified train/test subsets. Each split is an `ImageDataset` whose `get_batch` returns
uint8 images [B, C, H, W] and int64 labels; `BatchLoader` shuffles, shards (data parallel) and
transforms batches as a pure function of (seed, epoch).

Modules: formats (file readers), datasets (split classes), splits (stratified subsets), loaders
(`load_dataset` by name or path), batching (`BatchLoader`), seeding (seed streams).
Nothing here downloads anything: the files must already be on disk.
"""

from trady.data.batching import BatchLoader
from trady.data.datasets import DatasetPair, ImageDataset, ImageFolderDataset, TensorImageDataset
from trady.data.formats import load_image, read_cifar_binary, read_idx
from trady.data.loaders import (
    DATASETS,
    FASHION_MNIST_DIR,
    FASHION_MNIST_ENV,
    IMAGE_EXTENSIONS,
    default_fashion_mnist_dir,
    load_dataset,
)
from trady.data.splits import stratified_split, stratified_subset

__all__ = [
    "BatchLoader",
    "DATASETS",
    "DatasetPair",
    "FASHION_MNIST_DIR",
    "FASHION_MNIST_ENV",
    "IMAGE_EXTENSIONS",
    "ImageDataset",
    "ImageFolderDataset",
    "TensorImageDataset",
    "default_fashion_mnist_dir",
    "load_dataset",
    "load_image",
    "read_cifar_binary",
    "read_idx",
    "stratified_split",
    "stratified_subset",
]
