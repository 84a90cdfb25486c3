"""Tests of the data layer: sources, splits, transforms and the class-balanced sampler."""
from __future__ import annotations

import gzip
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import datasets as sk_datasets
from torch.utils.data import DataLoader

from knnsolver.data import ClassBalancedBatchSampler, build_data
from knnsolver.data import transforms as T
from knnsolver.data.datasets import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR
from knnsolver.errors import ConfigError, DataError


def rows_of(ds) -> set[int]:
    return set(ds.rows.tolist())


@pytest.fixture(scope="module")
def sk_digits():
    return sk_datasets.load_digits()


@pytest.fixture(scope="module")
def digits():
    return build_data("digits")


# ---------------------------------------------------------------- digits


def test_digits_items_shapes_values_and_row_index(digits, sk_digits):
    assert digits.input_shape == (1, 8, 8)
    assert digits.num_classes == 10 and digits.class_names == [str(d) for d in range(10)]
    for ds in (digits.train, digits.val, digits.test):
        for i in (0, 7, len(ds) - 1):
            x, y, idx = ds[i]
            assert x.shape == (1, 8, 8) and x.dtype == torch.float32
            assert idx == i
            src = ds.rows[i]
            np.testing.assert_allclose(x[0].numpy(), sk_digits.images[src] / 16.0, rtol=0, atol=1e-7)
            assert int(y) == sk_digits.target[src]
    xs = torch.stack([digits.train_eval[i][0] for i in range(len(digits.train_eval))])
    assert xs.min() == 0.0 and xs.max() == 1.0
    assert torch.equal(digits.train_labels, torch.as_tensor(sk_digits.target[digits.train_eval.rows]))


def test_digits_standard_split_sizes_stratified_disjoint(digits, sk_digits):
    n = len(sk_digits.target)
    assert len(digits.test) == round(0.2 * n)  # fixed 80/20 official split
    n_pool = n - len(digits.test)
    assert len(digits.val) == round(0.1 * n_pool)
    assert len(digits.train) == n_pool - len(digits.val)
    train, val, test = rows_of(digits.train), rows_of(digits.val), rows_of(digits.test)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(range(n))
    all_counts = Counter(sk_digits.target.tolist())
    test_counts = Counter(sk_digits.target[digits.test.rows].tolist())
    for c, count in all_counts.items():
        assert abs(test_counts[c] - 0.2 * count) <= 1
    val_counts = Counter(digits.val.labels.tolist())
    pool_counts = Counter(sk_digits.target[sorted(train | val)].tolist())
    for c, count in pool_counts.items():
        assert abs(val_counts[c] - 0.1 * count) <= 1


def test_split_seed_changes_val_but_not_test(digits):
    same = build_data("digits", seed=0)
    other = build_data("digits", seed=1)
    assert np.array_equal(same.val.rows, digits.val.rows) and np.array_equal(same.train.rows, digits.train.rows)
    assert not np.array_equal(other.val.rows, digits.val.rows)
    assert np.array_equal(other.test.rows, digits.test.rows)


def test_val_fraction_zero_gives_no_val(digits):
    b = build_data("digits", val_fraction=0.0)
    assert b.val is None
    assert len(b.train) + len(digits.test) == 1797


def test_digits_augmentation_shifts_but_keeps_shape():
    b = build_data("digits", augment=True)
    assert b.train is not b.train_eval and np.array_equal(b.train.rows, b.train_eval.rows)
    torch.manual_seed(0)
    changed = 0
    for i in range(20):
        xa, ya, ia = b.train[i]
        xe, ye, ie = b.train_eval[i]
        assert xa.shape == xe.shape == (1, 8, 8) and int(ya) == int(ye) and ia == ie == i
        changed += not torch.equal(xa, xe)
    assert changed >= 10
    torch.manual_seed(5)
    first = b.train[3][0]
    torch.manual_seed(5)
    assert torch.equal(first, b.train[3][0])


