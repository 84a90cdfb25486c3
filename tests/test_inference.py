"""Issue 13: a trained model from Python: load, predict, search, add classes, reject unknowns, save and export."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import knnsolver
from knnsolver.data import build_data
from knnsolver.errors import (
    ConfigError,
    DataError,
    MissingDependencyError,
    RunFolderBusyError,
    StorageError,
)
from knnsolver.inference import UNKNOWN, reject_threshold
from knnsolver.registry import SOLVERS
from knnsolver.training import TrainConfig, embed_saved, evaluate_saved, train
from knnsolver.training.checkpoint import load_checkpoint, save_checkpoint

SMALL = {"dataset": "digits", "width": 8, "embedding_dim": 16, "plots": False, "progress": False, "max_per_class": 40}


def _train(folder: Path, solver: str, epochs: int = 1, **settings) -> Path:
    train(TrainConfig(**{**SMALL, "solver": solver, "epochs": epochs, "out": str(folder), **settings}))
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Finished digits runs (standard split, all ten classes), trained once: rbf, hal and softmax."""
    root = tmp_path_factory.mktemp("runs")
    return {"rbf": _train(root / "rbf", "rbf", 2, solver_options={"k": 20, "update_interval": 1}),
            "hal": _train(root / "hal", "hal"), "softmax": _train(root / "softmax", "softmax")}


@pytest.fixture(scope="module")
def test_split():
    """The digits test split as the runs saw it: (N, 1, 8, 8) inputs in [0, 1] and their labels."""
    data = build_data("digits", seed=0, max_per_class=40)
    return torch.stack([data.test[i][0] for i in range(len(data.test))]), data.test.labels, data


def test_a_loaded_run_embeds_in_batches_of_its_eval_batch_size(runs, tmp_path):
    """The run's automatic eval_batch_size (0) is 128 rows on the CPU; a set one is kept."""
    assert knnsolver.load(runs["softmax"]).batch_size == 128
    assert knnsolver.load(_train(tmp_path / "set", "softmax", eval_batch_size=40)).batch_size == 40


def test_a_loaded_run_predicts_as_its_evaluation_did(runs, test_split):
    x, labels, _ = test_split
    for name in ("rbf", "hal", "softmax"):
        model = knnsolver.load(runs[name])
        expected = evaluate_saved(runs[name])["test_accuracy"]
        assert (model.predict(x) == labels).double().mean().item() == pytest.approx(expected, abs=1e-12), name


@pytest.mark.parametrize("solver", SOLVERS.names())
def test_every_solver_gives_probabilities_that_sum_to_one(solver):
    torch.manual_seed(0)
    emb, labels = torch.randn(60, 16), torch.arange(60) % 4
    model = SOLVERS.build(solver, embedding_dim=16, num_classes=4, num_train=60, **({"k": 5} if solver == "rbf" else {}))
    if solver == "rbf":
        model.refresh(emb, labels)
    model.fit_reference(emb, labels)
    queries = torch.randn(7, 16)
    proba = model.eval().predict_proba(queries)
    assert proba.shape == (7, 4) and bool((proba >= 0).all())
    assert torch.allclose(proba.sum(1), torch.ones(7), atol=1e-5)
    assert torch.equal(proba.argmax(1), model.predict(queries).argmax(1))  # the same ranking as the scores


@pytest.mark.parametrize("name", ["rbf", "hal", "softmax"])
def test_probabilities_sum_to_one_and_give_the_prediction(runs, test_split, name):
    x, _, _ = test_split
    model = knnsolver.load(runs[name])
    proba = model.predict_proba(x[:50])
    assert proba.shape == (50, 10) and bool((proba >= 0).all())
    assert torch.allclose(proba.sum(1), torch.ones(50), atol=1e-5)
    assert torch.equal(model.predict(x[:50]), proba.argmax(1))


