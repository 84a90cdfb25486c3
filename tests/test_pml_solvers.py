import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses, miners

from knnsolver.errors import ConfigError
from knnsolver.registry import SOLVERS, options_of
from knnsolver.solvers.pml import PMLSolver
from helpers import train_in_plain_loop

# name -> (key options with their types, uses the class-balanced sampler, owns proxies)
PML = {
    "triplet": ({"margin": float}, True, False),
    "lifted": ({"neg_margin": float}, True, False),
    "npairs": ({"embedding_reg": float}, True, False),
    "nca": ({"softmax_scale": float}, True, False),
    "proxynca": ({"softmax_scale": float}, False, True),
    "normsoftmax": ({"temperature": float}, False, True),
    "multisimilarity": ({"alpha": float, "beta": float, "base": float, "epsilon": float}, True, False),
    "proxyanchor": ({"margin": float, "alpha": float}, False, True),
}


@pytest.mark.parametrize("name", PML)
def test_solver_shape_options_and_flags(name):
    options, balanced, has_proxies = PML[name]
    cls = SOLVERS.get(name)
    assert issubclass(cls, PMLSolver) and cls.__mro__[1] is PMLSolver
    assert {o.name: o.type for o in options_of(cls, skip=("num_train",))} == {**options, "knn_k": int}
    solver = SOLVERS.build(name, embedding_dim=8, num_classes=5)
    assert solver.needs_balanced_sampler is balanced and solver.predicts_by_knn
    loss_params = list(solver.loss.parameters())
    assert bool(loss_params) is has_proxies
    assert {id(p) for p in loss_params} <= {id(p) for p in solver.parameters()}  # the optimiser sees the proxies


def test_triplet_uses_semihard_mining():
    solver = SOLVERS.build("triplet", embedding_dim=4, num_classes=2, margin=0.3)
    assert isinstance(solver.miner, miners.TripletMarginMiner) and solver.miner.type_of_triplets == "semihard"
    assert isinstance(solver.loss, losses.TripletMarginLoss) and solver.loss.margin == 0.3 == solver.miner.margin


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("triplet", {"margin": 0.0}, "triplet margin must be > 0"),
        ("lifted", {"neg_margin": -1.0}, "lifted neg_margin must be > 0"),
        ("npairs", {"embedding_reg": -0.1}, "npairs embedding_reg must be >= 0"),
        ("nca", {"softmax_scale": 0.0}, "nca softmax_scale must be > 0"),
        ("proxynca", {"softmax_scale": -2.0}, "proxynca softmax_scale must be > 0"),
        ("normsoftmax", {"temperature": 0.0}, "normsoftmax temperature must be > 0"),
        ("multisimilarity", {"beta": 0.0}, "multisimilarity beta must be > 0"),
        ("proxyanchor", {"alpha": -1.0}, "proxyanchor alpha must be > 0"),
        ("nca", {"knn_k": 0}, "knn_k must be >= 1"),
    ],
)
def test_invalid_settings(name, options, message):
    with pytest.raises(ConfigError, match=message):
        SOLVERS.build(name, embedding_dim=8, num_classes=3, **options)


@pytest.mark.parametrize("name", PML)
def test_user_loop_lowers_loss_and_predicts(name):
    _, losses, accuracy = train_in_plain_loop(lambda: SOLVERS.build(name, embedding_dim=8, num_classes=4))
    assert losses[-1] < 0.8 * losses[0]
    assert accuracy >= 0.75


