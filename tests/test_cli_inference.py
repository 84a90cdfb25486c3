"""Issue 13 from the command line: train, predict, search, add-classes and export, and every bad input is one line
(exit code 2) that leaves the run folder as it was."""
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from knnsolver.cli.main import main
from helpers import one_line_error as _one_line_error, run_cli as _run

# Digits 0-4 train (disjoint split); the RBF flow of the README, through the command line.
TRAIN = ["train", "--dataset", "digits", "--solver", "rbf", "--split", "disjoint", "--epochs", "4", "--width", "16",
         "--k", "20", "--sigma", "auto", "--update-interval", "1", "--plots", "false", "--progress", "false"]


def _snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((pixels.reshape(8, 8) / 16 * 255).round().astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def digits():
    return load_digits(return_X_y=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main([*TRAIN, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory, digits):
    """PNGs: half the 5s and 6s as a class-folder tree, the other half as queries; some 0-4 queries."""
    x, y = digits
    root = tmp_path_factory.mktemp("files")
    for digit in (5, 6):
        for i in np.flatnonzero(y == digit)[::2]:
            _png(root / "new" / str(digit) / f"{i}.png", x[i])
    held = {digit: [_png(root / "held" / str(digit) / f"{i}.png", x[i]) for i in np.flatnonzero(y == digit)[1::2]]
            for digit in (5, 6)}
    known = [_png(root / "known" / f"{i}.png", x[i]) for i in range(8) if y[i] < 5]
    np.save(root / "known.npy", (x[:3] / 16).reshape(3, 1, 8, 8).astype(np.float32))
    return root, held, known


def _csv(out: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(out)))


def test_the_whole_flow_through_the_command_line(trained, files, tmp_path, capsys, digits):
    root, held, known = files
    before = _snapshot(trained)
    code, out, err = _run(capsys, "predict", trained, *known, root / "known.npy", "--top-k", "3")
    assert code == 0, err
    rows = _csv(out)
    assert len(rows) == 3 * (len(known) + 3) and rows[0]["rank"] == "1"
    firsts = [r for r in rows if r["rank"] == "1"]
    truth = [str(digits[1][int(Path(p).stem)]) for p in known] + ["0", "1", "2"]
    assert sum(r["prediction"] == t for r, t in zip(firsts, truth)) >= len(truth) - 1
    for name in {r["input"] for r in rows}:
        assert sum(float(r["probability"]) for r in rows if r["input"] == name) <= 1 + 1e-5

    code, out, err = _run(capsys, "predict", trained, root / "known.npy", "--format", "json", "--reject-below", "1.0")
    assert code == 0, err
    answers = json.loads(out)
    assert [a["input"] for a in answers] == [f"{root / 'known.npy'}[{i}]" for i in range(3)]
    assert all(a["prediction"] == -1 and a["name"] == "unknown" or a["top"][0]["probability"] >= 1.0 for a in answers)

    code, out, err = _run(capsys, "search", trained, root / "known", "--k", "4", "--format", "json")
    assert code == 0, err
    found = json.loads(out)
    assert len(found) == len(known) and len(found[0]["neighbours"]) == 4
    assert [n["rank"] for n in found[0]["neighbours"]] == [1, 2, 3, 4]

    grown = tmp_path / "grown"
    code, out, err = _run(capsys, "add-classes", trained, "--data-dir", root / "new", "--out", grown)
    assert code == 0, err
    assert "2 new: 5, 6" in out and "knows 7 classes" in out
    assert _snapshot(trained) == before  # the run itself is untouched
    code, out, err = _run(capsys, "predict", grown, root / "held")
    assert code == 0, err
    rows = _csv(out)
    accuracy = np.mean([r["name"] == Path(r["input"]).parent.name for r in rows])
    assert len(rows) == len(held[5]) + len(held[6]) and accuracy > 0.8, accuracy

    code, out, err = _run(capsys, "search", grown, held[5][0], "--k", "3")
    assert code == 0, err
    assert str(root / "new" / "5") in _csv(out)[0]["path"]  # an added example, found by its file

    code, out, err = _run(capsys, "export", grown, "--out", tmp_path / "net.pt")
    assert code == 0, err
    report = json.loads(out)
    assert report["max_abs_error"] <= 1e-4 and Path(report["reference"]).is_file()
    assert np.load(report["labels"]).max() == 6


def test_add_classes_in_place_keeps_the_run_and_eval_as_they_were(trained, files, tmp_path, capsys):
    root, held, _ = files
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    before = _snapshot(run)
    code, out, err = _run(capsys, "eval", run)
    assert code == 0, err
    evaluated = json.loads(out)
    code, out, err = _run(capsys, "add-classes", run, "--data-dir", root / "new", "--in-place")
    assert code == 0, err
    after = _snapshot(run)
    assert set(after) == set(before) | {"model.pt"} and all(after[name] == before[name] for name in before)
    assert json.loads(_run(capsys, "eval", run)[1]) == evaluated
    code, out, err = _run(capsys, "predict", run, held[6][0])
    assert code == 0 and _csv(out)[0]["name"] == "6", out


def test_onnx_export_works_or_says_what_to_install(trained, tmp_path, capsys):
    code, out, err = _run(capsys, "export", trained, "--format", "onnx", "--out", tmp_path / "net.onnx")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        _one_line_error(code, err, "ONNX export needs the", "pip install 'knnsolver[onnx]'")
        assert not list(tmp_path.iterdir())
        return
    assert code == 0, err
    assert json.loads(out)["max_abs_error"] <= 1e-4


def test_bad_inputs_are_one_line_and_leave_the_run_as_it_was(trained, files, tmp_path, capsys):
    root, _, known = files
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not an image")
    np.save(tmp_path / "wide.npy", np.zeros((2, 1, 8, 9), dtype=np.float32))
    (tmp_path / "tree" / "7").mkdir(parents=True)
    (tmp_path / "tree" / "7" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    before = _snapshot(trained)
    cases = [
        (["predict", tmp_path / "no-run", known[0]], ["does not exist or is not a folder"]),
        (["predict", trained, tmp_path / "broken.png"], ["cannot read image", "broken.png"]),
        (["predict", trained, tmp_path / "wide.npy"], ["has shape (2, 1, 8, 9)", "(N, 1, 8, 8)"]),
        (["predict", trained, tmp_path / "empty"], ["holds no images"]),
        (["predict", trained, known[0], "--reject-below", "-0.5"], ["--reject-below must be >= 0"]),
        (["predict", trained, known[0], "--top-k", "0"], ["--top-k must be >= 1"]),
        (["search", tmp_path / "no-run", known[0]], ["does not exist or is not a folder"]),
        (["search", trained, tmp_path / "broken.png"], ["cannot read image"]),
        (["search", trained, known[0], "--k", "0"], ["--k must be >= 1"]),
        (["search", trained, known[0], "--k", "100000"], ["k=100000 neighbours requested"]),
        (["add-classes", trained, "--data-dir", tmp_path / "empty", "--out", tmp_path / "a"], ["has no class sub-folders"]),
        (["add-classes", trained, "--data-dir", tmp_path / "nowhere", "--out", tmp_path / "b"], ["does not exist"]),
        (["add-classes", trained, "--data-dir", tmp_path / "tree", "--out", tmp_path / "c"], ["cannot read image"]),
        (["add-classes", trained, "--data-dir", tmp_path / "tree", "--in-place"], ["cannot read image"]),
        (["add-classes", trained, "--data-dir", root / "new", "--out", tmp_path / "taken"], ["is not empty"]),
        (["add-classes", tmp_path / "no-run", "--data-dir", root / "new", "--out", tmp_path / "d"],
         ["does not exist or is not a folder"]),
        (["export", tmp_path / "no-run", "--out", tmp_path / "x.pt"], ["does not exist or is not a folder"]),
        (["export", trained, "--out", tmp_path / "empty"], ["is a folder"]),
    ]
    for argv, fragments in cases:
        code, _, err = _run(capsys, *argv)
        _one_line_error(code, err, *fragments)
    assert _snapshot(trained) == before
    assert not any((tmp_path / name).exists() for name in "abcd")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_a_features_run_refuses_images_and_wrong_widths_in_one_line(tmp_path, capsys, digits):
    x, y = digits
    np.savez(tmp_path / "features.npz", x=(x / 16).astype(np.float32), y=y)
    run = tmp_path / "run"
    assert main(["train", "--dataset", "embeddings", "--data-dir", str(tmp_path / "features.npz"), "--solver", "hal",
                 "--epochs", "1", "--plots", "false", "--progress", "false", "--out", str(run)]) == 0
    capsys.readouterr()
    np.save(tmp_path / "q.npy", (x[:4] / 16).astype(np.float32))
    np.save(tmp_path / "narrow.npy", np.zeros((4, 10), dtype=np.float32))
    assert _run(capsys, "predict", run, tmp_path / "q.npy")[0] == 0
    _png(tmp_path / "tree" / "new" / "a.png", x[0])
    before = _snapshot(run)
    for argv, fragments in [
        (["predict", run, tmp_path / "narrow.npy"], ["has shape (4, 10)", "feature vectors"]),
        (["predict", run, tmp_path / "tree" / "new" / "a.png"], ["is an image", "feature vectors"]),
        (["add-classes", run, "--data-dir", tmp_path / "tree", "--in-place"], ["is an image", "feature vectors"]),
    ]:
        code, _, err = _run(capsys, *argv)
        _one_line_error(code, err, *fragments)
    assert _snapshot(run) == before
