"""A finished run and its folder: the test evaluation that ends training, and the saved-run API (rebuild a run
from its folder, evaluate it again, embed its data)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from knnsolver import distributed
from knnsolver.data import data_fingerprint
from knnsolver.errors import ConfigError, DataError
from knnsolver.training.checkpoint import load_checkpoint, write_json
from knnsolver.training.config import TrainConfig, load_config_file
from knnsolver.training.runfolder import training_holder
from knnsolver.training.run import (BEST, CHECKPOINT, CONFIG, SUMMARY, Run, build_run, resume_command, select_key,
                                    stopped_on_patience, unrecorded_options, warn_if_data_changed)


def test_summary(run: Run, out: Path, history: list[dict[str, Any]]) -> dict[str, Any]:
    """Load the best checkpoint of the run in ``out`` and evaluate it on test; write nothing.

    The summary records the evaluation geometry (``embedding_space``), the
    BatchNorm mode, and ``diverged`` (some epoch's mean loss rose over
    :data:`~knnsolver.training.loop.DIVERGENCE_FACTOR` times the first epoch's, or the first epoch's over
    :data:`~knnsolver.training.loop.FIRST_EPOCH_FACTOR` times the run's first step's).
    """
    best = load_checkpoint(out / BEST)
    run.load_weights(best)
    key = select_key(run.config)
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
    summary["world_size"] = distributed.world_size()  # the training's processes; batch_size is per process
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
    if not (out / CONFIG).is_file() and (out / "model.pt").is_file():
        raise ConfigError(f"{out} is a model folder (written by add-classes --out or KnnModel.save), not a training "
                          "run: predict, search, add-classes and export take it; eval and embed need the run it came from")
    if not (out / CONFIG).is_file():
        raise ConfigError(f"{out} is not a knnsolver run: {CONFIG} is missing")
    if not (out / BEST).is_file():
        if holder := training_holder(out):
            raise ConfigError(f"{out} is still training ({holder}) and has no {BEST} yet; use it once it has")
        interrupted = (out / CHECKPOINT).is_file()
        raise ConfigError(f"{out} has no {BEST} yet" + (
            f" (a run without validation keeps its last epoch, at the end): finish it with {resume_command(out)}"
            if interrupted else ": no epoch of it has finished"))
    try:
        config = TrainConfig.from_dict(load_config_file(out / CONFIG))
    except ConfigError as err:
        raise DataError(f"the run in {out} has an invalid {CONFIG}: {err}") from None
    config.plots = "off"
    if device is not None:
        config.device = device
    saved = load_checkpoint(out / BEST).get("solver_options")
    config.solver_options = dict(saved) if saved is not None else {**unrecorded_options(config), **config.solver_options}
    try:
        return build_run(config), out
    except DataError as err:  # the run is rebuilt from its training data, which has gone or moved
        where = "" if config.data_dir is None or Path(config.data_dir).is_absolute() else (
            f" (recorded as {config.data_dir!r}, relative to the folder training ran in)")
        raise DataError(f"the run in {out} needs its training data to load, and it cannot be read{where}: {err}; "
                        "restore it, or use a model folder (add-classes --out, KnnModel.save), which loads without "
                        "it") from None


def summary_fingerprint(out: Path) -> dict[str, Any] | None:
    """The data fingerprint the run in ``out`` recorded in its ``summary.json`` (``None``: none, or no summary)."""
    if not (out / SUMMARY).is_file():
        return None
    try:
        return load_config_file(out / SUMMARY).get("data_fingerprint")
    except (ConfigError, AttributeError):
        return None


def evaluate_saved(out: str | Path, unfinished: bool = False) -> dict[str, Any]:
    """Evaluate a saved run's best checkpoint on its test split again; write nothing.

    A run whose training has not finished (fewer epochs saved than configured
    and not stopped early, or no ``summary.json``) is refused unless ``unfinished``, which scores its
    best epoch so far. A warning says when the data changed since training (the
    run's recorded fingerprint differs), since the number then describes other data.
    """
    run, out = load_saved(out)
    if not (out / CHECKPOINT).is_file():
        raise ConfigError(f"{out} has no {CHECKPOINT} (its history), which eval needs; predict and export work "
                          "without it")
    state = load_checkpoint(out / CHECKPOINT)
    done = state.get("epoch", -1) + 1
    trained = done >= run.config.epochs or stopped_on_patience(run.config, state["history"])
    finished = trained and (out / SUMMARY).is_file()
    if not finished and (holder := training_holder(out)):
        raise ConfigError(f"{out} is still training ({holder}); evaluate it once that training has finished")
    if not finished and not unfinished:
        raise ConfigError(
            f"{out} holds an unfinished run ({done} of {run.config.epochs} epochs, "
            f"{'no ' if not (out / SUMMARY).is_file() else ''}{SUMMARY}); finish it with {resume_command(out)}, "
            "or pass --unfinished to score its best epoch so far"
        )
    recorded = state.get("data")
    if recorded is None:
        recorded = summary_fingerprint(out)
    warn_if_data_changed(recorded, data_fingerprint(run.data), str(out),
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
