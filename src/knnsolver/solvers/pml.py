"""The field's baselines from pytorch-metric-learning, each a thin Solver around one of its losses.

:class:`PMLSolver` wraps any pml loss (and optional miner): ``forward`` returns
``loss(embeddings, labels, miner(embeddings, labels))`` and ``predict`` votes among
the ``knn_k`` nearest L2-normalised training embeddings (pml's distances normalise
embeddings too). Each subclass below only builds its loss from typed options, so
the CLI exposes them as flags (N-pairs also pairs the batch itself: pml's loss keeps one pair
a class, :class:`NPairsSolver`). Proxy losses own their proxies as parameters of the
wrapped loss, hence of the solver, so the trainer's optimiser trains them.
"""
from __future__ import annotations

import torch
from pytorch_metric_learning import distances, losses, miners, regularizers
from torch import Tensor, nn
from torch.nn import functional as F

from knnsolver.errors import ConfigError
from knnsolver.interfaces import Solver
from knnsolver.solvers.knn import KNNHead


def _require_positive(solver: str, **values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ConfigError(f"{solver} {name} must be > 0, got {value}")


class PMLSolver(Solver):
    """A pytorch-metric-learning loss (plus optional miner) as a Solver that predicts by kNN.

    Evaluated on L2-normalised embeddings (``embedding_space``): the space of the
    losses whose distance normalises (all but N-pairs), and for N-pairs, which
    trains on raw dot products, the field's evaluation convention (Musgrave et
    al. 2020 normalise every method's embeddings).

    A non-finite embedding makes the loss NaN even when a miner leaves its row
    out of every pair (``0 * sum(x)`` is added: zero for finite input, NaN
    otherwise), so the trainer's guard sees it.

    Unlike the library's own solvers, these steps read the device on the host:
    pml's losses and miners select their pairs and triplets with ``nonzero`` and
    boolean masks (a number of tuples known only from the data), so on a GPU each
    step waits for the device there (``tests/test_host_sync.py`` checks the others).

    Options:
        knn_k: neighbours that vote in kNN prediction.
    """

    predicts_by_knn = True
    embedding_space = "l2-normalised"
    score_kind = "votes"

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        num_train: int = 0,
        *,
        loss: nn.Module,
        miner: nn.Module | None = None,
        knn_k: int = 5,
        settings: dict[str, float] | None = None,
    ) -> None:
        super().__init__(embedding_dim, num_classes, num_train)
        self.loss = loss
        self.miner = miner
        self.knn = KNNHead(num_classes, embedding_dim, knn_k)
        self.settings = dict(settings or {})  # the loss's options, for extra_repr

    def forward(self, embeddings: Tensor, labels: Tensor, row_indices: Tensor | None = None) -> Tensor:
        labels = self.check_batch(embeddings, labels)
        return self._pml_loss(embeddings, labels) + 0.0 * embeddings.sum()

    def _pml_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        indices = None if self.miner is None else self.miner(embeddings, labels)
        return self.loss(embeddings, labels, indices)

    def extra_repr(self) -> str:
        settings = "".join(f", {name}={value:g}" for name, value in self.settings.items())
        return f"{super().extra_repr()}{settings}, knn_k={self.knn.k}"

    def fit_reference(self, embeddings: Tensor, labels: Tensor) -> None:
        labels = self.check_reference(embeddings, labels)
        self.knn.fit(self.transform(embeddings.detach()), labels)

    def predict(self, embeddings: Tensor) -> Tensor:
        self.check_queries(embeddings)
        return self.knn.scores(self.transform(embeddings))


class TripletSolver(PMLSolver):
    """``TripletMarginLoss(margin)`` on the semi-hard triplets of ``TripletMarginMiner(margin)``.

    Options:
        margin: how much nearer a positive must be than a negative (also the miner's margin).
    """

    needs_balanced_sampler = True

    def __init__(
        self, embedding_dim: int, num_classes: int, num_train: int = 0, *, margin: float = 0.1, knn_k: int = 5
    ) -> None:
        _require_positive("triplet", margin=margin)
        super().__init__(
            embedding_dim, num_classes, num_train, knn_k=knn_k, loss=losses.TripletMarginLoss(margin=margin),
            miner=miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard"), settings={"margin": margin},
        )


class LiftedStructureSolver(PMLSolver):
    """``LiftedStructureLoss(neg_margin, pos_margin=0)`` (Song et al. 2016) on normalised distances.

    Options:
        neg_margin: distance beyond which a negative pair costs nothing.
    """

    needs_balanced_sampler = True

    def __init__(
        self, embedding_dim: int, num_classes: int, num_train: int = 0, *, neg_margin: float = 1.0, knn_k: int = 5
    ) -> None:
        _require_positive("lifted", neg_margin=neg_margin)
        loss = losses.LiftedStructureLoss(neg_margin=neg_margin)
        super().__init__(embedding_dim, num_classes, num_train, knn_k=knn_k, loss=loss, settings={"neg_margin": neg_margin})