# ---------------------------------------------------------------- disjoint split and caps


def test_disjoint_split_classes_and_remapping(sk_digits):
    b = build_data("digits", split="disjoint", val_fraction=0.1)
    assert b.train_class_ids == [0, 1, 2, 3, 4] and b.test_class_ids == [5, 6, 7, 8, 9]
    assert b.class_names == ["0", "1", "2", "3", "4"] and b.test_class_names == ["5", "6", "7", "8", "9"]
    assert b.num_classes == 5
    target = sk_digits.target
    # every row of the train classes (official train and test pooled) is in train or val, every other row in test
    assert rows_of(b.train) | rows_of(b.val) == set(np.flatnonzero(target < 5).tolist())
    assert rows_of(b.test) == set(np.flatnonzero(target >= 5).tolist())
    assert not rows_of(b.train) & rows_of(b.val)
    assert torch.equal(b.train_labels, torch.as_tensor(target[b.train.rows]))
    assert torch.equal(b.test.labels, torch.as_tensor(target[b.test.rows] - 5))
    assert set(b.val.labels.tolist()) == set(range(5))


def test_disjoint_explicit_train_classes(sk_digits):
    b = build_data("digits", split="disjoint", train_classes=[7, 2, 9], val_fraction=0.0)
    assert b.train_class_ids == [2, 7, 9] and b.class_names == ["2", "7", "9"]
    assert b.test_class_ids == [0, 1, 3, 4, 5, 6, 8]
    lookup = {2: 0, 7: 1, 9: 2}
    assert b.train_labels.tolist() == [lookup[t] for t in sk_digits.target[b.train.rows]]
    test_lookup = {c: i for i, c in enumerate(b.test_class_ids)}
    assert b.test.labels.tolist() == [test_lookup[t] for t in sk_digits.target[b.test.rows]]
    _, y, _ = b.test[0]
    assert b.test_class_names[int(y)] == str(sk_digits.target[b.test.rows[0]])


def test_class_disjoint_validation_holds_out_whole_training_classes(sk_digits):
    """val_classes: the last training classes validate, every row of them, and none trains; test is unchanged."""
    b = build_data("digits", split="disjoint", train_classes=[0, 1, 2, 3, 4, 5], val_classes=2, val_fraction=0.3)
    target = sk_digits.target
    assert b.train_class_ids == [0, 1, 2, 3] and b.num_classes == 4 and b.class_names == ["0", "1", "2", "3"]
    assert b.val_class_names == ["4", "5"] and b.test_class_ids == [6, 7, 8, 9]
    assert rows_of(b.train) == set(np.flatnonzero(target < 4).tolist())  # val_fraction carves nothing
    assert rows_of(b.val) == set(np.flatnonzero((target == 4) | (target == 5)).tolist())
    assert rows_of(b.test) == set(np.flatnonzero(target >= 6).tolist())
    assert torch.equal(b.val.labels, torch.as_tensor(target[b.val.rows] - 4))  # 0..V-1 among themselves
    capped = build_data("digits", split="disjoint", val_classes=2, max_per_class=5)  # the cap is for training rows
    assert Counter(capped.train_labels.tolist()) == {0: 5, 1: 5, 2: 5} and len(capped.val) == (target == 3).sum() + (
        target == 4).sum()
    assert build_data("digits", split="disjoint").val_class_names == []
    with pytest.raises(ConfigError, match="val_classes only applies to split 'disjoint'"):
        build_data("digits", val_classes=2)
    with pytest.raises(ConfigError, match="hold out at least 2 of the 5 training classes .* got 1"):
        build_data("digits", split="disjoint", val_classes=1)
    with pytest.raises(ConfigError, match="leave at least 2 to train on, got 4"):
        build_data("digits", split="disjoint", val_classes=4)
    with pytest.raises(ConfigError, match="leave at least 2 to train on, got 9"):  # was "got 5": the slice's length
        build_data("digits", split="disjoint", val_classes=9)
    chosen = build_data("digits", split="disjoint", train_classes=[0, 1, 2, 3, 4, 6], val_classes=[6, 4])
    assert chosen.train_class_ids == [0, 1, 2, 3] and chosen.val_class_names == ["4", "6"]
    assert chosen.test_class_ids == [5, 7, 8, 9]
    with pytest.raises(ConfigError, match=r"val_classes \[7\] are not training classes"):
        build_data("digits", split="disjoint", val_classes=[3, 7])


