"""The trainer every solver plugs into.

One run writes to ``out/``:

* ``config.json``   the full configuration;
* ``checkpoint.pt`` the last finished epoch (model, solver, optimizer, history), written atomically;
* ``best.pt``       model and solver at the best validation score;
* ``log.jsonl``     one line per epoch (loss, throughput, validation metrics, solver diagnostics, seconds);
* ``summary.json``  final test metrics of the best checkpoint, the data's fingerprint, what was
  run (network, parameters, device, threads, geometry) and how long each phase took;
* ``*.png``         loss / metric curves, and with ``plots="all"`` a t-SNE of test embeddings.

On screen (stderr, rank 0; :mod:`knnsolver.training.progress`) a run first says what it
chose (data, input shape, network and parameter count, solver settings, device and threads),
then prints a line before and after each long phase (loading, BatchNorm warm-up, bank refresh,
test evaluation, plots) and one line per epoch that stays: loss, validation score(s), time and,
for the RBF solver, sigma and the mean RBF value.

The folder is locked for the run's lifetime, and ``overwrite`` trains into a
fresh folder swapped in at the first checkpoint (:mod:`knnsolver.training.runfolder`),
so a finished run is never mixed with, or lost to, another.

Determinism: the global RNG is reseeded from ``(seed, epoch)`` at every epoch
start and the sampler is seeded the same way, so a resumed run replays exactly
the epochs an uninterrupted run would have, and ends with the same result.

Distributed data parallel (launched with ``torchrun``; see :mod:`knnsolver.distributed`):

* every process builds the same data, network and solver; both are wrapped in
  ``DistributedDataParallel`` (gradients averaged; the solver only if it has
  trainable parameters, and without broadcasting its buffers, which the solvers
  keep equal themselves: the RBF bank is refreshed from embeddings gathered from
  every process, and its online update gathers the batch);
* each epoch's single-process batch plan is dealt round-robin to the processes,
  so ``batch_size`` is per process and an epoch visits every training row once,
  less a dropped remainder of fewer batches than processes (DDP weighs a short
  last batch like a full one); step counters (the centralized solver's
  ``decorrelate_every``) count this process's steps;
* embedding the training set for a bank refresh (and the bank's kNN graph) is
  sharded over the processes and all-gathered; BatchNorm statistics are rank 0's
  (DDP's buffer broadcast, and a last sync at the end of each epoch);
* rank 0 alone validates, writes every file and shows progress; the others end
  with the same best weights and return the same summary. Resuming loads the
  checkpoint on rank 0 and broadcasts it, so only rank 0 needs the run folder;
* every process must be given the same settings (checked at the start). An
  error in rank 0's own work is handed to every process; an error on another
  process ends the run through the launcher (torchrun stops the group).
"""
from __future__ import annotations

import gc
import inspect
import math
import pickle
import random
import time
import warnings
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler
from tqdm.auto import tqdm

from knnsolver import distributed
from knnsolver.data import DataBundle, build_data, data_fingerprint
from knnsolver.data.batches import gathers_on_device, iterate_batches
from knnsolver.data.sampler import ClassBalancedBatchSampler
from knnsolver.errors import ConfigError, DataError, DivergenceError, TrainingWarning
from knnsolver.hostsync import avoid_host_sync
from knnsolver.evaluation import embed_dataset, retrieval_summary, solver_accuracy
from knnsolver.interfaces import EpochContext, Solver
from knnsolver.models import build_model
from knnsolver.models.factory import choose_model
from knnsolver.registry import SOLVERS, options_of
from knnsolver.training.batchnorm import batchnorm_layers, calibrate_batchnorm, freeze_batchnorm, kept_running_statistics
from knnsolver.training.checkpoint import load_checkpoint, save_checkpoint, write_json, write_jsonl
from knnsolver.training.config import PRECISIONS, TrainConfig, load_config_file
from knnsolver.training.lr_groups import parameter_groups
from knnsolver.training.progress import Progress
from knnsolver.training.runfolder import RunFolder
from knnsolver.training.schedule import lr_factor