class NPairsSolver(PMLSolver):
    """N-pair loss (Sohn 2016) on raw dot products over every pair in the batch, plus ``embedding_reg * ||x||^2``.

    Sohn's N-pair-mc loss takes one (anchor, positive) pair from each of N classes: each anchor's softmax
    over its dot products with the N positives, its own the target. pytorch-metric-learning's ``NPairsLoss``
    keeps the first pair of each label in the batch, so with ``samples_per_class`` images of a class only two
    of them learn from the loss (2 of 8 with the suites' sampler: a baseline handicapped by its batch). Here a
    class's images are paired in batch order (its 1st and 2nd, 3rd and 4th, ...), the j-th pairs of the
    classes form the j-th N-pair group, and the loss is the mean over every pair of its cross-entropy within
    its group: pml's loss averaged over the groups, each weighted by its pairs (an odd image out is left
    unpaired, and a pair alone in its group, which has no negative, is left out of the mean). With two
    images per class it is pml's loss exactly; with the class-balanced sampler every group holds one pair
    of each of the batch's classes. The groups are scored side by side (a batched product of each group's
    anchors and positives), so a step costs about B C d, not the B^2 d of all pairs against all. A class padded with repeats (fewer images than ``samples_per_class``)
    may pair an image with itself. The penalty is the batch mean of
    ``||x||^2`` over all rows, as pml's ``LpRegularizer(power=2)``.

    Options:
        embedding_reg: weight of the squared-norm penalty that keeps raw embeddings small.
    """

    needs_balanced_sampler = True

    def __init__(
        self, embedding_dim: int, num_classes: int, num_train: int = 0, *, embedding_reg: float = 0.002, knn_k: int = 5
    ) -> None:
        if embedding_reg < 0:
            raise ConfigError(f"npairs embedding_reg must be >= 0, got {embedding_reg}")
        loss = losses.NPairsLoss(
            distance=distances.DotProductSimilarity(normalize_embeddings=False),
            embedding_regularizer=regularizers.LpRegularizer(power=2), embedding_reg_weight=embedding_reg,
        )
        super().__init__(embedding_dim, num_classes, num_train, knn_k=knn_k, loss=loss,
                         settings={"embedding_reg": embedding_reg})

    def _pml_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        anchors, positives, group = _pairs_in_class_order(labels.to(embeddings.device))
        penalty = self.loss.embedding_reg_weight * embeddings.norm(dim=1).pow(2).mean()
        if not len(anchors):
            return embeddings.sum() * 0.0 + penalty
        # the groups side by side, (groups, their most pairs, dim), so each anchor meets only its group's positives
        by_group = torch.argsort(group, stable=True)
        group, anchors, positives = group[by_group], anchors[by_group], positives[by_group]
        slot = _place_in_run(group)
        sizes = torch.bincount(group)  # pairs in each group
        shape = (len(sizes), int(sizes.max()), embeddings.shape[1])
        a = embeddings.new_zeros(shape).index_put((group, slot), embeddings[anchors])
        p = embeddings.new_zeros(shape).index_put((group, slot), embeddings[positives])
        filled = torch.arange(shape[1], device=sizes.device) < sizes.unsqueeze(1)
        logits = torch.bmm(a, p.transpose(1, 2)).masked_fill(~filled.unsqueeze(1), float("-inf"))[group, slot]
        terms = F.cross_entropy(logits, slot, reduction="none")
        scored = sizes[group] > 1  # a pair alone in its group has no negative: left out of the mean
        pairs = terms[scored].mean() if bool(scored.any()) else embeddings.sum() * 0.0
        return pairs + penalty


def _place_in_run(values: Tensor) -> Tensor:
    """Each entry's place within its run of equal neighbours in ``values`` (0, 1, 2, ... from each run's start)."""
    position = torch.arange(len(values), device=values.device)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[1:] = values[1:] != values[:-1]
    return position - torch.cummax(torch.where(starts, position, 0), dim=0).values


