"""Defects a review of the command-line journeys found (session 15): each test fails on the code before its fix."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import one_line_error, run_cli

TINY = ["--width", "4", "--embedding-dim", "8", "--epochs", "1", "--plots", "off", "--progress", "false"]


def _image_folder(root: Path) -> Path:
    """Three classes of 12 small greyscale images each: a bright square, a vertical bar, a horizontal bar."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("square", "vbar", "hbar")):
        (root / name).mkdir(parents=True)
        for j in range(12):
            pixels = rng.integers(0, 40, (16, 16)).astype(np.uint8)
            if c == 0:
                pixels[4:12, 4:12] = 230
            elif c == 1:
                pixels[:, 6:10] = 230
            else:
                pixels[6:10, :] = 230
            Image.fromarray(pixels).save(root / name / f"{j}.png")
    return root


def test_a_run_on_a_relative_data_folder_loads_from_any_folder(tmp_path, capsys, monkeypatch):
    """The data folder was recorded as typed ('imf'), so predict, eval, embed and export failed from any other
    folder than the one training ran in."""
    work = tmp_path / "work"
    _image_folder(work / "imf")
    monkeypatch.chdir(work)
    code, _, err = run_cli(capsys, "train", "--dataset", "image-folder", "--data-dir", "imf", "--solver", "hal",
                           "--out", "run", *TINY)
    assert code == 0, err
    assert json.loads((work / "run" / "config.json").read_text())["data_dir"] == str(work / "imf")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "predict", work / "run", work / "imf" / "square" / "0.png")
    assert code == 0, err
    code, out, err = run_cli(capsys, "eval", work / "run")
    assert code == 0, err
    # a run whose data is gone says what it needs
    shutil.move(str(work / "imf"), str(tmp_path / "elsewhere"))
    code, _, err = run_cli(capsys, "predict", work / "run", tmp_path / "elsewhere" / "square" / "0.png")
    one_line_error(code, err, "needs its training data to load", "restore it, or use a model folder")


def test_a_resume_keeps_a_run_recorded_with_a_relative_data_folder(tmp_path, capsys, monkeypatch):
    """Runs saved before data folders were made absolute resume from the folder they were trained in, without a
    warning that their data changed (their fingerprint holds the image paths as then spelled)."""
    from knnsolver.training import trainer

    _image_folder(tmp_path / "imf")
    monkeypatch.chdir(tmp_path)
    with monkeypatch.context() as old:  # as a version before session 15 recorded it: the path as typed
        old.setattr(trainer, "_data_dir_as_recorded", lambda config, state: config)
        code, _, err = run_cli(capsys, "train", "--dataset", "image-folder", "--data-dir", "imf", "--solver", "hal",
                               "--out", "run", *TINY, "--lr-schedule", "constant")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"] == "imf"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, _, err = run_cli(capsys, "train", "--config", "run/config.json", "--epochs", "2", "--resume")
    assert code == 0 and "resuming run: 1 of 2 epochs trained" in err, err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code, _, err = run_cli(capsys, "train", "--dataset", "image-folder", "--data-dir", str(tmp_path / "imf"),
                               "--solver", "hal", "--out", "run", *TINY[:-6], "--epochs", "3", "--plots", "off",
                               "--progress", "false", "--lr-schedule", "constant", "--resume")
    assert code == 0 and "resuming run: 2 of 3 epochs trained" in err, err  # the same folder, spelled absolute


@pytest.mark.parametrize("name", ["num_train", "num_classes", "embedding_dim"])
def test_trainer_supplied_sizes_in_solver_options_are_refused_in_one_line(tmp_path, capsys, name):
    """A raw TypeError ('got multiple values for keyword argument') came out of build_run."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"solver": "hal", "epochs": 1, "solver_options": {name: 5}}))
    code, _, err = run_cli(capsys, "train", "--config", config, "--out", tmp_path / "run")
    one_line_error(code, err, f"solver_options cannot set {name}: the trainer gives it to the solver")


def test_unknown_solver_options_list_only_real_options(tmp_path, capsys):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"solver": "hal", "epochs": 1, "solver_options": {"k": 5}}))
    code, _, err = run_cli(capsys, "train", "--config", config, "--out", tmp_path / "run", *TINY)
    one_line_error(code, err, "solver 'hal' has no option k; its options are: tau, predict_by, knn_k")


def test_flags_are_not_abbreviated_and_resume_excludes_overwrite(tmp_path, capsys):
    """HAL took rbf's --k as --knn-k (argparse's prefix match); --resume --overwrite resumed silently."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "train", "--solver", "hal", "--k", "200", "--out", tmp_path / "run", *TINY)
    assert exit_.value.code == 2 and "unrecognized arguments: --k 200" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        run_cli(capsys, "train", "--resume", "--overwrite", "--out", tmp_path / "run", *TINY)
    assert exit_.value.code == 2 and "--overwrite: not allowed with argument --resume" in capsys.readouterr().err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    from knnsolver.cli.main import main

    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--dataset", "digits", "--solver", "hal", "--out", str(out), *TINY]) == 0
    return out


