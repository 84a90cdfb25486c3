"""The nearest-neighbour RBF solver (Meyer, Harwood & Drummond, ICIP 2018; METHODS.md section 1).

Every training row's embedding is an RBF centre with a weight ``w_i = exp(theta_i)``
(initialised to 1); a sample is classified by Eq. 4 over its ``k`` nearest
centres and trained with ``-log P(y|x)``. The maths lives in
:mod:`knnsolver.functional.rbf`, including the hard-case rule (a sample with no
true-class centre among its neighbours gets the nearest true-class centre added).
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from knnsolver import distributed
from knnsolver.bank import BANK_DTYPES, EmbeddingBank
from knnsolver.errors import ConfigError, TrainingWarning
from knnsolver.functional.rbf import rbf_auto_sigma, rbf_log_probs, rbf_step
from knnsolver.hostsync import avoid_host_sync
from knnsolver.interfaces import EpochContext, NeighbourSearch, Solver, check_k, check_row_indices, check_rows_in_bank
from knnsolver.registry import SEARCHES
from knnsolver.search.common import drop_own_rows

NEIGHBOUR_MODES = ("stored", "fresh")
SIGMA_AUTO = "auto"
# Cap on the (batch x k x d) neighbour block gathered at once in predict().
_PREDICT_BLOCK = 2**24
# Median distance of a training query to its own stored centre, in sigmas, above which the bank counts as stale.
_STALE_SIGMAS = 3.0
# Most own-centre distances kept per epoch for the median diagnostic (the first batches' rows).
_OWN_SAMPLE = 2**16


class RBFSolver(Solver):
    """Nearest-neighbour RBF loss and classifier over a bank of stored training embeddings.

    Options:
        k: neighbours of each training sample that score it (the paper uses 100 to 200).
        sigma: RBF width, or ``auto``: the bank's median nearest-centre spacing, re-estimated at every refresh.
            ``auto`` (also written ``0``) is
            re-estimated at every bank refresh (and :meth:`fit_reference`) as the
            median distance from a centre to its nearest other centre
            (:func:`~knnsolver.functional.rbf.rbf_auto_sigma`: the bank's typical
            spacing), so it follows the embedding's scale as training rescales it
            (the paper fine-tunes at lr 1e-5, where the scale barely moves; from
            scratch the unnormalised embedding grows 16-40x and a sigma set once
            turns the solver into a hard nearest-neighbour rule). With
            ``learn_sigma`` an automatic sigma is set at the first fill only and then learned.
        learn_sigma: learn sigma with the network instead of fixing or re-estimating it.
            Measured on validation (benchmarks/README.md,
            "training health"): a learned sigma is 1.5 points better at 500 images
            per class (3 of 3 seeds) but 0.4-3.8 points worse at 10 per class, so
            the default stays re-estimation and the benchmark suites should tune it.
        update_interval: refresh the bank (centres, neighbour lists, automatic sigma) every this many epochs (training from random weights, unless set: 1).
            The default, 10, is the paper's, which fine-tunes a pretrained network at lr 1e-5;
            the trainer refreshes every epoch instead when the network starts from random
            weights (no ``--pretrained``), unless you set it: from scratch the centres go
            stale within an epoch (training queries 9-12 sigma from their own centre after one
            epoch), and on Fashion-MNIST refreshing every 10 epochs lost test accuracy against
            every epoch (BENCHMARKS.md, the ablation's table). The refresh runs before every epoch with ``epoch % update_interval == 0``; the
            bank is always filled before the first epoch. Where the run is no longer than
            the interval (``update_interval >= epochs``, so the bank would only ever hold
            the untrained network's embeddings), the interval becomes ``max(1, epochs // 2)``:
            a 2- or 3-epoch run refreshes before every epoch, a 10-epoch run before epochs 1
            and 6 (1-based); the trainer prints one line saying so (:meth:`schedule_note`).
            The rule follows the configured epoch count, so raising ``epochs`` on
            ``--resume`` past the interval changes the schedule from then on (the epochs
            already run kept theirs).
        learn_weights: learn a weight per centre (true: the paper's classification setting).
            The paper learns the log-weights ``theta_i`` for classification and fixes
            ``w_i = 1`` for metric learning, so the trainer sets ``False`` on the
            disjoint split unless you set it.
        normalize: put queries and centres on a sphere of radius ``radius`` (false: the paper's free scale).
            Fixing the scale keeps the meaning of a hand-set sigma
            (in units of the radius); retrieval then ranks in
            that space (``embedding_space = "l2-normalised"``). On by default,
            a departure from the paper (which fine-tunes at lr 1e-5, where the
            scale barely moves) chosen on validation: from scratch on
            Fashion-MNIST it gained 3.4 points over raw embeddings
            (benchmarks/README.md, "training health").
        radius: radius of the sphere the embeddings are put on with ``normalize``.
        neighbour_mode: where a sample's neighbours come from: ``stored`` lists or a ``fresh`` search.
            ``stored`` uses the neighbour list of the sample's own
            centre, computed at the last refresh (the paper; needs row indices);
            ``fresh`` searches the bank with the current embedding every batch,
            excluding the sample's own row; called without row indices it cannot
            tell which centre is the sample's own, so that centre counts among its
            neighbours (a lower loss than Eq. 3's), and a training-mode call warns once.
        online_update: write each training batch's embeddings into the bank at once.
            After each training-mode batch its detached embeddings go into the bank
            at its rows (neighbour lists still wait for the next refresh); an
            eval-mode call (a validation loss) writes nothing.
        bank_dtype: storage precision of the bank's centres.
        search: neighbour-search backend of the bank (``knnsolver searches`` lists their options).
        predict_k: centres searched per query at prediction; ``0`` = the same as ``k``.

    :meth:`fit_reference` replaces the bank's centres with the given embeddings
    (neighbour lists stay until the next refresh), so prediction uses the
    current network; the trainer calls it on a copy, so evaluating never
    changes training. :meth:`add_centres` adds labelled centres, of new classes
    too, with weight 1; they are used by prediction only. The online update
    writes training-mode embeddings (with any dropout or augmentation).

    :meth:`on_epoch_end` returns the paper's Figure 6 diagnostics, accumulated
    over the epoch's batches from the distances the loss already computed:
    ``mean_neighbour_distance`` (mean Euclidean distance to the k neighbour
    centres), ``mean_rbf_value`` (mean ``f(x, c)`` over them),
    ``frac_true_class_absent`` (share of samples with no true-class centre
    among their neighbours, the hard case), ``sigma``; plus
    ``median_own_centre_distance`` (a training query's distance to its own
    stored centre: how far training-mode queries drift from the bank) and
    ``frac_unscorable`` (rows whose class has no other centre, left out of the loss).
    When the median own-centre distance exceeds 3 sigma, the bank is stale
    (the network moved since the refresh) and a :class:`TrainingWarning` says
    so: training from scratch at the paper's 10-epoch interval does this. Not
    after a run's first epoch, whose bank holds the untrained network's
    embeddings and is far from the trained queries by construction; a bank that
    stays stale is reported at the next epoch.

    Under ``torch.distributed`` (:mod:`knnsolver.distributed`) the online update
    all-gathers the batch so every process's bank stays the same, and the
    diagnostics sum over all processes; ``forward`` is then a collective call.
    """

    predicts_by_knn = True
    score_kind = "log-probabilities"

    def __init__(
        self,
        embedding_dim: int,
        num_classes: int,
        num_train: int,
        *,
        k: int = 200,
        sigma: float | Literal["auto"] = SIGMA_AUTO,
        learn_sigma: bool = False,
        update_interval: int = 10,
        learn_weights: bool = True,
        normalize: bool = True,
        radius: float = 1.0,
        neighbour_mode: Annotated[str, NEIGHBOUR_MODES] = "stored",
        online_update: bool = False,
        bank_dtype: Annotated[str, BANK_DTYPES] = "float32",
        search: Annotated[str, SEARCHES] = "exact",
        predict_k: int = 0,
    ) -> None:
        super().__init__(embedding_dim, num_classes, num_train)
        if isinstance(sigma, str):
            if sigma != SIGMA_AUTO:
                raise ConfigError(f"sigma must be a finite number >= 0 (0 = auto), or {SIGMA_AUTO!r}, got {sigma!r}")
            sigma = 0.0
        if neighbour_mode not in NEIGHBOUR_MODES:
            raise ConfigError(f"unknown neighbour_mode {neighbour_mode!r}; choose one of: {', '.join(NEIGHBOUR_MODES)}")
        if bank_dtype not in BANK_DTYPES:
            raise ConfigError(f"unknown bank_dtype {bank_dtype!r}; choose one of: {', '.join(BANK_DTYPES)}")
        if not sigma >= 0 or math.isinf(sigma):
            raise ConfigError(f"sigma must be a finite number >= 0 (0 = auto), or 'auto', got {sigma}")
        if not radius > 0 or math.isinf(radius):
            raise ConfigError(f"radius must be a finite number > 0, got {radius}")
        if update_interval < 1:
            raise ConfigError(f"update_interval must be >= 1 epoch, got {update_interval}")
        if predict_k < 0:
            raise ConfigError(f"predict_k must be >= 0 (0 = use k), got {predict_k}")
        check_k(k, num_train, excluding_self=True)
        if predict_k > num_train:
            raise ConfigError(
                f"predict_k={predict_k} exceeds the {num_train} centres in the bank; use predict_k <= {num_train}"
            )
        self.k, self.predict_k = int(k), int(predict_k or k)
        self.auto_sigma = sigma == 0 and not learn_sigma
        self.normalize, self.radius = bool(normalize), float(radius)
        self.embedding_space = "l2-normalised" if self.normalize else "euclidean"
        self.update_interval = int(update_interval)
        self.neighbour_mode, self.online_update = neighbour_mode, bool(online_update)
        self.bank = EmbeddingBank(num_train, embedding_dim, self.k if neighbour_mode == "stored" else 0,
                                  dtype=bank_dtype, search=SEARCHES.build(search))
        self.log_weights = nn.Parameter(torch.zeros(num_train), requires_grad=learn_weights)
        # NaN until set (automatic sigma: when the bank is first filled).
        self.log_sigma = nn.Parameter(torch.tensor(math.log(sigma) if sigma > 0 else math.nan), requires_grad=learn_sigma)
        # Sums of: mean distance, mean RBF value, true class absent, unscorable; rows (follows the solver's device).
        self.register_buffer("_stats", torch.zeros(5), persistent=False)
        self._own: list[Tensor] = []  # this epoch's distances from training queries to their own stored centres
        self._own_rows = 0
        self._step = rbf_step  # the pure training maths; compile_loss() swaps in a compiled copy
        self._sigma_known = sigma > 0
        self._rows_checked = False  # on an accelerator, row indices are checked once per refresh (a host read)
        self._warned_no_rows = False

    def extra_repr(self) -> str:
        sigma = "learned" if self.log_sigma.requires_grad else "auto" if self.auto_sigma else "fixed"
        if not torch.isnan(self.log_sigma):
            sigma += f" ({self.log_sigma.exp().item():.4g})"
        space = f"normalize=True, radius={self.radius:g}" if self.normalize else "normalize=False"
        return (f"{super().extra_repr()}, k={self.k}, predict_k={self.predict_k}, sigma={sigma}, {space}, "
                f"update_interval={self.update_interval}, learn_weights={self.log_weights.requires_grad}, "
                f"neighbour_mode={self.neighbour_mode}, search={self.search.name}, centres={len(self.bank)}")

    @classmethod
    def protocol_defaults(cls, split: str, pretrained: bool = False) -> dict[str, object]:
        """Fixed weights (``w_i = 1``) for metric learning on unseen classes, as in the paper; a refresh every
        epoch for a network trained from random weights (``update_interval``)."""
        return {**({"learn_weights": False} if split == "disjoint" else {}),
                **({} if pretrained else {"update_interval": 1})}

    def transform(self, embeddings: Tensor) -> Tensor:
        """The space the RBF works in: raw embeddings, or the radius-``radius`` sphere with ``normalize``."""
        return self.radius * F.normalize(embeddings, dim=1) if self.normalize else embeddings

    @property
    def search(self) -> NeighbourSearch:
        """The neighbour-search backend (held by the bank, which builds its index)."""
        return self.bank.search

    @property
    def sigma(self) -> Tensor:
        """The global RBF width ``exp(log_sigma)`` (differentiable when learned)."""
        if not self._sigma_known:  # read from the device only until it is set
            if torch.isnan(self.log_sigma):
                raise RuntimeError("sigma is not set yet: it is set automatically when the bank is filled")
            self._sigma_known = True
        return self.log_sigma.exp()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._sigma_known = self._rows_checked = False  # a loaded state is read afresh

    @torch.no_grad()
    def _update_sigma(self, graph_current: bool = False) -> None:
        """Re-estimate an automatic sigma from the bank (a learned one only at the first fill); ``graph_current``:
        the bank's neighbour lists were just recomputed from its centres (a refresh)."""
        if self.auto_sigma or torch.isnan(self.log_sigma):
            nearest = functools.partial(self._nearest_other, graph_current=graph_current)
            self.log_sigma.fill_(math.log(rbf_auto_sigma(self.bank.training_centres, nearest=nearest)))
            self._sigma_known = True

    def _nearest_other(self, rows: Tensor, graph_current: bool) -> Tensor:
        """Each training row's nearest other training centre, from what the bank holds: the first column of its
        neighbour lists when current (a refresh in ``stored`` mode), else a search of its index (``search="auto"``
        picks the backend by the number of queries, so at over about a million centres this search of 2,048 rows
        may build the approximate one beside the exact one a training step's few queries use)."""
        if graph_current and self.bank.k:
            return self.bank.neighbours.index_select(0, rows.to(self.bank.neighbours.device))[:, 0]
        return self.bank.nearest_other(rows, self.num_train)

    @torch.no_grad()
    def refresh(self, embeddings: Tensor, labels: Tensor) -> None:
        """Store new centres for every training row, recompute their neighbour lists and an automatic sigma.

        Warns when some rows cannot be scored (their class has no other centre)
        and refuses a bank where no row can.
        """
        labels = self.check_reference(embeddings, labels, "refresh")
        self.bank.refresh(self.transform(embeddings), labels)
        self._update_sigma(graph_current=True)
        self._rows_checked = False
        counts = torch.bincount(self.bank.training_labels)
        alone = int((counts[self.bank.training_labels] < 2).sum())
        if alone == self.num_train:
            raise ConfigError(
                "no training row has another centre of its class in the RBF bank (every class has one row), so the "
                "loss would be 0 and nothing would be learnt; use at least 2 training rows per class"
            )
        if alone:
            warnings.warn(
                f"{alone} of {self.num_train} training rows are the only row of their class; the RBF loss cannot score "
                "them and leaves them out (counted as solver_frac_unscorable in the log)", TrainingWarning, stacklevel=2,
            )

    def refresh_interval(self, num_epochs: int | None) -> int:
        """The epochs between bank refreshes in a run of ``num_epochs``: ``update_interval``, or
        ``max(1, num_epochs // 2)`` where that would never refresh after the first fill."""
        if num_epochs is None or self.update_interval < num_epochs:
            return self.update_interval
        return max(1, num_epochs // 2)

    def schedule_note(self, num_epochs: int) -> str | None:
        """The adapted refresh schedule in one line, where :meth:`refresh_interval` changed it."""
        interval = self.refresh_interval(num_epochs)
        if interval == self.update_interval or num_epochs < 2:
            return None
        before = ", ".join(str(e + 1) for e in range(0, num_epochs, interval))
        return (f"rbf: update_interval={self.update_interval} >= epochs={num_epochs} would fill the bank once from the "
                f"untrained network; refreshing every {interval} epoch(s) instead (before epochs {before})")

    def on_epoch_start(self, ctx: EpochContext) -> None:
        if ctx.num_train != self.num_train:
            raise ConfigError(
                f"the solver was built for num_train={self.num_train} rows but the training set has {ctx.num_train}"
            )
        self._stats.zero_()
        self._own, self._own_rows = [], 0
        if not self.bank.filled or ctx.epoch % self.refresh_interval(ctx.num_epochs) == 0:
            self.refresh(*ctx.embed_train())

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """The paper's Figure 6 diagnostics over the epoch's training samples, plus sigma and drift (class docstring)."""
        dist, rbf, absent, unscorable, rows = distributed.all_reduce_sum(self._stats).tolist()
        if rows == 0:
            return {}
        out = {
            "mean_neighbour_distance": dist / rows,
            "mean_rbf_value": rbf / rows,
            "frac_true_class_absent": absent / rows,
            "frac_unscorable": unscorable / rows,
            "sigma": self.sigma.item(),
        }
        own = distributed.all_gather_rows(torch.cat(self._own)) if self._own else None
        if own is not None and own.numel():
            out["median_own_centre_distance"] = float(own.median())
            drift = out["median_own_centre_distance"] / out["sigma"]
            interval = self.refresh_interval(ctx.num_epochs if ctx is not None else None)
            first = ctx is not None and ctx.epoch == 0  # the untrained network's bank (class docstring)
            if drift > _STALE_SIGMAS and not first and distributed.is_main():
                warnings.warn(
                    f"RBF centres are stale: training queries lie a median {drift:.1f} sigma from their own stored "
                    f"centre, so the RBF values are near 0 and the loss acts as a hard nearest-neighbour rule; "
                    + (f"refresh more often (every {interval} epochs now; update_interval=1 suits training from scratch)"
                       if interval > 1 else "lower the learning rate or set online_update=True"),
                    TrainingWarning, stacklevel=2,
                )
        return out

    def _neighbours(self, embeddings: Tensor, row_indices: Tensor | None) -> Tensor:
        if self.neighbour_mode == "stored":
            if row_indices is None:
                raise ConfigError("neighbour_mode='stored' needs each sample's training-set row as row_indices; without "
                                  "them use neighbour_mode='fresh' (which then counts a sample's own centre among its "
                                  "neighbours)")
            return self.bank.neighbours.index_select(0, row_indices)
        # fresh: the bank's index of its training centres, built once per change of the centres
        embeddings = self.transform(embeddings.detach())
        if row_indices is None:
            if self.training and not self._warned_no_rows:
                self._warned_no_rows = True
                warnings.warn("RBFSolver(neighbour_mode='fresh') was called without row_indices, so each training "
                              "sample's own centre is among its neighbours (Eq. 3 leaves it out, and the loss is lower "
                              "than it should be); pass each sample's training-set row as row_indices",
                              TrainingWarning, stacklevel=3)
            return self.bank.search_training(embeddings, self.k)[1]
        return drop_own_rows(self.bank.search_training(embeddings, self.k + 1)[1].long(), row_indices)

    def forward(self, embeddings: Tensor, labels: Tensor, row_indices: Tensor | None = None) -> Tensor:
        """Mean ``-log P(y|x)`` over the batch (Eq. 3), the sample's own centre excluded."""
        if not self.bank.filled:
            raise RuntimeError("the RBF bank is empty: on_epoch_start (or refresh) must fill it before training")
        labels = self.check_batch(embeddings, labels)
        row_indices = check_row_indices(row_indices, labels.shape[0], "RBFSolver")
        if row_indices is not None:
            if not avoid_host_sync(row_indices.device) or not self._rows_checked:
                check_rows_in_bank(row_indices, labels, self.bank.training_labels, "RBFSolver")
                self._rows_checked = True
        neighbours = self._neighbours(embeddings, row_indices)
        loss, stats, own = self._step(
            embeddings, self.bank.training_centres, self.bank.training_labels, neighbours, self.log_weights,
            self.log_sigma, labels, row_indices, self.radius if self.normalize else 0.0,
        )
        with torch.no_grad():
            self._stats += stats
            if row_indices is not None and self.training and self._own_rows < _OWN_SAMPLE:
                self._own.append(own)
                self._own_rows += own.shape[0]
            if self.online_update and self.training and row_indices is not None:
                self.bank.write_batch(row_indices, self.transform(embeddings.detach()))
        return loss

    @torch.no_grad()
    def fit_reference(self, embeddings: Tensor, labels: Tensor) -> None:
        """Replace the bank's centres with fresh training embeddings (and re-estimate an automatic sigma)."""
        labels = self.check_reference(embeddings, labels)
        self.bank.set_centres(self.transform(embeddings), labels)
        self._update_sigma()

    @torch.no_grad()
    def add_centres(self, embeddings: Tensor, labels: Tensor) -> None:
        """Add labelled centres (weight 1), new classes included, for prediction; the network is unchanged."""
        labels = self.check_reference(embeddings, labels, "add_centres", num_classes=None)
        # judged (and warned about) before anything changes, so a warning raised as an error leaves the solver whole
        num_classes = max(self.num_classes, int(labels.max()) + 1 if labels.numel() else 0,
                          int(self.bank.labels.max()) + 1 if self.bank.labels.numel() else 0)
        counts = torch.bincount(torch.cat([self.bank.labels, labels.to(self.bank.labels.device)]), minlength=num_classes)
        few = [c for c in labels.unique().tolist() if int(counts[c]) * num_classes < self.predict_k]
        if few:
            warnings.warn(
                f"class(es) {', '.join(f'{c} ({int(counts[c])} centres)' for c in few)} hold fewer centres than "
                f"predict_k / classes = {self.predict_k}/{num_classes}: a prediction sums Eq. 4 over the "
                f"{self.predict_k} nearest centres, where such a class is outweighed unless its own centres are much "
                "the nearest; add more examples, or predict over fewer neighbours (solver.predict_k, e.g. 5)",
                TrainingWarning, stacklevel=2,
            )
        self.bank.append(self.transform(embeddings), labels)
        self.num_classes = num_classes

    @torch.no_grad()
    def predict(self, embeddings: Tensor) -> Tensor:
        """Log-probabilities ``(B, C)`` of Eq. 4 over each query's ``predict_k`` nearest centres in the bank."""
        if not self.bank.filled:
            raise RuntimeError("the RBF bank is empty: train the solver or call fit_reference(embeddings, labels) first")
        self.check_queries(embeddings)
        centres, centre_labels = self.bank.centres, self.bank.labels
        num_classes = max(self.num_classes, int(centre_labels.max()) + 1)  # added classes survive a reload
        extra = centres.shape[0] - self.num_train
        log_weights = torch.cat([self.log_weights, self.log_weights.new_zeros(extra)])
        sigma = self.sigma
        embeddings = self.transform(embeddings)
        rows = max(1, _PREDICT_BLOCK // (self.predict_k * self.embedding_dim))
        out = []
        for start in range(0, embeddings.shape[0], rows):
            query = embeddings[start : start + rows]
            _, neighbours = self.bank.search_knn(query, self.predict_k)
            out.append(rbf_log_probs(query, centres, centre_labels, neighbours, log_weights, sigma, num_classes))
        return torch.cat(out) if out else embeddings.new_zeros(0, num_classes)