def test_max_per_class_caps_train_only(digits):
    b = build_data("digits", max_per_class=7, seed=3)
    assert Counter(b.train_labels.tolist()) == {c: 7 for c in range(10)}
    assert rows_of(b.train) <= rows_of(build_data("digits", seed=3).train)
    again = build_data("digits", max_per_class=7, seed=3)
    assert np.array_equal(again.train.rows, b.train.rows)
    assert np.array_equal(b.val.rows, build_data("digits", seed=3).val.rows)  # validation ignores the cap
    assert np.array_equal(b.test.rows, digits.test.rows)
    big = build_data("digits", max_per_class=10_000)
    assert np.array_equal(big.train.rows, digits.train.rows)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "random"}, "unknown split 'random'"),
        ({"val_fraction": -0.1}, "val_fraction must be in [0, 1)"),
        ({"val_fraction": 1.0}, "val_fraction must be in [0, 1)"),
        ({"max_per_class": 0}, "max_per_class must be >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"train_classes": [1, 2]}, "train_classes only applies to split 'disjoint'"),
        ({"split": "disjoint", "train_classes": [3, 42]}, "train_classes [42] are not class ids"),
        ({"split": "disjoint", "train_classes": list(range(10))}, "leave at least one for testing"),
        ({"data_dir": "/tmp"}, "takes no data_dir"),
    ],
)
def test_build_data_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        build_data("digits", **kwargs)
    assert message in str(err.value)


def test_unknown_dataset_lists_choices():
    with pytest.raises(ConfigError, match="unknown dataset 'mnist'.*digits"):
        build_data("mnist")


# ---------------------------------------------------------------- fashion-mnist


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file, the header built independently of the reader."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fashion_dir(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (12, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(12) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.array([9, 0, 3, 3, 1]),
    }
    for name, a in arrays.items():
        write_idx(tmp_path / name, a)
    return tmp_path, arrays


def test_fashion_synthetic_idx(fashion_dir):
    root, arrays = fashion_dir
    b = build_data("fashion-mnist", data_dir=str(root), val_fraction=0.0)
    assert b.input_shape == (1, 28, 28)
    assert b.class_names == FASHION_MNIST_CLASSES and b.class_names[0] == "T-shirt/top"
    assert len(b.train) == 12 and len(b.test) == 5
    for ds, images, labels in (
        (b.train, arrays["train-images-idx3-ubyte.gz"], arrays["train-labels-idx1-ubyte.gz"]),
        (b.test, arrays["t10k-images-idx3-ubyte.gz"], arrays["t10k-labels-idx1-ubyte.gz"]),
    ):
        for i in range(len(ds)):
            x, y, idx = ds[i]
            np.testing.assert_allclose(x[0].numpy(), images[i] / 255.0, atol=1e-6)
            assert int(y) == labels[i] and idx == i


