"""RBFSolver and RBFClassifier: schedule, neighbours, gradients, prediction, new classes, state, errors."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from knnsolver.classifiers import RBFClassifier
from knnsolver.errors import ConfigError
from knnsolver.functional.rbf import rbf_auto_sigma, rbf_log_probs, rbf_loss
from knnsolver.interfaces import EpochContext
from knnsolver.registry import SOLVERS, options_of
from knnsolver.solvers.rbf import RBFSolver

N, D, C = 80, 6, 4


def clustered(n=N, d=D, c=C, seed=0, spread=0.3):
    """Well separated Gaussian clusters, one per class, so predictions are checkable."""
    g = torch.Generator().manual_seed(seed)
    means = 4.0 * torch.randn(c, d, generator=g)
    labels = torch.arange(n) % c
    return means[labels] + spread * torch.randn(n, d, generator=g), labels, means


class Trainer:
    """Stands in for the trainer: counts embed_train calls and hands out a fixed table."""

    def __init__(self, emb, labels):
        self.emb, self.labels, self.calls = emb, labels, 0

    def ctx(self, epoch):
        def embed_train():
            self.calls += 1
            return self.emb, self.labels

        return EpochContext(epoch, embed_train, len(self.labels))


def filled(emb=None, labels=None, **options):
    if emb is None:
        emb, labels, _ = clustered()
    solver = RBFSolver(D, C, len(labels), normalize=False, **{"k": 10, **options})
    solver.on_epoch_start(Trainer(emb, labels).ctx(0))
    return solver, emb, labels


def brute_knn(queries, points, k, exclude=None):
    d = torch.cdist(queries.double(), points.double())
    if exclude is not None:
        d[torch.arange(len(queries)), exclude] = float("inf")
    return d.argsort(1)[:, :k]


def test_registered_with_typed_options():
    solver = SOLVERS.build("rbf", embedding_dim=D, num_classes=C, num_train=N, k=5)
    assert isinstance(solver, RBFSolver) and solver.predicts_by_knn
    types = {o.name: o.type for o in options_of(RBFSolver)}
    assert types == {
        "k": int, "sigma": float, "learn_sigma": bool, "update_interval": int, "learn_weights": bool,
        "normalize": bool, "radius": float, "neighbour_mode": str, "online_update": bool, "bank_dtype": str, "search": str, "predict_k": int,
    }


def test_refresh_schedule_and_fill_before_first_epoch():
    emb, labels, _ = clustered()
    trainer = Trainer(emb, labels)
    solver = RBFSolver(D, C, N, normalize=False, k=5, update_interval=3)
    for epoch in range(7):
        solver.on_epoch_start(trainer.ctx(epoch))
    assert trainer.calls == 3  # epochs 0, 3, 6
    resumed = RBFSolver(D, C, N, normalize=False, k=5, update_interval=3)
    resumed.on_epoch_start(trainer.ctx(4))  # an empty bank is filled whatever the epoch
    assert trainer.calls == 4 and resumed.bank.filled
    resumed.on_epoch_start(trainer.ctx(5))
    assert trainer.calls == 4


def test_stored_mode_loss_equals_functional_with_self_excluded_lists():
    solver, emb, labels = filled(k=8, sigma=1.5)
    nb = solver.bank.neighbours
    assert torch.equal(nb.long(), brute_knn(emb, emb, 8, exclude=torch.arange(N)))
    rows = torch.tensor([3, 17, 40, 79])
    x = emb[rows] + 0.1
    want = rbf_loss(x, emb, labels, nb[rows], torch.zeros(N), 1.5, labels[rows])
    assert solver(x, labels[rows], rows).item() == pytest.approx(want.item(), rel=1e-6)


def test_fresh_mode_searches_current_embeddings_without_own_row():
    solver, emb, labels = filled(k=6, sigma=2.0, neighbour_mode="fresh")
    rows = torch.tensor([0, 1, 2, 50])
    x = emb[rows].clone()
    x[3] = emb[7] + 1e-3  # row 50's embedding moved next to centre 7: its own row is not among the nearest
    nb = brute_knn(x, emb, 6, exclude=rows)
    want = rbf_loss(x, emb, labels, nb, torch.zeros(N), 2.0, labels[rows], exclude=rows)
    assert solver(x, labels[rows], rows).item() == pytest.approx(want.item(), rel=1e-6)
    assert solver.bank.neighbours.numel() == 0  # no stored lists are kept in fresh mode


def test_gradients_reach_embeddings_and_weights_not_the_bank():
    emb, labels, _ = clustered(spread=5.0)  # overlapping classes: the loss is far from 0
    solver, *_ = filled(emb, labels, sigma=1.0)
    x = (emb[:8] + 0.2).requires_grad_(True)
    solver(x, labels[:8], torch.arange(8)).backward()
    assert x.grad.abs().sum() > 0 and solver.log_weights.grad.abs().sum() > 0
    assert not solver.bank.centres.requires_grad and solver.log_sigma.grad is None
    frozen, *_ = filled(emb, labels, sigma=1.0, learn_weights=False)
    assert not frozen.log_weights.requires_grad
    assert [p for p in frozen.parameters() if p.requires_grad] == []


def test_learnable_sigma_gets_a_gradient_matching_the_functional():
    solver, emb, labels = filled(sigma=1.5, learn_sigma=True)
    rows = torch.arange(10)
    solver(emb[rows] + 0.3, labels[rows], rows).backward()
    s = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    x, zeros = (emb[rows] + 0.3).double(), torch.zeros(N, dtype=torch.float64)
    rbf_loss(x, emb.double(), labels, solver.bank.neighbours[rows], zeros, s, labels[rows]).backward()
    assert solver.log_sigma.grad.item() == pytest.approx(s.grad.item() * 1.5, rel=1e-4)  # d/dlog s = s d/ds


def test_auto_sigma_follows_the_bank_at_every_refresh():
    """Issue 10, finding 2: an automatic sigma set once lost its meaning as the embedding grew."""
    emb, labels, _ = clustered()
    solver = RBFSolver(D, C, N, normalize=False, k=10, learn_sigma=False)
    with pytest.raises(RuntimeError, match="sigma is not set yet"):
        solver.sigma
    solver.on_epoch_start(Trainer(emb, labels).ctx(0))
    assert solver.sigma.item() == pytest.approx(rbf_auto_sigma(emb), rel=1e-6)
    solver.on_epoch_start(Trainer(emb * 3, labels).ctx(5))  # not a refresh epoch (interval 10): kept
    assert solver.sigma.item() == pytest.approx(rbf_auto_sigma(emb), rel=1e-6)
    solver.on_epoch_start(Trainer(emb * 30, labels).ctx(10))  # the embedding grew 30x: sigma follows
    assert solver.sigma.item() == pytest.approx(30 * rbf_auto_sigma(emb), rel=1e-4)
    solver.fit_reference(emb * 2, labels)  # prediction uses the same rule on the reference set
    assert solver.sigma.item() == pytest.approx(rbf_auto_sigma(emb * 2), rel=1e-6)
    first = RBFSolver(D, C, N, normalize=False, k=10, learn_sigma=False)
    first.fit_reference(emb * 2, labels)  # prediction before training: the same rule
    assert first.sigma.item() == pytest.approx(rbf_auto_sigma(emb * 2), rel=1e-6)
    learned = RBFSolver(D, C, N, normalize=False, k=10, learn_sigma=True)  # automatic at the first fill, then learned
    assert learned.log_sigma.requires_grad and not learned.auto_sigma
    learned.refresh(emb, labels)
    learned.refresh(emb * 3, labels)
    assert learned.sigma.item() == pytest.approx(rbf_auto_sigma(emb), rel=1e-6)
    assert not RBFSolver(D, C, N, k=10, sigma=0.5).log_sigma.requires_grad  # a given sigma stays fixed
    assert RBFSolver(D, C, N, k=10).auto_sigma  # the default: re-estimated at every refresh
    fixed, *_ = filled(emb, labels, sigma=0.7)
    assert fixed.sigma.item() == pytest.approx(0.7)


def test_online_update_writes_batch_rows():
    solver, emb, labels = filled(sigma=1.0, online_update=True)
    rows = torch.tensor([4, 9])
    new = torch.full((2, D), 7.0, requires_grad=True)
    solver(new, labels[rows], rows)
    assert torch.equal(solver.bank.centres[rows], new.detach()) and torch.equal(solver.bank.centres[0], emb[0])
    assert torch.equal(emb, clustered()[0])  # the caller's table is a copy, not the bank's storage
    off, *_ = filled(sigma=1.0)
    off(new, labels[rows], rows)
    assert torch.equal(off.bank.centres, emb)
    evaluating, *_ = filled(sigma=1.0, online_update=True)
    evaluating.eval()(new, labels[rows], rows)  # a validation loss leaves the bank alone
    assert torch.equal(evaluating.bank.centres, emb)


def test_epoch_end_diagnostics_match_direct_computation():
    solver, emb, labels = filled(k=5, sigma=2.0)
    batches = [torch.arange(0, 10), torch.arange(10, 16)]
    dists, rbfs, absent = [], [], []
    for rows in batches:
        x = emb[rows] + 0.5
        solver(x, labels[rows], rows)
        nb = solver.bank.neighbours[rows].long()
        d = (x[:, None] - emb[nb]).norm(dim=2)
        dists += d.mean(1).tolist()
        rbfs += torch.exp(-d**2 / 8.0).mean(1).tolist()
        absent += (labels[nb] != labels[rows][:, None]).all(1).tolist()
    stats = solver.on_epoch_end(Trainer(emb, labels).ctx(0))
    assert stats["mean_neighbour_distance"] == pytest.approx(np.mean(dists), rel=1e-5)
    assert stats["mean_rbf_value"] == pytest.approx(np.mean(rbfs), rel=1e-5)
    assert stats["frac_true_class_absent"] == pytest.approx(np.mean(absent))
    assert stats["sigma"] == pytest.approx(2.0)


def test_fraction_absent_counts_hard_rows():
    emb, labels, _ = clustered()
    solver, *_ = filled(emb, labels, k=3, sigma=1.0)
    rows = torch.arange(C)  # one row per cluster, relabelled to another class: no neighbour shares it
    wrong = (labels[rows] + 1) % C
    solver.bank.labels[rows] = wrong
    loss = solver(emb[rows], wrong, rows)
    assert torch.isfinite(loss)
    assert solver.on_epoch_end(Trainer(emb, labels).ctx(0))["frac_true_class_absent"] == 1.0


def test_predict_matches_functional_and_uses_fit_reference():
    solver, emb, labels = filled(k=7, sigma=1.0, predict_k=9)
    with torch.no_grad():
        solver.log_weights.copy_(0.1 * torch.randn(N))
    queries = emb[:20] + 0.2 * torch.randn(20, D)
    got = solver.predict(queries)
    want = rbf_log_probs(queries, emb, labels, brute_knn(queries, emb, 9), solver.log_weights, 1.0, C)
    assert torch.allclose(got, want, atol=1e-5)
    assert (got.argmax(1) == labels[:20]).float().mean() > 0.9
    shifted = emb + 100.0
    solver.fit_reference(shifted, labels)
    assert torch.equal(solver.bank.training_centres, shifted)
    assert torch.allclose(solver.predict(queries + 100.0), got, atol=1e-4)


def test_add_centres_with_an_unseen_class_is_predicted():
    solver, emb, labels = filled(k=5, sigma=1.0)
    weights = solver.log_weights.detach().clone()
    new_centre = 50.0 * torch.ones(D)
    g = torch.Generator().manual_seed(1)
    solver.add_centres(new_centre + 0.3 * torch.randn(6, D, generator=g), torch.full((6,), C))
    assert solver.num_classes == C + 1 and torch.equal(solver.log_weights, weights)
    queries = torch.cat([new_centre + 0.3 * torch.randn(5, D, generator=g), emb[:5] + 0.05])
    pred = solver.predict(queries)
    assert pred.shape == (10, C + 1)
    assert pred.argmax(1).tolist() == [C] * 5 + labels[:5].tolist()
    solver.fit_reference(emb, labels)  # the trainer refreshing the training rows keeps the added class
    assert solver.predict(queries).argmax(1).tolist() == [C] * 5 + labels[:5].tolist()


def test_adding_a_class_too_small_for_the_prediction_neighbourhood_warns():
    """Helper review: 10 added images of a new class among predict_k=200 neighbours were almost never predicted, and
    nothing said why. predict_k=40 over 5 classes: a class needs 8 centres."""
    from knnsolver.errors import TrainingWarning

    solver, emb, labels = filled(k=40)
    with pytest.warns(TrainingWarning, match=r"class\(es\) 4 \(3 centres\) hold fewer centres than predict_k / classes "
                                             r"= 40/5.*solver.predict_k"):
        solver.add_centres(torch.full((3, D), 30.0), torch.full((3,), C))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        solver.add_centres(torch.full((5, D), 30.0), torch.full((5,), C))  # 8 now
        solver.add_centres(emb[:2], labels[:2])  # training classes hold 20 each


def test_state_dict_round_trip_reproduces_predictions():
    solver, emb, labels = filled(k=6, bank_dtype="float16", learn_sigma=True)
    rows = torch.arange(12)
    solver(emb[rows], labels[rows], rows).backward()
    with torch.no_grad():
        solver.log_sigma.sub_(0.1 * solver.log_sigma.grad)  # a learned sigma moves off the automatic start
    solver.add_centres(torch.full((3, D), 30.0), torch.full((3,), C + 1))
    with torch.no_grad():
        solver.log_weights.uniform_(-0.5, 0.5)
    queries = torch.cat([emb[:10] + 0.1, torch.full((2, D), 30.0)])
    state = copy.deepcopy(solver.state_dict())
    fresh = RBFSolver(D, C, N, normalize=False, k=6, bank_dtype="float16", learn_sigma=True)
    fresh.load_state_dict(state)
    assert fresh.bank.centres.dtype == torch.float16 and fresh.bank.neighbours.dtype == torch.int32
    assert torch.equal(fresh.predict(queries), solver.predict(queries))
    assert fresh.predict(queries).argmax(1)[-2:].tolist() == [C + 1] * 2


def test_errors_by_type_and_message():
    emb, labels, _ = clustered()
    with pytest.raises(ConfigError, match="k=80 neighbours requested but only 79 other points.*use k <= 79"):
        RBFSolver(D, C, N, normalize=False, k=80)
    with pytest.raises(ConfigError, match="predict_k=81 exceeds the 80 centres"):
        RBFSolver(D, C, N, normalize=False, k=5, predict_k=81)
    with pytest.raises(ConfigError, match="unknown neighbour_mode 'live'; choose one of: stored, fresh"):
        RBFSolver(D, C, N, normalize=False, k=5, neighbour_mode="live")
    with pytest.raises(ConfigError, match="unknown bank_dtype 'int8'"):
        RBFSolver(D, C, N, normalize=False, k=5, bank_dtype="int8")
    with pytest.raises(ConfigError, match="sigma must be a finite number >= 0"):
        RBFSolver(D, C, N, normalize=False, k=5, sigma=-1.0)
    with pytest.raises(ConfigError, match="update_interval must be >= 1"):
        RBFSolver(D, C, N, normalize=False, k=5, update_interval=0)
    with pytest.raises(ConfigError, match="unknown neighbour search 'kdtree'"):
        RBFSolver(D, C, N, normalize=False, k=5, search="kdtree")
    with pytest.raises(ConfigError, match="solver 'rbf' has no option sigma_mode"):
        SOLVERS.build("rbf", embedding_dim=D, num_classes=C, num_train=N, sigma_mode="auto")
    solver = RBFSolver(D, C, N, normalize=False, k=5, sigma=1.0)
    with pytest.raises(RuntimeError, match="bank is empty"):
        solver(emb[:2], labels[:2], torch.arange(2))
    with pytest.raises(RuntimeError, match="bank is empty"):
        solver.predict(emb[:2])
    with pytest.raises(ConfigError, match="built for num_train=80 rows but the training set has 79"):
        solver.on_epoch_start(Trainer(emb[:79], labels[:79]).ctx(0))
    solver.on_epoch_start(Trainer(emb, labels).ctx(0))
    with pytest.raises(ConfigError, match=r"row indices must lie in \[0, 80\).*got 78..80"):
        solver(emb[:3], labels[:3], torch.tensor([78, 79, 80]))
    with pytest.raises(ConfigError, match="row indices do not match the bank"):
        solver(emb[:3], labels[:3], torch.tensor([1, 2, 3]))  # labels are rows 0..2's
    with pytest.raises(ConfigError, match="neighbour_mode='stored' needs each sample's training-set row as row_indices"):
        solver(emb[:3], labels[:3])
    with pytest.raises(ConfigError, match="num_train=80 rows but got 10 embeddings"):
        solver.fit_reference(emb[:10], labels[:10])
    with pytest.raises(ConfigError, match="add_centres takes class labels >= 0, got labels from -1"):
        solver.add_centres(emb[:1], torch.tensor([-1]))


def test_rbf_classifier_sklearn_style_numpy_and_torch():
    emb, labels, means = clustered(n=120, seed=3)
    names = np.array(["ant", "bee", "cat", "dog"])[labels.numpy()]
    clf = RBFClassifier(k=8).fit(emb.numpy(), names)
    assert list(clf.classes_) == ["ant", "bee", "cat", "dog"]
    queries = means + 0.2
    assert list(clf.predict(queries)) == ["ant", "bee", "cat", "dog"]  # torch input too
    proba = clf.predict_proba(queries.numpy())
    assert proba.shape == (4, 4) and np.allclose(proba.sum(1), 1.0)
    want = rbf_log_probs(queries, emb, labels, brute_knn(queries, emb, 8), torch.zeros(120), clf.sigma_, 4).exp()
    np.testing.assert_allclose(proba, want.numpy(), atol=1e-6)
    assert clf.sigma_ == pytest.approx(rbf_auto_sigma(emb), rel=1e-6)
    assert clf.score(emb.numpy(), names) == 1.0
    assert clone(clf).get_params() == {"k": 8, "sigma": 0.0, "search": "exact"}
    assert RBFClassifier(k=3, sigma=2.5).fit(emb, labels).sigma_ == 2.5


def test_rbf_classifier_errors():
    emb, labels, _ = clustered(n=20)
    with pytest.raises(ConfigError, match="k=21 neighbours requested but only 20 points"):
        RBFClassifier(k=21).fit(emb, labels)
    with pytest.raises(ConfigError, match=r"fit expects X of shape \(n, d\) and y of shape \(n,\)"):
        RBFClassifier(k=2).fit(emb, labels[:5])
    with pytest.raises(NotFittedError, match="not fitted yet"):
        RBFClassifier().predict(emb)
    with pytest.raises(ConfigError, match=r"X must have shape \(n, 6\)"):
        RBFClassifier(k=2).fit(emb, labels).predict(emb[:, :3])


def _train_config(out, **overrides):
    from knnsolver.training import TrainConfig

    settings = dict(
        dataset="digits", solver="rbf", epochs=4, out=str(out), seed=0, embedding_dim=32, width=8, max_per_class=40,
        solver_options={"k": 50, "update_interval": 3}, plots=False, progress=False,
    )
    return TrainConfig(**{**settings, **overrides})


def test_resume_with_a_bank_replays_the_straight_run(tmp_path):
    from knnsolver.training import train
    from knnsolver.training.checkpoint import load_checkpoint

    from helpers import train_interrupted

    straight = train(_train_config(tmp_path / "straight"))
    train_interrupted(_train_config(tmp_path / "resumed"), stop_after=2)
    resumed = train(_train_config(tmp_path / "resumed"), resume=True)  # refreshes at epoch 3, not at 2
    assert resumed["test_accuracy"] == straight["test_accuracy"]
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["solver"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["solver"]
    assert a["bank.embeddings"].shape == (len(a["bank.labels"]), 32) and a["bank.neighbours"].dtype == torch.int32
    for key in ("bank.embeddings", "bank.labels", "bank.neighbours", "log_weights", "log_sigma"):
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_rbf_reaches_softmax_accuracy_on_digits(tmp_path):
    """The paper's classification claim on the issue's settings (3 epochs, k=50, d=32, seed 0), one seed."""
    from knnsolver.training import train

    common = dict(epochs=3, width=32, max_per_class=None)
    softmax = train(_train_config(tmp_path / "softmax", solver="softmax", solver_options={}, **common))
    rbf = train(_train_config(tmp_path / "rbf", solver_options={"k": 50, "update_interval": 1}, **common))
    assert rbf["test_accuracy"] >= softmax["test_accuracy"]


def test_a_stale_bank_is_reported():
    from knnsolver.errors import TrainingWarning

    emb, labels, _ = clustered()
    solver = RBFSolver(D, C, N, k=10, normalize=False)
    trainer = Trainer(emb, labels)
    solver.on_epoch_start(trainer.ctx(0))
    solver(emb[:20] + 10 * solver.sigma.item(), labels[:20], torch.arange(20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first epoch's bank is the untrained network's: far by construction
        solver.on_epoch_end(trainer.ctx(0))
    solver.on_epoch_start(trainer.ctx(1))  # no refresh (interval 10): the network "moved" far from the bank
    solver(emb[:20] + 10 * solver.sigma.item(), labels[:20], torch.arange(20))
    with pytest.warns(TrainingWarning, match=r"RBF centres are stale: .* 24\.\d sigma"):
        stats = solver.on_epoch_end(trainer.ctx(1))
    assert stats["median_own_centre_distance"] == pytest.approx(10 * solver.sigma.item() * D**0.5, rel=1e-4)


def test_diagnostic_sums_follow_the_solver_to_its_device():
    """The per-epoch sums are a buffer: a solver moved to a device after construction (and refreshed
    there without an epoch start) accumulates on that device, not on the CPU it was built on."""
    solver = RBFSolver(4, 2, 10, k=3).to(torch.float64)
    assert solver._stats.dtype == torch.float64 and "_stats" not in solver.state_dict()
    assert solver.to("meta")._stats.device.type == "meta"
