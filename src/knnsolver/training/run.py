"""A run's composition: the run files, the :class:`Run` built from a config, what it says it chose, and the
validation score and early-stopping rule that every part of a run (training, resuming, re-evaluating) shares."""
from __future__ import annotations

import math
import os
import random
import shlex
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from knnsolver import distributed
from knnsolver.data import DataBundle, build_data
from knnsolver.data.batches import gathers_on_device
from knnsolver.errors import ConfigError, TrainingWarning
from knnsolver.evaluation import embed_dataset, retrieval_summary, solver_accuracy
from knnsolver.interfaces import EpochContext, Solver
from knnsolver.models import build_model
from knnsolver.models.factory import choose_model
from knnsolver.registry import SOLVERS, options_of
from knnsolver.training.batchnorm import calibrate_batchnorm, kept_running_statistics, mixed_order
from knnsolver.training.config import TrainConfig
from knnsolver.training.progress import Progress

CHECKPOINT, BEST, CONFIG, LOG, SUMMARY = "checkpoint.pt", "best.pt", "config.json", "log.jsonl", "summary.json"


def resume_command(out: Path) -> str:
    """The command that finishes the run in ``out``, wherever the folder now is (its config names the old place)."""
    return f"knnsolver train --config {shlex.quote(str(out / CONFIG))} --out {shlex.quote(str(out))} --resume"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 100_003 + epoch


@dataclass
class Run:
    """Everything a run is made of, built from a config.

    ``bn_current`` says whether the BatchNorm running statistics were
    re-estimated for the current weights (a re-estimation is skipped then: it
    would give the same values). ``train_embeddings`` keeps the training-set
    embeddings an evaluation computed, for a bank refresh before the next
    training step (the same values; single process only).
    """

    config: TrainConfig
    data: DataBundle
    model: nn.Module
    solver: Solver
    bn_current: bool = False
    train_embeddings: tuple[Tensor, Tensor] | None = None
    solver_options: dict[str, Any] | None = None  # every option the solver was built with, defaults included
    folder: Path | None = None  # where rank 0 writes the run's files (None: config.out)
    model_name: str = ""  # the network built (``auto`` resolved), and why it was chosen
    model_reason: str = ""
    progress: Progress = field(default_factory=lambda: Progress(enabled=False))
    refreshes: int = 0  # bank refreshes so far (embeddings of the training set taken for the solver)
    test_embeddings: tuple[Tensor, Tensor] | None = None  # the last test evaluation's, in the solver's space

    @property
    def bn_mode(self) -> str:
        return self.config.bn_mode

    @property
    def device(self) -> torch.device:
        return self.config.torch_device

    def embed(self, dataset, rows: Sequence[int] | None = None, batchnorm_batch_stats: bool = False
              ) -> tuple[Tensor, Tensor]:
        return embed_dataset(self.model, dataset, self.config.eval_rows, self.device, rows, batchnorm_batch_stats,
                             self.config.num_workers)

    def embed_all(self, dataset, batchnorm_batch_stats: bool = False) -> tuple[Tensor, Tensor]:
        """:meth:`embed` of every row of ``dataset``, each process embedding its shard (collective).

        With ``batchnorm_batch_stats`` the rows are batched in :func:`mixed_order` (and returned in
        dataset order), so each batch's statistics are the data's, not those of a stretch of one class.
        """
        order = mixed_order(range(len(dataset))) if batchnorm_batch_stats else range(len(dataset))
        if distributed.is_distributed():
            shard = distributed.shard(len(dataset))
            emb, labels = self.embed(dataset, order[shard.start:shard.stop], batchnorm_batch_stats)
            emb, labels = distributed.all_gather_rows(emb), distributed.all_gather_rows(labels)
        else:
            emb, labels = self.embed(dataset, order, batchnorm_batch_stats)
        if not batchnorm_batch_stats:
            return emb, labels
        in_dataset_order = torch.argsort(torch.as_tensor(order, device=emb.device))
        return emb[in_dataset_order], labels[in_dataset_order]

    def calibrate(self, force: bool = False) -> None:
        """Re-estimate BatchNorm statistics for the current weights (precise BN), unless already current.

        Runs when ``config.precise_bn`` is set, or when ``force`` is (the frozen
        mode's epoch start, and the very first pass of an untrained network).
        """
        if self.bn_current or not (self.config.precise_bn or force):
            return
        cfg = self.config
        calibrate_batchnorm(self.model, self.data.train_eval, cfg.batch_size, self.device, cfg.precise_bn_rows,
                            cfg.num_workers)
        self.bn_current, self.train_embeddings = True, None

    def bank_embeddings(self) -> tuple[Tensor, Tensor]:
        """Training-set embeddings for a bank refresh, after re-estimating BatchNorm (collective);
        those of the evaluation just before, when no training step came between."""
        self.refreshes += 1
        self.progress.say(f"bank refresh: embedding {len(self.data.train_eval):,} training rows ...")
        self.calibrate()
        if self.bn_mode == "matched":
            with kept_running_statistics(self.model):
                return self.embed_all(self.data.train_eval, batchnorm_batch_stats=True)
        if self.train_embeddings is not None and not distributed.is_distributed():
            return self.train_embeddings
        return self.embed_all(self.data.train_eval)

    def context(self, epoch: int) -> EpochContext:
        return EpochContext(epoch, self.bank_embeddings, len(self.data.train_eval), self.device, self.config.epochs)

    def evaluate(self, dataset, prefix: str) -> dict[str, float]:
        """Accuracy (standard split) or retrieval metrics (disjoint split) on ``dataset``.

        BatchNorm statistics are re-estimated first (``precise_bn``); retrieval
        ranks the embeddings in the solver's own space (``Solver.transform``).
        """
        self.calibrate()
        emb, labels = self.embed(dataset)
        with torch.no_grad():
            space = self.solver.transform(emb)
        if dataset is self.data.test:
            self.test_embeddings = space, labels  # for the plots
        if self.config.split == "standard":
            train_emb = train_labels = None
            if self.solver.predicts_by_knn:
                train_emb, train_labels = self.train_embeddings = self.embed(self.data.train_eval)
            return {f"{prefix}accuracy": solver_accuracy(self.solver, train_emb, train_labels, emb, labels)}
        emb = space
        query = self.data.test_query if dataset is self.data.test else None  # In-Shop: queries against a gallery
        metrics = retrieval_summary(emb, labels, with_nmi=prefix == "test_", seed=self.config.seed, query_mask=query,
                                    ks=self.data.recall_ks)
        return {f"{prefix}{k}" if prefix != "test_" else k: v for k, v in metrics.items()}

    def load_weights(self, state: dict[str, Any]) -> None:
        """Load a checkpoint's network and solver (their BatchNorm statistics are then not known to be current)."""
        self.model.load_state_dict(state["model"])
        self.solver.load_state_dict(state["solver"])
        self.bn_current, self.train_embeddings = False, None


