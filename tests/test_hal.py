import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses

from knnsolver.errors import ConfigError
from knnsolver.functional import hal_logits, hal_loss
from knnsolver.registry import SOLVERS, options_of
from knnsolver.solvers.hal import HALSolver
from helpers import train_in_plain_loop


def _direct_hal(x: np.ndarray, y: np.ndarray, a: np.ndarray, tau: float) -> tuple[np.ndarray, float]:
    """Float64 loops: distances between unit vectors, then -log of the NCA softmax."""
    logits = np.zeros((len(x), len(a)))
    for b in range(len(x)):
        xb = x[b] / np.linalg.norm(x[b])
        for c in range(len(a)):
            ac = a[c] / np.linalg.norm(a[c])
            logits[b, c] = -np.sum((xb - ac) ** 2) / tau
    losses = [-(logits[b, y[b]] - np.log(np.sum(np.exp(logits[b])))) for b in range(len(x))]
    return logits, float(np.mean(losses))


def test_hal_matches_direct_float64_computation():
    g = torch.Generator().manual_seed(0)
    x, a = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    logits, loss = _direct_hal(x.numpy(), y.numpy(), a.numpy(), 0.3)
    np.testing.assert_allclose(hal_logits(x, a, 0.3).numpy(), logits, rtol=1e-12, atol=1e-12)
    assert hal_loss(x, y, a, 0.3).item() == pytest.approx(loss, rel=1e-12)


def test_hal_loss_gradient_equals_autograd_through_the_plain_formula():
    """The one-node loss's closed-form gradient against autograd through normalize, the logits and
    cross_entropy (float64), for the embeddings and the anchors; a row below normalize's 1e-12 floor
    included (divided by the floor, not projected)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(3)
    x, a = torch.randn(9, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    x[4] *= 1e-14
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 0])
    got_in = [x.clone().requires_grad_(True), a.clone().requires_grad_(True)]
    want_in = [x.clone().requires_grad_(True), a.clone().requires_grad_(True)]
    got = hal_loss(got_in[0], y, got_in[1], 0.3)
    want = F.cross_entropy(hal_logits(want_in[0], want_in[1], 0.3), y)
    assert got.item() == pytest.approx(want.item(), rel=1e-12)
    (2.5 * got).backward()
    (2.5 * want).backward()
    for mine, theirs in zip(got_in, want_in):
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda e, an: hal_loss(e, y[:4], an, 0.3), (x[:4].clone().requires_grad_(True),
                                                                          a.clone().requires_grad_(True)))


def test_hal_logits_are_the_sphere_closed_form():
    g = torch.Generator().manual_seed(1)
    x, a = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64)
    cos = torch.nn.functional.cosine_similarity(x[:, None], a[None], dim=2)
    torch.testing.assert_close(hal_logits(x, a, 0.5), -(2 - 2 * cos) / 0.5)
    # scale invariance: only directions matter on the hypersphere
    torch.testing.assert_close(hal_logits(3 * x, 0.1 * a, 0.5), hal_logits(x, a, 0.5))


def test_hal_reading_equals_pml_proxy_nca_with_scale_one_over_tau():
    """Under METHODS.md's reading, HAL is ProxyNCA with normalised proxies and a full softmax."""
    g = torch.Generator().manual_seed(2)
    x, anchors = torch.randn(8, 6, generator=g), torch.randn(4, 6, generator=g)
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    proxy_nca = losses.ProxyNCALoss(4, 6, softmax_scale=1 / 0.25)
    with torch.no_grad():
        proxy_nca.proxies.copy_(anchors)
    assert hal_loss(x, y, anchors, 0.25).item() == pytest.approx(proxy_nca(x, y).item(), rel=1e-5)


def test_hal_equals_proxy_nca_and_normalized_softmax_in_float64():
    """METHODS.md's reading: HAL(tau) = ProxyNCA(softmax_scale = 1/tau) = NormSoftmax(temperature = tau/2), the
    anchors as proxies or as (normalised) weight columns; why the benchmarks do not run the two as rivals."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 5, generator=g, dtype=torch.float64)
    anchors = torch.randn(4, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0, 2])
    tau = 0.3
    proxy_nca = losses.ProxyNCALoss(4, 5, softmax_scale=1 / tau)
    norm_softmax = losses.NormalizedSoftmaxLoss(4, 5, temperature=tau / 2)
    with torch.no_grad():
        proxy_nca.proxies.data = anchors.clone()
        norm_softmax.W.data = anchors.T.clone()
    hal = hal_loss(x, y, anchors, tau).item()
    assert hal == pytest.approx(proxy_nca(x, y).item(), rel=1e-12)
    assert hal == pytest.approx(norm_softmax(x, y).item(), rel=1e-12)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"tau": 0.0}, "tau must be > 0"),
        ({"tau": -1.0}, "tau must be > 0"),
        ({"predict_by": "proxy"}, "choose one of: knn, anchor"),
        ({"knn_k": 0}, "knn_k must be >= 1"),
    ],
)
def test_invalid_settings(options, message):
    with pytest.raises(ConfigError, match=message):
        HALSolver(8, 3, **options)


def test_registry_options_are_typed():
    opts = {o.name: o.type for o in options_of(SOLVERS.get("hal"), skip=("num_train",))}
    assert opts == {"tau": float, "predict_by": str, "knn_k": int}


@pytest.mark.parametrize("predict_by", ["knn", "anchor"])
def test_user_loop_lowers_loss_and_predicts(predict_by):
    solver, losses, accuracy = train_in_plain_loop(lambda: HALSolver(8, 4, predict_by=predict_by))
    assert solver.predicts_by_knn == (predict_by == "knn")
    assert losses[-1] < 0.5 * losses[0]
    assert accuracy >= 0.8


def test_knn_prediction_needs_reference():
    with pytest.raises(RuntimeError, match="fit_reference"):
        HALSolver(4, 2).predict(torch.randn(3, 4))