CHECKPOINT, BEST, CONFIG, LOG, SUMMARY = "checkpoint.pt", "best.pt", "config.json", "log.jsonl", "summary.json"
# A run whose epoch loss exceeds this multiple of its first epoch's is flagged as diverged; the first epoch itself,
# over FIRST_EPOCH_FACTOR times the run's first step's (early losses may rise: CRC's dictionary of untrained
# embeddings gave a first step of 0.14 and a first epoch of 6.9 on digits, then 0.08).
DIVERGENCE_FACTOR = 10.0
FIRST_EPOCH_FACTOR = 100.0
# On a GPU the step's non-finite flags and loss are read back every this many steps, not every step.
_GPU_READ_EVERY = 32


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
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

    def embed(self, dataset, rows: range | None = None, batchnorm_batch_stats: bool = False) -> tuple[Tensor, Tensor]:
        return embed_dataset(self.model, dataset, self.config.eval_rows, self.device, rows, batchnorm_batch_stats,
                             self.config.num_workers)

    def embed_all(self, dataset, batchnorm_batch_stats: bool = False) -> tuple[Tensor, Tensor]:
        """:meth:`embed` of every row of ``dataset``, each process embedding its shard (collective)."""
        if not distributed.is_distributed():
            return self.embed(dataset, batchnorm_batch_stats=batchnorm_batch_stats)
        emb, labels = self.embed(dataset, distributed.shard(len(dataset)), batchnorm_batch_stats)
        return distributed.all_gather_rows(emb), distributed.all_gather_rows(labels)

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
    options = dict(solver_options) if solver_options is not None else _configured_options(config)
    solver = SOLVERS.build(
        config.solver, embedding_dim=config.embedding_dim, num_classes=data.num_classes, num_train=len(data.train),
        **options,
    )
    effective = {o.name: o.default for o in options_of(cls, skip=("embedding_dim", "num_classes", "num_train"))}
    device = config.torch_device
    if device.type == "cuda" and len(data.input_shape) == 3:
        model = model.to(memory_format=torch.channels_last)  # faster convolutions on GPUs
    return Run(config, data, model.to(device), solver.to(device), solver_options={**effective, **options},
               model_name=model_name, model_reason=model_reason, progress=progress)


def _configured_options(config: TrainConfig, under: dict[str, Any] | None = None) -> dict[str, Any]:
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


def _fused(device: torch.device) -> bool:
    """Whether the optimiser runs fused (one kernel per step, its step counts on the device, no host read):
    on the accelerator paths; the CPU keeps the default implementation, so CPU results stay as they were."""
    return avoid_host_sync(device)


def _optimizer(config: TrainConfig, params: list[dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    fused = {"fused": True} if _fused(device) else {}
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay, **fused)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=config.weight_decay, **fused)


def samples_per_class(batch_size: int, num_classes: int, requested: int = 0) -> int:
    """The class-balanced sampler's m: ``requested`` if set, else the smallest m >= 4
    dividing ``batch_size`` into 2 to ``num_classes`` classes per batch."""
    if requested:
        return requested
    for m in range(4, batch_size // 2 + 1):
        if batch_size % m == 0 and batch_size // m <= num_classes:
            return m
    raise ConfigError(
        f"batch_size {batch_size} cannot be split into equal groups of >= 4 samples from 2 to {num_classes} "
        f"classes; choose a batch size with such a divisor or set samples_per_class"
    )


def _batches(run: Run, epoch: int) -> list[list[int]]:
    """Row-index batches for one epoch (all processes together).

    Without ``epoch_steps`` an epoch is one pass (:func:`_pass`). With it, the
    passes form one stream (pass ``q`` is seeded by ``q``, as epoch ``q`` is
    without it) cut into epochs of ``epoch_steps`` batches per process
    (``epoch_steps * world_size`` in all, dealt out by :func:`_process_batches`):
    epoch ``e`` is the ``e``-th such slice of the stream, a pure function of
    ``e``, so a resumed run draws what the straight run did.
    """
    if run.config.epoch_steps is None:
        return _pass(run, epoch)
    steps = run.config.epoch_steps * distributed.world_size()
    first = _pass(run, 0)
    per_pass = len(first)
    if per_pass == 0:
        return first
    start = epoch * steps
    q, offset = divmod(start, per_pass)
    out: list[list[int]] = []
    while len(out) < steps:
        batches = first if q == 0 else _pass(run, q)
        out += batches[offset : offset + steps - len(out)]
        q, offset = q + 1, 0
    return out


def _pass(run: Run, q: int) -> list[list[int]]:
    """Row-index batches of pass ``q`` over the training set: class-balanced where needed, else a seeded shuffle."""
    cfg = run.config
    balanced = run.solver.needs_balanced_sampler if cfg.balanced is None else cfg.balanced
    if balanced:
        m = samples_per_class(cfg.batch_size, run.data.num_classes, cfg.samples_per_class)
        sampler = ClassBalancedBatchSampler(run.data.train_labels, cfg.batch_size, m, seed=cfg.seed)
        sampler.set_epoch(q)
        return list(sampler)
    n = len(run.data.train)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(cfg.seed, q))).tolist()
    # A last batch of one sample would break BatchNorm in training mode: fold it away.
    return list(BatchSampler(order, cfg.batch_size, drop_last=n % cfg.batch_size == 1))


def _process_batches(run: Run, epoch: int) -> list[list[int]]:
    """This process's share of the epoch's batches: every ``world_size``-th, from its rank."""
    batches = _batches(run, epoch)
    size = distributed.world_size()
    if size == 1:
        return batches
    if len(batches) < size:
        raise ConfigError(
            f"an epoch has {len(batches)} batches, fewer than the {size} processes; lower batch_size or use fewer processes"
        )
    return batches[distributed.rank() : len(batches) - len(batches) % size : size]


