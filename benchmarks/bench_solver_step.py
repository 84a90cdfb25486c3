"""Loss step time (forward + backward) of each solver against pytorch-metric-learning's NCA and triplet losses.

Random ``d``-dimensional embeddings (a leaf with ``requires_grad``) with class-balanced
batch labels (4 samples per class, classes cycling through ``C``), as the trainer's
balanced sampler gives pair losses. All rows run in this process with the same inputs;
the time is the median of ``--repeats`` steps after one warm-up step. Bank-based solvers
(``rbf``, ``crc[bank]``) use a bank of ``--bank`` training rows whose first ``B`` rows are
the batch. ``centralized`` with ``C > d`` runs with ``allow_correlated=True``.
pml's ``TripletMarginLoss`` (all triplets) is skipped where a batch holds more than
``--max-triplets`` triplets (its B x B x B mask and index tensors).

    .venv/bin/python benchmarks/bench_solver_step.py [--batch-sizes 64 256 1024] [--classes 10 1000]
        [--dim 128] [--repeats 5] [--bank 10000] [--threads 1]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from typing import Callable

import torch
from pytorch_metric_learning import losses
from torch import Tensor

from knnsolver.errors import KnnSolverError
from knnsolver.interfaces import EpochContext
from knnsolver.bench.provenance import cpu_name
from knnsolver.bench.runner import triplet_count
from knnsolver.registry import SOLVERS

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]
SAMPLES_PER_CLASS = 4


def balanced_labels(n: int, num_classes: int) -> Tensor:
    return (torch.arange(n) // SAMPLES_PER_CLASS) % num_classes


def solver_cases(dim: int, num_classes: int, bank: int) -> tuple[dict[str, LossFn], list[str]]:
    """The timed loss functions ``f(embeddings, labels, rows)`` and notes on rows that could not run."""
    bank_emb = torch.randn(bank, dim)
    bank_labels = balanced_labels(bank, num_classes)
    ctx = EpochContext(0, lambda: (bank_emb, bank_labels), bank)
    cases: dict[str, LossFn] = {
        "hal": SOLVERS.build("hal", embedding_dim=dim, num_classes=num_classes),
        "crc": SOLVERS.build("crc", embedding_dim=dim, num_classes=num_classes),
        "crc[bank]": SOLVERS.build("crc", embedding_dim=dim, num_classes=num_classes, dictionary="bank"),
        "centralized": SOLVERS.build("centralized", embedding_dim=dim, num_classes=num_classes,
                                     allow_correlated=num_classes > dim),
    }
    notes = []
    try:
        cases["rbf"] = SOLVERS.build("rbf", embedding_dim=dim, num_classes=num_classes, num_train=bank)
    except (ImportError, KnnSolverError) as err:  # the RBF solver is optional here
        notes.append(f"rbf skipped: {err}")
    for solver in cases.values():
        solver.on_epoch_start(ctx)
    nca, triplet = losses.NCALoss(), losses.TripletMarginLoss()
    cases["pml NCALoss"] = lambda emb, labels, rows: nca(emb, labels)
    cases["pml TripletMarginLoss"] = lambda emb, labels, rows: triplet(emb, labels)
    return cases, notes


def time_step(fn: LossFn, emb: Tensor, labels: Tensor, rows: Tensor, repeats: int) -> float:
    """Median seconds of ``fn(...).backward()`` over ``repeats`` steps after one warm-up."""
    times = []
    for i in range(repeats + 1):
        emb.grad = None
        start = time.perf_counter()
        fn(emb, labels, rows).backward()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--classes", type=int, nargs="+", default=[10, 1000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--bank", type=int, default=10_000, help="training rows in the bank of rbf and crc[bank]")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-triplets", type=float, default=3e7)
    args = parser.parse_args()
    if args.bank < max(args.batch_sizes):
        parser.error("--bank must be at least the largest batch size")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.node()}, {cpu_name()}, {platform.system()} {platform.release()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"d={args.dim}, bank={args.bank}, {SAMPLES_PER_CLASS} samples per class, median of {args.repeats} steps; "
          "ratio = time / pml NCALoss time\n")
    print(f"{'C':>5} {'B':>5}  {'solver':<22} {'ms/step':>9} {'ratio':>7}")
    for num_classes in args.classes:
        cases, notes = solver_cases(args.dim, num_classes, args.bank)
        for note in notes:
            print(f"# {note}")
        for batch in args.batch_sizes:
            emb = torch.randn(batch, args.dim, requires_grad=True)
            labels, rows = balanced_labels(batch, num_classes), torch.arange(batch)
            seconds: dict[str, float | None] = {}
            for name, fn in cases.items():
                skip = name == "pml TripletMarginLoss" and triplet_count(labels) > args.max_triplets
                seconds[name] = None if skip else time_step(fn, emb, labels, rows, args.repeats)
            for name, value in seconds.items():
                if value is None:
                    print(f"{num_classes:>5} {batch:>5}  {name:<22} {'skipped':>9}   ({triplet_count(labels):.2g} triplets)")
                else:
                    print(f"{num_classes:>5} {batch:>5}  {name:<22} {1e3 * value:>9.2f} {value / seconds['pml NCALoss']:>7.2f}")
        print()


if __name__ == "__main__":
    main()
