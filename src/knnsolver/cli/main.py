"""The ``knnsolver`` command: train, eval, bench, datasets, solvers.

Settings come from three layers, later ones winning: :class:`TrainConfig`'s
defaults, ``--config FILE`` (JSON or TOML), then flags. Every keyword option of
the chosen solver's constructor is a flag too (``knnsolver train --solver rbf
--help`` lists them). Errors made by the user print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import fields
from pathlib import Path
from typing import Any, Sequence, get_args, get_type_hints

from knnsolver.distributed import launch_rank
from knnsolver.errors import ConfigError, KnnSolverError, StorageError
from knnsolver.registry import DATASETS, SOLVERS, options_of, parse_value

_COMMON = ("embedding_dim", "num_classes", "num_train")
# TrainConfig fields that are not plain flags (handled separately or not user-facing).
_NOT_FLAGS = {"solver_options"}


def _flag_type(kind: type, optional: bool = False):
    """An argparse ``type`` that parses ``kind`` (``none`` only when ``optional``) and reports our message on failure."""

    def parse(text: str) -> Any:
        try:
            return parse_value(text, kind, optional)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = kind.__name__
    return parse


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from knnsolver.training.config import TrainConfig

    hints = get_type_hints(TrainConfig)
    group = parser.add_argument_group("training")
    for f in fields(TrainConfig):
        if f.name in _NOT_FLAGS:
            continue
        args = get_args(hints[f.name])
        kind = next((a for a in args if a is not type(None)), hints[f.name])
        default = f.default
        group.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, default=argparse.SUPPRESS, metavar=kind.__name__.upper(),
            type=_flag_type(kind, type(None) in args), help=f"(default: {default})",
        )


def _add_solver_flags(parser: argparse.ArgumentParser, solver: str) -> dict[str, str]:
    """Add the solver's constructor options as flags; return {dest: option name}."""
    from knnsolver.training.config import TrainConfig

    taken = {f.name for f in fields(TrainConfig)}
    group = parser.add_argument_group(f"{solver} solver options")
    dests = {}
    for opt in options_of(SOLVERS.get(solver), skip=_COMMON):
        flag = opt.name if opt.name not in taken else f"solver_{opt.name}"
        dest = f"solveropt__{opt.name}"
        group.add_argument(
            f"--{flag.replace('_', '-')}", dest=dest, default=argparse.SUPPRESS, metavar=opt.type.__name__.upper(),
            type=_flag_type(opt.type, opt.default is None), help=f"(default: {opt.default})",
        )
        dests[dest] = opt.name
    return dests


def _train_parser(solver: str | None) -> tuple[argparse.ArgumentParser, dict[str, str]]:
    parser = argparse.ArgumentParser(prog="knnsolver train", description="Train a network with a solver and evaluate it.")
    parser.add_argument("--config", help="JSON or TOML file of settings (keys as the flags, with underscores)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run in --out; the old run stays until the new one saves its first epoch")
    _add_train_flags(parser)
    dests = _add_solver_flags(parser, solver) if solver else {}
    return parser, dests


def cmd_train(argv: Sequence[str]) -> int:
    from knnsolver.training import TrainConfig, load_config_file, train

    pre = argparse.ArgumentParser(add_help=False)
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
    cfg = TrainConfig.from_dict({**file_cfg, **args, "solver_options": solver_options})
    summary = train(cfg, resume=resume, overwrite=overwrite)
    if launch_rank() == 0:  # under torchrun every process returns the summary; one prints it
        print(json.dumps(summary, indent=2, sort_keys=True))
        print(f"run written to {cfg.out}")
    return 0


def _writable_target(path: str) -> Path:
    """``path`` as a file to write, refused with one line when its folder is missing or it is a folder."""
    target = Path(path)
    if target.is_dir():
        raise StorageError(f"--out {target} is a folder; give a file name")
    if not target.parent.is_dir():
        raise StorageError(f"cannot write {target}: folder {target.parent} does not exist; create it first")
    return target


def cmd_eval(argv: Sequence[str]) -> int:
    from knnsolver.training import evaluate_saved
    from knnsolver.training.checkpoint import write_json

    parser = argparse.ArgumentParser(
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

    parser = argparse.ArgumentParser(
        prog="knnsolver embed", description="Write a saved run's embeddings and labels to .npy files."
    )
    parser.add_argument("run_dir", help="folder written by knnsolver train")
    parser.add_argument("--part", default="train", help="train (no augmentation), val or test (default: train)")
    parser.add_argument("--out", required=True, help="embeddings file FILE.npy; labels go to FILE_labels.npy")
    parser.add_argument("--raw", action="store_true",
                        help="the network's raw outputs instead of the solver's own space (e.g. L2-normalised)")
    args = parser.parse_args(argv)
    stem = args.out[:-4] if args.out.endswith(".npy") else args.out
    _writable_target(f"{stem}.npy")
    emb, labels = embed_saved(args.run_dir, args.part, raw=args.raw)
    try:
        np.save(f"{stem}.npy", emb.cpu().numpy())
        np.save(f"{stem}_labels.npy", labels.cpu().numpy())
    except OSError as err:
        raise StorageError(f"cannot write {stem}.npy: {err.strerror or err}; free space or choose another --out") from None
    print(f"wrote {emb.shape[0]} x {emb.shape[1]} embeddings to {stem}.npy and labels to {stem}_labels.npy")
    return 0


def cmd_datasets(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(prog="knnsolver datasets", description="List datasets.").parse_args(argv)
    for name in DATASETS.names():
        print(f"{name:16s} {DATASETS.describe(name)}")
    from knnsolver.data.datasets import IMAGE_FOLDER_HELP

    print(f"\n{IMAGE_FOLDER_HELP}", end="")
    return 0


def cmd_solvers(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(prog="knnsolver solvers", description="List solvers and their options.").parse_args(argv)
    for name in SOLVERS.names():
        print(f"{name:16s} {SOLVERS.describe(name)}")
        try:
            opts = options_of(SOLVERS.get(name), skip=_COMMON)
        except ImportError as exc:
            print(f"{'':16s} (unavailable: {exc})")
            continue
        if opts:
            print(f"{'':16s} options: " + ", ".join(f"{o.name}={o.default}" for o in opts))
    return 0


def cmd_bench(argv: Sequence[str]) -> int:
    from knnsolver.bench.cli import main as bench_main

    return bench_main(argv)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "embed": cmd_embed, "bench": cmd_bench, "datasets": cmd_datasets, "solvers": cmd_solvers}


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"knnsolver: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _one_line_warning
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: knnsolver {" + ",".join(COMMANDS) + "} ...\n\n"
              "  train     train a network with a solver and evaluate it\n"
              "  eval      re-evaluate a saved run\n"
              "  embed     write a saved run's embeddings to .npy\n"
              "  bench     run a benchmark suite or render the report\n"
              "  datasets  list datasets\n"
              "  solvers   list solvers and their options")
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
    except OSError as exc:  # the environment: a missing, unreadable or unwritable file, a full disk
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        print(f"knnsolver: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"knnsolver: interrupted{'; ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