def _corrupt(root: Path, case: str) -> Path:
    """Break one file of a synthetic Fashion-MNIST folder; return the path the error must name."""
    images, labels = root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"
    if case == "missing":
        labels.unlink()
        return labels
    if case == "not-gzip":
        images.write_bytes(b"definitely not gzip data")
        return images
    if case == "truncated-gzip":
        images.write_bytes(images.read_bytes()[:200])
        return images
    if case == "bad-magic":
        write_idx(images, np.zeros((12, 28, 28)), magic=0x0000_0901)
        return images
    if case == "truncated-data":
        raw = struct.pack(">IIII", 0x803, 12, 28, 28) + bytes(12 * 28 * 28 - 10)
        images.write_bytes(gzip.compress(raw))
        return images
    if case == "short-header":
        images.write_bytes(gzip.compress(struct.pack(">II", 0x803, 12)))
        return images
    if case == "count-mismatch":
        write_idx(labels, np.arange(11) % 10)
        return labels
    if case == "label-range":
        write_idx(labels, np.full(12, 10))
        return labels
    if case == "size-mismatch":
        write_idx(root / "t10k-images-idx3-ubyte.gz", np.zeros((5, 27, 28)))
        return root / "t10k-images-idx3-ubyte.gz"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["missing", "not-gzip", "truncated-gzip", "bad-magic", "truncated-data", "short-header", "count-mismatch", "label-range", "size-mismatch"],
)
def test_fashion_corrupt_files_raise_data_error(fashion_dir, case):
    root, _ = fashion_dir
    bad = _corrupt(root, case)
    with pytest.raises(DataError) as err:
        build_data("fashion-mnist", data_dir=str(root))
    assert str(bad) in str(err.value)
    assert "make data" in str(err.value) and "--data-dir" in str(err.value)


