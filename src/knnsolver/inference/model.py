"""A trained model in use: classify, search and grow a run without writing Python against internals.

:func:`load` turns a run folder written by ``knnsolver train`` (or a model folder
written by :meth:`KnnModel.save`) into a :class:`KnnModel`: the network, the
solver and the solver's reference set (the training set's embeddings, plus any
examples added since). Loading a run does what ``knnsolver eval`` does before it
scores: the best checkpoint, BatchNorm statistics re-estimated (``precise_bn``),
the training set embedded and given to the solver (``fit_reference``), so the
model predicts as the run's evaluation did. A saved model holds all of that in
one file, ``model.pt``, and loads without the data.
"""
from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from knnsolver.bank.reference import ReferenceSet
from knnsolver.constraints import check_type
from knnsolver.errors import ConfigError, DataError, StorageError
from knnsolver.inference.inputs import Inputs, InputSpec, collect
from knnsolver.inference.openset import (
    UNKNOWN,
    RejectThreshold,
    reject,
    reject_threshold,
)
from knnsolver.interfaces import Solver, check_k
from knnsolver.search.exact import ExactSearch
from knnsolver.training.config import auto_eval_batch_size

MODEL_FILE = "model.pt"
FORMAT, VERSION = "knnsolver-model", 1


@dataclass
class SearchResult:
    """The ``k`` nearest reference items of each query, nearest first.

    Attributes:
        queries: each query's name (its file, or ``input[i]``).
        ids: ``(Q, k)`` rows of the items in the reference set (training rows first, then added ones).
        labels: ``(Q, k)`` class ids of the items.
        distances: ``(Q, k)`` Euclidean distances in the solver's space (:attr:`KnnModel.embedding_space`).
        paths: per query, per item, the image file the item was embedded from (None where the data has no files).
    """

    queries: list[str]
    ids: Tensor
    labels: Tensor
    distances: Tensor
    paths: list[list[str | None]]


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _keeps_reference(solver: Solver) -> bool:
    """Whether the solver holds its reference set in its own state (the RBF bank), growing by ``add_centres``,
    rather than being refilled by ``fit_reference`` (the kNN heads, CRC's dictionary)."""
    return hasattr(solver, "add_centres")