class LossStep(nn.Module):
    """``solver(model(x), y, rows)`` as one call: what one training step differentiates.

    The network runs under autocast when ``autocast_dtype`` is given (mixed
    precision); its embeddings are cast to fp32 before the solver, whose maths
    (distances, log-sum-exps, ridge solves) stays in fp32. Returns the loss and
    a 0-d bool tensor saying whether every embedding was finite (checked on the
    device, read with the step's other flags).
    """

    def __init__(self, model: nn.Module, solver: Solver, autocast_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.model, self.solver = model, solver
        self.autocast_dtype = autocast_dtype

    def forward(self, x: Tensor, labels: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(x.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            embeddings = self.model(x)
        embeddings = embeddings.float()
        return self.solver(embeddings, labels, rows), torch.isfinite(embeddings.detach()).all()


# Not broadcasting a module's buffers at each forward: ``forward_sync_buffers`` from torch 2.13 on.
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
                   else {"broadcast_buffers": False})


def _loss_step(run: Run) -> nn.Module:
    """The training step: network and solver wrapped for data parallelism when distributed,
    the network compiled with ``config.compile`` in ``config.compile_mode`` (and on accelerators the solver's loss
    maths), autocast with ``config.precision``."""
    model, solver = run.model, run.solver
    if distributed.is_distributed():
        ids = [torch.cuda.current_device()] if run.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
        if any(p.requires_grad for p in solver.parameters()):
            # The solvers keep their buffers (the RBF bank) equal on every process themselves.
            solver = DistributedDataParallel(solver, device_ids=ids, **_NO_BUFFER_SYNC)
    if run.config.compile:
        model = torch.compile(model, **({} if run.config.compile_mode == "default" else {"mode": run.config.compile_mode}))
        if run.device.type != "cpu":  # on the CPU the compiled loss maths measured slower (benchmarks/README.md)
            run.solver.compile_loss()
    return LossStep(model, solver, PRECISIONS[run.config.precision])


def _select_key(config: TrainConfig) -> str:
    """The validation score that chooses the best epoch: accuracy, or MAP@R on the disjoint split (Musgrave et
    al. 2020's metric: it scores the whole ranking, where Precision@1 is flat and ties settings apart)."""
    return "val_accuracy" if config.split == "standard" else "val_map_at_r"


# Settings a resumed run may change: the epoch count, early stopping's patience, the progress bar, and where the
# folder lives (it may be moved).
_RESUMABLE_CHANGES = ("epochs", "patience", "progress", "out")


def _open_run(config: TrainConfig, resume: bool, overwrite: bool, folder: RunFolder) -> dict[str, Any] | None:
    """Lock the run folder, check it, and load the checkpoint to resume from (rank 0's view of the files).

    An overwrite of an existing run sends the new files to a replacement folder
    (:meth:`RunFolder.start_replacement`), so the old run stays whole until the
    new one has its first checkpoint.
    """
    out = Path(config.out)
    ckpt_path = out / CHECKPOINT
    if resume and not ckpt_path.is_file():
        raise ConfigError(f"cannot resume: {ckpt_path} does not exist; start the run without --resume")
    folder.open()
    if not resume:
        if ckpt_path.exists():
            if not overwrite:
                raise ConfigError(f"{out} already holds a run; pass --resume to continue it or --overwrite to replace it")
            folder.start_replacement()
        return None
    state = load_checkpoint(ckpt_path)
    try:
        saved = TrainConfig.from_dict(state["config"]).to_dict()
    except (KeyError, ConfigError) as err:
        raise DataError(f"cannot resume {out}: its checkpoint holds no valid configuration ({err})") from None
    wanted = config.to_dict()
    differ = sorted(k for k in wanted if k not in _RESUMABLE_CHANGES and saved.get(k) != wanted[k])
    if differ:
        changes = "; ".join(f"{k}: saved {saved.get(k)!r}, now {wanted[k]!r}" for k in differ)
        raise ConfigError(f"cannot resume {out}: settings other than epochs and patience differ from the saved run's ({changes}); "
                          "resume with the saved settings, or start a new run with another --out")
    if "solver_options" not in state:  # checkpoints before they were kept there: best.pt's, else as load_saved
        recorded = load_checkpoint(out / BEST).get("solver_options") if (out / BEST).is_file() else None
        state["solver_options"] = (recorded if recorded is not None
                                   else _configured_options(config, under=_unrecorded_options(config)))
    trained = int(state["epoch"]) + 1
    if config.epochs < trained:
        raise ConfigError(f"cannot resume {out} with epochs={config.epochs}: it has already trained {trained} epochs; "
                          f"resume with --epochs {trained} or more, or start a new run with another --out")
    return state


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False, model: nn.Module | None = None) -> dict[str, Any]:
    """Train, select the best epoch on validation, evaluate it on test; return the summary.

    ``resume`` continues the run in ``config.out`` from its last checkpoint (the
    epoch count may be raised). Without ``resume`` an existing run folder is
    refused unless ``overwrite`` is set, so finished work is never lost.
    Under ``torchrun`` (``WORLD_SIZE`` > 1) the run is data-parallel over the
    processes (module docstring) and every process returns the summary.
    """
    started = distributed.init_from_env(str(config.torch_device))
    try:
        return _train(config, resume, overwrite, model)
    finally:
        if started:
            # DistributedDataParallel's hooks form reference cycles, so its reducer, which holds the process
            # group, would otherwise be freed by the cyclic collector at interpreter exit, after the group is
            # torn down, and a process could abort there ("terminate called without an active exception").
            gc.collect()
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, resume: bool, overwrite: bool, model: nn.Module | None) -> dict[str, Any]:
    config.validate()  # every value typed and in range before any file is touched
    _check_same_config(config)
    folder = RunFolder(Path(config.out))
    try:
        return _train_in(config, resume, overwrite, model, folder)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(_interrupted_message(config, folder)) from None
    finally:
        _on_main(folder.close)


