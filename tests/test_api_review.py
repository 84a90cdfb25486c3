"""Defects a review of the Python API found (session 15): each test fails on the code before its fix."""
from __future__ import annotations

import copy
import io
import re
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError

from knnsolver.classifiers import RBFClassifier
from knnsolver.errors import ConfigError, TrainingWarning
from knnsolver.metrics import retrieval_metrics
from knnsolver.registry import SOLVERS
from knnsolver.solvers.centralized import CentralizedSolver
from knnsolver.solvers.crc import CRCSolver
from knnsolver.solvers.hal import HALSolver
from knnsolver.solvers.pml import NCASolver
from knnsolver.solvers.rbf import RBFSolver

D, C = 16, 4


def _batch(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.arange(n) % C


@pytest.mark.parametrize("every", [1, 2, 10])
def test_centralized_gradients_accumulate_over_forwards_before_one_backward(every):
    """Two micro-batches, one backward: the decorrelation in the second forward (in place) left the first's graph
    broken. The accumulated gradient is the sum of each forward's own, taken one at a time."""
    x, y = _batch()
    torch.manual_seed(0)
    solver = CentralizedSolver(D, C, decorrelate_every=every)
    alone = copy.deepcopy(solver)
    for _ in range(every):  # the last pair of forwards takes in a decorrelation
        solver.zero_grad()
        (solver(x[:20], y[:20]) + solver(x[20:], y[20:])).backward()
        alone.zero_grad()
        total = torch.zeros_like(alone.centres)
        for part in (slice(0, 20), slice(20, 40)):
            alone.centres.grad = None
            alone(x[part], y[part]).backward()
            total += alone.centres.grad
        torch.testing.assert_close(solver.centres.grad, total)
        torch.testing.assert_close(solver.centres, alone.centres)


def _solver(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return SOLVERS.build(name, embedding_dim=D, num_classes=C, num_train=40)


@pytest.mark.parametrize("name", ["softmax", "hal", "crc", "centralized"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_embeddings_of_another_precision_are_computed_in_the_solver_s(name, dtype):
    """float64 or half embeddings met float32 parameters in a raw 'same dtype' error from torch; now the loss and
    predictions are those of the embeddings cast to float32, and the gradient comes back in the embeddings' dtype."""
    x, y = _batch()
    solver = _solver(name)
    emb = x.to(dtype).requires_grad_()
    loss = solver(emb, y)
    loss.backward()
    assert emb.grad.dtype == dtype and torch.isfinite(emb.grad).all()
    expected = _solver(name)(emb.detach().float(), y)
    torch.testing.assert_close(loss, expected)
    solver.fit_reference(emb.detach(), y)
    reference = _solver(name)
    reference.fit_reference(emb.detach().float(), y)
    torch.testing.assert_close(solver.predict(emb.detach()[:5]), reference.predict(emb.detach().float()[:5]))


def test_crc_converted_to_float64_predicts_in_float64():
    """``.double()`` on CRC: its prediction cast the queries to float32 against a float64 metric."""
    x, y = _batch()
    solver = CRCSolver(D, C).double()
    solver.fit_reference(x.double(), y)
    scores = solver.predict(x.double()[:3])
    assert scores.dtype == torch.float64 and scores.shape == (3, C)


def test_hal_trains_under_autocast():
    """HAL's autograd node saved bfloat16 and float32 tensors under autocast and failed in backward."""
    x, y = _batch()
    torch.manual_seed(0)
    net, solver = torch.nn.Linear(D, D), HALSolver(D, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = net(x)
        loss = solver(emb, y)
    loss.backward()
    assert emb.dtype == torch.bfloat16 and torch.isfinite(solver.anchors.grad).all()
    assert torch.isfinite(net.weight.grad).all()
    assert loss.item() == HALSolver.forward(solver, emb.detach().float(), y).item()


def test_crc_pickles_whole():
    """A lambda load hook made ``torch.save(solver)`` fail ('Can't pickle local object')."""
    x, y = _batch()
    solver = CRCSolver(D, C, 40, dictionary="bank")
    solver.fit_reference(x, y)
    buffer = io.BytesIO()
    torch.save(solver, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded.predict(x[:5]), solver.predict(x[:5]))
    loaded.load_state_dict(solver.state_dict())  # the reload still clears the class table
    assert loaded._layout is None


def test_crc_bank_refuses_row_indices_outside_the_bank_or_of_other_labels():
    x, y = _batch()
    solver = CRCSolver(D, C, 40, dictionary="bank")
    solver.fit_reference(x, y)
    with pytest.raises(ConfigError, match=r"CRCSolver row indices must lie in \[0, 40\).*got 0..400"):
        solver(x[:4], y[:4], torch.tensor([0, 1, 2, 400]))
    with pytest.raises(ConfigError, match=r"must lie in \[0, 40\).*got -1..2"):
        solver(x[:4], y[:4], torch.tensor([0, 1, 2, -1]))
    with pytest.raises(ConfigError, match="row indices do not match the bank"):
        solver(x[:4], y[:4], torch.tensor([1, 2, 3, 4]))
    assert torch.isfinite(solver(x[:4], y[:4], torch.arange(4)))


def test_nca_loss_is_zero_without_a_positive_pair_and_nan_for_non_finite_embeddings():
    """A batch of distinct labels gave pml's NaN mean of no terms, which the trainer would call a divergence."""
    solver = NCASolver(D, C)
    emb = torch.randn(4, D, requires_grad=True)
    loss = solver(emb, torch.arange(4))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(emb.grad, torch.zeros_like(emb))
    paired = torch.tensor([0, 0, 1, 2])  # with a positive pair the loss is pml's own
    raw = solver.loss(emb.detach(), paired)
    assert torch.isfinite(raw) and solver(emb.detach(), paired).item() == pytest.approx(raw.item())
    bad = torch.randn(4, D)
    bad[0, 0] = float("nan")
    from knnsolver.hostsync import accelerator_paths

    with accelerator_paths():  # the training call's own checks skipped, as on a GPU: the loss carries the NaN
        assert torch.isnan(solver(bad, torch.arange(4)))


def _brute_force(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Recall@1 and MAP@R over every row against the others, in float64 (ties by lower index)."""
    d = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    order = np.argsort(d, axis=1, kind="stable")
    hits, maps = [], []
    for i in range(len(x)):
        rel = (y[order[i]] == y[i])[: len(x) - 1]
        r = int((y == y[i]).sum()) - 1
        if r == 0:
            continue
        hits.append(rel[0])
        precision = np.cumsum(rel[:r]) / np.arange(1, r + 1)
        maps.append((precision * rel[:r]).sum() / r)
    return float(np.mean(hits)), float(np.mean(maps))


@pytest.mark.parametrize("offset, spread, dim", [(20.0, 0.1, 64), (100.0, 0.01, 8), (50.0, 1.0, 128), (1000, 0, 3)])
def test_retrieval_ranks_points_far_from_the_origin_as_float64_does(offset, spread, dim):
    """The float32 expansion ||q||^2 - 2 q.p + ||p||^2 lost the distances of points far from the origin for their
    spread (recall@1 0.1300 against 0.1267 for the first case); a common shift changes no distance. Integer
    points (spread 0 here: a grid of +-3 around the offset) keep exact distances, so equal ones tie by index."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(300, dim)) * spread + offset if spread else
         rng.integers(-3, 4, size=(300, dim)) + offset).astype(np.float32)
    y = rng.integers(0, 10, 300)
    recall, map_r = _brute_force(x.astype(np.float64), y)
    got = retrieval_metrics(x, y)
    assert got["recall_at_1"] == pytest.approx(recall, abs=1e-12)
    assert got["map_at_r"] == pytest.approx(map_r, abs=1e-12)


def test_rbf_classifier_follows_scikit_learn_s_conventions():
    x, y = _batch()
    with pytest.raises(NotFittedError, match="not fitted yet"):
        RBFClassifier().predict(x.numpy())
    bad = x.numpy().copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        RBFClassifier(k=3).fit(bad, y.numpy())
    with pytest.raises(ConfigError, match="real-valued X, got complex"):
        RBFClassifier(k=3).fit(x.numpy() + 1j, y.numpy())
    with pytest.raises(ValueError, match="Unknown label type: continuous"):
        RBFClassifier(k=3).fit(x.numpy(), np.random.default_rng(0).random(40))


@pytest.mark.parametrize("num_train, expected", [(1, "only 0 other points are in the bank; the bank needs at least 2"),
                                                 (0, "only 0 other points are in the bank; the bank needs at least 2")])
def test_a_bank_too_small_for_any_neighbour_says_so(num_train, expected):
    """It advised 'use k <= 0' (and 'k <= -1'), values that are themselves refused."""
    with pytest.raises(ConfigError, match=expected):
        RBFSolver(8, 4, num_train=num_train, k=1)


def test_the_package_lists_its_lazy_interfaces():
    import knnsolver

    assert {"Solver", "EpochContext", "NeighbourSearch", "SOLVERS", "load"} <= set(dir(knnsolver))


def test_fresh_neighbours_without_row_indices_warn_once_in_training():
    x, y = _batch()
    solver = RBFSolver(D, C, 40, k=5, neighbour_mode="fresh", sigma=1.0)
    solver.refresh(x, y)
    with pytest.warns(TrainingWarning, match="own centre is among its neighbours"):
        solver(x[:8], y[:8])
    evaluating = RBFSolver(D, C, 40, k=5, neighbour_mode="fresh", sigma=1.0)
    evaluating.refresh(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solver(x[:8], y[:8])  # once
        evaluating.eval()(x[:8], y[:8])  # a validation loss: no warning
        fresh = RBFSolver(D, C, 40, k=5, neighbour_mode="fresh", sigma=1.0)
        fresh.refresh(x, y)
        fresh(x[:8], y[:8], torch.arange(8))  # with row indices: no warning


@pytest.mark.parametrize("name, options, message", [
    ("hal", {"tau": "0.1"}, "solver 'hal' option tau must be a number, got '0.1' (a str)"),
    ("rbf", {"k": "5"}, "solver 'rbf' option k must be an integer, got '5' (a str)"),
    ("rbf", {"k": 5.5}, "solver 'rbf' option k must be an integer, got 5.5"),
    ("crc", {"lam": None}, "solver 'crc' option lam must be a number, got None"),
    ("triplet", {"margin": [0.1]}, "solver 'triplet' option margin must be a number, got [0.1]"),
    ("hal", {"embedding_dim": "8"}, "embedding_dim must be an integer, got '8' (a str)"),
    ("hal", {"embedding_dim": 8.0}, "embedding_dim must be an integer, got 8.0"),
])
def test_options_of_the_wrong_type_are_refused_by_name(name, options, message):
    """They reached the constructor: a raw TypeError ('>' not supported between 'str' and 'int'), or k=5.5
    truncated to 5 without a word."""
    kwargs = {"embedding_dim": 8, "num_classes": 4, **options}
    with pytest.raises(ConfigError, match=re.escape(message)):
        SOLVERS.build(name, **kwargs)


def test_an_integer_for_a_float_option_is_taken():
    assert SOLVERS.build("hal", embedding_dim=8, num_classes=4, tau=1).tau == 1.0
