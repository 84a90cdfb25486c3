"""Defects a review of the inference API, the data pipeline and the networks found (session 15): each test fails on
the code before its fix."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import knnsolver
from knnsolver.data import build_data
from knnsolver.data.augment import parse_options
from knnsolver.errors import ConfigError
from knnsolver.models import build_model
from knnsolver.training import TrainConfig, train

TINY = dict(width=4, embedding_dim=8, epochs=1, plots=False, progress=False, max_per_class=30)


@pytest.mark.parametrize("name, shape, fragment", [
    ("vgg16", (1, 8, 8), "the vgg16 network cannot take the data's 1x8x8 inputs"),
    ("conv28", (64,), "the conv28 network cannot take the data's 64 inputs"),
    ("conv8", (1, 16, 12), "the conv8 network cannot take the data's 1x16x12 inputs"),
])
def test_a_network_that_cannot_take_the_input_is_refused_when_built(name, shape, fragment):
    """It failed at the first training step with a raw RuntimeError (exit code 1)."""
    with pytest.raises(ConfigError, match=fragment + r".*use --model auto"):
        build_model(name, shape, 8)


def test_building_checks_without_changing_the_network():
    torch.manual_seed(0)
    plain = build_model("conv28", (1, 28, 28), 8, width=4)
    assert plain.training
    torch.manual_seed(0)
    again = build_model("conv28", (1, 28, 28), 8, width=4)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in plain.state_dict().items())


def test_own_pretrained_weights_are_whole_or_refused_and_a_run_checkpoint_is_taken(tmp_path):
    """Garbage gave KeyError, a list TypeError, a wrong shape a raw RuntimeError; 3 of 20 tensors loaded
    silently; a run's own best.pt was 'no weight matches'."""
    source = build_model("conv8", (1, 8, 8), 10, width=8)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save([1, 2], tmp_path / "list.pt")
    some = dict(list(source.state_dict().items())[:3])
    torch.save(some, tmp_path / "some.pt")
    wrong = {k: torch.zeros(1) for k in source.state_dict()}
    torch.save(wrong, tmp_path / "wrong.pt")
    for name, message in (("garbage", "cannot read pretrained weights"), ("list", "not a state dict of tensors"),
                          ("some", r"tensors missing"), ("wrong", "of the wrong shape")):
        with pytest.raises(ConfigError, match=message):
            build_model("conv8", (1, 8, 8), 10, width=8, pretrained=str(tmp_path / f"{name}.pt"))
    torch.save({"model": source.state_dict(), "epoch": 3}, tmp_path / "best.pt")
    loaded = build_model("conv8", (1, 8, 8), 10, width=8, pretrained=str(tmp_path / "best.pt"))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())


def test_image_size_is_refused_for_data_of_a_fixed_size():
    """--image-size 32 on Fashion-MNIST trained at 28x28 while config.json recorded 32."""
    with pytest.raises(ConfigError, match="dataset 'digits' has a fixed input size and does not resize; drop --image-size"):
        build_data("digits", image_size=16)


@pytest.mark.parametrize("value", ["crop:inf", "crop:nan"])
def test_a_non_finite_crop_is_one_line(value):
    with pytest.raises(ConfigError, match="the strength must be a whole number of pixels"):
        parse_options([value])


def test_auto_mlp_follows_width():
    """--model auto ignored --width for feature vectors (hidden 256 whatever the width; --model mlp: width x 8)."""
    auto, mlp = build_model("auto", (20,), 8, width=4), build_model("mlp", (20,), 8, width=4)
    assert [p.shape for p in auto.parameters()] == [p.shape for p in mlp.parameters()]


@pytest.fixture(scope="module")
def rbf_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("data_review") / "run"
    train(TrainConfig(dataset="digits", solver="rbf", out=str(out), solver_options={"k": 10}, **TINY))
    return out


def test_rejection_and_search_refuse_values_of_the_wrong_kind(rbf_model):
    """reject_below=nan rejected every input; k=2.5 searched 2 neighbours, k=True one."""
    model = knnsolver.load(rbf_model)
    x = np.zeros((2, 1, 8, 8), dtype=np.float32)
    with pytest.raises(ConfigError, match="reject_below must be a number >= 0.*got nan"):
        model.predict(x, reject_below=float("nan"))
    with pytest.raises(ConfigError, match="reject_below must be a number"):
        model.predict(x, reject_below="0.5")
    for k in (2.5, True, "3"):
        with pytest.raises(ConfigError, match="k must be an integer"):
            model.search(x, k=k)


def test_a_big_endian_array_is_read(rbf_model):
    model = knnsolver.load(rbf_model)
    x = np.random.default_rng(0).random((3, 1, 8, 8)).astype(np.float32)
    torch.testing.assert_close(model.predict_proba(x.astype(">f4")), model.predict_proba(x))


def test_a_new_class_id_cannot_take_an_existing_class_s_name(tmp_path):
    """With classes '5'..'9' (train_classes 5..9), add(x, 5) made a sixth class named '5', and a later add by
    the name '5' went to the first."""
    out = tmp_path / "run"
    train(TrainConfig(dataset="digits", solver="rbf", out=str(out), solver_options={"k": 10},
                      train_classes=[5, 6, 7, 8, 9], split="disjoint", **TINY))
    model = knnsolver.load(out)
    assert model.classes[0] == "5"
    with pytest.raises(ConfigError, match="new class id 5 would be named '5', the name of class 0"):
        model.add(np.zeros((1, 1, 8, 8), dtype=np.float32), 5)


def test_added_files_are_recorded_by_absolute_path(rbf_model, tmp_path, monkeypatch):
    """A relative path was stored as given, so a saved model's search pointed at nothing from another folder."""
    (tmp_path / "imgs").mkdir()
    for j in range(3):
        Image.fromarray((np.random.default_rng(j).random((8, 8)) * 255).astype(np.uint8)).save(tmp_path / "imgs" / f"{j}.png")
    monkeypatch.chdir(tmp_path)
    model = knnsolver.load(rbf_model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few centres for the new class
        model.add("imgs", "new")
    model.save(tmp_path / "grown")
    monkeypatch.chdir(tmp_path / "imgs")
    found = knnsolver.load(tmp_path / "grown").search("0.png", k=1)
    assert found.paths == [[str(tmp_path / "imgs" / "0.png")]] and Path(found.paths[0][0]).is_file()


def test_an_add_refused_by_a_warning_raised_as_an_error_changes_nothing(rbf_model):
    """The bank took the centres before the warning, so the model was left with one more centre than rows."""
    model = knnsolver.load(rbf_model)
    model.solver.predict_k = 100  # one centre of 11 classes is outweighed among 100 neighbours: a warning
    before = (len(model.solver.bank), model.solver.num_classes, model.num_classes, model.reference_size)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(Warning, match="hold fewer centres than"):
            model.add(np.zeros((1, 1, 8, 8), dtype=np.float32), model.num_classes)
    assert (len(model.solver.bank), model.solver.num_classes, model.num_classes, model.reference_size) == before


def test_stray_val_classes_are_not_blamed_on_train_classes_not_given():
    with pytest.raises(ConfigError, match=r"val_classes \[99\] are not training classes .*; hold out some of those$"):
        build_data("digits", split="disjoint", val_classes=[99])
