"""Execute a suite's runs in order, one result file per run, resuming where a previous call stopped.

Each finished run is written atomically to ``<out>/<suite>/<run_id>.json``
(config, summary, best validation score, per-epoch log, wall time, command,
commit, date, machine); a run whose file exists is skipped. A training run
works in ``<out>/<suite>/runs/<run_id>/``, so a run killed mid-training resumes
from its last finished epoch.
"""
from __future__ import annotations

import ast
import contextlib
import datetime
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from knnsolver.bench.data import prepare_unseen_subset
from knnsolver.bench.suites import (
    BEST_OTHER_EXCLUDED,
    SUITES,
    UNSEEN_SUBSET,
    VAL_KEYS,
    Preset,
    RunSpec,
    Suite,
    build_specs,
    comparable,
    dim_text,
    grid_results,
    grid_extension,
    params_text,
    resolve,
)
from knnsolver.errors import ConfigError, DataError
from knnsolver.interfaces import EpochContext
from knnsolver.registry import SOLVERS
from knnsolver.training import TrainConfig, build_run, train
from knnsolver.training.checkpoint import write_json

RESULT_FORMAT = 1
# Version of the training code's trustworthiness fixes a result was produced under: 2 = precise BatchNorm,
# RBF sigma following the bank, non-finite guards, one evaluation geometry per solver (issue 10). The report
# marks results of older versions as stale.
TRAINING_VERSION = 2


def git_commit(cwd: str | Path | None = None) -> str:
    """``git rev-parse HEAD`` (with ``+modified`` when the code differs from it), or ``unknown``.

    Only the code counts (``src/``, ``pyproject.toml``): the results a suite
    writes into tracked files while it runs do not make later runs "modified".

    ``KNNSOLVER_COMMIT`` overrides it: a working tree copied to another machine
    (a lent GPU) may carry a stale ``.git``, so the sender names the commit.
    """
    if os.environ.get("KNNSOLVER_COMMIT"):
        return os.environ["KNNSOLVER_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/src", ":/pyproject.toml"],
                               cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+modified" if dirty else "")