def _interrupted_message(config: TrainConfig, folder: RunFolder) -> str:
    """What an interrupted training left behind, and what to do next."""
    if folder.pending:
        return f"the new run was discarded before its first checkpoint; the earlier run in {config.out} is unchanged"
    if (Path(config.out) / CHECKPOINT).is_file():
        return f"the last finished epoch is saved in {config.out}; continue with --resume"
    return "no epoch had finished, so nothing was saved; start the run again without --resume"


def _train_in(config: TrainConfig, resume: bool, overwrite: bool, model: nn.Module | None,
              folder: RunFolder) -> dict[str, Any]:
    state = _on_main(lambda: _open_run(config, resume, overwrite, folder))
    if not distributed.is_main():
        config = replace(config, progress=False)
    progress = Progress(enabled=distributed.is_main())
    # a resumed run keeps the solver options it was built with (a default changed since does not reach it)
    run = build_run(config, model, progress, solver_options=None if state is None else state.get("solver_options"))
    run.folder = folder.path
    if config.patience and run.data.val is None:
        raise ConfigError(f"patience={config.patience} stops on validation, but this run has none "
                          f"(val_fraction={config.val_fraction}); set val_fraction above 0, or patience to 0")
    for line in describe_run(run):
        progress.say(line)
    fingerprint = _on_main(lambda: data_fingerprint(run.data))
    optimizer = _optimizer(config, parameter_groups(run.model, run.solver, config.lr, config.backbone_lr), run.device)
    scaler = torch.amp.GradScaler(run.device.type, enabled=config.precision == "fp16")
    history: list[dict[str, Any]] = []
    best_score, start_epoch = -math.inf, 0
    if state is not None:
        run.load_weights(state)
        run.bn_current = state.get("bn_current", False)  # statistics re-estimated before the save: keep them
        optimizer.load_state_dict(state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        history, best_score, start_epoch = state["history"], state["best_score"], state["epoch"] + 1
        progress.say(f"resuming {config.out}: {start_epoch} of {config.epochs} epochs trained")
        if distributed.is_main():
            _warn_if_data_changed(state.get("data"), fingerprint, config.out, "resuming trains on the current data")
    else:
        # An untrained network's running statistics are BatchNorm's defaults (mean 0, variance 1),
        # which can put eval-mode embeddings (an RBF bank and its sigma) on a 100x smaller scale.
        if batchnorm_layers(run.model):
            rows = min(len(run.data.train_eval), config.precise_bn_rows)
            with progress.phase("batchnorm_warmup", f"BatchNorm warm-up on {rows:,} training rows"):
                run.calibrate(force=True)
    _on_main(lambda: write_json(config.to_dict(), folder.path / CONFIG))
    step = _loss_step(run)

    for epoch in range(start_epoch, config.epochs):
        if _on_main(lambda: _stops_early(run, history)):  # checked first, so a resumed run that had stopped stays so
            break
        # Rank 0 keeps the single-process seed; the others draw their own dropout and augmentation.
        torch.manual_seed(_epoch_seed(config.seed, epoch) + 7_919 * distributed.rank())
        row = _train_epoch(run, step, optimizer, scaler, epoch, run.context(epoch), history)

        def end_epoch() -> tuple[float, bool]:
            score = _end_epoch(run, optimizer, scaler, epoch, row, history, best_score, fingerprint)
            folder.commit()  # an overwrite's first checkpoint exists: it replaces the old run now
            run.folder = folder.path
            return score, run.bn_current

        best_score, bn_current = _on_main(end_epoch)
        distributed.sync_buffers(run.model)  # rank 0 may have re-estimated BatchNorm statistics
        run.bn_current = bn_current
    if distributed.is_distributed():  # every process ends with the best weights, as rank 0 does in finish()
        run.load_weights(_on_main(lambda: load_checkpoint(folder.path / BEST)))
    return _on_main(lambda: finish(run, folder.path, fingerprint))


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
    return 0 < config.patience <= passes_without_improvement(history, _select_key(config))


def _stops_early(run: Run, history: list[dict[str, Any]]) -> bool:
    """:func:`stopped_on_patience`, saying so when it is."""
    if not stopped_on_patience(run.config, history):
        return False
    key, patience = _select_key(run.config), run.config.patience
    scored = [row for row in history if row.get(key) is not None and not math.isnan(row[key])]
    best = f"best epoch {max(scored, key=lambda row: row[key])['epoch']}" if scored else "no finite score"
    run.progress.say(f"early stop after epoch {history[-1]['epoch']}: {patience} validation passes without a new "
                     f"best ({best}); the rest of the {run.config.epochs} epochs is skipped")
    return True


def _warn_if_data_changed(recorded: dict[str, Any] | None, current: dict[str, Any], out: str, consequence: str) -> None:
    """Warn when the run's recorded data fingerprint differs from the data loaded now (runs before it: no check)."""
    if recorded is None or recorded == current:
        return
    rows = lambda fp: ", ".join(f"{k} {fp.get(k)}" for k in ("train", "val", "test"))  # noqa: E731
    warnings.warn(
        f"the data of the run in {out} changed since it was trained (rows then: {rows(recorded)}; now: "
        f"{rows(current)}; content hash {recorded.get('hash')} -> {current['hash']}); {consequence}",
        TrainingWarning, stacklevel=3,
    )


def _check_same_config(config: TrainConfig) -> None:
    """Refuse, on every process, a launch whose processes were given different settings
    (the data folder and run folder may differ between machines)."""
    if not distributed.is_distributed():
        return
    own = {**config.to_dict(), "progress": None, "data_dir": None, "out": None}
    differs = distributed.broadcast_object(own) != own
    if distributed.all_reduce_sum(torch.tensor([float(differs)], device=config.torch_device)).item():
        raise ConfigError("the processes were launched with different settings; give every process the same flags")


def _on_main(work: Callable[[], Any]) -> Any:
    """Run ``work`` on rank 0 and hand its result, or the error it raised, to every process.

    So a failure on rank 0 (a refused run folder, a full disk) stops every
    process at once instead of leaving them waiting in the next collective.
    """
    if not distributed.is_distributed():
        return work()
    result: tuple[str, Any] = ("ok", None)
    failure: Exception | None = None
    if distributed.is_main():
        try:
            result = ("ok", work())
        except Exception as err:  # re-raised on every process below
            failure = err
            result = ("error", err if _picklable(err) else RuntimeError(f"rank 0 failed: {type(err).__name__}: {err}"))
    status, value = distributed.broadcast_object(result)
    if failure is not None:
        raise failure
    if status == "error":
        raise value
    return value


def _picklable(obj: Any) -> bool:
    try:
        pickle.loads(pickle.dumps(obj))
    except Exception:
        return False
    return True


def _end_epoch(run: Run, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, epoch: int, row: dict[str, Any],
               history: list[dict[str, Any]], best_score: float, fingerprint: dict[str, Any] | None = None) -> float:
    """Validate, keep the best checkpoint, append to the log, save the resumable checkpoint; return the best score."""
    config, out = run.config, run.folder or Path(run.config.out)
    is_eval_epoch = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
    if is_eval_epoch and run.data.val is not None:
        start = time.perf_counter()
        row.update(run.evaluate(run.data.val, "val_"))
        row["seconds_val"] = time.perf_counter() - start
        run.progress.add("validation", row["seconds_val"])
    history.append(row)
    score = row.get(_select_key(config))
    if run.data.val is None and epoch + 1 == config.epochs:
        # No validation split: the last epoch is the one kept, also when a resume raised the epoch count.
        score = float(epoch + 1)
    improved = score is not None and score > best_score
    run.progress.say(epoch_line(row, config, improved and run.data.val is not None))
    if improved:
        best_score = score
        run.calibrate()  # best.pt holds the statistics its evaluation used (no-op after validation)
        save_checkpoint({"model": run.model.state_dict(), "solver": run.solver.state_dict(), "epoch": epoch,
                         "solver_options": run.solver_options}, out / BEST)
    write_jsonl(history, out / LOG)
    save_checkpoint(
        {"config": config.to_dict(), "model": run.model.state_dict(), "solver": run.solver.state_dict(),
         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "epoch": epoch, "history": history,
         "solver_options": run.solver_options,
         "best_score": best_score, "bn_current": run.bn_current, "data": fingerprint},
        out / CHECKPOINT,
    )
    return best_score


# The validation scores an epoch line shows (when logged), after the one that selects the best epoch.
_SHOWN_VAL = ("val_map_at_r",)


def epoch_line(row: dict[str, Any], config: TrainConfig, best: bool = False) -> str:
    """One epoch in one line: loss, validation score(s), time, and the RBF solver's sigma and mean RBF value."""
    parts = [f"loss {row['loss']:.4f}"]
    for key in dict.fromkeys((_select_key(config), *_SHOWN_VAL)):  # once each (disjoint splits select by MAP@R)
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:.4f}")
    seconds = row["seconds"] + row.get("seconds_refresh", 0.0) + row.get("seconds_val", 0.0)
    split = [f"train {row['seconds']:.1f}"] + [f"{name} {row[k]:.1f}" for name, k in
                                              (("refresh", "seconds_refresh"), ("val", "seconds_val")) if k in row]
    parts.append(f"{seconds:.1f} s ({', '.join(split)}; {row['samples_per_s']:.0f} rows/s)")
    if "solver_sigma" in row:
        parts.append(f"sigma {row['solver_sigma']:.4g}, mean RBF {row.get('solver_mean_rbf_value', math.nan):.4g}")
    return f"epoch {row['epoch']}/{config.epochs}: " + ", ".join(parts) + (" (best so far)" if best else "")