def test_fashion_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist.*make data"):
        build_data("fashion-mnist", data_dir=str(tmp_path / "nowhere"))


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR).is_dir(), reason="Fashion-MNIST not installed (make data)")
def test_fashion_real_files():
    b = build_data("fashion-mnist", val_fraction=0.0)
    assert len(b.train) == 60_000 and len(b.test) == 10_000 and b.num_classes == 10
    with gzip.open(Path(FASHION_MNIST_DIR) / "t10k-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8)
    with gzip.open(Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz") as f:
        test_labels = np.frombuffer(f.read(), dtype=np.uint8)[8:]
    test_images = raw[16:].reshape(-1, 28, 28)
    for i in (0, 1, 9_999):
        x, y, idx = b.test[i]
        assert x.shape == (1, 28, 28) and idx == i
        np.testing.assert_allclose(x[0].numpy(), test_images[i] / 255.0, atol=1e-6)
        assert int(y) == test_labels[i]
    assert Counter(b.train_labels.tolist()) == {c: 6000 for c in range(10)}
    assert 0.0 <= float(b.train[123][0].min()) and float(b.train[123][0].max()) <= 1.0


# ---------------------------------------------------------------- image folder

COLOURS = {"cat": (255, 0, 0), "dog": (0, 128, 255), "owl": (10, 200, 30)}


def write_images(root: Path, per_class: int = 5, classes=COLOURS) -> None:
    for name, colour in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (12, 10), colour).save(root / name / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image, ignored")


def test_image_folder_pool_split_shapes_and_values(tmp_path):
    write_images(tmp_path)
    b = build_data("image-folder", data_dir=str(tmp_path), image_size=16, val_fraction=0.0)
    assert b.input_shape == (3, 16, 16) and b.class_names == ["cat", "dog", "owl"]
    assert len(b.train) == 12 and len(b.test) == 3  # 80/20 of 5 per class
    assert Counter(b.test.labels.tolist()) == {0: 1, 1: 1, 2: 1}
    for ds in (b.train, b.test):
        for i in range(len(ds)):
            x, y, idx = ds[i]
            assert x.shape == (3, 16, 16) and idx == i
            expected = torch.tensor(COLOURS[b.class_names[int(y)]], dtype=torch.float32) / 255.0
            np.testing.assert_allclose(x.numpy(), expected[:, None, None].expand(3, 16, 16).numpy(), atol=1e-5)


def test_image_folder_train_test_layout(tmp_path):
    write_images(tmp_path / "train", per_class=3)
    write_images(tmp_path / "test", per_class=2, classes={"cat": COLOURS["cat"], "dog": COLOURS["dog"]})
    b = build_data("image-folder", data_dir=str(tmp_path), image_size=8, val_fraction=0.0)
    assert len(b.train) == 9 and len(b.test) == 4
    assert b.class_names == ["cat", "dog", "owl"] and b.test.labels.tolist() == [0, 0, 1, 1]
    paths = b.test.pool.paths
    assert all("test" in paths[r].parts for r in b.test.rows)


def test_image_folder_augmentation_and_true_flip(tmp_path):
    write_images(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "dog" / "noise.png")
    b = build_data("image-folder", data_dir=str(tmp_path), image_size=16, val_fraction=0.0, augment=True)
    i = next(i for i in range(len(b.train)) if b.train.pool.paths[b.train.rows[i]].name == "noise.png")
    clean = b.train_eval[i][0]
    torch.manual_seed(0)
    augmented = [b.train[i][0] for _ in range(5)]
    assert all(a.shape == clean.shape == (3, 16, 16) for a in augmented)
    assert sum(not torch.allclose(a, clean) for a in augmented) >= 4
    flipped = T.RandomHorizontalFlip(p=1.0)(clean)
    assert torch.equal(flipped, torch.from_numpy(np.ascontiguousarray(clean.numpy()[:, :, ::-1])))
    assert torch.equal(T.RandomHorizontalFlip(p=0.0)(clean), clean)


def test_image_folder_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs data_dir"):
        build_data("image-folder")
    with pytest.raises(DataError, match="does not exist"):
        build_data("image-folder", data_dir=str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class sub-folders") as err:
        build_data("image-folder", data_dir=str(empty))
    assert str(empty) in str(err.value)
    (empty / "a").mkdir()
    (empty / "a" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="holds no images") as err:
        build_data("image-folder", data_dir=str(empty))
    assert str(empty / "a") in str(err.value)
    half = tmp_path / "half"
    write_images(half / "train")
    with pytest.raises(DataError, match="no test/"):
        build_data("image-folder", data_dir=str(half))


def test_image_folder_unreadable_images(tmp_path):
    write_images(tmp_path)
    garbage = tmp_path / "dog" / "garbage.png"
    garbage.write_bytes(b"this is not a png")
    with pytest.raises(DataError) as err:
        build_data("image-folder", data_dir=str(tmp_path))
    assert str(garbage) in str(err.value)
    garbage.unlink()
    truncated = tmp_path / "owl" / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(truncated)
    b = build_data("image-folder", data_dir=str(tmp_path), val_fraction=0.0, image_cache_mb=0)  # read lazily
    truncated.write_bytes(truncated.read_bytes()[:2000])  # header intact, pixel data cut
    with pytest.raises(DataError, match="truncated") as err:  # found when the data is built
        build_data("image-folder", data_dir=str(tmp_path), val_fraction=0.0)
    assert str(truncated) in str(err.value)
    ds = b.train if truncated in [b.train.pool.paths[r] for r in b.train.rows] else b.test
    i = [ds.pool.paths[r] for r in ds.rows].index(truncated)
    with pytest.raises(DataError) as err:  # and on access, when it was cut after that
        ds[i]
    assert str(truncated) in str(err.value)


# ---------------------------------------------------------------- embeddings


def test_embeddings_npz_with_and_without_test(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 3)), np.repeat([10, 20, 30, 40], 5)
    x_test, y_test = rng.normal(size=(4, 3)), np.array([40, 10, 10, 20])
    np.savez(tmp_path / "e.npz", x=x, y=y, x_test=x_test, y_test=y_test)
    b = build_data("embeddings", data_dir=str(tmp_path / "e.npz"), val_fraction=0.0)
    assert b.input_shape == (3,) and b.class_names == ["10", "20", "30", "40"]
    assert len(b.train) == 20 and b.train_labels.tolist() == np.repeat([0, 1, 2, 3], 5).tolist()
    assert b.test.labels.tolist() == [3, 0, 0, 1]
    xt, yt, it = b.test[1]
    assert xt.dtype == torch.float32 and it == 1 and int(yt) == 0
    np.testing.assert_allclose(xt.numpy(), x_test[1], rtol=1e-6)
    np.savez(tmp_path / "plain.npz", x=x, y=y)
    plain = build_data("embeddings", data_dir=str(tmp_path / "plain.npz"), val_fraction=0.0)
    assert len(plain.train) == 16 and len(plain.test) == 4
    assert Counter(plain.test.labels.tolist()) == {0: 1, 1: 1, 2: 1, 3: 1}


def test_embeddings_npy_folder(tmp_path):
    x = np.arange(30, dtype=np.float64).reshape(10, 3)
    np.save(tmp_path / "features.npy", x)
    np.save(tmp_path / "labels.npy", np.array([0, 1] * 5))
    np.save(tmp_path / "test_features.npy", x[:2] + 0.5)
    np.save(tmp_path / "test_labels.npy", np.array([1, 0]))
    b = build_data("embeddings", data_dir=str(tmp_path), val_fraction=0.2, seed=4)
    assert len(b.train) == 8 and len(b.val) == 2 and len(b.test) == 2
    assert sorted(b.val.labels.tolist()) == [0, 1]
    for i in range(len(b.train)):
        x_i, y_i, _ = b.train[i]
        np.testing.assert_array_equal(x_i.numpy(), x[b.train.rows[i]])
        assert int(y_i) == b.train.rows[i] % 2
    np.testing.assert_array_equal(b.test[0][0].numpy(), [0.5, 1.5, 2.5])


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 2)), "y": np.zeros(3, dtype=int)}, "has 4 rows but labels"),
        ({"x": np.zeros(4), "y": np.zeros(4, dtype=int)}, "must be 2-D"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4)}, "must be integers"),
        ({"x": np.zeros((4, 2)), "y": np.zeros((4, 1), dtype=int)}, "must be 1-D"),
        ({"x": np.full((4, 2), np.nan), "y": np.zeros(4, dtype=int)}, "NaN"),
        ({"x": np.zeros((4, 2))}, "missing"),
        ({"x": np.zeros((4, 2)), "y": np.zeros(4, dtype=int), "x_test": np.zeros((2, 2))}, "provide both or neither"),
        (
            {"x": np.zeros((4, 2)), "y": np.zeros(4, dtype=int), "x_test": np.zeros((2, 3)), "y_test": np.zeros(2, dtype=int)},
            "has 3 features",
        ),
    ],
)
def test_embeddings_bad_arrays(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as err:
        build_data("embeddings", data_dir=str(path))
    assert str(path) in str(err.value)


def test_embeddings_unreadable_and_config(tmp_path):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="cannot read") as err:
        build_data("embeddings", data_dir=str(corrupt))
    assert str(corrupt) in str(err.value)
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "features.npy", np.zeros((3, 2)))
    (folder / "labels.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError) as err:
        build_data("embeddings", data_dir=str(folder))
    assert str(folder / "labels.npy") in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        build_data("embeddings", data_dir=str(tmp_path / "nope.npz"))
    with open(tmp_path / "single.npz", "wb") as f:
        np.save(f, np.zeros((3, 2)))
    with pytest.raises(DataError, match="not an .npz archive"):
        build_data("embeddings", data_dir=str(tmp_path / "single.npz"))
    with pytest.raises(ConfigError, match="needs data_dir"):
        build_data("embeddings")
    np.savez(tmp_path / "one.npz", x=np.zeros((4, 2)), y=np.zeros(4, dtype=int))
    with pytest.raises(ConfigError, match="at least 2 classes"):
        build_data("embeddings", data_dir=str(tmp_path / "one.npz"), split="disjoint")
    with pytest.raises(ConfigError, match="no augmentation"):
        build_data("embeddings", data_dir=str(tmp_path / "one.npz"), augment=True)


# ---------------------------------------------------------------- transforms


def test_random_crop_is_a_window_of_the_padded_image():
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(2, 5, 6)
    padded = np.pad(x.numpy(), ((0, 0), (2, 2), (2, 2)))
    crop = T.RandomCrop((5, 6), padding=2)
    torch.manual_seed(0)
    offsets = set()
    for _ in range(30):
        out = crop(x).numpy()
        assert out.shape == (2, 5, 6)
        match = [(t, l) for t in range(5) for l in range(5) if np.array_equal(padded[:, t : t + 5, l : l + 6], out)]
        assert match
        offsets.add(match[0])
    assert len(offsets) > 5


def test_resize_normalize_compose():
    x = torch.rand(3, 4, 4)
    up = T.Resize(8)(torch.full((3, 4, 4), 0.25))
    assert up.shape == (3, 8, 8) and torch.allclose(up, torch.full((3, 8, 8), 0.25))
    # antialiased down-scaling agrees with Pillow's bilinear resize of each channel
    x = torch.rand(3, 12, 10)
    down = T.Resize((5, 4))(x)
    pil = [np.asarray(Image.fromarray(c.numpy(), mode="F").resize((4, 5), Image.BILINEAR)) for c in x]
    np.testing.assert_allclose(down.numpy(), np.stack(pil), atol=1e-5)
    norm = T.Normalize([0.5, 0.0, 1.0], [0.5, 2.0, 4.0])
    expected = (x.numpy() - np.array([0.5, 0.0, 1.0])[:, None, None]) / np.array([0.5, 2.0, 4.0])[:, None, None]
    np.testing.assert_allclose(norm(x).numpy(), expected, rtol=1e-6)
    both = T.Compose([T.RandomHorizontalFlip(1.0), norm])
    np.testing.assert_allclose(both(x).numpy(), norm(x.flip(-1)).numpy(), rtol=1e-6)
    torch.manual_seed(1)
    rrc = T.RandomResizedCrop(6, scale=(0.3, 0.6))
    assert all(rrc(x).shape == (3, 6, 6) for _ in range(10))
    with pytest.raises(ConfigError, match="std values must be > 0"):
        T.Normalize([0.0], [0.0])
    with pytest.raises(ConfigError, match="flip probability"):
        T.RandomHorizontalFlip(1.5)


# ---------------------------------------------------------------- sampler

SAMPLER_LABELS = torch.tensor([0] * 7 + [1] * 3 + [2] * 10 + [3] * 1 + [4] * 5 + [5] * 6)


def test_sampler_batches_balanced_and_cover_every_row():
    sampler = ClassBalancedBatchSampler(SAMPLER_LABELS, batch_size=6, samples_per_class=2, seed=3)
    for epoch in range(4):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        seen = Counter()
        for batch in batches:
            assert len(batch) == 6
            per_class = Counter(SAMPLER_LABELS[batch].tolist())
            assert len(per_class) == 3 and set(per_class.values()) == {2}
            seen.update(batch)
        assert set(seen) == set(range(len(SAMPLER_LABELS)))
        # groups of 2 per class: 4+2+5+1+3+3 = 18, so 6 full batches of 3 classes and no
        # filler; the only repeats pad the short last group of the 4 odd-sized classes
        assert len(batches) == 6
        assert sum(seen.values()) == len(SAMPLER_LABELS) + 4


def test_sampler_balanced_classes_visit_each_row_exactly_once():
    labels = torch.arange(48) % 4  # 12 rows per class: 3 whole groups of 4, no padding
    sampler = ClassBalancedBatchSampler(labels, batch_size=8, samples_per_class=4)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 6
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(48))


