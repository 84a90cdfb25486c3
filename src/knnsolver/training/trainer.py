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

This module opens, resumes and drives a run; its parts live beside it: :mod:`~knnsolver.training.run` (what a
run is built of, its files, the validation key), :mod:`~knnsolver.training.batch_plan` (each epoch's batches),
:mod:`~knnsolver.training.loop` (the steps of an epoch and its end), :mod:`~knnsolver.training.parallel` (the
processes' orchestration) and :mod:`~knnsolver.training.saved` (the test evaluation and the saved-run API).
"""
from __future__ import annotations

import gc
import math
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from knnsolver import distributed
from knnsolver.data import data_fingerprint
from knnsolver.errors import ConfigError, DataError
from knnsolver.training import loop
from knnsolver.training.batchnorm import batchnorm_layers
from knnsolver.training.checkpoint import load_checkpoint, write_json
from knnsolver.training.config import TrainConfig
from knnsolver.training.lr_groups import parameter_groups
from knnsolver.training.parallel import check_same_config, check_same_data, on_main
from knnsolver.training.progress import Progress
from knnsolver.training.run import (BEST, CHECKPOINT, CONFIG, Run, build_run, configured_options, describe_run,
                                    epoch_seed, select_key, stopped_on_patience, unrecorded_options,
                                    warn_if_data_changed)
from knnsolver.training.runfolder import RunFolder
from knnsolver.training.saved import finish

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
    for spelled in (saved, wanted):  # one folder however it is spelled (saved runs before session 15: relative)
        if spelled["data_dir"] is not None:
            spelled["data_dir"] = os.path.abspath(spelled["data_dir"])
    differ = sorted(k for k in wanted if k not in _RESUMABLE_CHANGES and saved.get(k) != wanted[k])
    if differ:
        changes = "; ".join(f"{k}: saved {saved.get(k)!r}, now {wanted[k]!r}" for k in differ)
        raise ConfigError(f"cannot resume {out}: settings other than epochs and patience differ from the saved run's ({changes}); "
                          "resume with the saved settings, or start a new run with another --out")
    trained_on = state.get("world_size")  # recorded from session 15 on
    if trained_on is not None and trained_on != distributed.world_size():
        raise ConfigError(f"cannot resume {out}: it was trained on {trained_on} process(es) and this launch has "
                          f"{distributed.world_size()}, which would change its batches (batch_size is per process); "
                          f"resume with {trained_on} process(es), or start a new run with another --out")
    if "solver_options" not in state:  # checkpoints before they were kept there: best.pt's, else as load_saved
        recorded = load_checkpoint(out / BEST).get("solver_options") if (out / BEST).is_file() else None
        state["solver_options"] = (recorded if recorded is not None
                                   else configured_options(config, under=unrecorded_options(config)))
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
    folder = RunFolder(Path(config.out))
    # an earlier run this one replaces (kept whole until the new run's first checkpoint)
    earlier = overwrite and not resume and distributed.is_main() and (folder.out / CHECKPOINT).is_file()
    try:
        check_same_config(config)  # under torchrun, waits for the other processes
        return _train_in(config, resume, overwrite, model, folder)
    except KeyboardInterrupt:
        # rank 0 alone says what is saved: another process may not see the run folder (another machine)
        raise KeyboardInterrupt(_interrupted_message(config, folder, earlier) if distributed.is_main() else "") from None
    finally:
        on_main(folder.close)


def _data_dir_as_recorded(config: TrainConfig, state: dict[str, Any] | None) -> TrainConfig:
    """``config`` with ``data_dir`` absolute, so the saved run loads from any folder; a resumed run saved with a
    relative one (before they were recorded absolute) keeps that spelling on rank 0 (the same folder: checked
    by :func:`_open_run`), which its data fingerprint (the image files' paths) was taken with."""
    if config.data_dir is None:
        return config
    saved = state["config"].get("data_dir") if state is not None else None
    if saved is not None and not os.path.isabs(saved):
        return replace(config, data_dir=saved) if distributed.is_main() else config
    return replace(config, data_dir=os.path.abspath(config.data_dir))


def _interrupted_message(config: TrainConfig, folder: RunFolder, earlier: bool) -> str:
    """What an interrupted training left behind, and what to do next (``earlier``: it was to replace a run)."""
    if folder.pending or (earlier and not folder.replaced):
        return f"the new run was discarded before its first checkpoint; the earlier run in {config.out} is unchanged"
    if (Path(config.out) / CHECKPOINT).is_file():
        return f"the last finished epoch is saved in {config.out}; continue with --resume"
    return "no epoch had finished, so nothing was saved; start the run again without --resume"


def _train_in(config: TrainConfig, resume: bool, overwrite: bool, model: nn.Module | None,
              folder: RunFolder) -> dict[str, Any]:
    state = on_main(lambda: _open_run(config, resume, overwrite, folder))
    config = _data_dir_as_recorded(config, state)
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
    check_same_data(run.data, run.device)
    fingerprint = on_main(lambda: data_fingerprint(run.data))
    optimizer = loop.build_optimizer(config, parameter_groups(run.model, run.solver, config.lr, config.backbone_lr), run.device)
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
            warn_if_data_changed(state.get("data"), fingerprint, config.out, "resuming trains on the current data")
    else:
        # An untrained network's running statistics are BatchNorm's defaults (mean 0, variance 1),
        # which can put eval-mode embeddings (an RBF bank and its sigma) on a 100x smaller scale.
        if batchnorm_layers(run.model):
            rows = min(len(run.data.train_eval), config.precise_bn_rows)
            with progress.phase("batchnorm_warmup", f"BatchNorm warm-up on {rows:,} training rows"):
                run.calibrate(force=True)
    on_main(lambda: write_json(config.to_dict(), folder.path / CONFIG))
    step = loop.loss_step(run)

    for epoch in range(start_epoch, config.epochs):
        if on_main(lambda: _stops_early(run, history)):  # checked first, so a resumed run that had stopped stays so
            break
        # Rank 0 keeps the single-process seed; the others draw their own dropout and augmentation.
        torch.manual_seed(epoch_seed(config.seed, epoch) + 7_919 * distributed.rank())
        row = loop.train_epoch(run, step, optimizer, scaler, epoch, run.context(epoch), history)

        def end_epoch() -> tuple[float, bool]:
            score = loop.end_epoch(run, optimizer, scaler, epoch, row, history, best_score, fingerprint)
            folder.commit()  # an overwrite's first checkpoint exists: it replaces the old run now
            run.folder = folder.path
            return score, run.bn_current

        best_score, bn_current = on_main(end_epoch)
        distributed.sync_buffers(run.model)  # rank 0 may have re-estimated BatchNorm statistics
        run.bn_current = bn_current
    if distributed.is_distributed():  # every process ends with the best weights, as rank 0 does in finish()
        run.load_weights(on_main(lambda: load_checkpoint(folder.path / BEST)))
    return on_main(lambda: finish(run, folder.path, fingerprint))


def _stops_early(run: Run, history: list[dict[str, Any]]) -> bool:
    """:func:`stopped_on_patience`, saying so when it is."""
    if not stopped_on_patience(run.config, history):
        return False
    key, patience = select_key(run.config), run.config.patience
    scored = [row for row in history if row.get(key) is not None and not math.isnan(row[key])]
    best = f"best epoch {max(scored, key=lambda row: row[key])['epoch']}" if scored else "no finite score"
    run.progress.say(f"early stop after epoch {history[-1]['epoch']}: {patience} validation passes without a new "
                     f"best ({best}); the rest of the {run.config.epochs} epochs is skipped")
    return True