def _sohn_npairs(x, labels, reg):
    """Sohn's N-pair-mc loss in float64 numpy, written from the paper: each class's images paired in batch order,
    the j-th pairs of the classes one group, cross-entropy of each anchor over its group's positives."""
    x, labels = x.detach().double().numpy(), labels.numpy()
    seen: dict[int, list[int]] = {}
    for row, label in enumerate(labels):
        seen.setdefault(int(label), []).append(row)
    groups: dict[int, list[tuple[int, int]]] = {}
    for rows in seen.values():
        for j in range(len(rows) // 2):
            groups.setdefault(j, []).append((rows[2 * j], rows[2 * j + 1]))
    terms = []
    for pairs in groups.values():
        if len(pairs) < 2:  # no negative: left out
            continue
        anchors, positives = x[[a for a, _ in pairs]], x[[p for _, p in pairs]]
        logits = anchors @ positives.T
        for i in range(len(pairs)):
            terms.append(np.log(np.exp(logits[i] - logits[i].max()).sum()) + logits[i].max() - logits[i, i])
    return float(np.mean(terms) + reg * (x ** 2).sum(axis=1).mean())


def test_npairs_learns_from_every_pair_of_the_batch():
    """pml's NPairsLoss keeps the first pair of each label, so with 8 images a class 6 of them had no gradient
    from the loss (the suites' sampler: N-pairs was handicapped by its batch)."""
    torch.manual_seed(0)
    solver = SOLVERS.build("npairs", embedding_dim=6, num_classes=4, embedding_reg=0.0)
    labels = torch.arange(4).repeat(8)[torch.randperm(32)]
    x = torch.randn(32, 6, dtype=torch.float64, requires_grad=True)
    loss = solver(x, labels)
    loss.backward()
    assert bool((x.grad.norm(dim=1) > 0).all()), "every image is in a pair and gets a gradient"
    assert loss.item() == pytest.approx(_sohn_npairs(x, labels, 0.0), rel=1e-12)


def test_npairs_leaves_a_pair_alone_in_its_group_out_of_the_mean():
    """Class 0 has four images, class 1 two: the second pair of class 0 has no negative (its term was a 0 that
    halved the loss's gradient)."""
    solver = SOLVERS.build("npairs", embedding_dim=3, num_classes=2, embedding_reg=0.0)
    x = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0, 0.8, 0.2], [1.0, 0.2, 0], [0.7, 0, 0.3]],
                     dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 0, 0])
    first_group = x[[0, 2]] @ x[[1, 3]].T
    expected = torch.logsumexp(first_group, dim=1) - first_group.diagonal()
    assert solver(x, labels).item() == pytest.approx(expected.mean().item(), rel=1e-12)
    assert solver(x, labels).item() == pytest.approx(_sohn_npairs(x, labels, 0.0), rel=1e-12)


@pytest.mark.parametrize("per_class", [2, 3, 5])
def test_npairs_is_pmls_loss_on_one_pair_a_class_and_sohns_on_more(per_class):
    torch.manual_seed(per_class)
    solver = SOLVERS.build("npairs", embedding_dim=5, num_classes=6, embedding_reg=0.01)
    labels = torch.arange(6).repeat(per_class)[torch.randperm(6 * per_class)]
    x = torch.randn(6 * per_class, 5, dtype=torch.float64)
    assert solver(x, labels).item() == pytest.approx(_sohn_npairs(x, labels, 0.01), rel=1e-12)
    if per_class == 2:  # one pair a class: pytorch-metric-learning's own loss, penalty included
        assert solver(x, labels).item() == pytest.approx(solver.loss(x, labels).item(), rel=1e-12)


def _vote(labels_nearest_first: list[int]) -> int:
    """The documented kNN rule, written independently: most votes, then the smaller sum of ranks, then the
    lower class id."""
    classes = set(labels_nearest_first)
    key = {c: (-labels_nearest_first.count(c), sum(r for r, lab in enumerate(labels_nearest_first) if lab == c), c)
           for c in classes}
    return min(classes, key=key.__getitem__)


@pytest.mark.parametrize("k", [1, 5, 7, 20, 200])
def test_knn_vote_follows_its_documented_tie_rule(k):
    from knnsolver.solvers.knn import knn_vote_scores

    generator = torch.Generator().manual_seed(k)
    neighbours = torch.randint(0, 4, (2000, k), generator=generator)
    chosen = knn_vote_scores(neighbours, 4).argmax(1).tolist()
    assert chosen == [_vote(row) for row in neighbours.tolist()]
    assert knn_vote_scores(torch.tensor([[3, 1, 1, 3, 0]]), 4).argmax(1).item() == 1  # rank sums 3 and 3: lower id
    assert knn_vote_scores(torch.tensor([[3, 0, 1, 0, 3]]), 4).argmax(1).item() == 0  # 4 and 4 (float32: 3)