class KnnModel:
    """A trained network, its solver and the solver's reference set, ready to predict, search and grow.

    Every method takes inputs as image files, folders of images (searched
    recursively), ``.npy`` files, numpy arrays or tensors of shape ``(N, *shape)``
    (:class:`~knnsolver.inference.inputs.InputSpec`), or a list of paths; images are
    preprocessed as the run's evaluation split was. Results are CPU tensors.

    Attributes:
        backbone: the network (eval mode).
        solver: the solver (eval mode), holding the reference set it predicts from.
        spec: what an input is and how an image file becomes one.
        classes: the name of every class id (training classes first, then added ones).
        batch_size: inputs embedded at once (the run's ``eval_batch_size``).
    """

    def __init__(self, backbone: nn.Module, solver: Solver, spec: InputSpec, classes: list[str], embeddings: Tensor,
                 labels: Tensor, sources: list[str | None], info: dict[str, Any]) -> None:
        self.backbone = backbone.eval()
        self.solver = solver.eval()
        self.spec = spec
        self.classes = list(classes)
        self._embeddings, self._labels, self._sources = embeddings, labels.long(), list(sources)
        self.batch_size = int(info["config"].get("eval_batch_size", 512)) or auto_eval_batch_size(self.device)
        self._info = info
        self._search_set: ReferenceSet | None = None

    # --- what the model is ---

    @property
    def device(self) -> torch.device:
        return self._embeddings.device

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def embedding_space(self) -> str:
        """The space embeddings are compared in (the solver's: ``euclidean``, ``l2-normalised`` or ``mahalanobis``)."""
        return self.solver.embedding_space

    @property
    def reference_size(self) -> int:
        """Rows of the reference set: the training rows, then the added ones."""
        return int(self._labels.numel())

    @property
    def reference_labels(self) -> Tensor:
        return self._labels.cpu()

    @property
    def reference_sources(self) -> list[str | None]:
        """The image file each reference row was embedded from (None where the data has no files)."""
        return list(self._sources)

    def reference_embeddings(self) -> Tensor:
        """``(R, d)`` reference embeddings in the solver's space, as :meth:`search` compares them."""
        return self._searchable().embeddings.cpu()

    def __repr__(self) -> str:
        added = self.reference_size - self._info["num_train"]
        return (f"KnnModel(solver={type(self.solver).__name__}, classes={self.num_classes}, "
                f"reference={self.reference_size} rows ({added} added), input shape={self.spec.shape}, "
                f"space={self.embedding_space})")

    # --- using it ---

    @torch.no_grad()
    def _embed(self, items: Inputs) -> Tensor:
        """Raw network outputs ``(N, d)`` of resolved inputs, on the model's device."""
        out = [self.backbone(batch.to(self.device)).float() for batch in items.batches(self.spec, self.batch_size)]
        return torch.cat(out)

    @torch.no_grad()
    def embed(self, inputs: Any, raw: bool = False) -> Tensor:
        """``(N, d)`` embeddings in the solver's space (as search and retrieval compare them), or the network's
        outputs with ``raw``."""
        emb = self._embed(collect(inputs, self.spec))
        return (emb if raw else self.solver.transform(emb)).cpu()

    @torch.no_grad()
    def _proba(self, emb: Tensor) -> Tensor:
        return torch.cat([self.solver.predict_proba(part) for part in emb.split(self.batch_size)]).cpu()

    def predict_proba(self, inputs: Any) -> Tensor:
        """``(N, num_classes)`` class probabilities, each row summing to 1.

        From the solver's own scores (:meth:`~knnsolver.interfaces.Solver.predict_proba`):
        the RBF solver's Eq. 4 probabilities, a softmax of logits, or the kNN vote shares.
        """
        return self._proba(self._embed(collect(inputs, self.spec)))

    def predict(self, inputs: Any, reject_below: float | None = None) -> Tensor:
        """``(N,)`` class ids; with ``reject_below`` = p, ``-1`` (unknown) where the top probability is below p
        (:meth:`choose_threshold` picks p for a target false-accept rate)."""
        return reject(self.predict_proba(inputs), reject_below)

    def _searchable(self) -> ReferenceSet:
        """The reference set in the solver's space, indexed for exact search (built once per change)."""
        if self._search_set is None:
            with torch.no_grad():
                points = self.solver.transform(self._embeddings).float()
            self._search_set = ReferenceSet(points.shape[1], ExactSearch(), persistent=False)
            self._search_set.set(points, self._labels)
        return self._search_set

    @torch.no_grad()
    def search(self, inputs: Any, k: int = 10) -> SearchResult:
        """The ``k`` nearest reference items of each input in the solver's space: ids, labels, distances, files."""
        k = check_type("k", k, int)
        check_k(k, self.reference_size, excluding_self=False)
        items = collect(inputs, self.spec)
        queries = self.solver.transform(self._embed(items)).float()
        sq, idx = self._searchable().search_knn(queries, int(k))
        idx = idx.long().cpu()
        paths = [[self._sources[i] for i in row] for row in idx.tolist()]
        return SearchResult(items.names, idx, self._labels.cpu()[idx], sq.clamp(min=0).sqrt().cpu(), paths)

    # --- growing it ---

    @staticmethod
    def _label_list(labels: Any, n: int) -> list[int | str]:
        """``labels`` as a list of ``n`` class ids (ints) or names (strs): one per input, or one for all."""
        wrong = "class labels must be integer ids or class names"
        if isinstance(labels, Tensor):
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise ConfigError(f"{wrong}, got a tensor of {labels.dtype}")
            labels = labels.reshape(-1).tolist() if labels.dim() else labels.item()
        elif isinstance(labels, np.ndarray):
            if labels.dtype.kind not in "iuU":
                raise ConfigError(f"{wrong}, got an array of {labels.dtype}")
            labels = labels.reshape(-1).tolist() if labels.ndim else labels.item()
        if isinstance(labels, (int, str, np.integer, np.str_)):
            labels = [labels] * n
        if not isinstance(labels, Sequence):
            raise ConfigError(f"{wrong}, got {type(labels).__name__}")
        if len(labels) != n:
            raise ConfigError(f"got {len(labels)} class labels for {n} inputs; give one label per input (or one for all)")
        out: list[int | str] = []
        for label in labels:
            if isinstance(label, (int, np.integer)) and not isinstance(label, (bool, np.bool_)):
                out.append(int(label))
            elif isinstance(label, (str, np.str_)):
                out.append(str(label))
            else:
                raise ConfigError(f"{wrong}, got {label!r} (a {type(label).__name__})")
        return out

    def _label_ids(self, labels: Any, n: int, create: bool) -> tuple[Tensor, list[str]]:
        """Class ids of ``labels`` (:meth:`_label_list`) and the classes after them.

        With ``create`` the ids that follow the last class (together, in any order)
        and unknown names become new classes; otherwise (true labels of validation
        data) an unknown id or name, or ``-1``, is unknown (-1).
        """
        labels = self._label_list(labels, n)
        classes = list(self.classes)
        if create:
            ids = {label for label in labels if isinstance(label, int)}
            new = sorted(i for i in ids if i >= len(classes))
            if min(ids, default=0) < 0 or new != list(range(len(classes), len(classes) + len(new))):
                raise ConfigError(f"class ids must be known classes (0..{len(classes) - 1}) or the ids that follow "
                                  f"them ({len(classes)}, {len(classes) + 1}, ...), got {sorted(ids)}; or give class names")
            taken = [i for i in new if str(i) in classes]
            if taken:  # a name already taken: later adds by that name would go to the other class
                raise ConfigError(f"new class id {taken[0]} would be named {str(taken[0])!r}, the name of class "
                                  f"{classes.index(str(taken[0]))}; give the new class a name instead of an id")
            classes += [str(i) for i in new]
            classes += list(dict.fromkeys(label for label in labels if isinstance(label, str) and label not in classes))
        index: dict[str, int] = {}
        for i, name in enumerate(classes):
            index.setdefault(name, i)
        ids_out = [(label if 0 <= label < len(classes) else UNKNOWN) if isinstance(label, int) else index.get(label, UNKNOWN)
                   for label in labels]
        return torch.tensor(ids_out, dtype=torch.long), classes

    def add(self, inputs: Any, labels: Any) -> KnnModel:
        """Add labelled examples to the reference set, of new classes too; the network is unchanged.

        ``labels``: one per input (or one for all): class ids (the ids after the
        last class make new classes) or class names (a new name makes a new class).
        The solver predicts from the grown set at once (the RBF bank takes them as
        centres of weight 1; kNN solvers vote among them). A solver that does not
        predict from reference examples (softmax, nearest anchor or centre) is refused.
        Nothing changes when anything is refused.
        """
        if not self.solver.predicts_by_knn:
            raise ConfigError(f"{type(self.solver).__name__} predicts with weights learnt for its {self.num_classes} "
                              "training classes, not from reference examples, so added examples would change nothing; "
                              "train with a solver that predicts by kNN (rbf, hal, triplet, ...) to add classes")
        items = collect(inputs, self.spec)
        ids, classes = self._label_ids(labels, len(items), create=True)
        known = {str(Path(p).resolve()) for p in self._sources if p is not None}
        again = {p for p in items.paths if p is not None and str(Path(p).resolve()) in known}
        if again:
            warnings.warn(f"{len(again)} of the {len(items)} files added are already in the reference set "
                          f"(e.g. {min(again)}); they are added again, counting twice in votes and sums",
                          UserWarning, stacklevel=2)
        emb = self._embed(items)
        ids = ids.to(self.device)
        embeddings, all_labels = torch.cat([self._embeddings, emb]), torch.cat([self._labels, ids])
        before = self.solver.num_classes
        try:
            if _keeps_reference(self.solver):
                self.solver.add_centres(emb, ids)
            else:
                self.solver.num_classes = len(classes)
                self.solver.fit_reference(embeddings, all_labels)
        except BaseException:
            self.solver.num_classes = before
            raise
        self.solver.num_classes = len(classes)
        self.classes = classes
        self._embeddings, self._labels = embeddings, all_labels
        self._sources += items.paths
        self._search_set = None
        return self

    def choose_threshold(self, inputs: Any, labels: Any, false_accept_rate: float = 0.05) -> RejectThreshold:
        """The ``reject_below`` that accepts at most ``false_accept_rate`` of the wrong predictions on validation data.

        ``labels`` are the inputs' true classes (ids or names); ``-1``, or an id or
        name the model does not know, marks an input of an unknown class, which
        every accepted prediction gets wrong. See
        :func:`~knnsolver.inference.openset.reject_threshold`.
        """
        items = collect(inputs, self.spec)
        truth, _ = self._label_ids(labels, len(items), create=False)
        top, predicted = self._proba(self._embed(items)).max(1)
        return reject_threshold(top, predicted == truth, false_accept_rate)

    # --- saving and loading ---

    def _state(self) -> dict[str, Any]:
        def cpu(module: nn.Module) -> dict[str, Tensor]:
            return {name: value.cpu() for name, value in module.state_dict().items()}

        return {"format": FORMAT, "version": VERSION, **self._info, "classes": self.classes, "spec": self.spec.to_dict(),
                "backbone": cpu(self.backbone), "solver": cpu(self.solver),
                "reference": {"embeddings": self._embeddings.cpu(), "labels": self._labels.cpu(),
                              "sources": self._sources}}

    def save(self, path: str | Path) -> Path:
        """Write the model to ``path/model.pt`` atomically; return the folder.

        ``path`` may be new, empty, a model folder (replaced) or a training run (the
        model is kept beside it, and :func:`load` of the run then returns it). The
        folder is locked for the write, so a training running in it is not disturbed:
        the save is refused instead.
        """
        from knnsolver.training.checkpoint import save_checkpoint
        from knnsolver.training.runfolder import LOCK, RunFolder
        from knnsolver.training.run import BEST

        folder = Path(path)
        if folder.exists() and not folder.is_dir():
            raise StorageError(f"{folder} is a file, not a folder; give a folder to save the model in")
        if folder.is_dir() and not (folder / MODEL_FILE).is_file() and not (folder / BEST).is_file():
            others = sorted(p.name for p in folder.iterdir() if p.name != LOCK)
            if others:
                raise StorageError(f"{folder} holds other files ({', '.join(others[:3])}); save the model into a new "
                                   "or empty folder, a model folder or its run folder")
        if (folder / BEST).is_file() and Path(self._info["origin"]).resolve() != folder.resolve():
            raise StorageError(f"{folder} holds another run; save the model into its own run folder, a model folder "
                               "or a new or empty folder")
        state = self._state()
        owner = RunFolder(folder)
        owner.open()
        try:
            state["best_digest"] = _file_digest(folder / BEST) if (folder / BEST).is_file() else None
            save_checkpoint(state, folder / MODEL_FILE)
        finally:
            owner.close()
        return folder

    def export(self, path: str | Path, format: str = "torchscript", atol: float = 1e-4) -> dict[str, Any]:
        """Write the network (and the solver's transform) to ``path`` and the reference set beside it;
        see :func:`knnsolver.inference.export.export`."""
        from knnsolver.inference.export import export

        return export(self, path, format, atol)

    @classmethod
    def _from_file(cls, folder: Path, device: str) -> KnnModel:
        from knnsolver.models import build_model
        from knnsolver.registry import SOLVERS
        from knnsolver.training.checkpoint import load_checkpoint
        from knnsolver.training.config import TrainConfig
        from knnsolver.training.run import BEST

        state = load_checkpoint(folder / MODEL_FILE)
        if state.get("format") != FORMAT or state.get("version") != VERSION:
            raise DataError(f"{folder / MODEL_FILE} is not a knnsolver model (format {state.get('format')!r}, "
                            f"version {state.get('version')!r}; this knnsolver reads {FORMAT!r} version {VERSION})")
        if (folder / BEST).is_file() and state.get("best_digest") != _file_digest(folder / BEST):
            raise DataError(f"{folder / MODEL_FILE} was saved from an earlier training of the run in {folder} "
                            f"({BEST} changed since); delete it to load the run as trained now")
        try:
            config = TrainConfig.from_dict(dict(state["config"]))
            spec = InputSpec.from_dict(state["spec"])
            # num_train as in training: ``auto`` chooses the network by the data size too
            backbone = build_model(config.model, spec.shape, config.embedding_dim, config.dropout, config.width,
                                   num_train=state["num_train"])
            solver = SOLVERS.build(config.solver, embedding_dim=config.embedding_dim, num_classes=state["train_classes"],
                                   num_train=state["num_train"], **config.solver_options)
            backbone.load_state_dict(state["backbone"])
            solver.load_state_dict(state["solver"])
        except (KeyError, RuntimeError, ConfigError) as err:
            reason = str(err).splitlines()[0] if str(err) else repr(err)
            raise DataError(f"cannot rebuild the model in {folder / MODEL_FILE} ({reason}); it was saved by another "
                            "version of knnsolver or is damaged") from None
        ref = state["reference"]
        info = {key: state[key] for key in ("config", "num_train", "train_classes", "origin")}
        model = cls(backbone.to(device), solver.to(device), spec, state["classes"], ref["embeddings"].to(device),
                    ref["labels"].to(device), ref["sources"], info)
        model.solver.num_classes = model.num_classes
        if not _keeps_reference(model.solver):  # a kNN head or dictionary is not in the state: refill it
            model.solver.fit_reference(model._embeddings, model._labels)
        return model

    @classmethod
    def _from_run(cls, folder: Path, device: str) -> KnnModel:
        from knnsolver.training.checkpoint import load_checkpoint
        from knnsolver.data import data_fingerprint
        from knnsolver.training.run import BEST, SUMMARY, resume_command, warn_if_data_changed
        from knnsolver.training.runfolder import training_holder
        from knnsolver.training.saved import load_saved, summary_fingerprint

        run, out = load_saved(folder, device)
        if not (out / SUMMARY).is_file():
            holder = training_holder(out)
            raise ConfigError(f"{out} is still training ({holder}); use it once that training has finished" if holder
                              else f"{out} holds an unfinished run (no {SUMMARY}); finish it with "
                                   f"{resume_command(out)} before using it")
        warn_if_data_changed(summary_fingerprint(out), data_fingerprint(run.data), str(out),
                             "its reference set is built from the data as it is now, not as the run was trained on")
        try:
            run.load_weights(load_checkpoint(out / BEST))
        except RuntimeError as err:  # the weights no longer fit the data (rows or classes changed since training)
            raise DataError(f"the weights in {out / BEST} do not fit the run's data as it is now "
                            f"({str(err).splitlines()[0]}); the data changed since training: restore it, or "
                            "load a model saved with save()") from None
        run.calibrate()
        emb, labels = run.embed(run.data.train_eval)
        pool, rows = run.data.train_eval.pool, run.data.train_eval.rows
        paths = getattr(pool, "paths", None)
        sources = [str(paths[r]) for r in rows] if paths is not None else [None] * len(rows)
        config = {**run.config.to_dict(), "solver_options": dict(run.solver_options or {})}
        info = {"config": config, "num_train": len(rows), "train_classes": run.data.num_classes,
                "origin": str(out.resolve())}
        model = cls(run.model, run.solver, InputSpec.of_data(run.data), run.data.class_names, emb, labels, sources, info)
        model.solver.fit_reference(emb, labels)
        return model


def load(path: str | Path, device: str = "cpu") -> KnnModel:
    """The model in ``path``: a model folder written by :meth:`KnnModel.save` (or a run folder holding one, after
    ``knnsolver add-classes --in-place``), else the finished training run in ``path``.

    Loading a run rebuilds its data (to embed the training set), as ``knnsolver eval`` does;
    loading a saved model needs no data. ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
    """
    from knnsolver.training.config import TrainConfig

    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"{folder} does not exist or is not a folder; give a run folder written by knnsolver train "
                          "or a model folder written by save or add-classes")
    device = str(TrainConfig(device=device).torch_device)  # checks the name and that the device is there
    if (folder / MODEL_FILE).is_file():
        return KnnModel._from_file(folder, device)
    return KnnModel._from_run(folder, device)
