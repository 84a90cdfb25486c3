import numpy as np
import pytest
import torch

from knnsolver.errors import ConfigError
from knnsolver.functional import crc_code, crc_logits, crc_loss, crc_residuals
from knnsolver.interfaces import EpochContext
from knnsolver.registry import SOLVERS, options_of
from knnsolver.solvers.crc import CRCSolver
from helpers import train_in_plain_loop


def _ridge_lstsq(x: np.ndarray, atoms: np.ndarray, lam: float, keep: list[int]) -> np.ndarray:
    """Ridge as augmented least squares: min || [D_keep; sqrt(lam) I] a - [x; 0] ||^2 (atoms as rows)."""
    d = atoms[keep].T
    lhs = np.vstack([d, np.sqrt(lam) * np.eye(len(keep))])
    rhs = np.concatenate([x, np.zeros(len(keep))])
    code = np.zeros(len(atoms))
    code[keep] = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
    return code


def _direct_residuals(x: np.ndarray, atoms: np.ndarray, labels: np.ndarray, alpha: np.ndarray, c: int) -> np.ndarray:
    r = np.zeros((len(x), c))
    for b in range(len(x)):
        for k in range(c):
            recon = sum((alpha[b, j] * atoms[j] for j in range(len(atoms)) if labels[j] == k), np.zeros_like(x[b]))
            r[b, k] = np.sum((x[b] - recon) ** 2)
    return r


def _case(b=5, n=7, p=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, p, generator=g, dtype=torch.float64), torch.randn(n, p, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("method", ["direct", "push-through", "auto"])
@pytest.mark.parametrize("shape", [(5, 7, 3), (4, 3, 6)])  # dictionary larger / smaller than the metric dimension
def test_coding_matches_lstsq(method, shape):
    q, atoms = _case(*shape)
    lam, n = 0.3, shape[1]
    expected = np.stack([_ridge_lstsq(q[b].numpy(), atoms.numpy(), lam, list(range(n))) for b in range(len(q))])
    np.testing.assert_allclose(crc_code(q, atoms, lam, method=method).numpy(), expected, atol=1e-10)


@pytest.mark.parametrize("method", ["direct", "push-through"])
def test_excluded_atom_matches_lstsq_without_that_column(method):
    q, atoms = _case()
    exclude = torch.tensor([0, 3, 6, 2, 2])
    expected = np.stack([
        _ridge_lstsq(q[b].numpy(), atoms.numpy(), 0.3, [j for j in range(7) if j != exclude[b]]) for b in range(5)
    ])
    alpha = crc_code(q, atoms, 0.3, exclude=exclude, method=method)
    np.testing.assert_allclose(alpha.numpy(), expected, atol=1e-10)
    assert (alpha[torch.arange(5), exclude] == 0).all()


def test_leave_one_out_over_the_batch_and_push_through_equals_direct():
    x, _ = _case(b=6, n=1, p=4)
    loo = torch.arange(6)
    direct = crc_code(x, x, 0.05, exclude=loo, method="direct")
    push = crc_code(x, x, 0.05, exclude=loo, method="push-through")
    torch.testing.assert_close(direct, push)
    assert torch.diagonal(direct).abs().max() == 0


@pytest.mark.parametrize("per_class", [2, 40])  # Gram-block path and reconstruction path
def test_residuals_match_direct_loops(per_class):
    g = torch.Generator().manual_seed(2)
    labels = torch.tensor([0, 2, 2, 4] * per_class)  # classes 1 and 3 have no atom
    atoms = torch.randn(len(labels), 3, generator=g, dtype=torch.float64)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64)
    alpha = crc_code(q, atoms, 0.1)
    r = crc_residuals(q, atoms, labels, alpha, 5)
    expected = _direct_residuals(q.numpy(), atoms.numpy(), labels.numpy(), alpha.numpy(), 5)
    np.testing.assert_allclose(r.numpy(), expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(r[:, 1], (q * q).sum(1))  # absent class: residual = ||x'||^2


def test_logits_apply_the_metric_and_temperature():
    g = torch.Generator().manual_seed(3)
    x, atoms = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    labels, metric = torch.tensor([0, 1, 1, 2, 0, 2]), torch.randn(2, 3, generator=g, dtype=torch.float64)
    ql, al = x @ metric.T, atoms @ metric.T
    expected = -crc_residuals(ql, al, labels, crc_code(ql, al, 0.2), 3) / 0.5
    torch.testing.assert_close(crc_logits(x, atoms, labels, metric, 0.2, 0.5, 3), expected)


def test_gradients_flow_to_metric_and_embeddings():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    metric = (torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(3, 3, generator=g, dtype=torch.float64)).requires_grad_()
    labels = torch.tensor([0, 0, 1, 1, 2])
    loo = torch.arange(5)
    for method in ("direct", "push-through"):
        def loss(x, metric, method=method):
            return crc_loss(x, labels, x, labels, metric, 0.1, 0.5, 3, exclude=loo, method=method)
        assert torch.autograd.gradcheck(loss, (x, metric))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lam": 0.0}, "lam must be > 0"),
        ({"temperature": -1.0}, "temperature must be > 0"),
        ({"dictionary": "means"}, "choose one of: batch, bank"),
        ({"solve": "inverse"}, "choose one of: auto, direct, push-through"),
        ({"metric_dim": 0}, "metric_dim must be >= 1"),
        ({"bank_refresh_every": 0}, "bank_refresh_every must be >= 1"),
    ],
)
def test_invalid_settings(options, message):
    with pytest.raises(ConfigError, match=message):
        CRCSolver(8, 3, **options)