def _train_epoch(run: Run, step: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 epoch: int, ctx: EpochContext, history: list[dict[str, Any]]) -> dict[str, Any]:
    """One epoch of this process's batches; the logged loss and throughput cover all processes.

    Every step sets the scheduled learning rate, clips gradients when asked,
    and flags (on the device, summed over processes) a non-finite loss,
    embedding or gradient norm. On the CPU the flags are read before every
    optimiser step, so a diverging run stops with weights that were never NaN;
    on a GPU they are read every :data:`_GPU_READ_EVERY` steps (no host
    synchronisation per step) and a flagged step moves nothing (the fused
    optimiser skips it on the device; otherwise its gradients are zeroed), so
    the weights stay finite until the run stops. With fp16 the
    gradient scaler skips steps with non-finite gradients itself, so only the
    loss and the embeddings are guarded there.
    """
    cfg, dev = run.config, run.device
    if run.bn_mode == "frozen":
        run.calibrate(force=True)  # the statistics this epoch's training forward (and any refresh) uses
    refreshes, start = run.refreshes, time.perf_counter()
    run.solver.on_epoch_start(ctx)
    refresh_seconds = time.perf_counter() - start if run.refreshes > refreshes else None
    if refresh_seconds is not None:
        run.progress.add("bank_refresh", refresh_seconds)
        run.progress.say(f"bank refresh before epoch {epoch + 1}: {refresh_seconds:.1f} s")
    run.model.train()
    run.solver.train()
    if run.bn_mode == "frozen":
        freeze_batchnorm(run.model)
    run.bn_current, run.train_embeddings = False, None
    batches = _process_batches(run, epoch)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    read_every = _read_every(dev)
    total = torch.zeros(2, dtype=torch.float64)  # summed loss x rows, rows: over every process
    window = torch.zeros(5, dtype=torch.float64, device=dev)  # the same, then non-finite loss, embeddings, gradients
    first_bad = torch.full((), -1, dtype=torch.long, device=dev)
    lr = cfg.lr
    start = time.perf_counter()
    bar = tqdm(iterate_batches(run.data.train, batches, dev, cfg.num_workers), desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not cfg.progress, leave=False, unit="batch", total=len(batches))
    for i, (x, y, idx) in enumerate(bar):
        lr = cfg.lr * lr_factor(cfg, epoch * len(batches) + i, len(batches))
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # backbone_lr: the backbone's group has its own scale
        loss, embeddings_finite = step(x, y, idx)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grads = [p.grad for p in params if p.grad is not None]
        if cfg.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=dev)
        grads_bad = ~torch.isfinite(grad_norm) if not scaler.is_enabled() else torch.zeros((), dtype=torch.bool, device=dev)
        rows = torch.full((), float(len(y)), dtype=torch.float64, device=dev)  # a fill, not a host copy
        flags = torch.stack([~torch.isfinite(loss.detach()), ~embeddings_finite, grads_bad])
        status = distributed.all_reduce_sum(torch.cat([torch.stack([loss.detach().double() * rows, rows]), flags.double()]))
        window += status
        if i == 0:
            first_step = status[:2].clone()  # the run's first loss, before any update: the divergence yardstick
        if read_every > 1:
            bad = status[2:].any()
            first_bad = torch.where(bad & (first_bad < 0), torch.full_like(first_bad, i), first_bad)
            if optimizer.defaults.get("fused") and not scaler.is_enabled():
                optimizer.found_inf = bad.float()  # the fused step skips a flagged step on the device
            else:
                for g in grads:  # a flagged step moves nothing by its gradients (NaN * 0 would stay NaN)
                    g.masked_fill_(bad, 0.0)
        if (i + 1) % read_every == 0 or i + 1 == len(batches):
            read = window.cpu()
            if read[2:].any():
                at = i if read_every == 1 else int(first_bad)
                raise DivergenceError(_divergence_message(run, epoch, at, lr, read[2:].tolist(), history))
            total += read[:2]
            window.zero_()
            bar.set_postfix(loss=f"{total[0] / total[1]:.4f}", samples_s=f"{total[1] / (time.perf_counter() - start):.0f}")
        scaler.step(optimizer)
        scaler.update()
    elapsed = time.perf_counter() - start
    # DDP broadcasts rank 0's BatchNorm statistics before each step; the last step's update is synced here.
    distributed.sync_buffers(run.model)
    seen = int(total[1])
    row = {"epoch": epoch + 1, "loss": float(total[0]) / max(1, seen), "seconds": elapsed, "samples_per_s": seen / elapsed,
           "lr": lr}
    if not history and batches:
        row["first_step_loss"] = float(first_step[0] / first_step[1])
    run.progress.add("train", elapsed)
    if refresh_seconds is not None:
        row.update(bank_refreshed=True, seconds_refresh=refresh_seconds)
    row.update({f"solver_{k}": float(v) for k, v in run.solver.on_epoch_end(ctx).items()})
    # later epochs against the first epoch's mean, the first against the run's first step (no loss there, as when a
    # miner found no tuple: unchecked)
    reference, factor, what = ((history[0]["loss"], DIVERGENCE_FACTOR, "the first epoch's") if history else
                               (row.get("first_step_loss", 0.0), FIRST_EPOCH_FACTOR, "the first step's"))
    if reference > 0 and row["loss"] > factor * reference:
        row["diverged"] = True
        if distributed.is_main():
            warnings.warn(
                f"epoch {epoch + 1}: training loss {row['loss']:.4g} is over {factor:g}x {what} "
                f"({reference:.4g}); the run is marked diverged in log.jsonl and summary.json; try a lower --lr or "
                "--clip-grad-norm", TrainingWarning, stacklevel=2,
            )
    return row


