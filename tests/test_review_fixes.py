"""Defects found in review of the run-folder, dataset and inference work; each test fails on the code before the fix."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

import knnsolver
from knnsolver.data.augment import AugmentPolicy, build_augmentation
from knnsolver.data.datasets import ImageFilePool, PhotoPool
from knnsolver.errors import ConfigError, StorageError
from knnsolver.training import TrainConfig, train
from knnsolver.training.runfolder import RunFolder


def test_sixteen_bit_images_keep_their_values_through_the_crop_protocol(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0..65520
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    cropped = PhotoPool([tmp_path / "ramp.png"], 64).get(0)
    stretched = ImageFilePool([tmp_path / "ramp.png"], 64).get(0)
    assert cropped.shape == (3, 64, 64) and abs(float(cropped.mean()) - 0.5) < 0.01
    torch.testing.assert_close(cropped, stretched, atol=1e-4, rtol=0)


def test_flip_alone_still_gives_the_training_size_on_uncropped_images():
    policy = AugmentPolicy(("scale", "flip"), (8, 8), uncropped=True)
    out = build_augmentation(["flip"], policy, "cub200")(torch.rand(3, 12, 20))
    assert out.shape == (3, 8, 8)
    assert build_augmentation(["flip"], AugmentPolicy(("flip",), (8, 8)), "x")(torch.rand(3, 8, 8)).shape == (3, 8, 8)


@pytest.mark.parametrize("bad", ["crop:0.4", "crop:2.5", "crop:0"])
def test_crop_padding_must_be_whole_pixels(bad):
    with pytest.raises(ConfigError, match="whole number of pixels"):
        build_augmentation([bad], AugmentPolicy(("crop:2",), (8, 8)), "x")


def test_a_folder_name_with_glob_characters_leaves_other_runs_alone(tmp_path):
    other = tmp_path / ".exp1.overwrite-123"  # another run's overwrite in progress
    other.mkdir()
    folder = RunFolder(tmp_path / "exp[1]")
    folder.open()
    folder.close()
    assert other.is_dir()


def test_backbone_lr_zero_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="backbone_lr must be > 0"):
        TrainConfig(backbone_lr=0.0).validate()


def test_torchvision_files_without_num_batches_tracked_load(tmp_path):
    """Older torchvision files (e.g. resnet50-19c8e357.pth) lack BatchNorm's num_batches_tracked."""
    from knnsolver.models import build_model

    source = build_model("resnet18", (3, 32, 32), 8)
    state = {k: v for k, v in source.state_dict().items()
             if not k.startswith("head.") and not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    torch.save(state, tmp_path / "old.pth")
    model = build_model("resnet18", (3, 32, 32), 8, pretrained=str(tmp_path / "old.pth"))
    key = next(k for k in state if k.endswith("conv1.weight"))
    assert torch.equal(model.state_dict()[key], state[key])


@pytest.fixture(scope="module")
def big_images_run(tmp_path_factory):
    """``auto`` on 80 px images with few rows picks conv28 (the data size decides, not only the image size)."""
    root = tmp_path_factory.mktemp("big")
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / "data" / f"c{c}").mkdir(parents=True)
        for j in range(8):
            pixels = rng.integers(0, 60, (80, 80, 3), dtype=np.uint8)
            pixels[..., c] += 150
            Image.fromarray(pixels).save(root / "data" / f"c{c}" / f"{j}.png")
    out = root / "run"
    train(TrainConfig(dataset="image-folder", data_dir=str(root / "data"), solver="hal", epochs=1, out=str(out),
                      plots="off", progress=False, width=4, embedding_dim=8, batch_size=8))
    return out


def test_a_saved_auto_model_builds_the_network_it_was_trained_with(big_images_run, tmp_path):
    model = knnsolver.load(big_images_run)
    model.save(tmp_path / "m")
    again = knnsolver.load(tmp_path / "m")
    x = torch.rand(2, *model.spec.shape)
    torch.testing.assert_close(again.embed(x), model.embed(x))


def test_a_model_is_not_saved_into_another_runs_folder(big_images_run, tmp_path):
    other = tmp_path / "other"
    train(TrainConfig(dataset="digits", solver="hal", epochs=1, out=str(other), plots="off", progress=False,
                      max_per_class=10, width=4, embedding_dim=8))
    with pytest.raises(StorageError, match="holds another run"):
        knnsolver.load(big_images_run).save(other)
    assert not (other / "model.pt").exists()


def test_integer_pixels_are_refused_for_image_models(big_images_run):
    model = knnsolver.load(big_images_run)
    with pytest.raises(ConfigError, match="divide 8-bit pixels by 255"):
        model.embed(np.zeros((1, *model.spec.shape), dtype=np.uint8))


def test_an_interrupted_swap_puts_the_old_run_back(tmp_path, monkeypatch):
    import os

    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("old")
    folder = RunFolder(out)
    folder.open()
    folder.start_replacement()
    (folder.path / "summary.json").write_text("new")
    real, calls = os.rename, []

    def rename(src, dst):
        calls.append(src)
        if len(calls) == 2:  # the new run's rename into place
            raise KeyboardInterrupt
        return real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        folder.commit()
    monkeypatch.setattr(os, "rename", real)
    folder.close()
    assert (out / "summary.json").read_text() == "old"


def test_large_photos_of_one_size_are_not_trained_at_full_resolution(tmp_path):
    from knnsolver.data.datasets import IMAGE_FOLDER_SIZE, NATIVE_MAX_SIDE, load_image_folder

    for c in range(2):
        (tmp_path / f"c{c}").mkdir()
        for j in range(3):
            Image.fromarray(np.full((NATIVE_MAX_SIDE + 44, 300, 3), 40 * c + j, dtype=np.uint8)).save(
                tmp_path / f"c{c}" / f"{j}.png")
    source = load_image_folder(tmp_path)
    assert source.input_shape[1:] == (IMAGE_FOLDER_SIZE, IMAGE_FOLDER_SIZE)


def test_in_shop_query_and_gallery_roles_are_part_of_the_data_fingerprint():
    from knnsolver.data import build_data, data_fingerprint

    data = build_data("digits", split="disjoint")
    plain = data_fingerprint(data)
    data.test_query = torch.zeros(len(data.test), dtype=torch.bool)
    data.test_query[:10] = True
    first = data_fingerprint(data)
    data.test_query[:20] = True
    assert plain["hash"] != first["hash"] != data_fingerprint(data)["hash"]


def test_start_up_cleans_only_knnsolvers_own_temporary_files(tmp_path):
    (tmp_path / ".notes.tmp").write_text("the user's")
    (tmp_path / ".checkpoint.pt.ab12cd_3.tmp").write_text("an interrupted write")
    folder = RunFolder(tmp_path)
    folder.open()
    folder.close()
    assert (tmp_path / ".notes.tmp").exists() and not (tmp_path / ".checkpoint.pt.ab12cd_3.tmp").exists()