def test_sampler_deterministic_per_seed_and_epoch():
    a = ClassBalancedBatchSampler(SAMPLER_LABELS, 6, 2, seed=1)
    b = ClassBalancedBatchSampler(SAMPLER_LABELS, 6, 2, seed=1)
    c = ClassBalancedBatchSampler(SAMPLER_LABELS, 6, 2, seed=2)
    a.set_epoch(5)
    b.set_epoch(5)
    c.set_epoch(5)
    assert list(a) == list(b)
    assert list(a) != list(c)
    first = list(a)
    a.set_epoch(6)
    assert list(a) != first
    a.set_epoch(5)
    assert list(a) == first


def test_sampler_drives_a_dataloader(digits):
    sampler = ClassBalancedBatchSampler(digits.train_labels, batch_size=32, samples_per_class=4)
    loader = DataLoader(digits.train, batch_sampler=sampler)
    x, y, idx = next(iter(loader))
    assert x.shape == (32, 1, 8, 8) and y.dtype == torch.int64
    assert torch.equal(digits.train_labels[idx], y)
    assert set(Counter(y.tolist()).values()) == {4}
    assert len(loader) == len(sampler) >= len(digits.train) // 32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 7, "samples_per_class": 2}, "multiple of samples_per_class"),
        ({"batch_size": 6, "samples_per_class": 0}, "samples_per_class must be >= 1"),
        ({"batch_size": 14, "samples_per_class": 2}, "needs 7 classes per batch but the labels have only 6"),
        ({"batch_size": 6, "samples_per_class": 2, "seed": -1}, "seed must be >= 0"),
    ],
)
def test_sampler_config_errors(kwargs, message):
    with pytest.raises(ConfigError) as err:
        ClassBalancedBatchSampler(SAMPLER_LABELS, **kwargs)
    assert message in str(err.value)
    with pytest.raises(ConfigError, match="integer labels"):
        ClassBalancedBatchSampler(SAMPLER_LABELS.float(), 6, 2)