def test_search_finds_a_training_image_itself(runs, test_split):
    _, _, data = test_split
    model = knnsolver.load(runs["rbf"])
    rows = [0, 7, 100]
    x = torch.stack([data.train_eval[i][0] for i in rows])
    hits = model.search(x, k=4)
    assert hits.ids[:, 0].tolist() == rows and bool((hits.distances[:, 0] < 1e-3).all())
    assert torch.equal(hits.labels, model.reference_labels[hits.ids])
    assert bool((hits.distances[:, 1:] >= hits.distances[:, :-1]).all())
    assert hits.paths == [[None] * 4] * 3 and hits.queries == ["input[0]", "input[1]", "input[2]"]
    with pytest.raises(ConfigError, match="k=10000 neighbours requested"):
        model.search(x, k=10_000)


def test_adding_the_same_files_again_warns(runs, test_split, tmp_path, monkeypatch):
    """Helper review: add-classes run twice on one folder added every image twice, silently."""
    from PIL import Image

    x, _, _ = test_split
    files = []
    for i in range(3):
        files.append(tmp_path / f"new{i}.png")
        Image.fromarray((x[i, 0].numpy() * 255).astype(np.uint8)).save(files[-1])
    model = knnsolver.load(runs["rbf"]).add(files, "new")
    size = model.reference_size
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"2 of the 2 files added are already in the reference set \(e.g. .*new0.png\)"):
        model.add(["new0.png", "new1.png"], "new")  # the same files by other paths
    assert model.reference_size == size + 2


def test_added_classes_by_id_or_name_are_predicted(runs, test_split):
    x, _, _ = test_split
    model = knnsolver.load(runs["hal"])
    model.add(x[:6], torch.tensor([11, 10, 10, 11, 10, 11]))  # the next ids, in any order
    model.add(x[6:9], "cat")  # one name for all
    assert model.classes[10:] == ["10", "11", "cat"] and model.num_classes == 13
    assert model.reference_size == 400 + 9
    assert model.search(x[6:9], k=1).ids[:, 0].tolist() == [406, 407, 408]  # each is its own nearest item
    assert bool((model.predict_proba(x[6:9])[:, 12] > 0).all())  # and votes for its new class
    model.add(x[9:10].expand(5, -1, -1, -1), "dog")  # five copies outvote the training neighbours
    assert model.predict(x[9:10]).tolist() == [13]
    model.add(x[10:12], "3")  # a known class's name adds examples to it
    assert model.num_classes == 14 and model.reference_labels[-2:].tolist() == [3, 3]
    assert model.predict_proba(x[:2]).shape == (2, 14)


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([1.0, 2.0]), "integer ids or class names, got a tensor of torch.float32"),
    (np.array([True, False]), "got an array of bool"),
    ([1, 2.5], "got 2.5 (a float)"),
    ([object(), 1], "got <object"),
    ([1], "got 1 class labels for 2 inputs"),
    ([11, 11], "the ids that follow them (10, 11, ...), got [11]"),
    ([-1, 3], "got [-1, 3]"),
    (None, "got NoneType"),
])
def test_bad_labels_are_refused_and_change_nothing(runs, test_split, labels, message):
    x, _, _ = test_split
    model = knnsolver.load(runs["hal"])
    before = model.predict_proba(x[:20])
    with pytest.raises(ConfigError) as err:
        model.add(x[:2], labels)
    assert message in str(err.value)
    assert model.num_classes == 10 and model.reference_size == 400
    assert torch.equal(model.predict_proba(x[:20]), before)


def test_a_solver_without_reference_refuses_to_add(runs, test_split):
    model = knnsolver.load(runs["softmax"])
    with pytest.raises(ConfigError, match="SoftmaxSolver predicts with weights learnt for its 10 training classes"):
        model.add(test_split[0][:2], [10, 10])
    assert model.search(test_split[0][:2], k=3).ids.shape == (2, 3)  # search still works