def machine() -> dict[str, Any]:
    """What the timings depend on: platform, CPU, core and thread counts, library versions."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def load_results(folder: Path) -> dict[str, dict]:
    """Every stored result of a suite folder, by run id; a file that is not one is refused, naming it."""
    results = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            results[data["run_id"]] = data
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise DataError(f"{path} is not a benchmark result ({type(err).__name__}: {err}); move it out of "
                            f"{folder}, or delete it to run that result again") from None
    return results


def check_one_preset(out: Path, preset: str) -> None:
    """Refuse a run of ``preset`` into a results folder holding another preset's results: one report, its
    statistics and its grid choices would mix them."""
    for suite in SUITES.values():
        stored = load_results(out / suite.name)
        others = sorted({r["preset"] for r in stored.values() if r.get("preset") not in (None, preset)})
        if others:
            count = sum(r.get("preset") in others for r in stored.values())
            raise ConfigError(
                f"{out / suite.name} holds {count} results of the {', '.join(others)} preset; results of another "
                f"preset would be mixed with them in the report, its statistics and its grid choices; give --preset "
                f"{preset} another --out folder, or move those results away"
            )


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def best_val(history: Sequence[Mapping[str, Any]], key: str) -> float:
    """The validation score the trainer selected its checkpoint by (its maximum over epochs)."""
    scores = [row[key] for row in history if row.get(key) is not None and not math.isnan(row[key])]
    if not scores:
        raise ConfigError(f"the run logged no {key}: the benchmarks need a validation split (val_fraction > 0)")
    return max(scores)


def continues(shorter: Mapping[str, Any], longer: Mapping[str, Any]) -> bool:
    """Whether training config ``longer`` is ``shorter`` run for more epochs at a constant learning rate, so
    resuming the shorter run gives exactly the longer one (every epoch's randomness is seeded by its number).

    The shorter run must end on a validation epoch: its last epoch was validated either way, so an extra
    validation pass there could keep a checkpoint, or count towards early stopping, where the longer run
    validates nothing.
    """
    a, b = comparable(shorter), comparable(longer)
    return (a.get("lr_schedule") == b.get("lr_schedule") == "constant" and a.get("epochs", 0) < b.get("epochs", 0)
            and a.get("epochs", 0) % a.get("eval_every", 1) == 0 and {**a, "epochs": b["epochs"]} == b)


def _can_resume(run_dir: Path, cfg: TrainConfig) -> bool:
    """Whether ``run_dir`` holds a checkpoint of this configuration, or of it cut shorter (:func:`continues`),
    and not of a moved or changed run."""
    if not (run_dir / "checkpoint.pt").is_file() or not (run_dir / "config.json").is_file():
        return False
    saved = json.loads((run_dir / "config.json").read_text())
    return saved.get("out") == cfg.out and (comparable(saved) == comparable(cfg.to_dict()) or continues(saved, cfg.to_dict()))


def _train(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """Train (resuming a killed run of the same configuration, else from scratch) and collect the result."""
    cfg = spec.train_config(str(run_dir))
    resume = spec.kind not in TIMED_KINDS and _can_resume(run_dir, cfg)  # a timing is always measured afresh
    # the epochs a killed process trained (training, refresh and validation seconds, as logged)
    before = sum(row.get(k, 0.0) for row in read_log(run_dir) for k in ("seconds", "seconds_refresh", "seconds_val")
                 ) if resume else 0.0
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    # The run's progress lines and warnings go to a log beside its folder, not between the suite's lines.
    # Named by appending: with_suffix would cut "sigma=0.1__s0" at its dot, so grid runs would share one log.
    with open(run_dir.parent / f"{run_dir.name}.log", "a") as log, contextlib.redirect_stderr(log):
        summary = train(cfg, resume=resume, overwrite=not resume)
    history = read_log(run_dir)
    key = VAL_KEYS[cfg.split]
    return {"config": cfg.to_dict(), "summary": summary, "val_key": key, "best_val": best_val(history, key),
            "history": history, "seconds_before_resume": before}


def _refresh_seconds(spec: RunSpec, run_dir: Path) -> float:
    """Time of one ``on_epoch_start`` (bank refresh with its neighbour search) of a freshly built run."""
    run = build_run(spec.train_config(str(run_dir)))
    ctx = run.context(0)
    start = time.perf_counter()
    run.solver.on_epoch_start(ctx)
    return time.perf_counter() - start


def _quartile_times(fn: Callable[[], None], repeats: int, budget_s: float) -> tuple[float, float, float, int]:
    """(25th percentile, median, 75th percentile) seconds of ``fn`` and the number of timed calls.

    One warm-up call, then up to ``repeats`` timed calls, stopping early once
    ``budget_s`` seconds have been spent; a warm-up call over the budget is the
    only measurement.
    """
    start = time.perf_counter()
    fn()
    warm_up = time.perf_counter() - start
    if warm_up > budget_s:
        return warm_up, warm_up, warm_up, 1
    times: list[float] = []
    while len(times) < repeats and (not times or sum(times) < budget_s):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    if len(times) < 2:
        return times[0], times[0], times[0], 1
    q1, q2, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return q1, q2, q3, len(times)


# pytorch-metric-learning's triplet miner builds every (anchor, positive, negative) index first: past this
# many triplets in a batch (95 million at B=1,024 with 10 classes) one step takes minutes and gigabytes.
MAX_TRIPLETS = 3e7
# Its lifted structure loss builds a (positive pairs x negative pairs) matrix: 3.7e8 entries at B=256 with
# 10 classes, and over 23 GiB in one step (killed for memory on this 24 GiB machine).
MAX_PAIR_PRODUCT = 1e8


def triplet_count(labels: Tensor) -> int:
    """The number of (anchor, positive, negative) triplets in a batch with these labels."""
    counts = torch.bincount(labels).double()
    return int((counts * (counts - 1) * (len(labels) - counts)).sum())


def pair_product(labels: Tensor) -> int:
    """(ordered positive pairs) x (ordered negative pairs) of a batch: the lifted structure loss's matrix size."""
    counts = torch.bincount(labels).double()
    return int((counts * (counts - 1)).sum() * (counts * (len(labels) - counts)).sum())


def oversized(solver: str, labels: Tensor) -> str | None:
    """Why one loss step of ``solver`` on a batch with these labels would not fit in time or memory, or None."""
    if solver == "triplet" and (count := triplet_count(labels)) > MAX_TRIPLETS:
        return f"{count:.2g} triplets (over {MAX_TRIPLETS:.0e})"
    if solver == "lifted" and (count := pair_product(labels)) > MAX_PAIR_PRODUCT:
        return f"{count:.2g} positive x negative pairs (over {MAX_PAIR_PRODUCT:.0e})"
    return None


def step_cost(spec: RunSpec) -> dict[str, list[dict[str, Any]]]:
    """Forward + backward time of the solver's loss on random embeddings, per class count and batch size.

    Labels and row indices come from a training set of ``bank_size`` rows with
    balanced labels; a solver with a bank (rbf) gets it filled by its own
    ``on_epoch_start`` from random embeddings, as after a refresh. Once a step
    takes over ``max_step_s``, larger batches of that class count are skipped
    (pytorch-metric-learning's lifted structure loss grows far faster than B^2),
    as are batches too large for the triplet miner or the lifted structure loss
    (:func:`oversized`; listed under ``skipped``).
    The centralized loss with more classes than dimensions (1,000 classes in
    64-d) runs with ``allow_correlated=True``: orthogonal centres cannot exist
    there, and only the first ``d`` are decorrelated.
    """
    c = spec.config
    gen = torch.Generator().manual_seed(spec.seed)
    rows, skipped = [], []
    for num_classes in c["class_counts"]:
        n, dim = int(c["bank_size"]), int(c["embedding_dim"])
        train_labels = torch.arange(n) % num_classes
        bank = torch.randn(n, dim, generator=gen)
        options = dict(c["solver_options"])
        if spec.solver == "centralized" and num_classes > dim:
            options["allow_correlated"] = True
        solver = SOLVERS.build(spec.solver, embedding_dim=dim, num_classes=num_classes, num_train=n, **options)
        solver.on_epoch_start(EpochContext(0, lambda: (bank, train_labels), n))
        solver.train()
        for batch in sorted(c["batch_sizes"]):
            idx = torch.randperm(n, generator=gen)[:batch]
            emb = torch.randn(batch, dim, generator=gen, requires_grad=True)
            labels = train_labels[idx]
            why = oversized(spec.solver, labels)
            if why is not None:
                skipped.append({"batch_size": batch, "num_classes": num_classes, "why": why})
                break

            def step() -> None:
                loss = solver(emb, labels, idx)
                if loss.requires_grad:
                    loss.backward()
                emb.grad = None
                solver.zero_grad(set_to_none=True)

            q1, median, q3, calls = _quartile_times(step, int(c["repeats"]), float(c["budget_s"]))
            rows.append({"batch_size": batch, "num_classes": num_classes, "q1_s": q1, "median_s": median, "q3_s": q3,
                         "calls": calls})
            if median > float(c["max_step_s"]):
                break
    return {"step_times": rows, "skipped": skipped}


def execute(spec: RunSpec, folder: Path) -> dict[str, Any]:
    """Run one resolved spec and return the kind-specific part of its result."""
    run_dir = folder / "runs" / spec.run_id
    if spec.kind == "train":
        return _train(spec, run_dir)
    if spec.kind == "epoch_cost":
        out = _train(spec, run_dir)
        out["refresh_seconds"] = _refresh_seconds(spec, run_dir)
        return out
    if spec.kind == "step_cost":
        return {"config": dict(spec.config), **step_cost(spec)}
    raise ConfigError(f"unknown run kind {spec.kind!r}")


# Kinds that time something: never run by a worker, while another process shares the machine.
TIMED_KINDS = ("step_cost", "epoch_cost")
# The packages and modules whose code each timed kind runs: a stored timing is redone once any of them changes.
_TIMED_COMMON = ("functional", "solvers", "bank", "search", "interfaces.py", "distributed.py", "hostsync.py",
                 "registry.py", "constraints.py", "bench/runner.py")
TIMED_CODE = {"step_cost": _TIMED_COMMON,
              "epoch_cost": (*_TIMED_COMMON, "training", "models", "data", "evaluation")}


def _code_of(path: Path) -> str:
    """The code of a Python file without its docstrings and comments (``ast.unparse`` of its tree), so an edit
    to the documentation alone leaves a fingerprint as it was."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def source_fingerprint(root: Path, names: Sequence[str]) -> str:
    """16 hex digits of a sha256 over the code (:func:`_code_of`) and paths of the ``.py`` files ``names`` name
    under ``root``: a module, or every module of a package."""
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        for file in [path] if path.suffix == ".py" else sorted(path.rglob("*.py")):
            digest.update(file.relative_to(root).as_posix().encode() + b"\0" + _code_of(file).encode() + b"\0")
    return digest.hexdigest()[:16]


@functools.cache
def timed_code(kind: str) -> str:
    """The :func:`source_fingerprint` of the packages a ``kind`` timing measures (:data:`TIMED_CODE`).

    Stored with each timing, so a timing measured on older code (a solver's loss rewritten since) is judged
    outdated and left out until it is run again, as a training result of an earlier budget is.
    """
    return source_fingerprint(Path(__file__).resolve().parents[1], TIMED_CODE[kind])


# How long a worker waits before looking again for a run whose inputs another worker is still making.
WAIT_S = 10.0


def outdated(spec: RunSpec, stored: Mapping[str, Any], results: Mapping[str, dict], preset: str | None = None) -> str | None:
    """Why a stored result must be redone under today's suite, or ``None`` when it stands.

    A training run stored with fewer epochs at a constant learning rate is
    continued from its checkpoint (a budget raised later costs only the new
    epochs); a final whose grid now chooses other settings is run again, and so
    is a run of the same ``preset`` whose settings changed otherwise (a budget
    that also changes the evaluation interval). A result of another preset is
    left to :func:`_check_same`, which refuses to mix the two. A timing
    (:data:`TIMED_KINDS`) of the same ``preset`` is run again once the code it
    times has changed (:func:`timed_code`).
    """
    if (spec.kind in TIMED_KINDS and stored.get("kind") == spec.kind and preset is not None
            and stored.get("preset") == preset and stored.get("code") != timed_code(spec.kind)):
        return ("the code it times changed since it was measured: run again" if "code" in stored else
                "it was measured before timings recorded their code: run again")
    if spec.kind != "train" or stored.get("kind") != "train":
        return None
    try:
        resolved, _ = resolve(spec, results)
    except ConfigError:  # its grid is not stored (a partial copy of the results): judged as stored
        return None
    if spec.pick is not None and resolved.method != stored.get("method"):
        return f"the pick is now {resolved.method}: run again"
    if spec.params is None and dict(resolved.params) != stored.get("params"):
        return f"its grid now chooses {params_text(resolved.params)}: run again"
    wanted = resolved.train_config(stored["config"]["out"]).to_dict()
    if continues(stored["config"], wanted):
        return f"continued to {resolved.config['epochs']} epochs"
    if preset is not None and stored.get("preset") == preset and comparable(stored["config"]) != comparable(wanted):
        return "its settings changed: run again"
    return None


def stale_extensions(every: Sequence[RunSpec], results: Mapping[str, dict], preset: str) -> list[str]:
    """The grid results of ``preset`` beyond the grids of ``every`` (extensions) that today's suite would not make:
    run under settings that have changed since. Only the grids of ``every`` are looked at (a call with fewer
    solvers leaves the others alone), and not their own points (:func:`outdated` judges those)."""
    ids = {s.run_id for s in every}
    stale = []
    for (method, condition), grid in grids_of(every).items():
        for r in grid_results(results, method, condition):
            if r.get("preset") != preset or r["run_id"] in ids or r.get("kind") != "train":
                continue
            expected = replace(grid[0], params=dict(r["params"]), seed=r["seed"]).train_config(r["config"]["out"])
            if comparable(expected.to_dict()) != comparable(r["config"]):
                stale.append(r["run_id"])
    return stale


def set_aside_stale(folder: Path, every: Sequence[RunSpec], results: dict[str, dict], preset: str) -> list[str]:
    """Move the :func:`stale_extensions` out of ``folder`` (into ``folder/stale``): left in place, a finals'
    choice would count their scores, measured under the old settings (another validation set). The runner
    runs the grids' own points again before any final chooses. Returns the run ids moved."""
    moved = stale_extensions(every, results, preset)
    for run_id in moved:
        (folder / "stale").mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # another worker moved it first
            os.replace(folder / f"{run_id}.json", folder / "stale" / f"{run_id}.json")
        del results[run_id]
    return moved


def next_extension(grid: Sequence[RunSpec], results: Mapping[str, dict], preset: str | None = None) -> RunSpec | None:
    """The next grid run beyond ``grid``'s chosen edge still to run (:func:`~knnsolver.bench.suites.grid_extension`),
    walking past the extensions already stored; ``None`` when none is due or the grid itself is unfinished
    (a stored result that does not stand, such as one of a shorter budget, does not count)."""
    grid = list(grid)
    while grid and all(stands(s, results, preset) for s in grid):
        extra = grid_extension(grid, [results[s.run_id] for s in grid])
        if extra is None:
            return None
        if not stands(extra, results, preset):
            return extra
        grid.append(extra)
    return None


def grids_of(specs: Sequence[RunSpec]) -> dict[tuple[str, str], list[RunSpec]]:
    """The grid runs of ``specs`` by the ``(method, condition)`` their finals tune from."""
    grids: dict[tuple[str, str], list[RunSpec]] = {}
    for spec in specs:
        if spec.role == "grid":
            grids.setdefault((spec.method, spec.condition), []).append(spec)
    return grids


def pending_extensions(specs: Sequence[RunSpec], results: Mapping[str, dict], preset: str | None = None) -> int:
    """How many of the grids in ``specs`` have an extension due (the report marks the suite in progress)."""
    return sum(next_extension(grid, results, preset) is not None for grid in grids_of(specs).values())


def _check_same(spec: RunSpec, stored: Mapping[str, Any], path: Path) -> None:
    """Refuse to mix results of different settings (another preset) in one folder."""
    if spec.params is None or spec.pick is not None:
        return  # its settings depend on choices; they were checked when it ran
    expected = spec.train_config(stored["config"]["out"]).to_dict() if spec.kind != "step_cost" else dict(spec.config)
    if comparable(stored.get("config", {})) != comparable(expected):
        raise ConfigError(
            f"{path} was made with other settings than this run (another --preset?); "
            "use another --out folder or delete the old results"
        )


class Claims:
    """Which runs of a suite folder a process is running: one lock file per run, created atomically.

    Workers (``run_suite(worker=True)``) share a folder by claiming a run
    before they start it and releasing the claim once its result is stored. A
    claim whose process died on this host (a killed worker) is stale and taken
    over; its run resumes from its checkpoint.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder / ".claims"
        self.owner = f"{platform.node()}:{os.getpid()}"

    def _path(self, run_id: str) -> Path:
        return self.folder / run_id

    def holder(self, run_id: str) -> str | None:
        """The live process (``host:pid``) that holds ``run_id``, or ``None``; a stale claim is removed."""
        try:
            owner = self._path(run_id).read_text()
        except FileNotFoundError:
            return None
        host, _, pid = owner.partition(":")
        if host == platform.node() and pid.isdigit() and not _alive(int(pid)):
            self._path(run_id).unlink(missing_ok=True)
            return None
        return owner

    def take(self, run_id: str) -> bool:
        """Claim ``run_id`` for this process; ``False`` when another live process holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(2):  # a second try after removing a stale claim
            try:
                fd = os.open(self._path(run_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                if self.holder(run_id) is not None:
                    return False
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.owner)
            return True
        return False

    def release(self, run_id: str) -> None:
        if self.holder(run_id) == self.owner:
            self._path(run_id).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stands(spec: RunSpec, results: Mapping[str, dict], preset: str | None) -> bool:
    """Whether ``spec``'s stored result stands under today's suite (see :func:`outdated`)."""
    return spec.run_id in results and outdated(spec, results[spec.run_id], results, preset) is None


def waits_for(spec: RunSpec, every: Sequence[RunSpec], results: Mapping[str, dict], preset: Preset) -> list[str]:
    """The runs ``spec`` needs before it can start, by id: none for a grid run; a final's whole grid, with the
    extensions its edge choice calls for; for the best-other pick, every final it chooses among."""
    if spec.pick is not None:
        needed = [s for s in every if s.role == "final" and s.pick is None and s.condition == dim_text(64)
                  and s.method not in BEST_OTHER_EXCLUDED]
    elif spec.role == "final" and spec.params is None:
        needed = grids_of(every).get(spec.tune_from, [])
        # next_extension looks only at a grid that stands whole
        if preset.extend_grids and (extra := next_extension(needed, results, preset.name)) is not None:
            return [extra.run_id]
    else:
        return []
    missing = [s.run_id for s in needed if not stands(s, results, preset.name)]
    if not missing and spec.pick is not None:  # the finals it chooses among need their own grids
        missing = [r for s in needed for r in waits_for(s, every, results, preset)]
    return missing


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _result_line(result: Mapping[str, Any]) -> str:
    summary = result.get("summary", {})
    test = summary.get("test_accuracy", summary.get("precision_at_1"))
    parts = [f"params {params_text(result.get('params') or {})}"]
    if "best_val" in result:
        parts.append(f"val {result['best_val']:.4f}")
    if test is not None:
        parts.append(f"test {test:.4f}")
    return ", ".join(parts) + f" ({result['wall_seconds']:.0f} s)"


def _run_one(spec: RunSpec, label: str, *, suite: Suite, preset: Preset, folder: Path, results: dict[str, dict],
             command: str, commit: str, host: Mapping[str, Any]) -> None:
    """Run ``spec``, whose stored result, if any, does not stand (:func:`stands`: it is continued or redone);
    store the result."""
    path = folder / f"{spec.run_id}.json"
    earlier = 0.0  # seconds already spent on a stored run that is continued
    if spec.run_id in results:
        stored = results[spec.run_id]
        redo = outdated(spec, stored, results, preset.name)
        tqdm.write(f"{label}: {redo}")
        del results[spec.run_id]
        earlier = stored["wall_seconds"] if redo.startswith("continued") and "same_run_as" not in stored else 0.0
    spec, same_as = resolve(spec, results)
    start, started = time.perf_counter(), _now()
    result: dict[str, Any] = {
        "format": RESULT_FORMAT, "suite": suite.name, "run_id": spec.run_id, "kind": spec.kind,
        "method": spec.method, "condition": spec.condition, "seed": spec.seed, "role": spec.role,
        "params": dict(spec.params or {}), "grid_index": spec.grid_index, "preset": preset.name,
        "training": TRAINING_VERSION,
    }
    if same_as is not None:
        result.update({k: same_as[k] for k in ("config", "summary", "val_key", "best_val", "history", "wall_seconds")
                       if k in same_as})
        result["same_run_as"] = same_as["run_id"]
    else:
        if spec.kind in TIMED_KINDS:
            result["code"] = timed_code(spec.kind)
        result.update(execute(spec, folder))
        # a stored result continued, or a killed run resumed: the time spent before counts (the larger, as a
        # continued run's log also holds its stored epochs)
        earlier = max(earlier, result.pop("seconds_before_resume", 0.0))
        result["wall_seconds"] = earlier + time.perf_counter() - start
        result["started"] = started  # this call's part of the wall time ran from here to ``date``
    result.update(command=command, commit=commit, date=_now(), machine=host)
    write_json(result, path)
    results[spec.run_id] = result
    tqdm.write(f"{label}: {_result_line(result)}" + (f" = {same_as['run_id']}" if same_as else ""))


def next_task(todo: Sequence[RunSpec], every: Sequence[RunSpec], results: Mapping[str, dict], preset: Preset,
              claims: Claims) -> tuple[RunSpec | None, bool]:
    """The next run of ``todo`` (or a grid extension that is due) this process claims, and whether any is left.

    A run is left when its stored result does not stand; it can start when the
    runs it waits for (:func:`waits_for`) stand and no other live process has
    claimed it. ``(None, True)``: runs are left, but each waits or is claimed.
    """
    extensions = []
    if preset.extend_grids:
        extensions = [e for grid in grids_of(every).values() if (e := next_extension(grid, results, preset.name))]
    left = False
    for spec in [*extensions, *todo]:
        if waits_for(spec, every, results, preset):
            left = True
            continue
        if stands(spec, results, preset.name):
            continue
        left = True
        if claims.take(spec.run_id):
            return spec, True
    return None, left


def run_suite(
    suite: Suite,
    preset: Preset,
    out: str | Path,
    solvers: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    command: str = "",
    worker: bool = False,
) -> dict[str, dict]:
    """Run every missing run of ``suite``; return all its results by run id.

    Grids run first, then the finals, each once its grid has chosen (after any
    extension beyond a chosen edge), then the runs that choose across methods
    (the unseen-classes suite's best other solver). Processes on one results
    folder share the work: each claims a run before it starts it
    (:class:`Claims`) and waits while the runs it needs are still being made
    by another. ``worker=True`` leaves out the runs that time something
    (:data:`TIMED_KINDS`), which need the machine to themselves: a later call
    without it runs them, skipping what is done.
    """
    out = Path(out)
    folder = out / suite.name
    every = build_specs(suite, preset, out, solvers, seeds)
    todo = sorted((s for s in every if not (worker and s.kind in TIMED_KINDS)), key=lambda s: (s.role != "grid", s.pick is not None))
    check_one_preset(out, preset.name)  # before anything is written into the folder
    if suite.uses_unseen_subset and preset.unseen_subset:
        prepare_unseen_subset(out / "data" / UNSEEN_SUBSET)
    commit, host = git_commit(Path(__file__).parent), machine()
    claims = Claims(folder)
    results = load_results(folder)
    for run_id in set_aside_stale(folder, every, results, preset.name):
        tqdm.write(f"{suite.name} {run_id}: made under other settings, moved to {folder / 'stale'}")
    for spec in todo:  # a result of another preset in the folder is refused, not overwritten
        if stands(spec, results, preset.name):
            _check_same(spec, results[spec.run_id], folder / f"{spec.run_id}.json")
    bar = tqdm(total=len(todo), desc=suite.name, unit="run")
    while True:
        results = load_results(folder)
        bar.n = sum(stands(s, results, preset.name) for s in todo)
        bar.refresh()
        task, left = next_task(todo, every, results, preset, claims)
        if task is None:
            if not left:
                break
            time.sleep(WAIT_S)  # what is left waits for runs another process is making
            continue
        try:
            results = load_results(folder)  # another process may have stored it since the first look
            if not stands(task, results, preset.name):
                label = "[grid extension]" if task not in todo else f"[{bar.n + 1}/{len(todo)}]"
                _run_one(task, f"{label} {suite.name} {task.run_id}", suite=suite, preset=preset, folder=folder,
                         results=results, command=command, commit=commit, host=host)
        finally:
            claims.release(task.run_id)
    bar.close()
    return load_results(folder)