def _read_every(device: torch.device) -> int:
    """Steps between host reads of the loss and the non-finite flags: every step where a read is free (the CPU)."""
    return _GPU_READ_EVERY if avoid_host_sync(device) else 1


def _divergence_message(run: Run, epoch: int, step: int, lr: float, flags: list[float], history: list[dict[str, Any]]) -> str:
    """One line: what became non-finite, where, the likely cause, what to try, and what is saved."""
    what = ", ".join(name for name, bad in zip(("loss", "embeddings", "gradients"), flags) if bad)
    saved = (f"the checkpoint of epoch {epoch} in {run.config.out} is intact (continue with --resume)"
             if epoch > 0 else "no epoch had finished, so nothing was saved")
    return (
        f"non-finite {what} at epoch {epoch + 1}, step {step + 1}: training diverged. Likely cause: learning rate "
        f"{lr:g} ({run.config.optimizer}) too high for this network and solver, or inputs holding inf/NaN. Try a lower "
        f"--lr, --clip-grad-norm 1.0 or --warmup-epochs 1; {saved}"
    )


def test_summary(run: Run, out: Path, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Load the best checkpoint of the run in ``out`` and evaluate it on test; write nothing.

    The summary records the evaluation geometry (``embedding_space``), the
    BatchNorm mode, and ``diverged`` (some epoch's mean loss rose over
    :data:`DIVERGENCE_FACTOR` times the first epoch's, or the first epoch's over
    :data:`FIRST_EPOCH_FACTOR` times the run's first step's).
    """
    best = load_checkpoint(out / BEST)
    run.load_weights(best)
    key = _select_key(run.config)
    best_row = next((row for row in history if row["epoch"] == best["epoch"] + 1), {})
    summary: dict[str, Any] = {"best_epoch": best["epoch"] + 1, "dataset": run.config.dataset,
                               "solver": run.config.solver, "split": run.config.split,
                               "embedding_space": run.solver.embedding_space, "bn_mode": run.bn_mode,
                               "precise_bn": run.config.precise_bn,
                               "diverged": any(row.get("diverged", False) for row in history),
                               "epochs_run": len(history),
                               "stopped_early": 0 < run.config.patience and len(history) < run.config.epochs,
                               "best_val_metric": key, "best_val_score": best_row.get(key),
                               "model": run.model_name, "model_parameters": sum(p.numel() for p in run.model.parameters()),
                               "device": str(run.device), "threads": torch.get_num_threads(),
                               "evaluation_geometry": evaluation_geometry(run)}
    summary.update(run.evaluate(run.data.test, "test_"))
    return summary


def evaluation_geometry(run: Run) -> dict[str, Any]:
    """How the test numbers were computed: the embedding space ranked in, and who is compared with whom."""
    if run.config.split == "standard":
        protocol = "classification by the solver's prediction, test rows against the training set"
    elif run.data.test_query is not None:
        protocol = "retrieval: query rows against a separate gallery"
    else:
        protocol = "retrieval: every test row against the other test rows (unseen classes)"
    return {"embedding_space": run.solver.embedding_space, "protocol": protocol,
            "recall_ks": list(run.data.recall_ks) if run.config.split == "disjoint" else None}


def finish(run: Run, out: Path, fingerprint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the best checkpoint on test (:func:`test_summary`), write ``summary.json`` (with the
    data's fingerprint) and plots."""
    history = load_checkpoint(out / CHECKPOINT)["history"]
    with run.progress.phase("test", f"test evaluation of the best epoch ({len(run.data.test):,} rows)"):
        summary = test_summary(run, out, history)
    summary["data_fingerprint"] = fingerprint if fingerprint is not None else data_fingerprint(run.data)
    if run.config.plots != "off":
        from knnsolver.training.plots import plot_run

        with run.progress.phase("plots", f"plots ({run.config.plots})"):
            test_emb, test_labels = run.test_embeddings
            plot_run(history, test_emb.cpu().numpy(), test_labels.cpu().numpy(), out, seed=run.config.seed,
                     tsne=run.config.plots == "all")
    summary["timing"] = run.progress.timing()
    write_json(summary, out / SUMMARY)
    run.progress.say(_result_line(summary, run.config))
    return summary


def _result_line(summary: dict[str, Any], config: TrainConfig) -> str:
    """The headline test numbers and the wall time in one line."""
    keys = ("test_accuracy",) if config.split == "standard" else ("precision_at_1", "map_at_r", "nmi")
    scores = ", ".join(f"{k} {summary[k]:.4f}" for k in keys if summary.get(k) is not None)
    return f"done: best epoch {summary['best_epoch']}, {scores}; {summary['timing']['wall_seconds']:.1f} s in all"


def load_saved(out: str | Path, device: str | None = None) -> tuple[Run, Path]:
    """Rebuild a saved run from its folder (plots off), weights not yet loaded; ``device`` overrides the run's.

    The solver is built with the options saved beside its weights (defaults
    included), so a later change of a default does not change a saved run. Runs
    saved before those were recorded keep the RBF solver's former free-scale
    embedding (``normalize=False``).
    """
    out = Path(out)
    if not out.is_dir():  # worded as predict, search and export word it
        raise ConfigError(f"{out} does not exist or is not a folder; give a run folder written by knnsolver train")
    for name in (CONFIG, BEST, CHECKPOINT):
        if not (out / name).is_file():
            raise ConfigError(f"{out} is not a finished knnsolver run: {name} is missing")
    try:
        config = TrainConfig.from_dict(load_config_file(out / CONFIG))
    except ConfigError as err:
        raise DataError(f"the run in {out} has an invalid {CONFIG}: {err}") from None
    config.plots = "off"
    if device is not None:
        config.device = device
    saved = load_checkpoint(out / BEST).get("solver_options")
    config.solver_options = dict(saved) if saved is not None else {**_unrecorded_options(config), **config.solver_options}
    return build_run(config), out


def _unrecorded_options(config: TrainConfig) -> dict[str, Any]:
    """Solver options of a run saved before they were recorded: the RBF solver's former free-scale embedding."""
    return {"normalize": False} if config.solver == "rbf" else {}


def evaluate_saved(out: str | Path, unfinished: bool = False) -> dict[str, Any]:
    """Evaluate a saved run's best checkpoint on its test split again; write nothing.

    A run whose training has not finished (fewer epochs saved than configured
    and not stopped early, or no ``summary.json``) is refused unless ``unfinished``, which scores its
    best epoch so far. A warning says when the data changed since training (the
    run's recorded fingerprint differs), since the number then describes other data.
    """
    run, out = load_saved(out)
    state = load_checkpoint(out / CHECKPOINT)
    done = state.get("epoch", -1) + 1
    trained = done >= run.config.epochs or stopped_on_patience(run.config, state["history"])
    finished = trained and (out / SUMMARY).is_file()
    if not finished and not unfinished:
        raise ConfigError(
            f"{out} holds an unfinished run ({done} of {run.config.epochs} epochs, "
            f"{'no ' if not (out / SUMMARY).is_file() else ''}{SUMMARY}); finish it with knnsolver train --config "
            f"{out / CONFIG} --resume, or pass --unfinished to score its best epoch so far"
        )
    recorded = state.get("data")
    if recorded is None and (out / SUMMARY).is_file():
        try:
            recorded = load_config_file(out / SUMMARY).get("data_fingerprint")
        except (ConfigError, AttributeError):
            recorded = None
    _warn_if_data_changed(recorded, data_fingerprint(run.data), str(out),
                          "the scores below are for the current data, not the data the run was trained on")
    return test_summary(run, out, state["history"])


SPLIT_PARTS = ("train", "val", "test")


def embed_saved(out: str | Path, part: str = "train", raw: bool = False) -> tuple[Tensor, Tensor]:
    """Embeddings and labels of one part of a saved run's data (train rows without
    augmentation), computed by its best checkpoint's network after re-estimating
    BatchNorm (``precise_bn``), in the solver's own space (``Solver.transform``)
    unless ``raw``."""
    if part not in SPLIT_PARTS:
        raise ConfigError(f"unknown part {part!r}; choose one of: {', '.join(SPLIT_PARTS)}")
    run, out = load_saved(out)
    run.load_weights(load_checkpoint(out / BEST))
    dataset = run.data.train_eval if part == "train" else getattr(run.data, part)
    if dataset is None:
        raise ConfigError(f"the run in {out} has no {part} split (val_fraction was 0)")
    run.calibrate()
    emb, labels = run.embed(dataset)
    if not raw:
        with torch.no_grad():
            emb = run.solver.transform(emb)
    return emb, labels
