"""``knnsolver bench``: run a suite, list the suites, render the report, or benchmark neighbour search.

    knnsolver bench SUITE [--preset full|gpu|tiny] [--out DIR] [--worker] [--solvers a,b] [--seeds 0,1]
        [--threads N] [--dry-run]
    knnsolver bench report [--results DIR] [--output BENCHMARKS.md] [--plots DIR]
    knnsolver bench list
    knnsolver bench search ...   (neighbour-search benchmark, knnsolver.bench.search)
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Sequence

from knnsolver.bench.claims import claims_of
from knnsolver.bench.suites import PRESETS, SUITES, build_specs, get_preset, get_suite
from knnsolver.errors import ConfigError

DEFAULT_RESULTS = "benchmarks/results"
DEFAULT_GPU_RESULTS = "benchmarks/results-gpu"
DEFAULT_REPORT = "BENCHMARKS.md"
DEFAULT_PLOTS = "benchmarks/plots"
USAGE = (
    "usage: knnsolver bench {" + ",".join([*SUITES, "report", "list", "search"]) + "} ...\n\n"
    "  SUITE    run a benchmark suite; each run is stored as it finishes, a second call resumes\n"
    "  report   render BENCHMARKS.md (tables, claims, plots) from the stored results\n"
    "  list     list the suites and the claims they test\n"
    "  search   benchmark the neighbour-search backends\n"
)


def _names(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return names


def _seeds(text: str) -> list[int]:
    try:
        return [int(t) for t in _names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def suite_parser(name: str) -> argparse.ArgumentParser:
    suite = get_suite(name)
    claims = " ".join(c.text for c in claims_of(name)) or "no claim; descriptive"
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     prog=f"knnsolver bench {name}", description=f"{suite.title}. Claims: {claims}")
    parser.add_argument("--preset", default="full", choices=list(PRESETS),
                        help="full: the Fashion-MNIST benchmark on the CPU (under 120 min per suite on 2 cores, "
                             "with 2 workers); gpu: the same at full data size on one GPU; tiny: digits, 1 epoch, a "
                             "smoke test (default: full)")
    parser.add_argument("--out", help=f"results folder (default: {DEFAULT_RESULTS}, or {DEFAULT_GPU_RESULTS} for a "
                                      "GPU preset: CPU and GPU results are never mixed)")
    parser.add_argument("--worker", action="store_true",
                        help="share the suite with other processes on the same results folder: each claims the next "
                             "run, and none times anything (the cost suite's timings wait for a call without "
                             "--worker, alone on the machine)")
    parser.add_argument("--solvers", type=_names, help="comma-separated solvers to include (default: all)")
    parser.add_argument("--seeds", type=_seeds, help="comma-separated seeds; the first one runs the grids "
                                                     "(default: the preset's)")
    parser.add_argument("--threads", type=_positive, default=1,
                        help="torch CPU threads (default: 1; the budgets were timed with 1)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs and which are done, run nothing")
    return parser


def cmd_suite(name: str, argv: Sequence[str]) -> int:
    import torch

    from knnsolver.bench.runner import check_one_preset, load_results, outdated, run_suite

    args = suite_parser(name).parse_args(argv)
    suite, preset = get_suite(name), get_preset(args.preset)
    args.out = args.out or (DEFAULT_GPU_RESULTS if preset.hardware == "gpu" else DEFAULT_RESULTS)
    if args.dry_run:  # judged as the run would judge them: a stored result that does not stand is redone
        check_one_preset(Path(args.out), preset.name)
        stored = load_results(Path(args.out) / name)
        specs = build_specs(suite, preset, Path(args.out), args.solvers, args.seeds)
        done = 0
        for spec in specs:
            why = outdated(spec, stored[spec.run_id], stored, preset.name) if spec.run_id in stored else None
            status = "todo" if spec.run_id not in stored else f"redo  ({why})" if why else "done"
            done += status == "done"
            print(f"{status[:4]}  {spec.run_id}{status[4:]}")
        print(f"{done} of {len(specs)} runs done")
        return 0
    torch.set_num_threads(args.threads)
    command = " ".join(["knnsolver", "bench", name, *map(shlex.quote, argv)])
    results = run_suite(suite, preset, args.out, args.solvers, args.seeds, command=command, worker=args.worker)
    print(f"{len(results)} results in {args.out}/{name}; render them with: knnsolver bench report --results {args.out}")
    return 0


def cmd_report(argv: Sequence[str]) -> int:
    from knnsolver.bench.report import write_report

    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     prog="knnsolver bench report", description="Render the benchmark report.")
    parser.add_argument("--results", default=DEFAULT_RESULTS, help=f"results folder (default: {DEFAULT_RESULTS})")
    parser.add_argument("--output", default=DEFAULT_REPORT, help=f"Markdown file to write (default: {DEFAULT_REPORT})")
    parser.add_argument("--plots", default=DEFAULT_PLOTS, help=f"folder for the PNG plots (default: {DEFAULT_PLOTS})")
    args = parser.parse_args(argv)
    path = write_report(args.results, args.output, args.plots)
    print(f"report written to {path}")
    return 0


def cmd_list(argv: Sequence[str]) -> int:
    argparse.ArgumentParser(allow_abbrev=False,
                            prog="knnsolver bench list", description="List the benchmark suites.").parse_args(argv)
    for suite in SUITES.values():
        print(f"{suite.name:16s} {suite.title}")
        for claim in claims_of(suite.name):
            print(f"{'':16s} claim: {claim.text}")
    return 0


def cmd_search(argv: Sequence[str]) -> int:
    from knnsolver.bench import search

    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     prog="knnsolver bench search", description="Benchmark neighbour-search backends.")
    search.add_arguments(parser)
    return search.run(parser.parse_args(argv))


def main(argv: Sequence[str]) -> int:
    """Entry point of ``knnsolver bench``; returns the exit status."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "report":
        return cmd_report(rest)
    if name == "list":
        return cmd_list(rest)
    if name == "search":
        return cmd_search(rest)
    if name not in SUITES:
        raise ConfigError(f"unknown benchmark suite {name!r}; choose one of: {', '.join([*SUITES, 'report', 'list', 'search'])}")
    return cmd_suite(name, rest)