def test_the_resume_advice_names_the_folder_as_it_is_now(finished_run, tmp_path, capsys):
    """After a move the advice resumed the folder named in config.json (another run, or none)."""
    moved = tmp_path / "moved"
    shutil.copytree(finished_run, moved)
    (moved / "summary.json").unlink()
    code, _, err = run_cli(capsys, "eval", moved)
    one_line_error(code, err, f"finish it with knnsolver train --config {moved / 'config.json'} --out {moved} --resume")


def test_a_model_folder_is_told_apart_from_a_run(finished_run, tmp_path, capsys):
    """eval and embed of a folder written by add-classes said config.json was missing."""
    import knnsolver

    knnsolver.load(finished_run).save(tmp_path / "model")
    code, _, err = run_cli(capsys, "eval", tmp_path / "model")
    one_line_error(code, err, "is a model folder (written by add-classes --out or KnnModel.save), not a training run")


def test_predict_works_without_the_resumable_checkpoint_and_eval_says_what_it_lacks(finished_run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "checkpoint.pt").unlink()
    sample = tmp_path / "x.npy"
    np.save(sample, np.zeros((2, 1, 8, 8), dtype=np.float32))
    code, _, err = run_cli(capsys, "predict", copy, sample)
    assert code == 0, err
    code, _, err = run_cli(capsys, "eval", copy)
    one_line_error(code, err, "has no checkpoint.pt (its history), which eval needs")


def test_predict_warns_when_the_training_data_changed(tmp_path, capsys, monkeypatch):
    """eval warned; predict and search built their reference set from other data without a word."""
    _image_folder(tmp_path / "imf")
    code, _, err = run_cli(capsys, "train", "--dataset", "image-folder", "--data-dir", tmp_path / "imf",
                           "--solver", "hal", "--out", tmp_path / "run", *TINY)
    assert code == 0, err
    (tmp_path / "imf" / "vbar" / "3.png").unlink()
    with pytest.warns(UserWarning, match="its reference set is built from the data as it is now"):
        code, _, err = run_cli(capsys, "predict", tmp_path / "run", tmp_path / "imf" / "square" / "0.png")
    assert code == 0, err


def test_a_negative_export_tolerance_is_refused_before_anything_is_written(finished_run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", finished_run, "--out", tmp_path / "exp" / "net.pt", "--atol", "-1")
    one_line_error(code, err, "--atol must be >= 0")
    assert not (tmp_path / "exp").exists()


def test_a_yaml_config_is_named_as_such(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("solver: hal\n")
    code, _, err = run_cli(capsys, "train", "--config", config, "--out", tmp_path / "run")
    one_line_error(code, err, "is YAML; write it as JSON (.json) or TOML (.toml)")


def test_a_training_in_progress_is_named_by_predict_and_eval(finished_run, tmp_path, capsys):
    """add-classes --in-place (and eval) on a run still training advised a --resume that the lock then refused."""
    from knnsolver.training.runfolder import RunFolder

    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    (copy / "summary.json").unlink()
    folder = RunFolder(copy)
    folder.open()
    try:
        code, _, err = run_cli(capsys, "predict", copy, tmp_path / "none.npy")
        one_line_error(code, err, "is still training (pid ", "use it once that training has finished")
        code, _, err = run_cli(capsys, "eval", copy)
        one_line_error(code, err, "is still training (pid ", "evaluate it once that training has finished")
    finally:
        folder.close()


def test_an_interrupt_while_the_command_loads_its_libraries_is_one_line(tmp_path):
    """A Ctrl-C while torch was being imported printed a 25-line traceback and died by the signal."""
    script = ("import builtins, sys\n"
              "real = builtins.__import__\n"
              "def interrupting(name, *a, **k):\n"
              "    if name == 'torch':\n"
              "        raise KeyboardInterrupt\n"
              "    return real(name, *a, **k)\n"
              "builtins.__import__ = interrupting\n"
              "sys.argv = ['knnsolver', 'solvers']\n"
              "from knnsolver.cli import run\n"
              "run()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")})
    assert done.returncode == 130 and done.stderr == "knnsolver: interrupted while starting; nothing was done\n", \
        done.stderr


def test_embed_writes_an_archive_the_embeddings_dataset_reads(finished_run, tmp_path, capsys):
    """embed wrote FILE.npy and FILE_labels.npy, a layout --dataset embeddings does not read."""
    code, out, err = run_cli(capsys, "embed", finished_run, "--out", tmp_path / "e.npz")
    assert code == 0 and f"to {tmp_path / 'e.npz'} (x, y)" in out, err
    with np.load(tmp_path / "e.npz") as archive:
        assert archive["x"].shape[1] == 8 and archive["y"].shape == (archive["x"].shape[0],)
    code, _, err = run_cli(capsys, "train", "--dataset", "embeddings", "--data-dir", tmp_path / "e.npz",
                           "--solver", "hal", "--out", tmp_path / "again", *TINY)
    assert code == 0, err


def test_compile_false_with_a_compiling_mode_is_refused(tmp_path, capsys):
    """--compile false --compile-mode max-autotune compiled anyway, without a word (the mode turns compile on)."""
    code, _, err = run_cli(capsys, "train", "--compile", "false", "--compile-mode", "max-autotune",
                           "--out", tmp_path / "run", *TINY)
    one_line_error(code, err, "compile is false but compile_mode 'max-autotune' compiles; drop one of them")
