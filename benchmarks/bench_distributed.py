"""Data-parallel training speed: the same ``knnsolver train`` run on 1 process and under torchrun.

Launches, one after the other, (a) one process with 1 thread, (b) one process with
``--procs`` threads and (c) ``--procs`` processes of 1 thread each under torchrun, and
prints per run the mean batch-loop seconds per epoch (``seconds`` in log.jsonl, the
slowest process's share of the epoch as seen by rank 0), the wall time of the whole
command (start-up, bank refreshes, validation and test included) and the test
accuracy, with ratios against (a). Same data, solver, seed and epochs for all.

    .venv/bin/python benchmarks/bench_distributed.py [--dataset fashion-mnist] [--solver rbf]
        [--epochs 3] [--max-per-class 1000] [--procs 2] [--out /tmp/bench_distributed]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

BIN = Path(sys.executable).parent


def run(name: str, launcher: list[str], threads: int, args: argparse.Namespace) -> dict[str, float]:
    out = Path(args.out) / name
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*launcher, str(BIN / "knnsolver"), "train", "--dataset", args.dataset, "--solver", args.solver,
           "--epochs", str(args.epochs), "--max-per-class", str(args.max_per_class), "--model", "conv28",
           "--width", "16", "--embedding-dim", "64", "--batch-size", "64", "--seed", "0",
           "--progress", "false", "--plots", "false", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return {"epoch_s": statistics.mean(r["seconds"] for r in log), "wall_s": wall,
            "accuracy": summary["test_accuracy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--solver", default="rbf")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-per-class", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--out", default="/tmp/bench_distributed")
    args = parser.parse_args()
    torchrun = [str(BIN / "torchrun"), "--nproc-per-node", str(args.procs), "--no-python"]
    cases = [("1 process x 1 thread", [], 1), (f"1 process x {args.procs} threads", [], args.procs),
             (f"{args.procs} processes x 1 thread (torchrun)", torchrun, 1)]
    print(f"# {datetime.date.today()} {platform.processor() or platform.machine()} {os.cpu_count()} cores, "
          f"torch {torch.__version__}; {args.dataset} {args.max_per_class}/class, {args.solver}, {args.epochs} epochs")
    print("| run | batch loop s/epoch | ratio | wall s | ratio | test accuracy |")
    print("|---|---|---|---|---|---|")
    base = None
    for i, (name, launcher, threads) in enumerate(cases):
        r = run(f"case{i}", launcher, threads, args)
        base = base or r
        print(f"| {name} | {r['epoch_s']:.1f} | {base['epoch_s'] / r['epoch_s']:.2f}x | {r['wall_s']:.1f} | "
              f"{base['wall_s'] / r['wall_s']:.2f}x | {r['accuracy']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
