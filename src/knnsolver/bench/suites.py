"""The benchmark suites: the runs each one makes under a preset, and the claims it tests.

A suite is a list of :class:`RunSpec` in execution order. Fair comparison
(Musgrave et al. 2020, METHODS.md): within a suite every solver gets the same
backbone, embedding size, augmentation, batch size and epoch budget (the
preset's ``standard`` or ``disjoint`` settings), plus the fixed solver settings
of :data:`FIXED`. Each solver's key hyperparameters come from the small grid in
:data:`GRIDS`: a ``grid`` run per grid point with the first seed (extended
along :data:`LADDERS` while the best point is at an edge), then ``final``
runs over every seed with the grid point of best *validation* score. Finals
hold ``params=None`` until the runner resolves them (:func:`resolve`) from the
stored grid results, so test data never steers a choice.
"""
from __future__ import annotations

import itertools
import math
import re
import statistics
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from knnsolver.bench.data import TRAIN_CLASSES, VAL_CLASSES
from knnsolver.errors import ConfigError
from knnsolver.registry import SOLVERS
from knnsolver.training.config import TrainConfig

# Key hyperparameter of each solver, chosen on validation from a grid whose middle point is the
# expected optimum, so the grid brackets it (the report flags a choice at an edge). The learning rate
# is not tuned: every solver of a suite shares the preset's (Adam 1e-3, constant), chosen once.
GRIDS: dict[str, dict[str, tuple[Any, ...]]] = {
    "softmax": {"label_smoothing": (0.0, 0.1, 0.2)},
    # On the unit sphere (normalize=True); the automatic rules (re-estimated, learned) are ablation variants.
    "rbf": {"sigma": (0.1, 0.2, 0.4)},
    "hal": {"tau": (0.05, 0.1, 0.2)},
    "crc": {"lam": (0.003, 0.03, 0.3)},
    "centralized": {"margin": (1.0, 2.0, 4.0)},
    "triplet": {"margin": (0.05, 0.1, 0.2)},
    "lifted": {"neg_margin": (0.5, 1.0, 2.0)},
    "npairs": {"embedding_reg": (0.0002, 0.002, 0.02)},
    "nca": {"softmax_scale": (3.0, 10.0, 30.0)},
    "proxynca": {"softmax_scale": (3.0, 10.0, 30.0)},
    "normsoftmax": {"temperature": (0.025, 0.05, 0.1)},
    "multisimilarity": {"base": (0.3, 0.5, 0.7)},
    "proxyanchor": {"margin": (0.05, 0.1, 0.2)},
}
# Each key hyperparameter's ladder: its GRIDS points with values beyond each edge, in order (two, or more where
# validation chose the ladder's end: softmax's 0.4 and HAL's 0.8 at 100 classification epochs, rbf's 1.6 at 10
# images per class and 0.025 with all images in the scarcity suite, centralized's 16 in the cost suite's target runs,
# softmax's 0.7 at 500 images per class under early stopping; label smoothing must stay below 1).
# A grid must bracket the optimum: when validation chooses a value at the edge of the points tried,
# the runner (with the preset's ``extend_grids``) tries the next value outward, one more grid run on the
# first seed, until the choice is interior or the ladder ends; the report still flags an edge choice.
LADDERS: dict[str, tuple[Any, ...]] = {
    "softmax": (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
    "rbf": (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2),
    "hal": (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2),
    "crc": (0.00003, 0.0003, 0.003, 0.03, 0.3, 3.0, 30.0),
    "centralized": (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0),
    "triplet": (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8),
    "lifted": (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0),
    "npairs": (0.000002, 0.00002, 0.0002, 0.002, 0.02, 0.2, 2.0),
    "nca": (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0),
    "proxynca": (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0),
    "normsoftmax": (0.00625, 0.0125, 0.025, 0.05, 0.1, 0.2, 0.4),
    "multisimilarity": (0.1, 0.3, 0.5, 0.7, 0.9),
    "proxyanchor": (0.0125, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8),
}
# Settings that differ from a solver's defaults in every suite: short budgets need a bank
# refreshed every epoch (the paper's 10-epoch interval assumes ~100 epochs), k as in the paper.
FIXED: dict[str, dict[str, Any]] = {"rbf": {"k": 100, "update_interval": 1}}
# The kNN baselines of the HAL claim (every pytorch-metric-learning baseline predicts by kNN) and
# the batch losses whose O(B^2 d) pair cost its cost claim is about.
PML_BASELINES = ("triplet", "lifted", "npairs", "nca", "proxynca", "normsoftmax", "multisimilarity", "proxyanchor")
PAIRWISE_KNN_LOSSES = ("nca", "triplet", "lifted", "npairs", "multisimilarity")
UNSEEN_BASELINES = ("triplet", "lifted", "npairs")
# The unseen-classes suite sweeps the embedding size of these, and of the best other solver it runs.
BEST_OTHER_EXCLUDED = ("rbf", "triplet")
SCARCITY_SOLVERS = ("softmax", "rbf", "hal")
TARGET_SOLVERS = ("centralized", "triplet")
STEP_BUDGET_S = 2.0  # seconds of timed loss steps per (batch size, class count), at least one step
STEP_MAX_S = 2.0  # a loss step slower than this skips the solver's larger batch sizes
VAL_KEYS = {"standard": "val_accuracy", "disjoint": "val_map_at_r"}  # the trainer's checkpoint choice
UNSEEN_SUBSET = "fashion-mnist-unseen-v3"  # knnsolver.bench.data: train on 0-3, validate on 4 and 6, test on the rest
_CONFIG_FIELDS = frozenset(f.name for f in fields(TrainConfig))


@dataclass(frozen=True)
class Preset:
    """The scale of every suite: data, network, budgets, seeds.

    ``standard`` and ``disjoint`` are the TrainConfig fields every classification
    and every unseen-class run shares; the other fields size the individual suites.
    """

    name: str
    description: str
    seeds: tuple[int, ...]
    num_classes: int
    standard: Mapping[str, Any]
    disjoint: Mapping[str, Any]
    unseen_subset: bool  # train/test retrieval on the prepared Fashion-MNIST subset (knnsolver.bench.data)
    scarcity_sizes: tuple[int | None, ...]  # training samples per class; None = all
    # The size whose grid chooses every size's hyperparameters (None: all images), or "each": every size
    # tunes its own (RBF's sigma depends on how densely the bank fills the space).
    scarcity_reference: int | str | None
    scarcity_steps: int  # optimiser steps per run (epochs = steps / batches per epoch)
    scarcity_min_epochs: int
    scarcity_evals: int  # validation passes per run
    # Most optimiser steps per epoch (TrainConfig.epoch_steps): RBF's bank refreshes, and validation comes, at
    # least this often at every size (one pass of all 57,000 images is 891 steps: centres went 6 sigma stale)
    scarcity_epoch_steps: int
    train_rows: int  # training rows with no per-class cap (the standard split), for the budgets of "all"
    embedding_dims: tuple[int, ...]
    ablation: Mapping[str, Any]  # overrides of ``standard`` for the RBF ablation
    ablation_k: tuple[int, ...]
    ablation_sigma: tuple[float, ...]
    ablation_intervals: tuple[int, ...]
    ablation_refresh_steps: tuple[int, ...]  # refreshes every this many steps, in epochs of that many (epoch_steps)
    cost_epochs: int
    target_epochs: int
    step_batch_sizes: tuple[int, ...]
    step_class_counts: tuple[int, ...]
    step_bank_size: int
    step_repeats: int
    budgets: Mapping[str, str] = field(default_factory=dict)  # suite -> how its budget was sized
    # suite -> the solvers its claims need (the default of --solvers); absent: every registered solver
    solvers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    hardware: str = "cpu"  # "cpu" or "gpu": results of the two are never mixed in one table
    extend_grids: bool = True  # try LADDERS values beyond a grid edge that validation chooses
    # The classification suite's rbf refreshes its bank every this many steps (None: every pass): trained from
    # scratch at Adam 1e-3, centres refreshed every 47-step pass drifted 2-3 sigma from their queries.
    rbf_refresh_steps: int | None = None
    classification: Mapping[str, Any] = field(default_factory=dict)  # overrides of ``standard`` for that suite
    unseen: Mapping[str, Any] = field(default_factory=dict)  # overrides of ``disjoint`` for the unseen-classes suite
    # The scarcity runs' TrainConfig.patience as a share of each run's validation passes, rounded up (0: every
    # run takes its whole budget).
    scarcity_patience: float = 0.0


# Unseen-class runs validate on classes held out whole from training (knnsolver.bench.data): classes 0-4 and 6
# train and validate, 4 (coat) and 6 (shirt) validate only; 5 and 7-9 test.
_CLASS_DISJOINT = dict(train_classes=[*TRAIN_CLASSES, *VAL_CLASSES], val_classes=list(VAL_CLASSES))
_FULL_STANDARD = dict(
    dataset="fashion-mnist", split="standard", model="conv28", width=16, embedding_dim=64, dropout=0.0,
    batch_size=64, samples_per_class=8, epochs=50, optimizer="adam", lr=1e-3, lr_schedule="constant",
    weight_decay=0.0, max_per_class=300, val_fraction=0.05, augment=False, eval_every=1,
)
# What each suite's claims need: the classification claims compare RBF with softmax and HAL with the
# pairwise batch kNN losses; ProxyNCA and NormSoftmax equal HAL under METHODS.md's reading (to 2e-15,
# tests/test_hal.py), so they are left out rather than shown as rivals.
_CLAIM_SOLVERS = {
    "classification": ("softmax", "rbf", "hal", "nca", "triplet", "lifted", "npairs", "multisimilarity"),
    "scarcity": ("softmax", "rbf"),
    "unseen-classes": ("rbf", "triplet", "lifted", "npairs"),
    "cost": ("softmax", "rbf", "hal", "centralized", "nca", "triplet", "lifted", "npairs", "multisimilarity"),
    "ablation": ("rbf",),
}
_TINY_STANDARD = dict(
    dataset="digits", split="standard", model="conv8", width=4, embedding_dim=16, dropout=0.0,
    batch_size=32, samples_per_class=4, epochs=1, optimizer="adam", lr=1e-3, weight_decay=0.0,
    max_per_class=None, val_fraction=0.1, augment=False, eval_every=1,
)

PRESETS: dict[str, Preset] = {
    "full": Preset(
        name="full",
        description=(
            "Fashion-MNIST, a 3-block convnet (conv28, width 16), 64-d embeddings, Adam at a constant 1e-3 for every "
            "solver, batch 64, no augmentation, 1 torch thread per run; classification on 300 training images per "
            "class (3,000), validation 5% of the official training set (3,000 images), the official 10,000 test "
            "images; each solver's key hyperparameter from a 3-point grid on validation (first seed), then 5 seeds"
        ),
        seeds=(0, 1, 2, 3, 4),
        num_classes=10,
        # Validated every 5th epoch: a validation pass costs about 1.5 training epochs.
        standard=dict(_FULL_STANDARD, epochs=100, eval_every=5),
        # At 100 epochs 17 of 40 finals peaked in the last 20%: 8 on a plateau (chance), 9 still rising (N-pairs and
        # lifted about a point per 20 epochs). Up to 200 epochs, each run stopping after 6 passes (30 epochs) without
        # a new best: the plateaued solvers stop at about 45-100 epochs (replayed on the 100-epoch curves), and a run
        # stopped by epoch 150 has its best outside its last 20% by construction.
        classification=dict(epochs=200, patience=6),
        # Validation every 3rd epoch (50 passes): a pass (BatchNorm re-estimation plus 1,500 rows) costs about
        # what a training epoch does, and the training itself does not depend on when it is evaluated. 150 epochs:
        # at 90, 20 of 65 finals peaked in the last 20%, N-pairs still rising (9 of 12 still-rising runs).
        disjoint=dict(_FULL_STANDARD, split="disjoint", max_per_class=300, samples_per_class=16, epochs=150,
                      eval_every=3, **_CLASS_DISJOINT),
        # Replayed on the 150-epoch curves, stopping after 10 passes (30 epochs) without a new best stops 64 of 65
        # finals before the cap (1 of them late), at about half the compute.
        unseen=dict(patience=10),
        unseen_subset=True,
        # All 57,000 images are left to the gpu preset: at 2,400 steps (2.7 passes) both solvers still rose 1-3
        # points over the second half, and an RBF run there took 6.6-7.1 minutes (most of it refreshing its
        # 57,000-centre bank every 100 steps), so the passes it needs do not fit 120 minutes on 2 cores.
        scarcity_sizes=(10, 20, 50, 100, 500),
        # With sigma chosen at 100 per class (0.8), rbf with all images reached 79-82% (neighbours' mean RBF
        # value 0.7-0.86: a near-uniform vote), below the earlier 84-85% at sigma 0.2: one size's sigma need not
        # suit another's bank density.
        scarcity_reference="each",
        # At a fixed 2,400 steps 42 of 60 finals peaked in the last 20%, 31 still rising (at every size). Up to
        # 6,000 steps, validated about 20 times, stopping after a fifth of the passes without a new best: a run
        # stopped early has its best outside its last 20% by construction.
        scarcity_steps=6000,
        scarcity_min_epochs=2,
        scarcity_evals=20,
        scarcity_patience=0.2,
        scarcity_epoch_steps=100,
        train_rows=57_000,
        embedding_dims=(16, 32, 64, 128),
        # At 25 epochs validation still rose; at a fixed 50, 18 of 55 finals peaked in the last 20% (9 on a
        # plateau). Replayed on those curves, stopping after 10 passes (10 epochs, 20% of the cap) without a new
        # best stops 53 of 55 before the cap, 2 of them late, at about 70% of the compute.
        ablation=dict(epochs=50, eval_every=1, patience=10),
        ablation_k=(10, 50, 100, 200),
        ablation_sigma=(0.0, 0.05, 0.1, 0.2, 0.4),  # on the unit sphere (normalize=True); 0 = automatic
        ablation_intervals=(1, 5, 10),
        # A third of a 47-step epoch (the base's centres drift 2-3 sigma). The ablation scores it on test data, so
        # it never sets the classification suite's refresh (rbf_refresh_steps unset: every pass); the report
        # renders its effect in the ablation table rather than a number copied here, which went stale once.
        ablation_refresh_steps=(16,),
        cost_epochs=2,
        target_epochs=90,
        step_batch_sizes=(256, 1024, 4096),
        step_class_counts=(10, 100, 1000),
        step_bank_size=10_000,
        step_repeats=50,
        budgets={
            "classification": "up to 200 epochs of 3,000 images (about 9,400 optimiser steps), validation every "
                              "5th epoch, each run stopped early after 6 validation passes (30 epochs) without a new "
                              "best (at a fixed 50 epochs, then 100, 17 of 40 finals peaked in the last 20%, lifted "
                              "and N-pairs still rising); rbf's bank refreshes every epoch (47 steps, 10 times as "
                              "often as the paper; refreshing every 16 steps is an ablation variant, scored on test "
                              "data and so not used to set this suite: see the ablation's table); "
                              "8 solvers x (3 grid points + 4 more seeds) = 56 trainings of about 1-5 minutes with 1 "
                              "thread, plus a training per grid extension and 4 more finals per changed choice, run "
                              "by 2 workers side by side (benchmarks/run_suites.sh)",
            "scarcity": "up to 6,000 optimiser steps per run (epochs = 6,000 / batches per epoch, at least 2), "
                        "validated about 20 times, each run stopped early after a fifth of its validation passes "
                        "without a new best (at a fixed 600 steps 34 of 60 finals peaked in the last 20%; at a "
                        "fixed 2,400, 42 of 60, 31 of them still rising); 10, 20, 50, 100 and 500 images per class "
                        "(all 57,000 images only in the gpu preset: at 2,400 steps, 2.7 passes, both solvers still "
                        "rose, and an RBF run took 6.6-7.1 minutes there); a grid at every size (sigma chosen at 100 "
                        "per class did not suit all images); softmax and rbf x 5 sizes x 5 seeds",
            "unseen-classes": "up to 150 epochs of 1,200 images of classes 0-3 (about 2,850 optimiser steps), "
                              "validation every 3rd epoch, each run stopped early after 10 validation passes (30 "
                              "epochs) without a new best (at a fixed 30 epochs 31 of 44 finals peaked in the last "
                              "20%, 22 still rising; at 90, 20 of 65; at 150, 23 of 65, 11 of them on a plateau); "
                              "the claims' rbf, triplet, lifted and npairs x (3 grid points + 4 more seeds) at "
                              "64-d, plus rbf, triplet and the best other solver x 3 sizes x 5 seeds, run by 2 "
                              "workers that share the runs",
            "cost": "loss steps on random embeddings at batch 256, 1,024, 4,096 and 10, 100, 1,000 classes (50 "
                    "repeats); 2 epochs per solver for the epoch time (timings alone on the machine, after the "
                    "workers); time to target: 90 epochs on the unseen-class split x 2 solvers, evaluated every "
                    "epoch (about 19 optimiser steps: 1,200 images in batches of 64)",
            "ablation": "up to 50 epochs of 3,000 images, validated every epoch, each run stopped early after "
                        "10 validation passes without a new best (at a fixed 25 epochs validation still rose; at "
                        "a fixed 50, 18 of 55 finals peaked in the last 20%, 9 of them on a plateau), a "
                        "5-point sigma grid then 11 RBF variants x 5 seeds (one refreshing every 16 steps, a "
                        "third of an epoch), run by 2 workers",
        },
        solvers=_CLAIM_SOLVERS,
    ),
    "gpu": Preset(
        name="gpu",
        description=(
            "Fashion-MNIST at full size (all 60,000 training images less 5% for validation: 57,000), conv28 width "
            "32, 64-d, Adam at a constant 1e-3, batch 128, network and solver maths compiled, on one GPU; otherwise as "
            "the full preset. Results are stored apart from the CPU ones and never mixed with them"
        ),
        seeds=(0, 1, 2, 3, 4),
        num_classes=10,
        standard=dict(_FULL_STANDARD, width=32, batch_size=128, samples_per_class=16, max_per_class=None, epochs=30,
                      device="cuda", compile=True),
        disjoint=dict(_FULL_STANDARD, split="disjoint", width=32, batch_size=128, samples_per_class=16,
                      max_per_class=None, epochs=30, device="cuda", compile=True, **_CLASS_DISJOINT),
        # Early stopping after a fifth of the 30-epoch cap without a new best (rbf's epochs of 100 steps wait at
        # least as many steps: in_epochs_of).
        classification=dict(patience=6),
        unseen=dict(patience=6),
        scarcity_patience=0.2,
        unseen_subset=True,
        scarcity_sizes=(10, 20, 50, 100, 500, 1000, None),
        scarcity_reference=100,
        scarcity_steps=3000,
        scarcity_min_epochs=5,
        scarcity_evals=15,
        scarcity_epoch_steps=200,
        train_rows=57_000,
        embedding_dims=(16, 32, 64, 128),
        ablation=dict(epochs=30, patience=6),
        ablation_k=(10, 50, 100, 200),
        ablation_sigma=(0.0, 0.05, 0.1, 0.2, 0.4),
        ablation_intervals=(1, 5, 10),
        ablation_refresh_steps=(100,),
        cost_epochs=2,
        target_epochs=30,
        step_batch_sizes=(256, 1024, 4096),
        step_class_counts=(10, 100, 1000),
        step_bank_size=54_000,
        step_repeats=50,
        budgets={"classification": "up to 30 epochs of 57,000 images, each run stopped early after 6 validation "
                                   "passes without a new best, about a minute per training on an H200; rbf in 134 "
                                   "epochs of 100 steps (its bank refreshed every 100 steps, not every 446-step "
                                   "pass)"},
        solvers=_CLAIM_SOLVERS,
        hardware="gpu",
        rbf_refresh_steps=100,
    ),
    "tiny": Preset(
        name="tiny",
        description="scikit-learn digits, width 4, 1 epoch, one seed: a smoke test of the machinery, not a benchmark",
        seeds=(0,),
        num_classes=10,
        standard=_TINY_STANDARD,
        disjoint=dict(_TINY_STANDARD, split="disjoint", samples_per_class=8, **_CLASS_DISJOINT),
        unseen_subset=False,
        scarcity_sizes=(10, None),
        scarcity_reference=None,
        scarcity_steps=4,
        scarcity_min_epochs=1,
        scarcity_evals=1,
        scarcity_epoch_steps=20,
        train_rows=1_294,
        embedding_dims=(8, 16),
        ablation=dict(epochs=2),
        ablation_k=(10, 20),
        ablation_sigma=(0.0, 10.0),
        ablation_intervals=(1, 2),
        ablation_refresh_steps=(10,),
        cost_epochs=1,
        target_epochs=2,
        step_batch_sizes=(16, 32),
        step_class_counts=(10,),
        step_bank_size=200,
        step_repeats=2,
        budgets={},
        extend_grids=False,
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One run of a suite, stored as ``<out>/<suite>/<run_id>.json``.

    Attributes:
        run_id: file-name-safe unique name within the suite.
        kind: ``train`` (train and evaluate), ``epoch_cost`` (train, then time one
            ``on_epoch_start``) or ``step_cost`` (time loss steps on random embeddings).
        method: the row of the report (usually the solver name).
        condition: the column of the report (``"n=10"``, ``"dim=16"``...), ``""`` for none.
        seed: the run's seed.
        role: ``grid`` (a grid point, first seed) or ``final`` (the chosen setting).
        config: TrainConfig fields without ``params`` (train kinds), or measurement settings.
        params: the grid values of this run; ``None`` until resolved for tuned finals.
        tune_from: ``(method, condition)`` of the grid a final takes its params from.
        pick: a choice made from earlier results when the run starts (``"best-other"``).
        grid_index: position of a grid run in its grid (ties go to the first).
    """

    run_id: str
    kind: str
    method: str
    condition: str
    seed: int
    role: str
    config: Mapping[str, Any]
    params: Mapping[str, Any] | None = None
    tune_from: tuple[str, str] | None = None
    pick: str | None = None
    grid_index: int = 0

    @property
    def solver(self) -> str:
        return str(self.config["solver"])

    def train_config(self, out: str) -> TrainConfig:
        """The full TrainConfig of a resolved train-kind run writing to ``out``."""
        if self.params is None:
            raise RuntimeError(f"run {self.run_id} is not resolved yet")
        cfg = apply_settings(self.config, self.params)
        cfg.update(seed=self.seed, out=out, progress=False, plots=False)
        return TrainConfig.from_dict(cfg).validate()


@dataclass(frozen=True)
class Suite:
    """A named benchmark and how it builds its runs for a preset (its claims: :mod:`knnsolver.bench.claims`)."""

    name: str
    title: str
    build: Callable[[Preset, Path, tuple[str, ...], tuple[int, ...]], list[RunSpec]]
    uses_unseen_subset: bool = False


def apply_settings(config: Mapping[str, Any], settings: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``settings`` into a TrainConfig dict: config fields at the top, the rest as solver options."""
    out = {k: v for k, v in config.items()}
    out["solver_options"] = dict(config.get("solver_options", {}))
    for key, value in settings.items():
        if key in _CONFIG_FIELDS:
            out[key] = value
        else:
            out["solver_options"][key] = value
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+@-]+", "-", text).strip("-")


def _value_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def params_text(params: Mapping[str, Any]) -> str:
    """``sigma=10,k=100`` (``-`` when empty)."""
    return ",".join(f"{k}={_value_text(v)}" for k, v in params.items()) or "-"


def _run_id(method: str, condition: str, tag: str, seed: int) -> str:
    parts = [method + (f"@{condition}" if condition else ""), tag, f"s{seed}"]
    return _slug("__".join(p for p in parts if p))


def _solver_config(base: Mapping[str, Any], solver: str, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    cfg = apply_settings(dict(base, solver=solver, solver_options={}), FIXED.get(solver, {}))
    return apply_settings(cfg, extra or {})


def tuned(
    method: str, condition: str, config: Mapping[str, Any], grid: Mapping[str, Sequence[Any]], seeds: Sequence[int],
    *, kind: str = "train", tune_from: tuple[str, str] | None = None,
) -> list[RunSpec]:
    """Grid runs (first seed, one per grid point) then final runs (every seed) for one method.

    With ``tune_from`` the grid of another (method, condition) chooses the
    params and no grid is run here.
    """
    specs = []
    if tune_from is None:
        keys = list(grid)
        for index, values in enumerate(itertools.product(*(grid[k] for k in keys))):
            params = dict(zip(keys, values))
            specs.append(RunSpec(_run_id(method, condition, params_text(params), seeds[0]), kind, method, condition,
                                 seeds[0], "grid", config, params, grid_index=index))
    source = tune_from or (method, condition)
    specs += [RunSpec(_run_id(method, condition, "final", s), kind, method, condition, s, "final", config, None, source)
              for s in seeds]
    return specs


def _select(solvers: tuple[str, ...], wanted: Sequence[str]) -> list[str]:
    return [s for s in wanted if s in solvers]


def build_classification(preset: Preset, out: Path, solvers: tuple[str, ...], seeds: tuple[int, ...]) -> list[RunSpec]:
    """Every solver on ``standard`` with the preset's ``classification`` overrides; rbf in epochs of
    ``rbf_refresh_steps`` steps where that is set (the same batches in the same order, since epochs cut one
    stream of passes: only its bank refreshes more often)."""
    specs, base = [], dict(preset.standard, **preset.classification)
    for solver in solvers:
        refresh = solver == "rbf" and preset.rbf_refresh_steps
        extra = in_epochs_of(preset, base, preset.rbf_refresh_steps) if refresh else {}
        specs += tuned(solver, "", _solver_config(base, solver, extra), GRIDS[solver], seeds)
    return specs


def scarcity_epochs(preset: Preset, per_class: int | None) -> tuple[int, int | None]:
    """``(epochs, epoch_steps)`` giving at least ``scarcity_steps`` optimiser steps with ``per_class`` images per
    class (``None``: all ``train_rows``); an epoch is one pass, or ``scarcity_epoch_steps`` steps where a pass is
    longer (``epoch_steps``; ``None`` when a pass is short enough)."""
    rows = preset.train_rows if per_class is None else per_class * preset.num_classes
    batches = math.ceil(rows / preset.standard["batch_size"])
    epoch_steps = preset.scarcity_epoch_steps if batches > preset.scarcity_epoch_steps else None
    epochs = math.ceil(preset.scarcity_steps / (epoch_steps or batches))
    return max(preset.scarcity_min_epochs, epochs), epoch_steps


def size_text(per_class: int | None) -> str:
    return f"n={'all' if per_class is None else per_class}"


def build_scarcity(preset: Preset, out: Path, solvers: tuple[str, ...], seeds: tuple[int, ...]) -> list[RunSpec]:
    specs = []
    each = preset.scarcity_reference == "each"
    reference = size_text(None if each else preset.scarcity_reference)
    sizes = sorted(preset.scarcity_sizes, key=lambda n: (n is None, n))
    ordered = [n for n in sizes if size_text(n) == reference] + [n for n in sizes if size_text(n) != reference]
    for solver in _select(solvers, SCARCITY_SOLVERS):
        for per_class in ordered:
            epochs, epoch_steps = scarcity_epochs(preset, per_class)
            extra: dict[str, Any] = dict(max_per_class=per_class, epochs=epochs,
                                         eval_every=max(1, epochs // preset.scarcity_evals))
            if preset.scarcity_patience:
                extra["patience"] = math.ceil(preset.scarcity_patience * (epochs // extra["eval_every"]))
            if epoch_steps is not None:
                extra["epoch_steps"] = epoch_steps
            if solver == "rbf" and per_class is not None:  # k must stay below the bank size
                extra["k"] = min(FIXED["rbf"]["k"], per_class * preset.num_classes - 1)
            cond = size_text(per_class)
            tune_from = None if each or cond == reference else (solver, reference)
            specs += tuned(solver, cond, _solver_config(preset.standard, solver, extra), GRIDS[solver], seeds,
                           tune_from=tune_from)
    return specs


def dim_text(dim: int) -> str:
    return f"dim={dim}"


def _disjoint_base(preset: Preset, out: Path) -> dict[str, Any]:
    base = dict(preset.disjoint)
    if preset.unseen_subset:
        base["data_dir"] = str(out / "data" / UNSEEN_SUBSET)
    return base


def build_unseen(preset: Preset, out: Path, solvers: tuple[str, ...], seeds: tuple[int, ...]) -> list[RunSpec]:
    base = dict(_disjoint_base(preset, out), **preset.unseen)
    main = dim_text(64)
    specs = []
    for solver in solvers:
        specs += tuned(solver, main, _solver_config(base, solver, {"embedding_dim": 64}), GRIDS[solver], seeds)
    swept = _select(solvers, BEST_OTHER_EXCLUDED)
    others = [s for s in solvers if s not in swept]
    for dim in (d for d in preset.embedding_dims if d != 64):
        for solver in swept:
            cfg = _solver_config(base, solver, {"embedding_dim": dim})
            specs += tuned(solver, dim_text(dim), cfg, GRIDS[solver], seeds, tune_from=(solver, main))
        if others:
            cfg = dict(base, embedding_dim=dim, solver="", solver_options={})
            specs += [RunSpec(_run_id("other", dim_text(dim), "final", s), "train", "other", dim_text(dim), s, "final",
                              cfg, pick="best-other") for s in seeds]
    return specs


def build_cost(preset: Preset, out: Path, solvers: tuple[str, ...], seeds: tuple[int, ...]) -> list[RunSpec]:
    step = dict(batch_sizes=list(preset.step_batch_sizes), class_counts=list(preset.step_class_counts),
                embedding_dim=preset.standard["embedding_dim"], bank_size=preset.step_bank_size,
                repeats=preset.step_repeats, budget_s=STEP_BUDGET_S, max_step_s=STEP_MAX_S)
    specs = []
    for solver in solvers:
        cfg = dict(step, solver=solver, solver_options=dict(FIXED.get(solver, {})))
        specs.append(RunSpec(_run_id(solver, "step", "", seeds[0]), "step_cost", solver, "step", seeds[0], "final", cfg, {}))
    epoch_cfg = dict(preset.standard, epochs=preset.cost_epochs, eval_every=preset.cost_epochs)
    for solver in solvers:
        specs.append(RunSpec(_run_id(solver, "epoch", "", seeds[0]), "epoch_cost", solver, "epoch", seeds[0], "final",
                             _solver_config(epoch_cfg, solver), {}))
    target_cfg = dict(_disjoint_base(preset, out), epochs=preset.target_epochs, eval_every=1)
    for solver in _select(solvers, TARGET_SOLVERS):
        specs += tuned(solver, "target", _solver_config(target_cfg, solver), GRIDS[solver], seeds)
    return specs


def steps_per_pass(preset: Preset, config: Mapping[str, Any]) -> int:
    """Optimiser steps of one pass over the training rows of ``config`` (its per-class cap, else all)."""
    cap = config.get("max_per_class")
    return math.ceil((cap * preset.num_classes if cap else preset.train_rows) / config["batch_size"])


def in_epochs_of(preset: Preset, config: Mapping[str, Any], steps: int) -> dict[str, int]:
    """The settings that train ``config``'s budget in epochs of ``steps`` optimiser steps (``epoch_steps``: a bank
    refreshes at every epoch start), validated about as often (in steps) as ``config`` is, and stopping early
    after at least as many steps without a new best (``patience`` in passes of the new interval, rounded up)."""
    per_pass = steps_per_pass(preset, config)
    every = max(1, round(config["eval_every"] * per_pass / steps))
    settings = {"epoch_steps": steps, "epochs": math.ceil(config["epochs"] * per_pass / steps), "eval_every": every}
    if config.get("patience"):
        settings["patience"] = math.ceil(config["patience"] * config["eval_every"] * per_pass / (every * steps))
    return settings


def ablation_variants(preset: Preset) -> list[tuple[str, str, dict[str, Any]]]:
    """``(axis, variant, settings)`` of every ablation run besides the sigma grid; the first is the base.

    A variant refreshing every ``n`` steps (``ablation_refresh_steps``) trains in epochs of ``n`` steps
    (``epoch_steps``) for the base's number of steps, validated about as often as the base.
    """
    base = dict(FIXED["rbf"])
    variants = [("base", f"k={base['k']},interval={base['update_interval']}", {})]
    variants += [("neighbours k", f"k={k}", {"k": k}) for k in preset.ablation_k if k != base["k"]]
    variants += [("update interval", f"interval={i}", {"update_interval": i})
                 for i in preset.ablation_intervals if i != base["update_interval"]]
    config = dict(preset.standard, **preset.ablation)
    variants += [("update interval", f"every {n} steps", in_epochs_of(preset, config, n))
                 for n in preset.ablation_refresh_steps if n < steps_per_pass(preset, config)]
    variants += [
        ("update interval", f"online,interval={max(preset.ablation_intervals)}",
         {"online_update": True, "update_interval": max(preset.ablation_intervals)}),
        ("weights", "fixed weights", {"learn_weights": False}),
        ("sigma rule", "learned sigma", {"learn_sigma": True}),
        ("neighbour lists", "fresh neighbours", {"neighbour_mode": "fresh"}),
    ]
    return variants


def build_ablation(preset: Preset, out: Path, solvers: tuple[str, ...], seeds: tuple[int, ...]) -> list[RunSpec]:
    if "rbf" not in solvers:
        raise ConfigError("suite 'ablation' studies the rbf solver; include rbf in --solvers")
    base = dict(preset.standard, **preset.ablation)
    sigma_grid = tuned("rbf", "sigma", _solver_config(base, "rbf"), {"sigma": preset.ablation_sigma}, seeds)
    specs = [s for s in sigma_grid if s.role == "grid"]  # its finals are the base variant's
    for _, variant, options in ablation_variants(preset):
        cfg = _solver_config(base, "rbf", options)
        specs += tuned("rbf", variant, cfg, {}, seeds, tune_from=("rbf", "sigma"))
    return specs


SUITES: dict[str, Suite] = {
    s.name: s
    for s in (
        Suite("classification", "Classification accuracy with the same network", build_classification),
        Suite("scarcity", "Classification with scarce training data", build_scarcity),
        Suite("unseen-classes", "Retrieval on unseen classes", build_unseen, uses_unseen_subset=True),
        Suite("cost", "Computational cost", build_cost, uses_unseen_subset=True),
        Suite("ablation", "RBF ablation", build_ablation),
    )
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ConfigError(f"unknown benchmark suite {name!r}; choose one of: {', '.join(SUITES)}")
    return SUITES[name]


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def check_solvers(names: Sequence[str]) -> tuple[str, ...]:
    """Validate solver names against the registry (keeping registry order, no duplicates)."""
    valid = SOLVERS.names()
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise ConfigError(f"unknown solver(s) {', '.join(unknown)}; choose from: {', '.join(valid)}")
    return tuple(n for n in valid if n in set(names))


def build_specs(suite: Suite, preset: Preset, out: Path, solvers: Sequence[str] | None = None,
                seeds: Sequence[int] | None = None) -> list[RunSpec]:
    """The runs of ``suite`` under ``preset``, restricted to ``solvers`` and ``seeds`` when given."""
    chosen = check_solvers(solvers or preset.solvers.get(suite.name) or SOLVERS.names())
    seed_list = tuple(dict.fromkeys(int(s) for s in seeds)) if seeds else preset.seeds
    if any(s < 0 for s in seed_list):
        raise ConfigError(f"seeds must be >= 0, got {', '.join(map(str, seed_list))}")
    specs = suite.build(preset, out, chosen, seed_list)
    if not specs:
        raise ConfigError(f"suite {suite.name!r} has no run for solvers {', '.join(chosen)}")
    ids = [s.run_id for s in specs]
    assert len(ids) == len(set(ids)), "run ids must be unique within a suite"
    return specs


# ---- choices made from stored results -------------------------------------------------


def grid_results(results: Mapping[str, dict], method: str, condition: str) -> list[dict]:
    """The stored grid runs of ``(method, condition)``, in grid order."""
    found = [r for r in results.values() if r["role"] == "grid" and r["method"] == method and r["condition"] == condition]
    return sorted(found, key=lambda r: r["grid_index"])


def choose(grid: Sequence[dict]) -> dict:
    """The grid run with the best validation score (the first one on ties)."""
    if not grid:
        raise ConfigError("no grid result to choose from")
    return max(grid, key=lambda r: (r["best_val"], -r["grid_index"]))


def grid_extension(grid: Sequence[RunSpec], stored: Sequence[Mapping[str, Any]]) -> RunSpec | None:
    """The grid run to add to ``grid`` (its specs so far, every one with its result in ``stored``), or ``None``.

    When a point with the best validation score is at an edge of the values
    tried (the chosen one, or one that ties with it: a tie at an edge does not
    bracket the optimum), the next value outward on the solver's ladder
    (:data:`LADDERS`) is run on the grid's seed, the upper edge first; ``None``
    when no best point is at an edge, the ladder ends there, or the grid is not
    a run of ladder values (the ablation's sigma sweep, a multi-key grid). The
    new run's ``grid_index`` comes after every earlier point, so the final's
    choice (:func:`choose`) still goes to a point tried before it on a tie.
    """
    if not grid:
        return None
    first = grid[0]
    ladder = LADDERS.get(first.solver, ())
    keys = {k for spec in grid for k in (spec.params or {})}
    if len(keys) != 1 or not ladder:
        return None
    (key,) = keys
    tried = [spec.params[key] for spec in grid]
    if any(v not in ladder for v in tried):
        return None
    positions = sorted({ladder.index(v) for v in tried})
    if positions != list(range(positions[0], positions[-1] + 1)):
        return None
    top = max(r["best_val"] for r in stored)
    best = {ladder.index(r["params"][key]) for r in stored if r["best_val"] == top}
    low, high = positions[0], positions[-1]
    step = 1 if high in best and high + 1 < len(ladder) else -1 if low in best and low > 0 else 0
    if step == 0 or len(positions) < 2:
        return None
    at = high if step == 1 else low
    params = {key: ladder[at + step]}
    return replace(first, run_id=_run_id(first.method, first.condition, params_text(params), first.seed), params=params,
                   grid_index=max(spec.grid_index for spec in grid) + 1)


def final_results(results: Mapping[str, dict], method: str, condition: str) -> list[dict]:
    found = [r for r in results.values() if r["role"] == "final" and r["method"] == method and r["condition"] == condition]
    return sorted(found, key=lambda r: r["seed"])


def best_other(results: Mapping[str, dict], condition: str, exclude: Sequence[str]) -> str:
    """The method (other than ``exclude``) with the best mean validation score of its finals at ``condition``."""
    scores: dict[str, list[float]] = {}
    for r in results.values():
        if r["role"] == "final" and r["condition"] == condition and r["method"] not in exclude:
            scores.setdefault(r["method"], []).append(r["best_val"])
    if not scores:
        raise ConfigError(f"no finished run at {condition} to pick the best other solver from")
    return max(scores, key=lambda m: statistics.fmean(scores[m]))


def comparable(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config in today's canonical form, without its paths (which follow the spelling of the --out folder).

    A training config is read back through :class:`TrainConfig`, so a result
    stored before a setting was added (it takes its default) or before a value's
    spelling changed (``plots: false`` -> ``"off"``) still matches the same
    settings; a measurement config is compared as stored. ``eval_batch_size``
    only sets how many rows are embedded at once, so it is left out, except
    under ``bn_mode="matched"``, where the bank's BatchNorm statistics come from
    those batches.
    """
    config = dict(config)
    if "dataset" in config:
        try:
            config = TrainConfig.from_dict(config).to_dict()
        except (ConfigError, TypeError, ValueError):
            pass  # a setting unknown today: compared as stored, so it differs
    ignored = {"out", "data_dir"} | ({"eval_batch_size"} if config.get("bn_mode", "batch") != "matched" else set())
    return {k: v for k, v in config.items() if k not in ignored}


def resolve(spec: RunSpec, results: Mapping[str, dict]) -> tuple[RunSpec, dict | None]:
    """Fill in a spec's late choices from ``results``; also return a stored grid run it repeats exactly.

    A final run whose chosen setting and seed are those of a finished grid run
    is the same run: the runner copies that result instead of training again.
    """
    if spec.pick == "best-other":
        method = best_other(results, dim_text(64), exclude=BEST_OTHER_EXCLUDED)
        cfg = apply_settings(dict(spec.config, solver=method, solver_options={}), FIXED.get(method, {}))
        spec = replace(spec, method=method, config=cfg, tune_from=(method, dim_text(64)), pick=None)
    if spec.params is not None:
        return spec, None
    chosen = choose(grid_results(results, *spec.tune_from))
    spec = replace(spec, params=dict(chosen["params"]))
    same = (chosen["seed"] == spec.seed and chosen["kind"] == spec.kind
            and comparable(spec.train_config("").to_dict()) == comparable(chosen["config"]))
    return spec, chosen if same else None