def _pairs_in_class_order(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each class's images paired in batch order (1st with 2nd, 3rd with 4th, ...): the anchors' rows, their
    positives' rows, and each pair's number within its class (its N-pair group)."""
    order = torch.argsort(labels, stable=True)  # rows by class, each class in batch order
    ranked = labels[order]
    occurrence = _place_in_run(ranked)
    anchor = occurrence % 2 == 0
    anchor[-1:] = False
    anchor[:-1] &= ranked[1:] == ranked[:-1]  # the next image is of the same class
    at = torch.arange(len(labels), device=labels.device)[anchor]
    return order[at], order[at + 1], occurrence[at] // 2


class NCASolver(PMLSolver):
    """Batch ``NCALoss(softmax_scale)``: softmax over ``-softmax_scale * ||x̂_i - x̂_j||^2`` within the batch.

    A batch in which no label appears twice has no positive pair: its loss is 0 (pml's is the NaN mean of
    no terms; told from the labels without a host read, so any other NaN stays one).

    Options:
        softmax_scale: multiplies the negative squared distances inside the softmax (larger: sharper).
    """

    needs_balanced_sampler = True

    def _pml_loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        loss = super()._pml_loss(embeddings, labels)
        positive_pair = (labels.unsqueeze(0) == labels.unsqueeze(1)).sum() > labels.numel()  # beyond the diagonal
        return torch.where(positive_pair, loss, torch.zeros_like(loss))

    def __init__(
        self, embedding_dim: int, num_classes: int, num_train: int = 0, *, softmax_scale: float = 10.0, knn_k: int = 5
    ) -> None:
        _require_positive("nca", softmax_scale=softmax_scale)
        loss = losses.NCALoss(softmax_scale=softmax_scale)
        super().__init__(embedding_dim, num_classes, num_train, knn_k=knn_k, loss=loss,
                         settings={"softmax_scale": softmax_scale})


class ProxyNCASolver(PMLSolver):
    """``ProxyNCALoss(softmax_scale)``: NCA against one learnable proxy per class.

    Options:
        softmax_scale: multiplies the negative squared distances to the proxies inside the softmax.
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, num_train: int = 0, *, softmax_scale: float = 10.0, knn_k: int = 5
    ) -> None:
        _require_positive("proxynca", softmax_scale=softmax_scale)
        loss = losses.ProxyNCALoss(num_classes, embedding_dim, softmax_scale=softmax_scale)
        super().__init__(embedding_dim, num_classes, num_train, knn_k=knn_k, loss=loss,
                         settings={"softmax_scale": softmax_scale})


class NormalizedSoftmaxSolver(PMLSolver):
    """``NormalizedSoftmaxLoss(temperature)``: cross-entropy over cosine logits ``cos / temperature``.

    Options:
        temperature: divides the cosine logits (smaller: sharper).
    """

    def __init__(
        self, embedding_dim: int, num_classes: int, num_train: int = 0, *, temperature: float = 0.05, knn_k: int = 5
    ) -> None:
        _require_positive("normsoftmax", temperature=temperature)
        loss = losses.NormalizedSoftmaxLoss(num_classes, embedding_dim, temperature=temperature)
        super().__init__(embedding_dim, num_classes, num_train, knn_k=knn_k, loss=loss,
                         settings={"temperature": temperature})


class MultiSimilaritySolver(PMLSolver):
    """``MultiSimilarityLoss(alpha, beta, base)`` on ``MultiSimilarityMiner(epsilon)``'s pairs (Wang et al. 2019).

    Options:
        alpha: weight of the positive pairs' similarity term.
        beta: weight of the negative pairs' similarity term.
        base: similarity offset the pairs are weighed around.
        epsilon: the miner's margin for keeping informative pairs.
    """

    needs_balanced_sampler = True

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        num_train: int = 0,
        *,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        epsilon: float = 0.1,
        knn_k: int = 5,
    ) -> None:
        _require_positive("multisimilarity", alpha=alpha, beta=beta, epsilon=epsilon)
        super().__init__(
            embedding_dim, num_classes, num_train, knn_k=knn_k,
            loss=losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base),
            miner=miners.MultiSimilarityMiner(epsilon=epsilon),
            settings={"alpha": alpha, "beta": beta, "base": base, "epsilon": epsilon},
        )


class ProxyAnchorSolver(PMLSolver):
    """``ProxyAnchorLoss(margin, alpha)`` (Kim et al. 2020): one learnable proxy per class as the anchor.

    Options:
        margin: similarity margin around the proxies.
        alpha: scale of the similarities (larger: harder pairs weigh more).
    """

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        num_train: int = 0,
        *,
        margin: float = 0.1,
        alpha: float = 32.0,
        knn_k: int = 5,
    ) -> None:
        _require_positive("proxyanchor", margin=margin, alpha=alpha)
        loss = losses.ProxyAnchorLoss(num_classes, embedding_dim, margin=margin, alpha=alpha)
        super().__init__(embedding_dim, num_classes, num_train, knn_k=knn_k, loss=loss,
                         settings={"margin": margin, "alpha": alpha})
