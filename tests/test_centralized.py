import math

import numpy as np
import pytest
import torch

from knnsolver.errors import ConfigError
from knnsolver.functional import centralized_ranking_loss, centre_sq_distances, gram_schmidt, normalize_scale
from knnsolver.registry import SOLVERS, options_of
from knnsolver.solvers.centralized import CentralizedSolver
from helpers import train_in_plain_loop


def _direct_loss(x: np.ndarray, y: np.ndarray, c: np.ndarray, m: float, form: str) -> float:
    total = 0.0
    for b in range(len(x)):
        d = [np.sum((x[b] - c[k]) ** 2) for k in range(len(c))]
        for k in range(len(c)):
            if k != y[b]:
                gap = m + d[y[b]] - d[k]
                total += max(0.0, gap) if form == "hinge" else math.log1p(math.exp(gap))
    return total / len(x)


def test_normalize_scale_matches_direct():
    x = torch.randn(5, 3, dtype=torch.float64)
    expected = np.stack([2.5 * r / np.linalg.norm(r) for r in x.numpy()])
    np.testing.assert_allclose(normalize_scale(x, 2.5).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("form", ["hinge", "softplus"])
def test_ranking_loss_matches_direct_float64_loops(form):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 0, 1])
    expected = _direct_loss(x.numpy(), y.numpy(), c.numpy(), 1.5, form)
    assert centralized_ranking_loss(x, y, c, 1.5, form).item() == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(
        centre_sq_distances(x, c).numpy(), ((x[:, None] - c[None]) ** 2).sum(-1).numpy(), rtol=1e-12, atol=1e-12
    )


def test_gram_schmidt_gives_orthonormal_rows_spanning_the_same_prefixes():
    v = torch.randn(6, 9, dtype=torch.float64)
    q = gram_schmidt(v)
    torch.testing.assert_close(q @ q.T, torch.eye(6, dtype=torch.float64))
    # q_i lies in span(v_1..v_i): V = R Q with R lower triangular, positive diagonal
    r = v @ q.T
    assert torch.allclose(torch.triu(r, 1), torch.zeros_like(r), atol=1e-12)
    assert (torch.diagonal(r) > 0).all()


def test_gram_schmidt_rejects_too_many_or_dependent_rows():
    with pytest.raises(ValueError, match="need n <= d"):
        gram_schmidt(torch.randn(4, 3))
    v = torch.randn(3, 5, dtype=torch.float64)
    v[2] = 2 * v[0] - v[1]
    with pytest.raises(ValueError, match="row 2 is linearly dependent"):
        gram_schmidt(v)


def test_more_classes_than_dimensions_needs_allow_correlated():
    with pytest.raises(ConfigError, match="10 class centres cannot be orthogonal in 4 dimensions.*allow_correlated=True"):
        CentralizedSolver(4, 10)
    solver = CentralizedSolver(4, 10, allow_correlated=True)
    first = solver.centres[:4].detach()
    torch.testing.assert_close(first @ first.T, torch.eye(4))
    rest = solver.centres[4:].detach().clone()
    solver.decorrelate()
    assert torch.equal(solver.centres[4:], rest)  # the other C - d centres are left as they are


def test_centres_are_decorrelated_every_n_training_steps():
    solver = CentralizedSolver(6, 3, decorrelate_every=2)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    with torch.no_grad():
        solver.centres.add_(0.5)
    solver(x, y)  # step 1: no decorrelation
    gram = solver.centres.detach() @ solver.centres.detach().T
    assert not torch.allclose(gram, torch.eye(3), atol=1e-3)
    solver(x, y)  # step 2
    torch.testing.assert_close(solver.centres.detach() @ solver.centres.detach().T, torch.eye(3))
    assert int(solver.steps) == 2
    solver.eval()
    solver(x, y)
    assert int(solver.steps) == 2  # evaluation passes are not training steps


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale": 0.0}, "scale must be > 0"),
        ({"margin": -1.0}, "margin must be > 0"),
        ({"form": "square"}, "choose one of: hinge, softplus"),
        ({"decorrelate_every": -1}, "decorrelate_every must be >= 0"),
        ({"predict_by": "anchor"}, "choose one of: centre, knn"),
        ({"knn_k": 0}, "knn_k must be >= 1"),
    ],
)
def test_invalid_settings(options, message):
    with pytest.raises(ConfigError, match=message):
        CentralizedSolver(8, 3, **options)


def test_registry_options_are_typed():
    opts = {o.name: o.type for o in options_of(SOLVERS.get("centralized"), skip=("num_train",))}
    assert opts == {"scale": float, "learn_scale": bool, "margin": float, "form": str, "decorrelate_every": int,
                    "allow_correlated": bool, "predict_by": str, "knn_k": int}


def test_learnable_scale_is_a_trained_parameter():
    assert not CentralizedSolver(8, 3).log_scale.requires_grad
    solver = CentralizedSolver(8, 3, scale=2.0, learn_scale=True)
    assert solver.log_scale.requires_grad and solver.scale.item() == pytest.approx(2.0)
    torch.testing.assert_close(solver.transform(torch.randn(4, 8)).norm(dim=1), torch.full((4,), 2.0))


@pytest.mark.parametrize(("predict_by", "form"), [("centre", "hinge"), ("knn", "hinge"), ("centre", "softplus")])
def test_user_loop_lowers_loss_and_predicts(predict_by, form):
    _, losses, accuracy = train_in_plain_loop(
        lambda: CentralizedSolver(8, 4, predict_by=predict_by, form=form, decorrelate_every=5))
    assert losses[-1] < 0.5 * losses[0]
    assert accuracy >= 0.8