@pytest.mark.parametrize("name", ["rbf", "hal"])
def test_a_saved_model_predicts_exactly_as_before(runs, test_split, tmp_path, name):
    x, _, _ = test_split
    model = knnsolver.load(runs[name]).add(x[:30], torch.arange(30) % 2 + 10)
    assert model.save(tmp_path / "m") == tmp_path / "m"
    again = knnsolver.load(tmp_path / "m")
    assert again.classes == model.classes and again.reference_size == model.reference_size
    assert torch.equal(again.predict_proba(x), model.predict_proba(x))
    assert torch.equal(again.search(x[:5], k=3).ids, model.search(x[:5], k=3).ids)
    assert "added" in repr(again) and f"{type(again.solver).__name__}(" in str(again.solver)
    again.add(x[30:32], "new").save(tmp_path / "m")  # a model folder is replaced
    assert knnsolver.load(tmp_path / "m").num_classes == 13


def test_a_model_saved_into_its_run_folder_is_loaded_from_it_until_the_run_changes(runs, test_split, tmp_path):
    x, _, _ = test_split
    run = tmp_path / "run"
    shutil.copytree(runs["hal"], run)
    knnsolver.load(run).add(x[:4], "cat").save(run)
    assert knnsolver.load(run).classes[-1] == "cat"
    state = load_checkpoint(run / "best.pt")
    save_checkpoint({**state, "note": "retrained"}, run / "best.pt")
    with pytest.raises(DataError, match="was saved from an earlier training of the run"):
        knnsolver.load(run)


def test_save_refuses_files_and_foreign_folders_and_busy_runs(runs, test_split, tmp_path):
    from knnsolver.training.runfolder import _Lock

    model = knnsolver.load(runs["hal"])
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        model.save(tmp_path / "file")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(StorageError, match=r"holds other files \(notes.txt\)"):
        model.save(tmp_path / "other")
    run = tmp_path / "run"
    shutil.copytree(runs["hal"], run)
    with pytest.raises(StorageError, match="holds another run"):  # a copy is not the folder the model came from
        model.save(run)
    own = knnsolver.load(run)
    lock = _Lock(run)  # a training holding the folder
    try:
        with pytest.raises(RunFolderBusyError, match="in use by another training"):
            own.save(run)
    finally:
        lock.release()
    assert not (run / "model.pt").exists()


def test_reject_threshold_meets_the_false_accept_rate():
    top = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    correct = torch.tensor([True, False, True, False, False])
    loose = reject_threshold(top, correct, 0.34)  # one of three wrong answers may pass: the 0.8
    assert 0.6 < loose.threshold <= 0.7 and loose.false_accept_rate == pytest.approx(1 / 3)
    assert loose.true_accept_rate == 1.0
    strict = reject_threshold(top, correct, 0.0)
    assert 0.8 < strict.threshold <= 0.9 and strict.false_accept_rate == 0 and strict.true_accept_rate == 0.5
    assert reject_threshold(top, torch.ones(5, dtype=torch.bool), 0.0).threshold == 0.0
    with pytest.raises(ConfigError, match=r"false_accept_rate must be in \[0, 1\]"):
        reject_threshold(top, correct, 1.5)


def test_predict_rejects_below_a_chosen_threshold(runs, test_split):
    x, labels, _ = test_split
    model = knnsolver.load(runs["rbf"])
    unknown = labels == 9
    truth = torch.where(unknown, torch.full_like(labels, UNKNOWN), labels)  # 9s stand for an unknown class
    choice = model.choose_threshold(x, truth, false_accept_rate=0.1)
    predicted = model.predict(x, reject_below=choice.threshold)
    accepted_wrong = (predicted != UNKNOWN) & (predicted != truth)
    wrong = model.predict(x) != truth
    assert accepted_wrong.sum() <= 0.1 * wrong.sum() + 1e-9
    top = model.predict_proba(x).max(1).values
    assert torch.equal(predicted == UNKNOWN, top < choice.threshold)
    with pytest.raises(ConfigError, match="reject_below must be >= 0"):
        model.predict(x[:2], reject_below=-0.5)
    assert model.predict(x[:3], reject_below=1.01).tolist() == [UNKNOWN] * 3