def build_run(config: TrainConfig, model: nn.Module | None = None, progress: Progress | None = None,
              solver_options: dict[str, Any] | None = None) -> Run:
    """Build data, backbone and solver for ``config`` (``model`` overrides the named backbone).

    The solver gets its paper's protocol values for the split and the network's
    start (:meth:`Solver.protocol_defaults`, e.g. fixed RBF weights on the disjoint
    split, a bank refresh every epoch from random weights) wherever
    ``config.solver_options`` does not set them (the network counts as pretrained
    with ``config.pretrained``, a network given as ``model`` included);
    ``solver_options``, where given (a resumed run's recorded ones), replace all of that. ``progress`` prints
    the loading phase and keeps its time (default: silent).
    """
    config.validate()
    progress = progress or Progress(enabled=False)
    seed_everything(config.seed)
    where = f" from {config.data_dir}" if config.data_dir else ""
    with progress.phase("startup", f"loading {config.dataset}{where}"):
        data = build_data(
            config.dataset, split=config.split, val_fraction=config.val_fraction, max_per_class=config.max_per_class,
            seed=config.seed, data_dir=config.data_dir, augment=config.augment, image_size=config.image_size,
            resize_size=config.resize_size, image_channels=config.image_channels,
            image_cache_mb=config.image_cache_mb, train_classes=config.train_classes, val_classes=config.val_classes,
        )
    classes = int(torch.unique(data.train_labels).numel())
    if classes < 2:
        raise ConfigError(
            f"the training set of {config.dataset!r} holds {classes} class; nothing can be learnt and accuracy would be "
            "trivially 1.0; use data with at least 2 classes (check --max-per-class and the class folders)"
        )
    model_name, model_reason = config.model, "asked for"
    if model is None:
        if config.model == "auto":
            model_name, model_reason = choose_model(data.input_shape, len(data.train))
            model_reason = f"auto: {model_reason}"
        model = build_model(config.model, data.input_shape, config.embedding_dim, config.dropout, config.width,
                            config.pretrained, num_train=len(data.train))
    else:
        model_name, model_reason = type(model).__name__, "given"
    cls = SOLVERS.get(config.solver)
    options = dict(solver_options) if solver_options is not None else configured_options(config)
    solver = SOLVERS.build(
        config.solver, embedding_dim=config.embedding_dim, num_classes=data.num_classes, num_train=len(data.train),
        **options,
    )
    effective = {o.name: o.default for o in options_of(cls, skip=SOLVERS.supplied)}
    device = config.torch_device
    if device.type == "cuda" and len(data.input_shape) == 3:
        model = model.to(memory_format=torch.channels_last)  # faster convolutions on GPUs
    return Run(config, data, model.to(device), solver.to(device), solver_options={**effective, **options},
               model_name=model_name, model_reason=model_reason, progress=progress)


