"""The benchmark readers (CUB-200-2011, Cars196, SOP, In-Shop) on tiny replicas of their official layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from knnsolver.data import build_data
from knnsolver.data import transforms as T
from knnsolver.data.benchmarks import INSHOP_KS, SOP_KS, PhotoPool
from knnsolver.errors import ConfigError, DataError
from replicas import BOX_COLOUR, colour, inshop_rows, write_cars, write_cub, write_inshop, write_sop


def source_ids(bundle, part: str) -> set[int]:
    """The source class ids present in a part of a bundle."""
    ds = getattr(bundle, part)
    ids = bundle.train_class_ids if part in ("train", "val") else bundle.test_class_ids
    return {ids[int(y)] for y in ds.labels}


@pytest.fixture(scope="module")
def cub_full(tmp_path_factory):
    """All 200 CUB classes, two images each (one train, one test)."""
    return write_cub(tmp_path_factory.mktemp("cub"), classes=200, per_class=2)


@pytest.fixture(scope="module")
def cars_full(tmp_path_factory):
    """All 196 Cars classes, two images each (one train, one test)."""
    return write_cars(tmp_path_factory.mktemp("cars"), classes=196, per_class=2)


def test_cub_class_counts_and_both_protocols(cub_full):
    disjoint = build_data("cub200", data_dir=str(cub_full.parent), split="disjoint", val_fraction=0.0, image_size=8)
    assert disjoint.num_classes == 100 and len(disjoint.test_class_names) == 100
    assert disjoint.class_names[0] == "001.Bird_1" and disjoint.test_class_names[0] == "101.Bird_101"
    assert source_ids(disjoint, "train") == set(range(100)) and source_ids(disjoint, "test") == set(range(100, 200))
    assert len(disjoint.train) == len(disjoint.test) == 200 and disjoint.test_query is None
    assert disjoint.recall_ks == (1, 2, 4, 8)
    # the classification split is train_test_split.txt: the second image of every class tests
    standard = build_data("cub200", data_dir=str(cub_full), split="standard", val_fraction=0.0, image_size=8)
    assert standard.num_classes == 200 and len(standard.train) == len(standard.test) == 200
    assert np.array_equal(standard.test.rows, np.arange(1, 400, 2))
    assert np.array_equal(standard.test.labels.numpy(), np.arange(200))


def test_cars_mat_class_counts_and_both_protocols(cars_full):
    disjoint = build_data("cars196", data_dir=str(cars_full), split="disjoint", val_fraction=0.0, image_size=8)
    assert disjoint.num_classes == 98 and len(disjoint.test_class_names) == 98
    assert source_ids(disjoint, "train") == set(range(98)) and source_ids(disjoint, "test") == set(range(98, 196))
    assert disjoint.class_names[0] == "Make1 Model Sedan 2012"
    standard = build_data("cars196", data_dir=str(cars_full), split="standard", val_fraction=0.0, image_size=8)
    assert standard.num_classes == 196
    assert np.array_equal(standard.test.rows, np.arange(1, 392, 2))  # the annotation's test flag


def test_sop_classes_from_its_own_lists(tmp_path):
    root = write_sop(tmp_path, train_classes=3, test_classes=4)
    b = build_data("sop", data_dir=str(tmp_path), split="disjoint", val_fraction=0.0, image_size=8)
    # 3 + 4 classes: the first-half rule would train on 4; SOP's own lists train on 3
    assert b.num_classes == 3 and len(b.test_class_names) == 4
    assert b.class_names == ["1", "2", "3"] and b.test_class_names == ["4", "5", "6", "7"]
    assert len(b.train) == 6 and len(b.test) == 8 and b.recall_ks == SOP_KS
    assert build_data("sop", data_dir=str(root), split="disjoint", image_size=8).num_classes == 3
    with pytest.raises(DataError, match="use split 'disjoint'"):
        build_data("sop", data_dir=str(root), split="standard", image_size=8)


def test_inshop_query_and_gallery(tmp_path):
    rows = inshop_rows(items=7, per_item=3)
    write_inshop(tmp_path, rows)
    b = build_data("inshop", data_dir=str(tmp_path), split="disjoint", val_fraction=0.0, image_size=8)
    train_items = sorted({item for _, item, status in rows if status == "train"})
    test_items = sorted({item for _, item, status in rows if status != "train"})
    assert b.class_names == train_items and b.test_class_names == test_items and b.num_classes == 4
    assert len(b.train) == 12 and len(b.test) == 9 and b.recall_ks == INSHOP_KS
    statuses = np.asarray([status for _, _, status in rows])
    assert np.array_equal(b.test_query.numpy(), statuses[b.test.rows] == "query")
    assert int(b.test_query.sum()) == 3
    # an explicit class choice is a different protocol: no query/gallery roles then
    assert build_data("inshop", data_dir=str(tmp_path), split="disjoint", train_classes=[0, 1], image_size=8).test_query is None


def test_cub_bbox_crop_and_resize_protocol(tmp_path):
    write_cub(tmp_path, classes=2, per_class=2)
    b = build_data("cub200-bbox", data_dir=str(tmp_path), split="standard", val_fraction=0.0, image_size=6, resize_size=8)
    x, _, _ = b.train[0]
    assert x.shape == (3, 6, 6)  # the 10 x 8 box resized to 10 x 8, centre 6 x 6
    expected = torch.tensor(BOX_COLOUR, dtype=torch.float32)[:, None, None] / 255
    assert (x - expected).abs().max() < 0.1, "a bounding-box crop holds the box's pixels only"
    whole = build_data("cub200", data_dir=str(tmp_path), split="standard", val_fraction=0.0, image_size=6, resize_size=16)
    x, _, _ = whole.train[0]
    assert x.shape == (3, 6, 6) and (x[:, 0, 0] - expected[:, 0, 0]).abs().max() < 0.1  # centre of the box


def test_cars_bbox_crop(tmp_path):
    write_cars(tmp_path, classes=2, per_class=2)
    b = build_data("cars196-bbox", data_dir=str(tmp_path), split="standard", val_fraction=0.0, image_size=8)
    x, _, _ = b.train[0]
    assert x.shape == (3, 8, 8)
    expected = torch.tensor(BOX_COLOUR, dtype=torch.float32)[:, None, None] / 255
    assert (x - expected).abs().max() < 0.1


def test_photo_pool_resizes_shorter_side_and_keeps_aspect(tmp_path):
    path = tmp_path / "a.jpg"
    Image.fromarray(np.full((30, 60, 3), colour(1), dtype=np.uint8)).save(path)
    x = PhotoPool([path], resize_size=256).get(0)
    assert x.shape == (3, 256, 512) and 0 <= x.min() and x.max() <= 1
    tall = PhotoPool([path], resize_size=20, boxes=[(0, 0, 10, 30)]).get(0)
    assert tall.shape == (3, 60, 20)


def test_standard_protocol_output_sizes(tmp_path):
    """The default protocol: shorter side 256, evaluation centre 224, training random-resized 224 + flip."""
    write_cub(tmp_path, classes=2, per_class=2)
    b = build_data("cub200", data_dir=str(tmp_path), split="standard", val_fraction=0.0, augment=True)
    assert b.input_shape == (3, 224, 224)
    assert b.train.pool.resize_size == 256
    torch.manual_seed(0)
    for ds in (b.train, b.train_eval, b.test):
        assert ds[0][0].shape == (3, 224, 224)
    assert isinstance(b.train_eval.transform, T.CenterCrop)
    assert [type(t) for t in b.train.transform.transforms] == [T.RandomResizedCrop, T.RandomHorizontalFlip]
    small = build_data("cub200", data_dir=str(tmp_path), val_fraction=0.0, image_size=112)
    assert small.train.pool.resize_size == 128 and small.test[0][0].shape == (3, 112, 112)


def test_center_crop():
    x = torch.arange(5 * 6, dtype=torch.float32).reshape(1, 5, 6)
    assert torch.equal(T.CenterCrop((3, 2))(x), x[:, 1:4, 2:4])
    with pytest.raises(ValueError, match="larger than the image"):
        T.CenterCrop(7)(x)


def test_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="needs --data-dir"):
        build_data("cub200")
    with pytest.raises(DataError, match="images.txt"):
        build_data("cub200", data_dir=str(tmp_path))
    write_cub(tmp_path, classes=2, per_class=2)
    with pytest.raises(ConfigError, match="resize_size .* must be >= image_size"):
        build_data("cub200", data_dir=str(tmp_path), image_size=32, resize_size=16)
    with pytest.raises(ConfigError, match="drop --resize-size"):
        build_data("digits", resize_size=16)
    (tmp_path / "CUB_200_2011" / "images" / "001.Bird_1" / "Bird_1_0000_100.jpg").unlink()
    with pytest.raises(DataError, match="1 of 4 listed images are missing, the first .*Bird_1_0000_100.jpg"):
        build_data("cub200", data_dir=str(tmp_path))
    (tmp_path / "cars").mkdir()
    (tmp_path / "cars" / "cars_annos.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="cannot read .*cars_annos.mat"):
        build_data("cars196", data_dir=str(tmp_path / "cars"))


def test_image_folder_takes_the_protocol_with_resize_size(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for j in range(5):
            pixels = np.zeros((10, 30, 3), dtype=np.uint8)
            pixels[:, 10:20] = 255  # a white centre third: the centre crop of the 12 x 36 resize is all white
            Image.fromarray(pixels).save(tmp_path / c / f"{j}.png")
    b = build_data("image-folder", data_dir=str(tmp_path), image_size=8, resize_size=12, val_fraction=0.0)
    x, _, _ = b.test[0]
    assert x.shape == (3, 8, 8) and b.train_eval.pool.get(0).shape == (3, 12, 36)
    assert x[:, :, 2:6].min() > 0.9, "the centre of the image, not a squeezed whole"
    stretched = build_data("image-folder", data_dir=str(tmp_path), image_size=8, val_fraction=0.0)
    assert stretched.test[0][0][:, :, 0].max() < 0.1, "without resize_size the whole image is stretched (unchanged)"


def test_the_unseen_subset_keeps_train_validation_and_test_classes_apart(tmp_path):
    """The benchmark subset: all official training images of classes 0-3, VAL_PER_CLASS of classes 4 and 6,
    the official test images of classes 5 and 7-9; loaded as the suites load it, the class sets are disjoint."""
    from test_data import write_idx

    from knnsolver.bench import data as bench_data
    from knnsolver.data import build_data

    rng = np.random.default_rng(0)
    train_labels, test_labels = np.arange(200) % 10, np.arange(50) % 10
    source = tmp_path / "source"
    source.mkdir()
    write_idx(source / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (200, 28, 28)))
    write_idx(source / "train-labels-idx1-ubyte.gz", train_labels)
    write_idx(source / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (50, 28, 28)))
    write_idx(source / "t10k-labels-idx1-ubyte.gz", test_labels)
    bench_data.VAL_PER_CLASS, saved = 7, bench_data.VAL_PER_CLASS
    try:
        folder = bench_data.prepare_unseen_subset(tmp_path / "subset", source)
    finally:
        bench_data.VAL_PER_CLASS = saved
    from knnsolver.bench.suites import get_preset

    disjoint = get_preset("full").disjoint
    b = build_data("fashion-mnist", data_dir=str(folder), split="disjoint", train_classes=disjoint["train_classes"],
                   val_classes=disjoint["val_classes"])
    assert b.train_class_ids == [0, 1, 2, 3] and len(b.train) == 4 * 20  # every training image of 0-3
    assert b.val_class_names == ["Coat", "Shirt"] and len(b.val) == 2 * 7
    assert b.test_class_ids == [5, 7, 8, 9] and len(b.test) == 4 * 5  # the official test images of the others only