# ---------------------------------------------------------------- issue 14: loading fixes

def test_sixteen_bit_greyscale_images_are_scaled_not_saturated(tmp_path):
    """convert("RGB") turned every 16-bit value above 255 into white: 32768 and 1000 both loaded as 1.0."""
    for name, value in (("bright", 32768), ("dim", 1000)):
        (tmp_path / name).mkdir()
        for i in range(5):
            Image.fromarray(np.full((6, 6), value, dtype=np.uint16)).save(tmp_path / name / f"{i}.png")
    b = build_data("image-folder", data_dir=str(tmp_path), image_size=6, val_fraction=0.0)
    assert Image.open(b.train.pool.paths[0]).mode.startswith("I")
    for i in range(len(b.train)):
        x, y, _ = b.train[i]
        expected = (32768 if b.class_names[int(y)] == "bright" else 1000) / 65535
        np.testing.assert_allclose(x.numpy(), expected, rtol=1e-5)


def test_a_truncated_image_in_the_test_split_is_found_before_training(tmp_path):
    write_images(tmp_path / "train", per_class=3)
    write_images(tmp_path / "test", per_class=2)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        tmp_path / "test" / "dog" / "big.png")
    data = (tmp_path / "test" / "dog" / "big.png").read_bytes()
    (tmp_path / "test" / "dog" / "big.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cannot read image .*test/dog/big.png: .*truncated"):
        build_data("image-folder", data_dir=str(tmp_path), image_size=8)


def test_embeddings_are_checked_after_the_cast_to_float32(tmp_path):
    """A float64 1e300 is finite but becomes inf in float32, and then NaN embeddings."""
    x, y = np.random.default_rng(0).normal(size=(20, 3)), np.repeat(np.arange(2), 10)
    x[4, 1] = 1e300
    np.savez(tmp_path / "e.npz", x=x, y=y)
    with pytest.raises(DataError, match=r"1 row\(s\) holding NaN or infinite values, or values beyond float32"):
        build_data("embeddings", data_dir=str(tmp_path / "e.npz"))
    np.savez(tmp_path / "z.npz", x=np.zeros((20, 0)), y=y)
    with pytest.raises(DataError, match="has 0 features"):
        build_data("embeddings", data_dir=str(tmp_path / "z.npz"))