def test_functional_rejects_bad_values():
    q, atoms = _case()
    with pytest.raises(ConfigError, match="lam must be > 0"):
        crc_code(q, atoms, 0.0)
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        crc_logits(q, atoms, torch.zeros(7, dtype=torch.long), torch.eye(3, dtype=torch.float64), 0.1, 0.0, 2)


def test_registry_options_are_typed():
    opts = {o.name: o.type for o in options_of(SOLVERS.get("crc"), skip=("num_train",))}
    assert opts == {"dictionary": str, "metric_dim": int, "lam": float, "temperature": float, "normalize": bool,
                    "bank_refresh_every": int, "solve": str}


def test_metric_starts_at_identity_with_configurable_rows():
    assert torch.equal(CRCSolver(6, 3).metric, torch.eye(6))
    assert CRCSolver(6, 3, metric_dim=4).metric.shape == (4, 6)


@pytest.mark.parametrize("dictionary", ["batch", "bank"])
def test_user_loop_lowers_loss_and_predicts(dictionary):
    def refresh(step, solver, net, x, y):
        def embed_train():
            with torch.no_grad():
                return net(x), y

        solver.on_epoch_start(EpochContext(step, embed_train, len(y)))

    solver, losses, accuracy = train_in_plain_loop(
        lambda: CRCSolver(8, 4, 32, dictionary=dictionary, metric_dim=6), on_step=refresh)
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(solver.metric, torch.eye(6, 8))  # L is trained through the solve
    assert accuracy >= 0.75


def test_bank_and_prediction_need_the_training_embeddings():
    solver = CRCSolver(4, 2, dictionary="bank")
    with pytest.raises(RuntimeError, match="fit_reference"):
        solver(torch.randn(3, 4), torch.tensor([0, 1, 1]))
    with pytest.raises(RuntimeError, match="fit_reference"):
        solver.predict(torch.randn(3, 4))


def test_the_fixed_shape_class_layout_gives_the_same_residuals():
    """On accelerators the class table has shapes fixed in advance (every class, width N: no host read of
    the class counts); its residuals equal the tight table's, absent classes included."""
    from knnsolver.functional.crc import class_layout, crc_residuals

    g = torch.Generator().manual_seed(0)
    queries, atoms = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(9, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([3, 0, 3, 3, 1, 0, 3, 1, 3])  # class 2 and 4 absent
    alpha = torch.randn(6, 9, generator=g, dtype=torch.float64)
    tight = crc_residuals(queries, atoms, labels, alpha, 5, class_layout(labels))
    fixed_layout = class_layout(labels, 5)
    assert fixed_layout[1].shape == (5, 9) and tight.shape == (6, 5)
    torch.testing.assert_close(crc_residuals(queries, atoms, labels, alpha, 5, fixed_layout), tight)
    want = torch.stack([((queries - (alpha * (labels == c)) @ atoms) ** 2).sum(1) for c in range(5)], 1)
    torch.testing.assert_close(tight, want)


def test_a_bank_dictionary_keeps_its_class_table_between_refreshes(monkeypatch):
    """The bank's tight class table is made once per fit_reference, not at every training step."""
    import knnsolver.functional.crc as fcrc

    calls = []
    real = fcrc.class_layout
    monkeypatch.setattr(fcrc, "class_layout", lambda *a, **k: calls.append(a) or real(*a, **k))
    solver = SOLVERS.build("crc", embedding_dim=4, num_classes=3, num_train=12, dictionary="bank")
    labels = torch.arange(12) % 3
    solver.fit_reference(torch.randn(12, 4), labels)
    for _ in range(3):
        solver(torch.randn(4, 4), labels[:4], torch.arange(4)).backward()
    assert calls == []  # the solver's own table (made in fit_reference) served every step


def test_a_bank_dictionary_refreshed_every_few_epochs_resumes_as_the_straight_run(tmp_path):
    """The bank is the solver's state between refreshes: a run stopped between two refreshes must code over
    the saved bank, not re-embed the training set at the resumed epoch."""
    from knnsolver.training import TrainConfig, train

    from helpers import results, train_interrupted

    def cfg(name):
        return TrainConfig(dataset="digits", solver="crc", epochs=4, out=str(tmp_path / name), embedding_dim=16,
                           width=8, max_per_class=40, progress=False, plots=False,
                           solver_options={"dictionary": "bank", "bank_refresh_every": 2})

    straight = train(cfg("straight"))
    train_interrupted(cfg("resumed"), stop_after=1)  # epoch 2 comes between the refreshes of epochs 0 and 2
    assert results(train(cfg("resumed"), resume=True)) == results(straight)


def test_a_crc_bank_saved_before_it_was_kept_loads_empty():
    """Checkpoints made while the bank was not saved lack its buffers: they load, with an empty bank to refill."""
    solver = SOLVERS.build("crc", embedding_dim=4, num_classes=3, num_train=12, dictionary="bank")
    solver.fit_reference(torch.randn(12, 4), torch.arange(12) % 3)
    state = {k: v for k, v in solver.state_dict().items() if not k.startswith("dictionary_set.")}
    assert "dictionary_set.embeddings" in solver.state_dict()
    fresh = SOLVERS.build("crc", embedding_dim=4, num_classes=3, num_train=12, dictionary="bank")
    fresh.load_state_dict(state)
    assert len(fresh.dictionary_set) == 0 and torch.equal(fresh.metric, solver.metric)
    with pytest.raises(RuntimeError, match="needs the training embeddings"):
        fresh.predict(torch.randn(2, 4))
