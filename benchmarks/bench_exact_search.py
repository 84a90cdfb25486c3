"""Exact search: the ``exact`` backend (on the CPU, or on CUDA with ``--device cuda``) against faiss
``IndexFlatL2`` on the CPU, in one process.

For each bank size N, dimension d and k, on a clustered synthetic bank
(:func:`knnsolver.bench.search.clustered`, as in the crossover benchmark):

* graph: ``ExactSearch().build(bank).graph(k)`` against ``IndexFlatL2`` add plus
  a search of all N points for ``k + 1`` neighbours (the own row is dropped
  afterwards, untimed);
* query: ``ExactSearch().build(bank).search(queries, k)`` against
  ``IndexFlatL2`` add plus search, for ``--queries`` held-out points (on the
  CPU the exact backend searches queries with ``IndexFlatL2`` itself, so this
  ratio shows only its overhead).

Both run with ``torch.get_num_threads()`` threads (``--threads``; faiss gets as
many OpenMP threads). Times are the best of ``--repeats`` interleaved runs,
after a warm-up that loads the numba kernels. ratio = exact / faiss-flat (below
1: exact is faster); agree = share of graph entries equal to faiss's (exact
searches may order tied neighbours differently).

    .venv/bin/python benchmarks/bench_exact_search.py [--sizes 5000 20000 54000] [--dims 64 128]
        [--ks 10 200] [--queries 10000] [--repeats 3] [--threads N]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from typing import Callable

import faiss
import numpy as np
import torch

from knnsolver.bench.search import clustered
from knnsolver.search.common import drop_own_rows
from knnsolver.search.exact import ExactSearch
from knnsolver.bench.provenance import cpu_name
from knnsolver.search.faiss_backend import torch_threads


def best_of(fns: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict[str, object]]:
    """Best wall time of each function over ``repeats`` interleaved runs, and its last result."""
    times = {name: float("inf") for name in fns}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name] = min(times[name], time.perf_counter() - start)
    return times, results


def flat_search(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """faiss ``IndexFlatL2``: add the bank, search the queries; the indices."""
    with torch_threads():
        index = faiss.IndexFlatL2(bank.shape[1])
        index.add(bank)
        return index.search(queries, k)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 54000])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--ks", type=int, nargs="+", default=[10, 200])
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cpu", help="where the exact backend's points live (cuda: torch on the GPU); "
                        "faiss-flat always runs on the CPU")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    exact = ExactSearch()
    warm = torch.randn(300, 8)
    exact.build(warm).graph(5)  # loads (or compiles) the numba kernels outside the timings
    exact.build(warm).search(warm[:10], 5)

    print(f"command: {' '.join([sys.executable, *sys.argv])}")
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.node()}, {cpu_name()}, {platform.system()} {platform.release()}, "
          f"torch {torch.__version__}, faiss {faiss.__version__}, {torch.get_num_threads()} thread(s)")
    print(f"best of {args.repeats}; clustered synthetic banks; seconds; ratio = exact / faiss-flat\n")
    print(f"{'N':>7} {'d':>4} {'k':>4} | {'graph exact':>11} {'faiss':>7} {'ratio':>5} {'agree':>6} | "
          f"{'queries':>7} {'exact':>7} {'faiss':>7} {'ratio':>5}")
    for n in args.sizes:
        for dim in args.dims:
            bank, queries = clustered(n, dim, args.queries, seed=0)
            device = torch.device(args.device)
            points, query_t = torch.from_numpy(bank).to(device), torch.from_numpy(queries).to(device)

            def synced(result):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                return result

            for k in args.ks:
                graph_t, graphs = best_of({
                    "exact": lambda: synced(exact.build(points).graph(k).cpu()),
                    "faiss": lambda: flat_search(bank, bank, k + 1),
                }, args.repeats)
                faiss_graph = drop_own_rows(torch.from_numpy(graphs["faiss"]), torch.arange(n))
                agree = (graphs["exact"].long() == faiss_graph).float().mean().item()
                query_t_s, _ = best_of({
                    "exact": lambda: synced(exact.build(points).search(query_t, k)),
                    "faiss": lambda: flat_search(bank, queries, k),
                }, args.repeats)
                print(f"{n:>7} {dim:>4} {k:>4} | {graph_t['exact']:>11.2f} {graph_t['faiss']:>7.2f} "
                      f"{graph_t['exact'] / graph_t['faiss']:>5.2f} {agree:>6.4f} | {len(queries):>7} "
                      f"{query_t_s['exact']:>7.2f} {query_t_s['faiss']:>7.2f} "
                      f"{query_t_s['exact'] / query_t_s['faiss']:>5.2f}", flush=True)


if __name__ == "__main__":
    main()
