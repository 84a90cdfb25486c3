"""Time and peak memory of knnsolver.metrics.retrieval_metrics at Fashion-MNIST scale.

60,000 random 64-d embeddings in 10 classes, queries = reference (own row left
out), so MAP@R needs the top R ~ 6,000 neighbours of every query. A full
N x N float32 distance matrix would need 14.4 GB; the blocked computation must
stay far below that. Peak memory is the process's peak resident set size
(torch allocations are invisible to tracemalloc) minus its resident size just
before the call.

    .venv/bin/python benchmarks/bench_metrics.py [--n 60000] [--dim 64] [--classes 10]
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from knnsolver.metrics import retrieval_metrics

# Peak extra memory allowed: 1 GiB, against 14.4 GB for the N x N matrix at the default size.
_LIMIT_BYTES = 2**30


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    emb = torch.from_numpy(rng.normal(size=(args.n, args.dim)).astype(np.float32))
    labels = torch.from_numpy(rng.integers(0, args.classes, args.n))

    before = _rss_bytes()
    start = time.perf_counter()
    results = retrieval_metrics(emb, labels)
    seconds = time.perf_counter() - start
    peak_extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    full_matrix = args.n * args.n * 4

    print(f"retrieval_metrics: {args.n} x {args.dim} embeddings, {args.classes} classes, "
          f"{torch.get_num_threads()} torch threads")
    print(f"time: {seconds:.1f} s")
    print(f"peak extra memory: {peak_extra / 2**20:.0f} MiB "
          f"(N x N float32 matrix: {full_matrix / 1e9:.1f} GB, ratio {peak_extra / full_matrix:.4f})")
    for key, value in results.items():
        print(f"{key}: {value:.6f}")
    assert peak_extra < _LIMIT_BYTES, f"peak extra memory {peak_extra / 2**20:.0f} MiB exceeds 1 GiB"


if __name__ == "__main__":
    main()
