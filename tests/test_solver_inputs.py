"""Issue 14: every solver's Python API answers bad input (shape, dtype, finiteness, label range, empty
batch) with one clear error, the same checks for all, instead of NaN, a wrong class or a raw torch error."""
import numpy as np
import pytest
import torch

from knnsolver.classifiers import RBFClassifier
from knnsolver.errors import ConfigError, NonFiniteInputError
from knnsolver.registry import SOLVERS

SOLVER_CASES = [("softmax", {}), ("hal", {}), ("crc", {"dictionary": "batch"}), ("crc", {"dictionary": "bank"}),
                ("centralized", {}), ("triplet", {}), ("proxyanchor", {}), ("rbf", {"k": 5})]
D, C, N = 8, 4, 32


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.arange(C).repeat(N // C)


def _solver(name, options):
    torch.manual_seed(0)
    solver = SOLVERS.build(name, embedding_dim=D, num_classes=C, num_train=N, **options)
    x, y = _data()
    if name == "rbf":
        solver.refresh(x, y)
    else:
        solver.fit_reference(x, y)
    return solver


def _ids(cases):
    return [f"{name}-{'-'.join(map(str, opts.values()))}" if opts else name for name, opts in cases]


@pytest.mark.parametrize("name, options", SOLVER_CASES, ids=_ids(SOLVER_CASES))
def test_good_input_still_works(name, options):
    solver = _solver(name, options)
    x, y = _data(1)
    loss = solver(x, y, torch.arange(N))
    assert torch.isfinite(loss)
    assert solver.predict(x).shape == (N, C)
    assert solver.predict(x[:0]).shape[0] == 0


@pytest.mark.parametrize("name, options", SOLVER_CASES, ids=_ids(SOLVER_CASES))
def test_bad_training_batches_are_one_clear_error(name, options):
    solver = _solver(name, options)
    x, y = _data(1)
    rows = torch.arange(N)
    cases = [
        ((x[:0], y[:0], rows[:0]), ConfigError, "got an empty batch"),
        ((x[:, :5], y, rows), ConfigError, r"takes embeddings of shape \(n, 8\), got \(32, 5\)"),
        ((x.long(), y, rows), ConfigError, "takes floating-point embeddings, got dtype torch.int64"),
        ((x, y.float(), rows), ConfigError, "takes integer class labels, got dtype torch.float32"),
        ((x, y[:-1], rows), ConfigError, r"one label per embedding row, shape \(32,\), got \(31,\)"),
        ((x, y + 1, rows), ConfigError, r"class labels \[0, 4\), got labels from 1 to 4"),
        ((x, y - 1, rows), ConfigError, r"class labels \[0, 4\), got labels from -1 to 2"),
    ]  # a NaN embedding makes the loss NaN for the trainer's guard: test_every_solver_loss_propagates_a_nan_embedding
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            solver(*args)


@pytest.mark.parametrize("name, options", [("rbf", {"k": 5}), ("crc", {"dictionary": "bank"})])
def test_row_indices_of_the_wrong_length_or_dtype_are_named(name, options):
    """Helper review: 2 row indices for 4 rows made RBF say the stored labels differ (and CRC fail inside torch)."""
    solver = _solver(name, options)
    x, y = _data(1)
    with pytest.raises(ConfigError, match=r"one training-set row index per embedding row, shape \(4,\), got \(2,\)"):
        solver(x[:4], y[:4], torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="integer row indices, got dtype torch.float32"):
        solver(x[:4], y[:4], torch.arange(4.0))


@pytest.mark.parametrize("name, options", SOLVER_CASES, ids=_ids(SOLVER_CASES))
def test_bad_reference_and_query_embeddings_are_refused(name, options):
    solver = _solver(name, options)
    x, y = _data(1)
    x[5, 2] = float("inf")
    with pytest.raises(NonFiniteInputError, match="predict got 1 embedding row"):
        solver.predict(x)
    with pytest.raises(ConfigError, match=r"takes embeddings of shape \(n, 8\)"):
        solver.predict(x[0])
    if solver.predicts_by_knn or name in ("rbf", "crc"):
        fit = solver.refresh if name == "rbf" else solver.fit_reference
        with pytest.raises(NonFiniteInputError, match="holding NaN or inf"):
            fit(x, y)
        with pytest.raises(ConfigError, match="integer class labels"):
            fit(_data()[0], y.float())


def test_rbf_add_centres_refuses_float_labels_and_nan():
    solver = _solver("rbf", {"k": 5})
    x, _ = _data(2)
    with pytest.raises(ConfigError, match="integer class labels, got dtype torch.float32"):
        solver.add_centres(x[:2], torch.tensor([0.7, 1.2]))
    x[1, 0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="add_centres got 1 embedding row"):
        solver.add_centres(x[:2], torch.tensor([4, 5]))
    assert solver.bank.centres.shape[0] == N  # nothing was added


def test_rbf_refresh_with_nan_does_not_fall_back_to_sigma_one():
    solver = SOLVERS.build("rbf", embedding_dim=D, num_classes=C, num_train=N, k=5)
    x, y = _data()
    x[0] = float("nan")
    with pytest.raises(NonFiniteInputError, match="refresh got 1 embedding row"):
        solver.refresh(x, y)
    assert not solver.bank.filled


def test_rbf_classifier_checks_its_input():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), np.repeat(np.arange(4), 10)
    clf = RBFClassifier(k=5).fit(x, y)
    assert clf.predict(x[:0]).shape == (0,) and clf.predict_proba(x[:0]).shape == (0, 4)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(NonFiniteInputError, match="RBFClassifier.predict got 1 row"):
        clf.predict(bad)
    with pytest.raises(NonFiniteInputError, match="RBFClassifier.fit got 1 row"):
        RBFClassifier(k=5).fit(bad, y)
    huge = x.copy()
    huge[0, 0] = 1e300  # finite in float64, inf in float32
    with pytest.raises(NonFiniteInputError, match="after the cast to float32"):
        RBFClassifier(k=5).fit(huge, y)
    assert RBFClassifier(k=np.int64(5)).fit(x, y).score(x, y) > 0.5  # numpy integers are integers
    with pytest.raises(ConfigError, match="k must be an integer, got 5.0"):
        RBFClassifier(k=5.0).fit(x, y)
    with pytest.raises(ConfigError, match="unknown search 'kd'"):
        RBFClassifier(search="kd").fit(x, y)
    with pytest.raises(ConfigError, match="at least one feature"):
        RBFClassifier(k=5).fit(np.zeros((40, 0)), y)