def configured_options(config: TrainConfig, under: dict[str, Any] | None = None) -> dict[str, Any]:
    """The options a solver is built with from ``config``: its protocol values for the split and the network's
    start (:meth:`Solver.protocol_defaults`), then ``under``, then ``config.solver_options``."""
    protocol = SOLVERS.get(config.solver).protocol_defaults(config.split, pretrained=bool(config.pretrained))
    return {**protocol, **(under or {}), **config.solver_options}


def describe_run(run: Run) -> list[str]:
    """The lines a run starts with: data, input, network, solver, device and threads (what was chosen, and why)."""
    cfg, data = run.config, run.data
    val = len(data.val) if data.val is not None else 0
    classes = (f"{data.num_classes} classes" if cfg.split == "standard"
               else f"{data.num_classes} training classes, "
                    + (f"{len(data.val_class_names)} other validation classes, " if data.val_class_names else "")
                    + f"{len(data.test_class_names)} unseen test classes")
    notes = f" ({data.notes})" if data.notes else ""
    params = sum(p.numel() for p in run.model.parameters())
    options = ", ".join(f"{k}={v}" for k, v in (run.solver_options or {}).items())
    env_threads = os.environ.get("OMP_NUM_THREADS")
    threads = f"{torch.get_num_threads()} torch threads" + (
        f" (OMP_NUM_THREADS={env_threads})" if env_threads else " (set OMP_NUM_THREADS to change; see README)")
    if cfg.num_workers:
        loading = f"{cfg.num_workers} loader workers"
    elif gathers_on_device(data.train):
        loading = "batches gathered on the device"
    else:  # file-backed or augmented: decoded per item; workers are asked for, not chosen (TrainConfig.num_workers)
        loading = "loading in the main process (--num-workers N decodes in N worker processes)"
    lines = [
        f"data: {cfg.dataset}, {cfg.split} split: {len(data.train):,} train / {val:,} val / {len(data.test):,} test rows, "
        f"{classes}",
        f"input: {'x'.join(map(str, data.input_shape))}{notes}",
        f"network: {run.model_name} ({run.model_reason}), {params:,} parameters, {cfg.embedding_dim}-d embedding",
        f"solver: {cfg.solver} ({options})" if options else f"solver: {cfg.solver}",
        f"device: {run.device}, {threads}, {loading}",
    ]
    note = run.solver.schedule_note(cfg.epochs)
    return lines + ([note] if note else [])


def select_key(config: TrainConfig) -> str:
    """The validation score that chooses the best epoch: accuracy, or MAP@R on the disjoint split (Musgrave et
    al. 2020's metric: it scores the whole ranking, where Precision@1 is flat and ties settings apart)."""
    return "val_accuracy" if config.split == "standard" else "val_map_at_r"


def passes_without_improvement(history: list[dict[str, Any]], key: str) -> int:
    """Validation passes in ``history`` since the last one that raised the best ``key`` score (the rise that
    keeps a new best checkpoint; a NaN score never rises)."""
    best, since = -math.inf, 0
    for row in history:
        score = row.get(key)
        if score is None:
            continue
        best, since = (score, 0) if score > best else (best, since + 1)
    return since


def stopped_on_patience(config: TrainConfig, history: list[dict[str, Any]]) -> bool:
    """Whether ``config.patience`` validation passes in a row of ``history`` have not improved the best score."""
    return 0 < config.patience <= passes_without_improvement(history, select_key(config))


def warn_if_data_changed(recorded: dict[str, Any] | None, current: dict[str, Any], out: str, consequence: str) -> None:
    """Warn when the run's recorded data fingerprint differs from the data loaded now (runs before it: no check)."""
    if recorded is None or recorded == current:
        return
    rows = lambda fp: ", ".join(f"{k} {fp.get(k)}" for k in ("train", "val", "test"))  # noqa: E731
    warnings.warn(
        f"the data of the run in {out} changed since it was trained (rows then: {rows(recorded)}; now: "
        f"{rows(current)}; content hash {recorded.get('hash')} -> {current['hash']}); {consequence}",
        TrainingWarning, stacklevel=3,
    )


def unrecorded_options(config: TrainConfig) -> dict[str, Any]:
    """Solver options of a run saved before they were recorded: the RBF solver's former free-scale embedding."""
    return {"normalize": False} if config.solver == "rbf" else {}
