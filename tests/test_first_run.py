"""Issue 16: a first run says what it chose, shows progress that stays, and records what runs are compared by."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from knnsolver.cli.main import main
from knnsolver.data import build_data
from knnsolver.data.augment import AugmentPolicy, build_augmentation
from knnsolver.data.datasets import CachedImagePool, ImageFilePool
from knnsolver.data.transforms import Compose, RandomCrop, RandomHorizontalFlip, RandomResizedCrop
from knnsolver.errors import ConfigError
from knnsolver.training import TrainConfig, train

QUICK = dict(dataset="digits", width=8, embedding_dim=8, max_per_class=30, batch_size=64, plots="off")


def _cfg(tmp_path, **kw):
    return TrainConfig(**{**QUICK, "out": str(tmp_path / "run"), **kw})


def _grey_folder(root, size=(32, 32), classes=3, per_class=6, mode="L"):
    """A class folder of greyscale PNGs (each class its own brightness, plus noise)."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(40 * c + rng.integers(0, 60, (size[1], size[0])), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").convert(mode).save(root / f"class{c}" / f"{i}.png")
    return root


# ------------------------------------------------------------------ image folders


def test_greyscale_png_folder_loads_at_native_size_with_one_channel_cached(tmp_path):
    root = _grey_folder(tmp_path / "d", size=(32, 32))
    b = build_data("image-folder", data_dir=str(root), val_fraction=0.0)
    assert b.input_shape == (1, 32, 32)
    x, _, _ = b.train[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert isinstance(b.train.pool, CachedImagePool)  # decoded once, in memory
    assert "native size 32x32" in b.notes and "1 channel" in b.notes and "into memory" in b.notes
    path = b.train.pool.paths[int(b.train.rows[0])]
    expected = torch.from_numpy(np.asarray(Image.open(path), dtype=np.float32) / 255.0)
    assert torch.allclose(x[0], expected, atol=1e-6)  # the file's own pixels, not resized


def test_image_folder_sizes_channels_and_cache_can_be_set(tmp_path):
    root = _grey_folder(tmp_path / "d", size=(20, 12))
    b = build_data("image-folder", data_dir=str(root), val_fraction=0.0, image_cache_mb=0)
    assert b.input_shape == (1, 12, 20) and isinstance(b.train.pool, ImageFilePool)  # non-square native, lazy
    assert "image_cache_mb=0" in b.notes
    b = build_data("image-folder", data_dir=str(root), val_fraction=0.0, image_size=16, image_channels=3)
    assert b.input_shape == (3, 16, 16) and b.train[0][0].shape == (3, 16, 16)
    assert "repeated to 3 channels" in b.notes
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(root / "class0" / "colour.png")
    b = build_data("image-folder", data_dir=str(root), val_fraction=0.0)
    assert b.input_shape == (3, 64, 64) and "2 sizes found, stretched to 64x64" in b.notes  # a colour image: RGB
    with pytest.raises(ConfigError, match="image_channels must be 1"):
        build_data("image-folder", data_dir=str(root), image_channels=2)
    with pytest.raises(ConfigError, match="fixed number of channels"):
        build_data("digits", image_channels=1)


# ------------------------------------------------------------------ augmentation


def test_augmentation_options_compose_in_order():
    policy = AugmentPolicy(("crop:2", "flip"), (28, 28))
    t = build_augmentation(["scale:0.3", "crop", "flip:0.2"], policy, "x")
    assert isinstance(t, Compose) and [type(s) for s in t.transforms] == [RandomResizedCrop, RandomCrop,
                                                                         RandomHorizontalFlip]
    assert t.transforms[0].scale == (0.3, 1.0) and t.transforms[1].padding == 2 and t.transforms[2].p == 0.2
    default = build_augmentation(True, policy, "x")
    assert [type(s) for s in default.transforms] == [RandomCrop, RandomHorizontalFlip]
    assert build_augmentation(False, policy, "x") is None
    with pytest.raises(ConfigError, match="unknown augmentation 'rotate'"):
        build_augmentation(["rotate"], policy, "x")
    with pytest.raises(ConfigError, match="must be in \\(0, 1\\]"):
        build_augmentation(["flip:2"], policy, "x")


def test_flips_are_refused_on_digits_and_true_keeps_the_old_default():
    with pytest.raises(ConfigError, match="'digits' is orientation-sensitive.*drop flip"):
        build_data("digits", augment=["crop", "flip"])
    old = build_data("digits", augment=True).train.transform
    assert isinstance(old, RandomCrop) and old.padding == 1
    fashion = AugmentPolicy(("crop:2", "flip"), (28, 28))  # fashion-mnist's: clothes may be mirrored
    assert not fashion.orientation_sensitive


@pytest.mark.parametrize("value, expected", [
    (True, True), (False, False), ("true", True), ("false", False), ("flip,crop:3", ["flip", "crop:3"]),
    (["scale", "crop"], ["scale", "crop"]), ([], False),
])
def test_augment_setting_takes_booleans_names_and_lists(value, expected):
    assert TrainConfig(augment=value).validate().augment == expected


def test_augment_flag_takes_named_options(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--dataset", "digits", "--width", "8", "--embedding-dim", "8", "--max-per-class", "20",
                 "--epochs", "1", "--augment", "crop:1", "--plots", "false", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["augment"] == ["crop:1"]
    code = main(["train", "--dataset", "digits", "--augment", "flip", "--out", str(tmp_path / "f")])
    assert code == 2 and "orientation-sensitive" in capsys.readouterr().err


# ------------------------------------------------------------------ what a run prints and records


def test_a_run_says_what_it_chose_and_prints_a_line_per_epoch(tmp_path, capsys):
    train(_cfg(tmp_path, epochs=2, progress=False))
    err = capsys.readouterr().err
    assert "data: digits, standard split: 300 train / 144 val / 359 test rows, 10 classes" in err
    assert re.search(r"network: conv8 \(auto: 8x8 images\), [\d,]+ parameters, 8-d embedding", err)
    assert "solver: softmax (" in err and re.search(r"device: cpu, \d+ torch threads", err)
    epoch_lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert len(epoch_lines) == 2, err
    assert re.match(r"epoch 1/2: loss \d+\.\d{4}, val_accuracy \d\.\d{4}, [\d.]+ s \(train [\d.]+, val [\d.]+;",
                    epoch_lines[0])
    for phase in ("loading digits", "BatchNorm warm-up", "test evaluation"):
        assert f"{phase}" in err and re.search(rf"{phase}.*: [\d.]+ s", err), phase
    assert "\r" not in err  # --progress false: no bars


def test_summary_records_time_epochs_model_device_and_geometry(tmp_path):
    summary = train(_cfg(tmp_path, epochs=2, progress=False, split="disjoint", max_per_class=20))
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert summary["epochs_run"] == 2 and summary["best_val_metric"] == "val_map_at_r"
    assert summary["best_val_score"] == log[summary["best_epoch"] - 1]["val_map_at_r"]
    assert summary["model"] == "conv8" and summary["model_parameters"] > 1000
    assert summary["device"] == "cpu" and summary["threads"] == torch.get_num_threads()
    geometry = summary["evaluation_geometry"]
    assert geometry["embedding_space"] == "euclidean" and "unseen classes" in geometry["protocol"]
    assert geometry["recall_ks"] == [1, 2, 4, 8]
    timing = summary["timing"]
    assert timing["wall_seconds"] > 0 and {"startup", "train", "validation", "test"} <= set(timing["phase_seconds"])
    assert sum(timing["phase_seconds"].values()) <= timing["wall_seconds"] + 0.5


@pytest.mark.filterwarnings("ignore::knnsolver.errors.TrainingWarning")
def test_rbf_refreshes_after_the_first_epoch_when_update_interval_exceeds_the_run(tmp_path, capsys):
    train(_cfg(tmp_path, epochs=3, solver="rbf", progress=False, solver_options={"k": 10, "update_interval": 10}))
    err = capsys.readouterr().err
    assert ("rbf: update_interval=10 >= epochs=3 would fill the bank once from the untrained network; refreshing "
            "every 1 epoch(s) instead (before epochs 1, 2, 3)") in err
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [row.get("bank_refreshed", False) for row in log] == [True, True, True]
    assert "bank refresh before epoch 2:" in err
    epoch_line = next(line for line in err.splitlines() if line.startswith("epoch 2/3"))
    assert re.search(r"sigma [\d.]+, mean RBF [\d.e-]+", epoch_line) and "refresh" in epoch_line


def test_rbf_refresh_rule():
    from knnsolver.solvers.rbf import RBFSolver

    solver = RBFSolver(8, 2, 40, k=5, update_interval=10)
    assert [solver.refresh_interval(n) for n in (None, 1, 3, 10, 11, 30)] == [10, 1, 1, 5, 10, 10]
    assert solver.schedule_note(11) is None and solver.schedule_note(1) is None
    assert "before epochs 1, 6" in solver.schedule_note(10)


def test_plots_are_curves_by_default_and_tsne_only_with_all(tmp_path):
    assert TrainConfig().plots == "curves" and TrainConfig(plots=False).validate().plots == "off"
    train(_cfg(tmp_path, epochs=1, progress=False, plots="curves", out=str(tmp_path / "c")))
    assert (tmp_path / "c" / "loss.png").is_file() and not (tmp_path / "c" / "tsne.png").exists()
    summary = train(_cfg(tmp_path, epochs=1, progress=False, plots="all", out=str(tmp_path / "a")))
    assert (tmp_path / "a" / "tsne.png").is_file() and "plots" in summary["timing"]["phase_seconds"]
