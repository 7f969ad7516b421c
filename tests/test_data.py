"""Tests for trady.data and trady.data.transforms on tiny data written in tmp_path (plus sklearn digits
and, when installed, Debian's Fashion-MNIST)."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trady.core.errors import TradyError
from trady.data import (
    FASHION_MNIST_DIR,
    BatchLoader,
    ImageFolderDataset,
    TensorImageDataset,
    load_dataset,
    stratified_subset,
)
from trady.data.transforms import ImageTransform

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# helpers writing tiny files


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write_fashion(folder: Path, n_train=30, n_test=20, size=6, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        rng.shuffle(labels)
        for kind, arr, nd in (("images", images, 3), ("labels", labels, 1)):
            name = f"{prefix}-{kind}-idx{nd}-ubyte"
            raw = idx_bytes(arr)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)
        data[prefix] = (images, labels)
    return data


def write_cifar(path: Path, n: int, label_bytes: int, seed=0, n_classes=10):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, n_classes, (n, label_bytes), dtype=np.uint8)
    records = np.concatenate([labels, pixels.reshape(n, -1)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(records.tobytes())
    return pixels, labels


def write_image(path: Path, array: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_folder(root: Path, counts: dict[str, int], size=8, seed=0, order=None):
    """Class folders of random RGB PNGs; returns {path: array}."""
    rng = np.random.default_rng(seed)
    written = {}
    items = [(c, i) for c, n in counts.items() for i in range(n)]
    for c, i in order(items) if order else items:
        arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        p = root / c / f"img{i:03d}.png"
        write_image(p, arr)
        written[str(p)] = arr
    return written


# ----------------------------------------------------------------------------------------------
# loaders read what was written


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_roundtrip(tmp_path, gz):
    data = write_fashion(tmp_path, gz=gz)
    pair = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert pair.name == "fashion-mnist" and len(pair.classes) == 10 and pair.classes[9] == "Ankle boot"
    for split, prefix in ((pair.train, "train"), (pair.test, "t10k")):
        images, labels = data[prefix]
        assert isinstance(split, TensorImageDataset) and split.channels == 1 and len(split) == len(labels)
        assert split.labels.dtype == torch.int64
        assert torch.equal(split.labels, torch.from_numpy(labels.astype(np.int64)))
        x, y = split.get_batch([3, 0, 5])
        assert x.dtype == torch.uint8 and x.shape == (3, 1, 6, 6)
        assert torch.equal(x[:, 0], torch.from_numpy(images[[3, 0, 5]]))
        assert y.tolist() == labels[[3, 0, 5]].tolist()


def test_fashion_mnist_folder_from_environment(tmp_path, monkeypatch):
    data = write_fashion(tmp_path / "elsewhere", n_train=20, n_test=10)
    monkeypatch.setenv("TRADY_FASHION_MNIST_DIR", str(tmp_path / "elsewhere"))
    pair = load_dataset("fashion-mnist")
    assert len(pair.train) == 20 and len(pair.test) == 10
    assert torch.equal(pair.train.images[:, 0], torch.from_numpy(data["train"][0]))
    monkeypatch.setenv("TRADY_FASHION_MNIST_DIR", str(tmp_path / "missing"))
    with pytest.raises(TradyError, match="missing"):
        load_dataset("fashion-mnist")
    assert len(load_dataset("fashion-mnist", data_dir=tmp_path / "elsewhere").test) == 10  # data_dir wins


def test_fashion_mnist_parent_folder_accepted(tmp_path):
    write_fashion(tmp_path / "fashion-mnist")
    pair = load_dataset("FASHION_MNIST", data_dir=tmp_path)
    assert len(pair.train) == 30 and len(pair.test) == 20


def test_digits_split_is_stratified_and_seeded():
    a = load_dataset("digits", seed=0)
    b = load_dataset("digits", seed=0)
    c = load_dataset("digits", seed=1)
    assert len(a.train) + len(a.test) == 1797 and abs(len(a.test) - 1797 * 0.25) < 10
    assert a.classes == [str(i) for i in range(10)] and a.train.channels == 1
    x, _ = a.train.get_batch(range(len(a.train)))
    assert x.shape[1:] == (1, 8, 8) and int(x.max()) == 255 and int(x.min()) == 0
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.test.images, c.test.images)
    full = torch.bincount(torch.cat([a.train.labels, a.test.labels]), minlength=10)
    test = torch.bincount(a.test.labels, minlength=10)
    assert ((test - full * 0.25).abs() <= 1).all()


def test_cifar10_roundtrip_outer_and_inner_folder(tmp_path):
    inner = tmp_path / "cifar-10-batches-bin"
    written = [write_cifar(inner / f"data_batch_{i}.bin", 4, 1, seed=i) for i in range(1, 6)]
    test_pixels, test_labels = write_cifar(inner / "test_batch.bin", 3, 1, seed=9)
    for data_dir in (tmp_path, inner):
        pair = load_dataset("cifar10", data_dir=data_dir)
        assert pair.classes[0] == "airplane" and len(pair.classes) == 10
        assert len(pair.train) == 20 and len(pair.test) == 3 and pair.train.channels == 3
        x, y = pair.train.get_batch([4, 19])
        assert torch.equal(x[0], torch.from_numpy(written[1][0][0]))  # first record of batch 2
        assert torch.equal(x[1], torch.from_numpy(written[4][0][3]))
        assert y.tolist() == [written[1][1][0, 0], written[4][1][3, 0]]
        assert torch.equal(pair.test.labels, torch.from_numpy(test_labels[:, 0].astype(np.int64)))
        assert torch.equal(pair.test.get_batch([2])[0][0], torch.from_numpy(test_pixels[2]))


def test_cifar100_uses_fine_labels(tmp_path):
    inner = tmp_path / "cifar-100-binary"
    pixels, labels = write_cifar(inner / "train.bin", 7, 2, n_classes=100)
    write_cifar(inner / "test.bin", 2, 2, seed=1, n_classes=20)
    assert not np.array_equal(labels[:, 0], labels[:, 1])
    pair = load_dataset("cifar-100", data_dir=tmp_path)
    assert pair.name == "cifar100" and len(pair.classes) == 100 and pair.classes[-1] == "worm"
    assert torch.equal(pair.train.labels, torch.from_numpy(labels[:, 1].astype(np.int64)))
    assert torch.equal(pair.train.get_batch([6])[0][0], torch.from_numpy(pixels[6]))


def test_image_folder_train_test_layout(tmp_path):
    train = make_folder(tmp_path / "train", {"cat": 3, "dog": 2})
    test = make_folder(tmp_path / "test", {"cat": 1, "dog": 1}, seed=1)
    # a grey, non-square image and a non-image file
    grey = np.arange(10 * 16, dtype=np.uint8).reshape(10, 16)
    write_image(tmp_path / "train" / "dog" / "wide.png", grey)
    (tmp_path / "train" / "dog" / "notes.txt").write_text("not an image")
    pair = load_dataset(tmp_path, load_size=8)
    assert pair.classes == ["cat", "dog"] and pair.name == str(tmp_path)
    assert isinstance(pair.train, ImageFolderDataset) and pair.train.channels == 3
    assert len(pair.train) == 6 and len(pair.test) == 2
    assert pair.train.labels.tolist() == [0, 0, 0, 1, 1, 1]
    x, y = pair.train.get_batch(range(6))
    assert x.dtype == torch.uint8 and x.shape == (6, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1]
    for i, p in enumerate(pair.train.paths):
        if p in train:
            assert torch.equal(x[i], torch.from_numpy(train[p]).permute(2, 0, 1))
    # the 10x16 grey image: height 10 -> 8, width 16 -> 13, centre crop of 8 columns; grey -> RGB
    i = pair.train.paths.index(str(tmp_path / "train" / "dog" / "wide.png"))
    expected = np.asarray(Image.fromarray(grey).convert("RGB").resize((13, 8), Image.Resampling.BILINEAR))
    assert torch.equal(x[i], torch.from_numpy(expected[:, 2:10].copy()).permute(2, 0, 1))
    assert torch.equal(x[i][0], x[i][1]) and torch.equal(x[i][1], x[i][2])
    xt, _ = pair.test.get_batch([0, 1])
    assert torch.equal(xt[0], torch.from_numpy(test[pair.test.paths[0]]).permute(2, 0, 1))


def test_image_folder_single_layout_split_80_20(tmp_path):
    make_folder(tmp_path / "imgs", {"a": 10, "b": 5, "c": 5})
    pair = load_dataset(str(tmp_path / "imgs"), seed=3, load_size=8)
    assert pair.classes == ["a", "b", "c"]
    assert torch.bincount(pair.test.labels).tolist() == [2, 1, 1]
    assert torch.bincount(pair.train.labels).tolist() == [8, 4, 4]
    assert not set(pair.train.paths) & set(pair.test.paths)
    again = load_dataset(str(tmp_path / "imgs"), seed=3, load_size=8)
    assert again.test.paths == pair.test.paths
    other = [load_dataset(str(tmp_path / "imgs"), seed=s, load_size=8).test.paths for s in range(4, 9)]
    assert any(o != pair.test.paths for o in other)


def test_image_folder_subset_independent_of_file_order(tmp_path):
    counts = {"a": 6, "b": 4}
    make_folder(tmp_path / "one", counts)
    make_folder(tmp_path / "two", counts, order=lambda items: items[::-1])
    kw = dict(train_size=5, test_size=2, seed=7, load_size=8)
    one, two = load_dataset(tmp_path / "one", **kw), load_dataset(tmp_path / "two", **kw)
    rel = lambda paths, root: [os.path.relpath(p, root) for p in paths]  # noqa: E731
    assert rel(one.train.paths, tmp_path / "one") == rel(two.train.paths, tmp_path / "two")
    assert rel(one.test.paths, tmp_path / "one") == rel(two.test.paths, tmp_path / "two")


# ----------------------------------------------------------------------------------------------
# stratified subsets


def test_stratified_subset_balanced_reproducible_seeded():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 7)
    idx = stratified_subset(labels, 12, seed=0)
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert sum(counts) == 12 and counts[1] == 3 and sorted([counts[0], counts[2]]) == [4, 5]
    assert torch.equal(idx, stratified_subset(labels, 12, seed=0))
    assert idx.unique().numel() == 12 and torch.equal(idx, idx.sort().values)
    assert any(not torch.equal(idx, stratified_subset(labels, 12, seed=s)) for s in range(1, 6))
    # the one sample left over goes to a seed-chosen class among those with samples left
    by_seed = {tuple(torch.bincount(labels[stratified_subset(labels, 12, s)]).tolist()) for s in range(20)}
    assert by_seed == {(5, 3, 4), (4, 3, 5)}
    assert torch.bincount(labels[stratified_subset(labels, 11, seed=4)]).tolist() == [4, 3, 4]
    even = torch.bincount(labels[stratified_subset(labels, 9, seed=2)], minlength=3).tolist()
    assert even == [3, 3, 3]


def test_load_dataset_subsets_balanced(tmp_path):
    write_fashion(tmp_path, n_train=50, n_test=30)
    a = load_dataset("fashion-mnist", data_dir=tmp_path, train_size=20, test_size=10, seed=5)
    b = load_dataset("fashion-mnist", data_dir=tmp_path, train_size=20, test_size=10, seed=5)
    c = load_dataset("fashion-mnist", data_dir=tmp_path, train_size=20, test_size=10, seed=6)
    assert len(a.train) == 20 and len(a.test) == 10
    assert torch.bincount(a.train.labels, minlength=10).tolist() == [2] * 10
    assert torch.bincount(a.test.labels, minlength=10).tolist() == [1] * 10
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.images, b.test.images)
    assert not torch.equal(a.train.images, c.train.images)


# ----------------------------------------------------------------------------------------------
# transforms


def test_eval_transform_normalisation_by_hand():
    x = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    out = ImageTransform(5, MEAN, STD, train=False)(x)
    assert out.shape == (2, 3, 5, 5) and out.dtype == torch.float32
    for c in range(3):
        expected = (x[:, c].double() / 255.0 - MEAN[c]) / STD[c]
        assert torch.allclose(out[:, c].double(), expected, atol=1e-5)


def test_eval_transform_grey_to_rgb_and_resize():
    grey = torch.full((3, 1, 7, 7), 51, dtype=torch.uint8)  # 0.2 everywhere
    out = ImageTransform(16, MEAN, STD)(grey)
    assert out.shape == (3, 3, 16, 16)
    for c in range(3):
        assert torch.allclose(out[:, c], torch.tensor((0.2 - MEAN[c]) / STD[c]), atol=1e-5)
    # identity normalisation: outputs stay within [0, 1], channels equal
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    out = ImageTransform(128, (0, 0, 0), (1, 1, 1))(x)
    assert out.shape == (4, 3, 128, 128) and out.min() >= 0 and out.max() <= 1
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    ref = torch.nn.functional.interpolate(x.float() / 255, size=(128, 128), mode="bilinear", antialias=True)
    assert torch.allclose(out[:, 0], ref[:, 0], atol=1e-5)
    # shrinking is antialiased: a 2-pixel checkerboard averages to grey
    board = (torch.arange(64).view(8, 8) + torch.arange(64).view(8, 8) // 8) % 2 * 255
    small = ImageTransform(4, (0, 0, 0), (1, 1, 1))(board.to(torch.uint8).view(1, 1, 8, 8))
    assert torch.allclose(small, torch.full_like(small, 0.5), atol=0.02)  # (corners see the border)


def test_train_transform_shapes_and_determinism():
    x = torch.randint(0, 256, (8, 3, 20, 20), dtype=torch.uint8)
    t = ImageTransform(32, MEAN, STD, train=True)
    a = t(x, torch.Generator().manual_seed(1))
    b = t(x, torch.Generator().manual_seed(1))
    c = t(x, torch.Generator().manual_seed(2))
    assert a.shape == (8, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    lo = min((0 - m) / s for m, s in zip(MEAN, STD))
    hi = max((1 - m) / s for m, s in zip(MEAN, STD))
    assert a.min() >= lo - 1e-5 and a.max() <= hi + 1e-5
    # params drawn for a larger batch can be sliced (data-parallel shards)
    params = t.sample_params(8, torch.Generator().manual_seed(1))
    assert torch.equal(t(x[2:5], params=params[2:5]), a[2:5])


def test_flip_only_is_exact_flip_per_sample():
    x = torch.randint(0, 256, (16, 1, 6, 6), dtype=torch.uint8)
    t = ImageTransform(6, (0, 0, 0), (1, 1, 1), train=True, crop_scale=None)
    out = t(x, torch.Generator().manual_seed(0))
    ref = x.float().expand(-1, 3, -1, -1) / 255
    flipped = [bool(torch.allclose(out[i], ref[i].flip(-1))) for i in range(16)]
    same = [bool(torch.allclose(out[i], ref[i])) for i in range(16)]
    assert all(f or s for f, s in zip(flipped, same)) and any(flipped) and any(same)
    assert torch.equal(out, t(x, torch.Generator().manual_seed(0)))
    # no crop and no flip: training equals evaluation (upsampling, single resampling)
    plain = ImageTransform(16, MEAN, STD, train=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
    assert torch.allclose(plain(x, torch.Generator().manual_seed(3)), ImageTransform(16, MEAN, STD)(x), atol=1e-5)


def test_crop_zooms_into_the_image():
    # left half black, right half white; crops of a quarter area often see one half only
    x = torch.zeros(64, 1, 16, 16, dtype=torch.uint8)
    x[..., 8:] = 255
    t = ImageTransform(16, (0, 0, 0), (1, 1, 1), train=True, crop_scale=(0.2, 0.25), flip=False)
    out = t(x, torch.Generator().manual_seed(0))
    means = out.mean((1, 2, 3))
    assert (means < 0.1).any() and (means > 0.9).any()
    assert out.min() >= 0 and out.max() <= 1


def test_transform_rejects_bad_input():
    t = ImageTransform(8, MEAN, STD)
    with pytest.raises(ValueError):
        t(torch.zeros(2, 2, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError):
        ImageTransform(8, (0.5, 0.5), STD)


# ----------------------------------------------------------------------------------------------
# BatchLoader


def tiny_dataset(n=23, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=g)
    return TensorImageDataset(images, torch.arange(n) % 4)


def collect(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_batch_loader_basic_order_and_len():
    ds = tiny_dataset()
    loader = BatchLoader(ds, 5, transform=None, shuffle=False)
    batches = collect(loader)
    assert len(loader) == len(batches) == 5 and [len(y) for _, y in batches] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([y for _, y in batches]), ds.labels)
    assert torch.allclose(batches[0][0], ds.images[:5].float() / 255)
    dropped = BatchLoader(ds, 5, None, drop_last=True)
    assert len(dropped) == 4 and len(collect(dropped)) == 4
    shuffled = BatchLoader(ds, 5, None, shuffle=True, seed=0)
    idx = torch.cat(shuffled.batch_indices())
    assert sorted(idx.tolist()) == list(range(23)) and idx.tolist() != list(range(23))


def test_batch_loader_set_epoch_replays_exactly():
    ds = tiny_dataset()
    t = ImageTransform(12, MEAN, STD, train=True)
    loader = BatchLoader(ds, 4, t, shuffle=True, seed=11)
    loader.set_epoch(3)
    first = collect(loader)
    loader.set_epoch(4)
    other = collect(loader)
    loader.set_epoch(3)
    replay = collect(loader)
    fresh = BatchLoader(ds, 4, t, shuffle=True, seed=11)
    fresh.set_epoch(3)
    for (x1, y1), (x2, y2), (x3, y3) in zip(first, replay, collect(fresh)):
        assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(x1, x3) and torch.equal(y1, y3)
    assert any(not torch.equal(y1, y2) for (_, y1), (_, y2) in zip(first, other))
    other_seed = BatchLoader(ds, 4, t, shuffle=True, seed=12)
    other_seed.set_epoch(3)
    assert any(not torch.equal(y1, y2) for (_, y1), (_, y2) in zip(first, collect(other_seed)))


@pytest.mark.parametrize("n,drop_last", [(24, False), (23, True), (23, False), (26, False)])
def test_rank_shards_union_equals_single_process(n, drop_last):
    ds = tiny_dataset(n)
    t = ImageTransform(8, MEAN, STD, train=True)
    world, bs = 3, 2
    single = BatchLoader(ds, bs * world, t, shuffle=True, seed=5, drop_last=drop_last)
    ranks = [BatchLoader(ds, bs, t, shuffle=True, seed=5, drop_last=drop_last, rank=r, world_size=world)
             for r in range(world)]  # fmt: skip
    for loader in [single, *ranks]:
        loader.set_epoch(2)
    assert len({len(r) for r in ranks}) == 1
    shard_batches = [collect(r) for r in ranks]
    single_batches = collect(single)
    assert len(single_batches) >= len(shard_batches[0]) == len(ranks[0])
    seen = []
    for step, parts in enumerate(zip(*shard_batches)):
        sizes = {len(y) for _, y in parts}
        assert len(sizes) == 1  # equal-size shards
        xs, ys = torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])
        sx, sy = single_batches[step]
        assert torch.equal(ys, sy[: len(ys)]) and torch.allclose(xs, sx[: len(xs)], atol=1e-6)
        seen += torch.cat([r.batch_indices()[step] for r in ranks]).tolist()
    assert len(seen) == len(set(seen))  # disjoint
    expected = n - n % (bs * world) if drop_last else n - n % world
    assert len(seen) == expected


# ----------------------------------------------------------------------------------------------
# errors name the file


def test_error_missing_folder_and_file(tmp_path):
    with pytest.raises(TradyError, match="nope"):
        load_dataset("fashion-mnist", data_dir=tmp_path / "nope")
    write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(TradyError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    with pytest.raises(TradyError, match="data_dir"):
        load_dataset("cifar10")
    (tmp_path / "c10").mkdir()
    with pytest.raises(TradyError, match="data_batch_1.bin"):
        load_dataset("cifar10", data_dir=tmp_path / "c10")
    with pytest.raises(TradyError, match="missing"):
        load_dataset(tmp_path / "no-such-images")


@pytest.mark.parametrize(
    "corrupt,match",
    [
        (lambda raw: b"\x00\x00\x09\x03" + raw[4:], "magic"),
        (lambda raw: raw[:-7], "size"),
        (lambda raw: raw[:2], "magic|header"),
    ],
)
def test_error_bad_idx(tmp_path, corrupt, match):
    write_fashion(tmp_path, gz=False)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(corrupt(p.read_bytes()))
    with pytest.raises(TradyError, match=match) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_error_corrupt_gzip_and_count_mismatch(tmp_path):
    write_fashion(tmp_path)
    p = tmp_path / "train-labels-idx1-ubyte.gz"
    p.write_bytes(p.read_bytes()[:-10])
    with pytest.raises(TradyError, match="train-labels-idx1-ubyte.gz"):
        load_dataset("fashion-mnist", data_dir=tmp_path)
    p.write_bytes(gzip.compress(idx_bytes(np.zeros(29, np.uint8))))
    with pytest.raises(TradyError, match="30 images but 29 labels"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_error_truncated_cifar(tmp_path):
    inner = tmp_path / "cifar-100-binary"
    write_cifar(inner / "train.bin", 3, 2, n_classes=100)
    write_cifar(inner / "test.bin", 2, 2, n_classes=100)
    p = inner / "test.bin"
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(TradyError, match="3074") as info:
        load_dataset("cifar100", data_dir=tmp_path)
    assert str(p) in str(info.value)


def test_error_unreadable_image(tmp_path):
    make_folder(tmp_path / "train", {"a": 2, "b": 2})
    make_folder(tmp_path / "test", {"a": 1, "b": 1})
    bad = tmp_path / "train" / "b" / "broken.png"
    bad.write_bytes(b"this is not a png")
    pair = load_dataset(tmp_path, load_size=8)
    i = pair.train.paths.index(str(bad))
    with pytest.raises(TradyError, match="broken.png"):
        pair.train.get_batch([0, i])


def test_error_empty_class_folder_and_no_classes(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TradyError, match="no class subfolders"):
        load_dataset(tmp_path / "empty")
    make_folder(tmp_path / "imgs", {"a": 2})
    (tmp_path / "imgs" / "b").mkdir()
    with pytest.raises(TradyError, match=str(tmp_path / "imgs" / "b")):
        load_dataset(tmp_path / "imgs")


def test_error_unknown_name_and_sizes(tmp_path):
    with pytest.raises(TradyError, match="fashion-mnist") as info:
        load_dataset("fashon-mnist")
    assert "image folder" in str(info.value)
    write_fashion(tmp_path)
    with pytest.raises(TradyError, match="31.*30"):
        load_dataset("fashion-mnist", data_dir=tmp_path, train_size=31)
    with pytest.raises(TradyError, match="test_size 21.*20"):
        load_dataset("fashion-mnist", data_dir=tmp_path, test_size=21)
    with pytest.raises(TradyError, match="positive"):
        load_dataset("fashion-mnist", data_dir=tmp_path, train_size=0)
    with pytest.raises(TradyError, match="rank"):
        BatchLoader(tiny_dataset(5), 2, None, rank=2, world_size=2)
    empty = BatchLoader(tiny_dataset(5), 8, None, drop_last=True)
    assert len(empty) == 0 and list(empty) == []


# ----------------------------------------------------------------------------------------------
# the real Debian Fashion-MNIST


def test_real_fashion_mnist():
    if not Path(FASHION_MNIST_DIR).is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{FASHION_MNIST_DIR} is missing on CI (install the dataset-fashion-mnist package)")
        pytest.skip(f"{FASHION_MNIST_DIR} not installed")
    full = load_dataset("fashion-mnist")
    pair_train = full.train.subset(stratified_subset(full.train.labels, 1000, seed=0))
    assert len(full.train) == 60000 and len(full.test) == 10000
    assert full.train.images.shape == (60000, 1, 28, 28)
    assert torch.bincount(full.test.labels).tolist() == [1000] * 10
    assert full.classes[0] == "T-shirt/top" and torch.bincount(full.train.labels).tolist() == [6000] * 10
    assert torch.bincount(pair_train.labels).tolist() == [100] * 10
    x, y = pair_train.get_batch(range(32))
    out = ImageTransform(128, MEAN, STD, train=True)(x, torch.Generator().manual_seed(0))
    assert out.shape == (32, 3, 128, 128) and torch.isfinite(out).all()
    assert 60 < full.train.images.float().mean() < 90  # mostly dark background