@pytest.mark.parametrize("smoothing", [-0.1, 1.0, 1.5])
def test_softmax_label_smoothing_outside_zero_one_is_refused(smoothing):
    from knnsolver.solvers.softmax import SoftmaxSolver

    with pytest.raises(ConfigError, match=rf"label_smoothing must be in \[0, 1\), got {smoothing}; try label_smoothing=0.1"):
        SoftmaxSolver(8, 3, label_smoothing=smoothing)


@pytest.mark.parametrize(("smoothing", "message"), [("0.5", "label_smoothing must be a number"),
                                                     (None, "label_smoothing must be a number, got None")])
def test_softmax_label_smoothing_of_the_wrong_type_is_refused(smoothing, message):
    from knnsolver.solvers.softmax import SoftmaxSolver

    with pytest.raises(ConfigError, match=message):
        SoftmaxSolver(8, 3, label_smoothing=smoothing)


def test_softmax_label_smoothing_matches_the_smoothed_targets():
    """0.9 (the ladder's end) against cross-entropy written out with targets (1 - eps) onehot + eps / C."""
    from knnsolver.solvers.softmax import SoftmaxSolver

    torch.manual_seed(0)
    solver = SoftmaxSolver(8, 3, label_smoothing=0.9).double()
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.arange(16) % 3
    log_p = torch.log_softmax(solver.classifier(x), dim=1)
    target = 0.1 * torch.nn.functional.one_hot(y, 3).double() + 0.9 / 3
    assert solver(x, y).item() == pytest.approx(-(target * log_p).sum(1).mean().item(), rel=1e-12)