def _digit_pngs(folder: Path, images: torch.Tensor) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = folder / f"{i:03d}.png"
        Image.fromarray((img[0].numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def test_images_folders_and_npy_files_are_read_as_the_run_saw_its_pixels(runs, test_split, tmp_path):
    x, _, _ = test_split
    model = knnsolver.load(runs["rbf"])
    quantised = (x[:6] * 255).round() / 255
    _digit_pngs(tmp_path / "pngs" / "nested", x[:3])
    _digit_pngs(tmp_path / "pngs", x[3:6])
    np.save(tmp_path / "x.npy", quantised.numpy())
    from_folder = model.embed(tmp_path / "pngs")  # recursively, sorted: 000-002.png, then nested/000-002.png
    expected = model.embed(quantised)
    assert torch.allclose(from_folder, torch.cat([expected[3:], expected[:3]]), atol=1e-5)
    assert torch.allclose(model.embed(tmp_path / "x.npy"), expected, atol=1e-6)
    assert torch.allclose(model.embed([str(tmp_path / "x.npy"), tmp_path / "pngs" / "000.png"])[-1], expected[3], atol=1e-5)
    assert torch.allclose(model.embed(quantised[0].numpy()), expected[:1], atol=1e-6)  # one input without a batch axis
    assert model.search(tmp_path / "pngs", k=1).queries[0] == str(tmp_path / "pngs" / "000.png")


@pytest.mark.parametrize("resize", [None, 20])
def test_an_image_folder_run_reads_files_as_its_test_split(tmp_path, resize):
    rng = np.random.default_rng(0)
    for c, colour in enumerate(("red", "green", "blue")):
        (tmp_path / "data" / colour).mkdir(parents=True)
        for j in range(10):
            pixels = rng.integers(0, 80, (24, 30, 3), dtype=np.uint8)
            pixels[..., c] += 150
            Image.fromarray(pixels).save(tmp_path / "data" / colour / f"{j}.png")
    extra = {} if resize is None else {"resize_size": resize}
    run = _train(tmp_path / "run", "hal", dataset="image-folder", data_dir=str(tmp_path / "data"), image_size=16,
                 max_per_class=None, **extra)
    model = knnsolver.load(run)
    assert model.spec.images == ("stretch" if resize is None else "crop")
    data = build_data("image-folder", data_dir=str(tmp_path / "data"), image_size=16, resize_size=resize)
    paths = [data.test.pool.paths[r] for r in data.test.rows]
    emb, _ = embed_saved(run, "test")
    assert torch.allclose(model.embed(paths), emb, atol=1e-5)
    hits = model.search(paths[:1], k=2)
    assert all(Path(p).parent.parent == tmp_path / "data" for p in hits.paths[0])  # training files


def test_a_features_run_takes_arrays_and_refuses_images(tmp_path, test_split):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    np.savez(tmp_path / "features.npz", x=(x / 16).astype(np.float32), y=y)
    run = _train(tmp_path / "run", "hal", dataset="embeddings", data_dir=str(tmp_path / "features.npz"))
    model = knnsolver.load(run)
    np.save(tmp_path / "q.npy", (x[:5] / 16).astype(np.float32))
    assert model.spec.images is None and model.predict(tmp_path / "q.npy").shape == (5,)
    np.save(tmp_path / "narrow.npy", np.zeros((2, 10), dtype=np.float32))
    with pytest.raises(ConfigError, match=r"narrow.npy has shape \(2, 10\), but this model takes feature vectors"):
        model.predict(tmp_path / "narrow.npy")
    _digit_pngs(tmp_path / "img", test_split[0][:1])
    with pytest.raises(ConfigError, match="is an image, but this model takes feature vectors"):
        model.predict(tmp_path / "img" / "000.png")


def test_bad_inputs_are_one_clear_error(runs, tmp_path):
    model = knnsolver.load(runs["hal"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "notes.txt").write_text("x")
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    cases = [
        (tmp_path / "empty", DataError, "holds no images"),
        (tmp_path / "broken.png", DataError, "cannot read image"),
        (tmp_path / "missing.png", DataError, "does not exist"),
        (tmp_path / "notes.txt", ConfigError, "is neither an image"),
        (tmp_path / "strings.npy", DataError, "holds <U1 values"),
        (torch.zeros(2, 3, 8, 8), ConfigError, r"has shape \(2, 3, 8, 8\)"),
        (torch.full((1, 1, 8, 8), float("nan")), DataError, "NaN"),
        (torch.zeros(2, 1, 8, 8, dtype=torch.bool), ConfigError, "torch.bool"),
        ([], ConfigError, "no inputs given"),
        ({"a": 1}, ConfigError, "got dict"),
    ]
    for inputs, error, message in cases:
        with pytest.raises(error, match=message):
            model.predict(inputs)
    with pytest.raises(ConfigError, match="does not exist or is not a folder"):
        knnsolver.load(tmp_path / "no-run")
    with pytest.raises(ConfigError, match="is not a knnsolver run: config.json is missing"):
        knnsolver.load(tmp_path / "empty")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU is visible"):
            knnsolver.load(runs["hal"], device="cuda")


def test_export_reproduces_the_embeddings_and_writes_the_reference_set(runs, test_split, tmp_path, monkeypatch):
    import hashlib
    import json

    from knnsolver.inference import export as export_module

    x, _, _ = test_split
    model = knnsolver.load(runs["rbf"]).add(x[:4], "new")
    report = model.export(tmp_path / "net.pt")
    assert report["max_abs_error"] <= 1e-4
    network = torch.jit.load(str(tmp_path / "net.pt"))
    with torch.no_grad():
        assert torch.allclose(network(x[:7]), model.embed(x[:7]), atol=1e-4)
    reference = np.load(tmp_path / "net_reference.npy")
    assert reference.shape == (model.reference_size, 16)
    assert np.array_equal(np.load(tmp_path / "net_reference_labels.npy"), model.reference_labels.numpy())
    manifest = json.loads((tmp_path / "net_classes.json").read_text())
    assert manifest["classes"][-1] == "new"
    # written last, the classes file names the other three by SHA-256 (hashlib here): a torn export shows
    for entry in manifest["files"].values():
        assert entry["sha256"] == hashlib.sha256((tmp_path / entry["name"]).read_bytes()).hexdigest()
    assert sorted(e["name"] for e in manifest["files"].values()) == ["net.pt", "net_reference.npy",
                                                                       "net_reference_labels.npy"]
    monkeypatch.setattr(export_module, "_torchscript", lambda *args: torch.zeros(5, 16))
    with pytest.raises(DataError, match="differ from the model's by up to"):
        model.export(tmp_path / "bad.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.pt", "net_classes.json", "net_reference.npy",
                                                           "net_reference_labels.npy"]


def test_export_makes_its_folder_and_files_a_server_can_read(runs, tmp_path):
    """Helper review: the network file kept mkstemp's 0600 (the others were 0644), and a missing folder was refused
    although every other writer creates it."""
    import os

    old = os.umask(0o022)
    try:
        knnsolver.load(runs["rbf"]).export(tmp_path / "serve" / "v1" / "net.pt")
    finally:
        os.umask(old)
    files = sorted((tmp_path / "serve" / "v1").iterdir())
    assert [p.name for p in files] == ["net.pt", "net_classes.json", "net_reference.npy", "net_reference_labels.npy"]
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o644 for p in files}


def test_onnx_export_works_or_names_what_to_install(runs, test_split, tmp_path):
    model = knnsolver.load(runs["hal"])
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r"pip install 'knnsolver\[onnx\]'"):
            model.export(tmp_path / "net.onnx", "onnx")
        assert not (tmp_path / "net.onnx").exists()
        return
    report = model.export(tmp_path / "net.onnx", "onnx")
    session = onnxruntime.InferenceSession(report["network"], providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": test_split[0][:3].numpy()})[0]
    assert np.allclose(got, model.embed(test_split[0][:3]).numpy(), atol=1e-4)
