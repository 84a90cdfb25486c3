"""The ``knnsolver`` command: train, eval, bench, datasets, solvers.

Settings come from three layers, later ones winning: :class:`TrainConfig`'s
defaults, ``--config FILE`` (JSON or TOML), then flags. Every keyword option of
the chosen solver's constructor is a flag too (``knnsolver train --solver rbf
--help`` lists them). Errors made by the user print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import os
import select
import signal
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence, get_args, get_type_hints

from knnsolver.constraints import Interval
from knnsolver.distributed import launch_rank
from knnsolver.docstrings import one_line, option_docs
from knnsolver.errors import ConfigError, KnnSolverError, StorageError
from knnsolver.registry import DATASETS, MODELS, SEARCHES, SOLVERS, Option, Registry, options_of, parse_value

_COMMON = ("embedding_dim", "num_classes", "num_train")
# TrainConfig fields that are not plain flags (handled separately or not user-facing).
_NOT_FLAGS = {"solver_options"}


def _flag_type(kind: type, optional: bool = False, words: tuple[str, ...] = ()):
    """An argparse ``type`` that parses ``kind`` or one of ``words`` (``none`` only when ``optional``) and reports
    our message on failure."""

    def parse(text: str) -> Any:
        try:
            return parse_value(text, kind, optional, words)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = kind.__name__
    return parse


def _metavar(opt: Option) -> str:
    if opt.choices:
        return "{" + ",".join(opt.choices) + "}"
    return "|".join([opt.type.__name__.upper(), *opt.words])


def _add_option(group: argparse._ArgumentGroup, flag: str, dest: str, opt: Option) -> None:
    """The flag ``flag`` for ``opt``, with its help line, choices or words and default (:meth:`Option.describe`)."""
    group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, metavar=_metavar(opt),
                       type=_flag_type(opt.type, opt.default is None, opt.words), help=opt.describe())


def train_options() -> list[Option]:
    """The training settings that are flags: :class:`TrainConfig`'s fields with their help lines (from its
    ``Attributes:`` docstring section) and choices (those it validates with, and the registries' names)."""
    from knnsolver.training.config import _CHOICES, TrainConfig

    hints = get_type_hints(TrainConfig)
    docs = option_docs(TrainConfig)
    names = {"dataset": DATASETS, "solver": SOLVERS, "model": MODELS}
    out = []
    for f in fields(TrainConfig):
        if f.name in _NOT_FLAGS:
            continue
        args = get_args(hints[f.name])
        kind = next((a for a in args if a is not type(None)), hints[f.name])
        choices = tuple(_CHOICES.get(f.name, ())) or tuple(names[f.name].names() if f.name in names else ())
        if f.name == "model":  # any timm model besides the registered ones: not a closed list
            choices = ()
        out.append(Option(f.name, f.default, kind, one_line(docs.get(f.name, "")), choices))
    return out


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training")
    for opt in train_options():
        _add_option(group, f"--{opt.name.replace('_', '-')}", opt.name, opt)


def _solver_flag(option: str) -> str:
    """The flag of a solver option: ``--NAME``, or ``--solver-NAME`` where a training setting has the name."""
    from knnsolver.training.config import TrainConfig

    taken = {f.name for f in fields(TrainConfig)}
    return f"--{(option if option not in taken else f'solver_{option}').replace('_', '-')}"


def _add_solver_flags(parser: argparse.ArgumentParser, solver: str) -> dict[str, str]:
    """Add the solver's constructor options as flags; return {dest: option name}."""
    group = parser.add_argument_group(
        f"{solver} solver options", f"another solver's: knnsolver train --solver NAME --help ({', '.join(SOLVERS.names())})")
    dests = {}
    for opt in options_of(SOLVERS.get(solver), skip=_COMMON):
        dest = f"solveropt__{opt.name}"
        _add_option(group, _solver_flag(opt.name), dest, opt)
        dests[dest] = opt.name
    return dests


def _train_parser(solver: str | None) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    from knnsolver.training.config import TrainConfig

    parser = argparse.ArgumentParser(allow_abbrev=False,
        prog="knnsolver train", description="Train a network with a solver and evaluate it.",
        epilog=f"The solver options listed are those of --solver ({TrainConfig.solver} unless given); "
               "knnsolver train --solver NAME --help lists solver NAME's, and knnsolver solvers lists every solver "
               "with its options. A config file sets solver options under solver_options.")
    parser.add_argument("--config", help="JSON or TOML file of settings (keys as the flags, with underscores)")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    start.add_argument("--overwrite", action="store_true",
                        help="replace an existing run in --out; the old run stays until the new one saves its first epoch")
    _add_train_flags(parser)
    dests = _add_solver_flags(parser, solver) if solver else {}
    return parser, dests


def cmd_train(argv: Sequence[str]) -> int:
    from knnsolver.training import TrainConfig, load_config_file, train

    pre = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--solver")
    known, _ = pre.parse_known_args(argv)
    file_cfg: dict[str, Any] = load_config_file(known.config) if known.config else {}
    solver = known.solver or file_cfg.get("solver", TrainConfig.solver)
    if not isinstance(solver, str):
        raise ConfigError(f"solver in {known.config} must be a solver name, got {solver!r}")
    parser, dests = _train_parser(solver)
    args = vars(parser.parse_args(argv))
    resume, overwrite = args.pop("resume"), args.pop("overwrite")
    args.pop("config")
    solver_options = file_cfg.pop("solver_options", {})
    if not isinstance(solver_options, dict):
        raise ConfigError(f"solver_options in {known.config} must be a mapping of option name to value, "
                          f"got {solver_options!r}")
    solver_options = dict(solver_options)
    solver_options.update({dests[d]: args.pop(d) for d in list(args) if d in dests})
    given = {**file_cfg, **args}
    if given.get("compile") is False and given.get("compile_mode", "default") != "default":
        raise ConfigError(f"compile is false but compile_mode {given['compile_mode']!r} compiles; drop one of them")
    cfg = TrainConfig.from_dict({**given, "solver_options": solver_options})
    summary = train(cfg, resume=resume, overwrite=overwrite)
    if launch_rank() == 0:  # under torchrun every process returns the summary; one prints it
        print(json.dumps(summary, indent=2, sort_keys=True))
        print(f"run written to {cfg.out}")
    return 0


def _writable_target(path: str) -> Path:
    """``path`` as a file to write, its folder created now (as ``train --out`` creates its run folder), so a
    path that cannot be written fails in one line before any work; refused when it is a folder."""
    target = Path(path)
    if target.is_dir():
        raise StorageError(f"--out {target} is a folder; give a file name")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(f"cannot write {target}: cannot create folder {target.parent} ({err.strerror or err}); "
                           "choose a writable --out") from None
    return target


def cmd_eval(argv: Sequence[str]) -> int:
    from knnsolver.training import evaluate_saved
    from knnsolver.training.checkpoint import write_json

    parser = argparse.ArgumentParser(allow_abbrev=False,
        prog="knnsolver eval",
        description="Re-evaluate a saved run's best checkpoint on its test split; nothing in the run folder is written.",
    )
    parser.add_argument("run_dir", help="folder written by knnsolver train")
    parser.add_argument("--out", help="also write the result to this JSON file (outside or inside the run folder)")
    parser.add_argument("--unfinished", action="store_true",
                        help="score the best epoch so far of a run whose training has not finished")
    args = parser.parse_args(argv)
    target = _writable_target(args.out) if args.out else None
    summary = evaluate_saved(args.run_dir, unfinished=args.unfinished)
    if target is not None:
        write_json(summary, target)
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


def cmd_embed(argv: Sequence[str]) -> int:
    import numpy as np

    from knnsolver.training import embed_saved

    parser = argparse.ArgumentParser(allow_abbrev=False,
        prog="knnsolver embed", description="Write a saved run's embeddings and labels to .npy files, or one .npz."
    )
    parser.add_argument("run_dir", help="folder written by knnsolver train")
    parser.add_argument("--part", default="train", help="train (no augmentation), val or test (default: train)")
    parser.add_argument("--out", required=True,
                        help="embeddings file FILE.npy (labels go to FILE_labels.npy), or FILE.npz holding both as x "
                             "and y, which --dataset embeddings --data-dir FILE.npz reads")
    parser.add_argument("--raw", action="store_true",
                        help="the network's raw outputs instead of the solver's own space (e.g. L2-normalised)")
    args = parser.parse_args(argv)
    archive = args.out.endswith(".npz")
    stem = args.out[:-4] if args.out.endswith((".npy", ".npz")) else args.out
    _writable_target(args.out if archive else f"{stem}.npy")
    emb, labels = embed_saved(args.run_dir, args.part, raw=args.raw)
    x, y = emb.cpu().numpy(), labels.cpu().numpy()
    try:
        if archive:
            np.savez(args.out, x=x, y=y)
        else:
            np.save(f"{stem}.npy", x)
            np.save(f"{stem}_labels.npy", y)
    except OSError as err:
        raise StorageError(f"cannot write {args.out}: {err.strerror or err}; free space or choose another --out") from None
    where = f"{args.out} (x, y)" if archive else f"{stem}.npy and labels to {stem}_labels.npy"
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {where}")
    return 0


def cmd_datasets(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(allow_abbrev=False,
                            prog="knnsolver datasets", description="List datasets.").parse_args(argv)
    for name in DATASETS.names():
        print(f"{name:16s} {DATASETS.describe(name)}")
    from knnsolver.data.datasets import IMAGE_FOLDER_HELP

    print(f"\n{IMAGE_FOLDER_HELP}", end="")
    return 0


def _list_options(registry: Registry, command: str, argv: Sequence[str]) -> int:
    """List a registry's entries with their options; with a name, that entry's options with their help lines."""
    parser = argparse.ArgumentParser(allow_abbrev=False, prog=f"knnsolver {command}",
                                     description=f"List {command} and their options, or explain one {registry.kind}'s.")
    parser.add_argument("name", nargs="?", choices=registry.names(), help="explain this one's options")
    args = parser.parse_args(argv)
    for name in [args.name] if args.name else registry.names():
        print(f"{name:16s} {registry.describe(name)}")
        try:
            opts = options_of(registry.get(name), skip=_COMMON)
        except ImportError as exc:
            print(f"{'':16s} (unavailable: {exc})")
            continue
        if args.name:
            for o in opts:
                # Solver options are flags of knnsolver train; a search backend's are keyword options.
                shown = f"{_solver_flag(o.name)} {_metavar(o)}" if registry is SOLVERS else f"{o.name} ({_metavar(o)})"
                print(f"  {shown}\n      {o.describe()}")
        elif opts:
            print(f"{'':16s} options: " + ", ".join(f"{o.name}={o.default}" for o in opts))
    if not args.name:
        print(f"\nknnsolver {command} NAME explains each option of NAME.")
    return 0


def cmd_solvers(argv: Sequence[str]) -> int:
    return _list_options(SOLVERS, "solvers", argv)


def cmd_searches(argv: Sequence[str]) -> int:
    return _list_options(SEARCHES, "searches", argv)


def _model_parser(command: str, description: str, inputs: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(allow_abbrev=False, prog=f"knnsolver {command}", description=description)
    parser.add_argument("run_dir", metavar="RUN",
                        help="a run folder written by knnsolver train, or a model folder written by add-classes")
    if inputs:
        parser.add_argument("inputs", metavar="INPUT", nargs="+",
                            help="image files, folders of images (searched recursively) or .npy arrays of inputs "
                                 "(feature vectors for runs trained on embeddings), one row per input")
        parser.add_argument("--format", choices=("csv", "json"), default="csv", help="output format (default: csv)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    return parser


def _print_rows(rows: list[dict[str, Any]], columns: list[str], fmt: str, nested: str | None = None) -> None:
    """Rows as CSV (one line per nested item when ``nested`` names a list in each row) or as a JSON list."""
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    import csv

    writer = csv.DictWriter(sys.stdout, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        for item in row[nested] if nested else [{}]:
            writer.writerow({**row, **item})


def cmd_predict(argv: Sequence[str]) -> int:
    from knnsolver.inference import UNKNOWN, load
    from knnsolver.inference.inputs import collect
    from knnsolver.inference.openset import reject

    parser = _model_parser("predict", "Predict the class of each input with a trained model: its top classes and "
                                      "their probabilities, or unknown (-1) below --reject-below.")
    parser.add_argument("--top-k", type=_flag_type(int), default=1, help="classes listed per input, most probable "
                                                                          "first (default: 1)")
    parser.add_argument("--reject-below", type=_flag_type(float), metavar="P",
                        help="answer unknown (-1) when the top class probability is below P; choose P for a target "
                             "false-accept rate with KnnModel.choose_threshold (default: never reject)")
    args = parser.parse_args(argv)
    Interval(1).check("--top-k", args.top_k)
    Interval(0, hint=" (above 1 rejects every input)").check("--reject-below", args.reject_below)
    model = load(args.run_dir, args.device)
    items = collect(args.inputs, model.spec)
    proba = model.predict_proba(items)
    predicted = reject(proba, args.reject_below)
    top = proba.topk(min(args.top_k, model.num_classes), dim=1)
    rows = []
    for name, answer, values, classes in zip(items.names, predicted.tolist(), top.values.tolist(), top.indices.tolist()):
        rows.append({"input": name, "prediction": answer, "name": "unknown" if answer == UNKNOWN else model.classes[answer],
                     "top": [{"rank": r + 1, "class": c, "class_name": model.classes[c], "probability": round(v, 6)}
                             for r, (v, c) in enumerate(zip(values, classes))]})
    _print_rows(rows, ["input", "prediction", "name", "rank", "class", "class_name", "probability"], args.format, "top")
    return 0


def cmd_search(argv: Sequence[str]) -> int:
    from knnsolver.inference import load

    parser = _model_parser("search", "Find each input's nearest reference items (training and added examples) in the "
                                     "model's embedding space.")
    parser.add_argument("--k", type=_flag_type(int), default=10, help="items listed per input, nearest first (default: 10)")
    args = parser.parse_args(argv)
    Interval(1).check("--k", args.k)
    model = load(args.run_dir, args.device)
    result = model.search(args.inputs, args.k)
    rows = []
    for q, name in enumerate(result.queries):
        rows.append({"input": name, "neighbours": [
            {"rank": r + 1, "id": int(result.ids[q, r]), "label": int(result.labels[q, r]),
             "name": model.classes[int(result.labels[q, r])], "distance": round(float(result.distances[q, r]), 6),
             "path": result.paths[q][r]} for r in range(result.ids.shape[1])]})
    _print_rows(rows, ["input", "rank", "id", "label", "name", "distance", "path"], args.format, "neighbours")
    return 0


def _new_folder(path: str) -> Path:
    """``path`` as a folder to create, refused with one line when it holds anything already."""
    target = Path(path)
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise StorageError(f"--out {target} already exists and is not empty; choose a new folder")
    return target


def cmd_add_classes(argv: Sequence[str]) -> int:
    from knnsolver.inference import load
    from knnsolver.inference.inputs import class_folders

    parser = _model_parser("add-classes", "Add the labelled examples of a class-folder tree to a model's reference "
                                          "set (new classes too), without retraining; write a new model folder.",
                           inputs=False)
    parser.add_argument("--data-dir", required=True, metavar="FOLDER",
                        help="one sub-folder of images per class; a folder named as a known class adds to it, "
                             "any other name makes a new class")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="NEW_RUN", help="new (or empty) folder to write the grown model to")
    where.add_argument("--in-place", action="store_true",
                       help="update RUN itself (its model.pt; a training run's own files stay untouched)")
    args = parser.parse_args(argv)
    target = Path(args.run_dir) if args.in_place else _new_folder(args.out)
    folders = class_folders(args.data_dir)
    model = load(args.run_dir, args.device)
    known = set(model.classes)
    paths = [str(path) for _, files in folders for path in files]
    labels = [name for name, files in folders for _ in files]
    model.add(paths, labels)
    model.save(target)
    new = [name for name, _ in folders if name not in known]
    print(f"added {len(paths)} examples of {len(folders)} classes ({len(new)} new: {', '.join(new) or 'none'}); "
          f"the model now knows {model.num_classes} classes and {model.reference_size} reference examples; "
          f"written to {target}")
    return 0


def cmd_export(argv: Sequence[str]) -> int:
    from knnsolver.inference import load
    from knnsolver.inference.export import FORMATS, check_atol

    parser = _model_parser("export", "Export a model's network (with the solver's transform) for serving, checked to "
                                     "reproduce its embeddings, and its reference set as .npy files.", inputs=False)
    parser.add_argument("--format", choices=FORMATS, default="torchscript", help="network file format "
                                                                                  "(default: torchscript)")
    parser.add_argument("--out", required=True, metavar="FILE",
                        help="the network file; FILE_reference.npy, FILE_reference_labels.npy and FILE_classes.json "
                             "are written beside it")
    parser.add_argument("--atol", type=_flag_type(float), default=1e-4,
                        help="largest embedding difference the check accepts (default: 1e-4)")
    args = parser.parse_args(argv)
    check_atol(args.atol, "--atol")  # before the folder is made and the model loaded
    _writable_target(args.out)
    report = load(args.run_dir, args.device).export(args.out, args.format, args.atol)
    print(json.dumps(report, indent=2))
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    from knnsolver.bench.cli import main as bench_main

    return bench_main(argv)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "embed": cmd_embed, "predict": cmd_predict, "search": cmd_search,
            "add-classes": cmd_add_classes, "export": cmd_export, "bench": cmd_bench, "datasets": cmd_datasets,
            "solvers": cmd_solvers, "searches": cmd_searches}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"knnsolver: warning: {message}\n"


def _output_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone: the descriptor polls as in error. (Flushing
    cannot tell: after a failed write Python drops the buffer, so a second flush succeeds.)"""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _one_line_warning
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: knnsolver {" + ",".join(COMMANDS) + "} ...\n\n"
              "  train        train a network with a solver and evaluate it\n"
              "  eval         re-evaluate a saved run\n"
              "  embed        write a saved run's embeddings to .npy\n"
              "  predict      classify inputs with a trained model (probabilities, top-k, rejection)\n"
              "  search       find inputs' nearest reference examples\n"
              "  add-classes  add labelled examples (new classes too) to a model without retraining\n"
              "  export       write a model's network (TorchScript or ONNX) and reference set\n"
              "  bench        run a benchmark suite or render the report\n"
              "  datasets     list datasets\n"
              "  solvers      list solvers and their options (solvers NAME explains them)\n"
              "  searches     list neighbour-search backends and their options\n\n"
              "knnsolver COMMAND --help explains a command's flags.")
        return 0 if argv else 2
    command = COMMANDS.get(argv[0])
    if command is None:
        print(f"knnsolver: error: unknown command {argv[0]!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return command(argv[1:])
    except (KnnSolverError, FloatingPointError) as exc:
        print(f"knnsolver: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError as exc:
        if _output_closed():  # the reader of the output went away (`| head`): stop quietly, as a SIGPIPE would
            try:  # Python flushes stdout at exit, which would fail again
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except (OSError, ValueError, AttributeError):
                pass
            return 128 + signal.SIGPIPE
        print(f"knnsolver: error: {exc.strerror or exc}", file=sys.stderr)  # another pipe than the output
        return 2
    except OSError as exc:  # the environment: a missing, unreadable or unwritable file, a full disk
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"knnsolver: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        if launch_rank() == 0:  # under torchrun rank 0 alone says what is saved
            print(f"knnsolver: interrupted{'; ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
