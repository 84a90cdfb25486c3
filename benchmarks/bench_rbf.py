"""Benchmark the RBF solver: vectorised loss step vs a per-sample loop, and an epoch vs softmax.

Usage: python benchmarks/bench_rbf.py [--batch 32 --k 200 --dim 512 --num 6000] [--epoch]

1. Loss step time (forward + backward) of :func:`knnsolver.functional.rbf_loss`
   against a per-sample Python loop computing the same maths, in this process.
2. With ``--epoch`` and Fashion-MNIST at ``--data-dir``: wall time of one
   training epoch of the RBF solver (bank fill included) against one softmax
   epoch, through the trainer.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from knnsolver.functional.rbf import rbf_loss


def loop_loss(x, centres, centre_labels, neighbours, log_weights, sigma, labels):
    """The same Eq. 3/4 loss one sample at a time (no hard rows arise in this benchmark)."""
    total = x.new_zeros(())
    for b in range(x.shape[0]):
        nb = neighbours[b].long()
        logits = log_weights[nb] - ((x[b] - centres[nb].detach()) ** 2).sum(1) / (2 * sigma**2)
        true = centre_labels[nb] == labels[b]
        total = total + torch.logsumexp(logits, 0) - torch.logsumexp(logits[true], 0)
    return total / x.shape[0]


def time_step(fn, args, repeats: int) -> float:
    """Median seconds of forward + backward."""
    times = []
    for _ in range(repeats + 2):  # two warm-up runs
        x = args[0].detach().requires_grad_(True)
        w = args[4].detach().requires_grad_(True)
        start = time.perf_counter()
        fn(x, args[1], args[2], args[3], w, *args[5:]).backward()
        times.append(time.perf_counter() - start)
    return sorted(times[2:])[len(times[2:]) // 2]


def bench_step(a: argparse.Namespace) -> None:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(a.num, a.dim, generator=g)
    centre_labels = torch.randint(0, a.classes, (a.num,), generator=g)
    labels = torch.randint(0, a.classes, (a.batch,), generator=g)
    neighbours = torch.stack([torch.randperm(a.num, generator=g)[: a.k] for _ in range(a.batch)]).to(torch.int32)
    # Every row gets a true-class neighbour so both versions compute exactly Eq. 3/4.
    neighbours[:, 0] = torch.stack([(centre_labels == y).nonzero()[0, 0] for y in labels]).to(torch.int32)
    x = torch.randn(a.batch, a.dim, generator=g)
    args = (x, centres, centre_labels, neighbours, torch.zeros(a.num), float(a.dim) ** 0.5, labels)
    assert torch.allclose(rbf_loss(*args), loop_loss(*args), rtol=1e-4)
    vec = time_step(rbf_loss, args, a.repeats)
    loop = time_step(loop_loss, args, a.repeats)
    print(f"loss step (forward+backward), B={a.batch} k={a.k} d={a.dim} N={a.num}, median of {a.repeats}:")
    print(f"  vectorised rbf_loss  {vec * 1e3:8.2f} ms")
    print(f"  per-sample loop      {loop * 1e3:8.2f} ms")
    print(f"  speed-up             {loop / vec:8.1f} x")


def bench_epoch(a: argparse.Namespace) -> None:
    if not Path(a.data_dir).is_dir():
        print(f"epoch timing skipped: no Fashion-MNIST at {a.data_dir} (make data)")
        return
    from knnsolver.solvers.rbf import RBFSolver
    from knnsolver.training import TrainConfig, train

    fills: list[float] = []
    on_epoch_start = RBFSolver.on_epoch_start

    def timed(self, ctx):  # time the bank fill (full eval pass + neighbour graph) on its own
        start = time.perf_counter()
        on_epoch_start(self, ctx)
        fills.append(time.perf_counter() - start)

    RBFSolver.on_epoch_start = timed
    print(f"one training epoch on fashion-mnist, embedding_dim={a.epoch_dim}, batch 64 (trainer defaults):")
    for solver, options in (("softmax", {}), ("rbf", {"k": a.k})):
        with tempfile.TemporaryDirectory() as out:
            config = TrainConfig(
                dataset="fashion-mnist", data_dir=a.data_dir, solver=solver, solver_options=options, epochs=1,
                out=out, plots=False, progress=False, embedding_dim=a.epoch_dim, seed=0,
            )
            start = time.perf_counter()
            summary = train(config)
            total = time.perf_counter() - start
            row = json.loads((Path(out) / "log.jsonl").read_text().splitlines()[0])
        fill = f", bank fill {fills[-1]:6.1f} s" if solver == "rbf" else ""
        print(f"  {solver:8s} batch loop {row['seconds']:7.1f} s{fill}; whole train() with evaluation {total:7.1f} s;"
              f" test accuracy {summary['test_accuracy']:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--num", type=int, default=6000)
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--epoch", action="store_true", help="also time one Fashion-MNIST epoch, RBF vs softmax")
    p.add_argument("--epoch-dim", type=int, default=64, help="embedding size for the epoch timing")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("date:   ", datetime.datetime.now().isoformat(timespec="seconds"))
    print("machine:", platform.platform(), platform.processor() or platform.machine(),
          f"{os.cpu_count()} cpus, torch {torch.__version__} with {torch.get_num_threads()} threads")
    bench_step(a)
    if a.epoch:
        bench_epoch(a)


if __name__ == "__main__":
    main()
