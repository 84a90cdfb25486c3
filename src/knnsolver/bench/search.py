"""Benchmark of the neighbour-search backends: build time, query time and recall@k.

    python -m knnsolver.bench.search [--datasets fashion,synthetic] [--sizes 100000 ...] [--out DIR]
    knnsolver bench search ...

For every dataset and every backend (and each value of its search-time knob:
IVF ``nprobe``, HNSW ``ef_search``, FANNG ``budget``) one *case* measures

* ``graph_s``: wall time of ``knn_graph(points, k)`` (index build included),
  and ``graph_recall``: recall@k of its rows against exact neighbours;
* ``build_s`` and ``query_s``: ``search.build(points)`` and then
  ``index.search(queries, k)`` of held-out queries, timed apart;
  ``query_recall`` is recall@k against exact search.

Recall is measured on ``--recall-sample`` seeded random rows (and at most that
many queries), against faiss's exact flat search. Exact backends (``exact``,
``faiss-flat``) above ``--exact-max`` points are timed on those rows only and
scaled by ``N / rows`` (exact cost is the same for every row); such rows are
marked ``extrapolated``.

Datasets:

* ``embeddings``: ``--embeddings FILE.npy`` (N x d float array; real embeddings
  of a trained network), queries from ``--query-embeddings`` or, without it,
  10% of the rows (at most ``--queries``) held out at random.
* ``fashion``: a **stand-in** until trained embeddings are available: the
  60,000 raw Fashion-MNIST training images (784 pixels in [0, 1]) projected to
  each of ``--dims`` by a fixed Gaussian matrix (seed 0, variance ``1/d``);
  queries are the 10,000 test images projected the same way. These are not
  trained embeddings: their neighbourhoods are those of raw pixels.
* ``synthetic``: clustered banks of each of ``--sizes`` points in
  ``--synthetic-dim`` dimensions: ``N / 1000`` clusters (at least 10), each a
  random 8-dimensional Gaussian subspace around a random centre plus small
  isotropic noise (embeddings concentrate near low-dimensional class
  manifolds); queries are fresh draws from the same mixture.

Each case is written as JSON under ``--out`` as soon as it finishes and is
skipped when its JSON exists, so an interrupted run resumes. At the end the
table is printed, ``recall_vs_time.png`` is drawn from every stored case, and
where several synthetic sizes were measured the exact/approximate crossover
of :class:`~knnsolver.search.auto.AutoSearch` is reported. ``--train-epochs``
also trains the RBF solver on Fashion-MNIST with each backend and records its
test accuracy.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from knnsolver.bench.provenance import cpu_name
from knnsolver.errors import ConfigError, KnnSolverError
from knnsolver.registry import SEARCHES

DEFAULT_OUT = "benchmarks/results/search"
DEFAULT_BACKENDS = ("exact", "faiss-flat", "faiss-ivf", "faiss-hnsw", "fanng")
EXACT_BACKENDS = ("exact", "faiss-flat")
# The search-time knob swept for each approximate backend, and its values.
SWEEPS: dict[str, tuple[str, tuple[int, ...]]] = {
    "faiss-ivf": ("nprobe", (4, 16, 64)),
    "faiss-hnsw": ("ef_search", (16, 32, 64)),
    "fanng": ("budget", (100, 200, 400)),
}
RECALL_TARGET = 0.95


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser``."""
    parser.add_argument("--datasets", default="fashion,synthetic",
                        help="comma-separated: fashion (stand-in), synthetic, embeddings (default: fashion,synthetic)")
    parser.add_argument("--embeddings", default=None, metavar="FILE.npy", help="real embeddings (N x d); adds 'embeddings'")
    parser.add_argument("--query-embeddings", default=None, metavar="FILE.npy", help="queries for --embeddings")
    parser.add_argument("--dims", default="64,128", help="projection dimensions of the fashion stand-in (default: 64,128)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000], help="synthetic bank sizes (default: 100000)")
    parser.add_argument("--synthetic-dim", type=int, default=64, help="dimension of the synthetic banks (default: 64)")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS), help="comma-separated registered backends")
    parser.add_argument("--no-sweep", action="store_true", help="only each backend's default settings")
    parser.add_argument("--k", type=int, default=10, help="neighbours per point (default: 10)")
    parser.add_argument("--queries", type=int, default=10_000, help="held-out queries at most (default: 10000)")
    parser.add_argument("--skip-queries", action="store_true", help="time knn_graph only")
    parser.add_argument("--recall-sample", type=int, default=2000, help="rows and queries scored (default: 2000)")
    parser.add_argument("--exact-max", type=int, default=60_000,
                        help="above this many points exact backends are timed on the sample and scaled (default: 60000)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"results folder (default: {DEFAULT_OUT})")
    parser.add_argument("--train-epochs", type=int, default=0,
                        help="also train the RBF solver on Fashion-MNIST this many epochs per backend (default: 0, off)")
    parser.add_argument("--train-backends", default="exact,faiss-hnsw,fanng", help="backends for --train-epochs")
    parser.add_argument("--train-max-per-class", type=int, default=None,
                        help="training images per class for --train-epochs (default: all 6000)")
    parser.add_argument("--train-dir", default="runs/bench-search",
                        help="run folders (checkpoints) of --train-epochs (default: runs/bench-search)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, samples and backends (default: 0)")


# ---------------------------------------------------------------- datasets


def _fashion_pixels(split: str) -> np.ndarray:
    from knnsolver.data.datasets import FASHION_MNIST_DIR, FASHION_MNIST_FILES, IDX_IMAGES_MAGIC, read_idx

    images = read_idx(Path(FASHION_MNIST_DIR) / FASHION_MNIST_FILES[f"{split}_images"], IDX_IMAGES_MAGIC)
    return images.reshape(len(images), -1).astype(np.float32) / 255.0


def fashion_standin(dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(bank, queries): raw Fashion-MNIST train/test pixels projected to ``dim`` by a fixed Gaussian matrix."""
    proj = np.random.default_rng(seed).normal(size=(784, dim)).astype(np.float32) / np.sqrt(dim)
    return (np.ascontiguousarray(_fashion_pixels("train") @ proj),
            np.ascontiguousarray(_fashion_pixels("test") @ proj))


def clustered(n: int, dim: int, n_queries: int, seed: int = 0, intrinsic: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """(bank, queries) from a mixture of ``max(10, n // 1000)`` low-dimensional Gaussian clusters."""
    rng = np.random.default_rng(seed)
    clusters = max(10, n // 1000)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32) * 3.0
    bases = rng.normal(size=(clusters, intrinsic, dim)).astype(np.float32) / np.sqrt(intrinsic)

    def draw(count: int) -> np.ndarray:
        out = np.empty((count, dim), np.float32)
        for start in range(0, count, 100_000):
            m = min(100_000, count - start)
            label = rng.integers(0, clusters, m)
            z = rng.normal(size=(m, intrinsic)).astype(np.float32)
            out[start:start + m] = (centres[label] + np.einsum("nm,nmd->nd", z, bases[label])
                                    + 0.05 * rng.normal(size=(m, dim)).astype(np.float32))
        return out

    return draw(n), draw(n_queries)


def embeddings_file(path: str, query_path: str | None, n_queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(bank, queries) from .npy files; without a query file 10% of the rows are held out."""
    try:
        bank = np.load(path).astype(np.float32)
        queries = np.load(query_path).astype(np.float32) if query_path else None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read embeddings: {exc}") from None
    if bank.ndim != 2:
        raise ConfigError(f"{path} must hold an (N, d) array, got shape {bank.shape}")
    if queries is None:
        held = min(n_queries, len(bank) // 10)
        order = np.random.default_rng(seed).permutation(len(bank))
        bank, queries = bank[np.sort(order[held:])], bank[np.sort(order[:held])]
    return np.ascontiguousarray(bank), np.ascontiguousarray(queries)


def datasets(args: argparse.Namespace) -> list[tuple[str, str, Callable[[], tuple[np.ndarray, np.ndarray]]]]:
    """(name, description, loader) for every dataset requested."""
    names = [s for s in args.datasets.split(",") if s]
    if args.embeddings and "embeddings" not in names:
        names.append("embeddings")
    out = []
    for name in names:
        if name == "fashion":
            for dim in (int(d) for d in args.dims.split(",")):
                out.append((f"fashion-standin-d{dim}", "stand-in: raw Fashion-MNIST pixels, random projection",
                            lambda dim=dim: fashion_standin(dim, args.seed)))
        elif name == "synthetic":
            for n in args.sizes:
                out.append((f"synthetic-n{n}-d{args.synthetic_dim}", "clustered synthetic bank",
                            lambda n=n: clustered(n, args.synthetic_dim, args.queries, args.seed)))
        elif name == "embeddings":
            if not args.embeddings:
                raise ConfigError("dataset 'embeddings' needs --embeddings FILE.npy")
            stem = Path(args.embeddings).stem
            out.append((f"embeddings-{stem}", f"embeddings from {args.embeddings}",
                        lambda: embeddings_file(args.embeddings, args.query_embeddings, args.queries, args.seed)))
        else:
            raise ConfigError(f"unknown dataset {name!r}; choose from fashion, synthetic, embeddings")
    return out


# ---------------------------------------------------------------- measuring


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true k neighbours that were found."""
    hits = sum(len(np.intersect1d(f, t)) for f, t in zip(found, truth))
    return hits / truth.size


def ground_truth(bank: np.ndarray, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest others of the sampled ``rows`` and exact k nearest of ``queries`` (faiss flat)."""
    import faiss

    index = faiss.IndexFlatL2(bank.shape[1])
    index.add(bank)
    found = index.search(bank[rows], k + 1)[1]
    own = found == rows[:, None]
    own[~own.any(axis=1), -1] = True
    graph_truth = found[~own].reshape(len(rows), k)
    query_truth = index.search(queries, k)[1] if len(queries) else np.empty((0, k), np.int64)
    return graph_truth, query_truth


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def measure_case(backend: str, options: dict[str, Any], bank: np.ndarray, queries: np.ndarray, rows: np.ndarray,
                 truths: tuple[np.ndarray, np.ndarray], k: int, exact_max: int, skip_queries: bool) -> dict[str, Any]:
    """Time and score one backend with ``options`` (see the module docstring)."""
    search = SEARCHES.build(backend, **options)
    points = torch.from_numpy(bank)
    n = len(bank)
    result: dict[str, Any] = {"extrapolated": False}
    if backend in EXACT_BACKENDS and n > exact_max:
        _, seconds = _timed(lambda: search.search(points[rows], points, k + 1))
        result.update(graph_s=seconds * n / len(rows), graph_recall=1.0, extrapolated=True)
    else:
        graph, seconds = _timed(lambda: search.knn_graph(points, k))
        result.update(graph_s=seconds, graph_recall=_recall(graph[torch.from_numpy(rows)].numpy(), truths[0]))
    if not skip_queries and len(queries):
        q = torch.from_numpy(queries)
        index, build_s = _timed(lambda: search.build(points))
        (_, found), query_s = _timed(lambda: index.search(q, k))
        result.update(build_s=build_s, query_s=query_s, queries=len(queries),
                      query_recall=_recall(found[: len(truths[1])].numpy(), truths[1]))
    return result


def _settings(backend: str, sweep: bool, seed: int) -> list[tuple[str, dict[str, Any]]]:
    """(label, options) of every case run for ``backend``."""
    base: dict[str, Any] = {"seed": seed} if backend in ("faiss-ivf", "fanng") else {}
    if sweep and backend in SWEEPS:
        knob, values = SWEEPS[backend]
        return [(f"{knob}={v}", {**base, knob: v}) for v in values]
    return [("default", base)]


def _machine() -> dict[str, Any]:
    return {"machine": f"{cpu_name()}, {platform.system()}",
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat()}


def run_cases(args: argparse.Namespace, out: Path) -> None:
    """Run every missing case, writing each one's JSON as it finishes."""
    backends = [b for b in args.backends.split(",") if b]
    for b in backends:
        SEARCHES.get(b)  # unknown names fail before any work
    for name, description, load in datasets(args):
        todo = [(b, label, opts) for b in backends for label, opts in _settings(b, not args.no_sweep, args.seed)
                if not (out / f"{name}__{b}__{label}.json").exists()]
        if not todo:
            continue
        bank, queries = load()
        queries = queries[: args.queries] if not args.skip_queries else queries[:0]
        rng = np.random.default_rng(args.seed)
        rows = np.sort(rng.choice(len(bank), min(args.recall_sample, len(bank)), replace=False))
        truths = ground_truth(bank, queries[: args.recall_sample], rows, args.k)
        print(f"{name}: {len(bank)} x {bank.shape[1]} ({description}), {len(queries)} queries", flush=True)
        warm = torch.from_numpy(bank[:64])
        for backend in {b for b, _, _ in todo}:  # load compiled kernels (numba) outside the timings
            SEARCHES.build(backend).knn_graph(warm, 1)
        for backend, label, opts in todo:
            result = measure_case(backend, opts, bank, queries, rows, truths, args.k, args.exact_max, args.skip_queries)
            record = {"dataset": name, "description": description, "n": len(bank), "dim": bank.shape[1], "k": args.k,
                      "backend": backend, "setting": label, "options": opts, **result, **_machine()}
            (out / f"{name}__{backend}__{label}.json").write_text(json.dumps(record, indent=1))
            print("  " + _row(record), flush=True)


# ---------------------------------------------------------------- reporting


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _row(r: dict[str, Any]) -> str:
    return (f"{r['backend']:<11} {r['setting']:<13} graph {_fmt(r['graph_s'], '8.2f')} s"
            f"{'*' if r['extrapolated'] else ' '} recall {_fmt(r['graph_recall'], '.4f')} | "
            f"build {_fmt(r.get('build_s'), '7.2f')} s  query {_fmt(r.get('query_s'), '7.3f')} s "
            f"recall {_fmt(r.get('query_recall'), '.4f')}")


def load_results(out: Path) -> list[dict[str, Any]]:
    """Every stored case under ``out``."""
    return [json.loads(p.read_text()) for p in sorted(out.glob("*__*__*.json"))]


def print_table(results: list[dict[str, Any]]) -> None:
    """Print the cases grouped by dataset, faiss-flat first as the reference."""
    order = {b: i for i, b in enumerate(DEFAULT_BACKENDS)}
    for name in sorted({r["dataset"] for r in results}):
        rows = sorted((r for r in results if r["dataset"] == name),
                      key=lambda r: (order.get(r["backend"], 99) if r["backend"] != "faiss-flat" else -1,
                                     sorted(r["options"].items())))
        print(f"\n{name}: N={rows[0]['n']} d={rows[0]['dim']} k={rows[0]['k']}  ({rows[0]['description']})")
        for r in rows:
            print("  " + _row(r))
    if any(r["extrapolated"] for r in results):
        print("\n* timed on the recall sample and scaled to N rows")


def crossover(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per approximate backend and synthetic size: exact vs the cheapest setting with recall >= target."""
    synthetic = [r for r in results if r["dataset"].startswith("synthetic-")]
    table: dict[str, list[dict[str, Any]]] = {}
    for n in sorted({r["n"] for r in synthetic}):
        at_n = [r for r in synthetic if r["n"] == n]
        exact = [r["graph_s"] for r in at_n if r["backend"] == "exact"]
        if not exact:
            continue
        for backend in sorted({r["backend"] for r in at_n} - set(EXACT_BACKENDS)):
            good = [r for r in at_n if r["backend"] == backend and r["graph_recall"] >= RECALL_TARGET]
            best = min(good, key=lambda r: r["graph_s"]) if good else None
            table.setdefault(backend, []).append({
                "n": n, "exact_s": exact[0], "approx_s": best["graph_s"] if best else None,
                "setting": best["setting"] if best else None, "recall": best["graph_recall"] if best else None})
    return table


def print_crossover(table: dict[str, list[dict[str, Any]]]) -> None:
    table = {backend: rows for backend, rows in table.items() if len(rows) > 1}
    if not table:
        return
    print(f"\nknn_graph crossover (exact vs cheapest setting with recall@k >= {RECALL_TARGET}):")
    for backend, rows in table.items():
        first = next((r["n"] for r in rows if r["approx_s"] is not None and r["approx_s"] < r["exact_s"]), None)
        print(f"  {backend}: " + "; ".join(
            f"N={r['n']}: exact {r['exact_s']:.2f} s vs {_fmt(r['approx_s'], '.2f')} s ({r['setting']})" for r in rows))
        print(f"    approximate first faster at N = {first if first is not None else 'none measured'}")


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """Recall vs time per dataset: knn_graph (left) and query search (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    names = sorted({r["dataset"] for r in results})
    if not names:
        return
    fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), squeeze=False)
    for row, name in zip(axes, names):
        for ax, time_key, recall_key, title in ((row[0], "graph_s", "graph_recall", "knn_graph"),
                                                (row[1], "query_s", "query_recall", "query search")):
            drawn = False
            for backend in DEFAULT_BACKENDS + tuple(sorted({r["backend"] for r in results} - set(DEFAULT_BACKENDS))):
                cases = sorted((r for r in results if r["dataset"] == name and r["backend"] == backend
                                and r.get(time_key) is not None), key=lambda r: sorted(r["options"].items()))
                pts = [(r[time_key], r[recall_key]) for r in cases]  # in sweep order
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=backend)
                    drawn = True
            ax.set_title(f"{name}: {title}", fontsize=9)
            if not drawn:
                ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
                continue
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("seconds (log)")
            ax.set_ylabel("recall@k")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- RBF training


def run_training(args: argparse.Namespace, out: Path) -> None:
    """Train the RBF solver on Fashion-MNIST with each backend; record test accuracy and time."""
    try:
        from knnsolver.training import TrainConfig, train
    except ImportError as exc:
        print(f"RBF training comparison not run: the trainer is not available ({exc})")
        return
    for backend in (b for b in args.train_backends.split(",") if b):
        tag = f"{backend}_epochs{args.train_epochs}_per-class{args.train_max_per_class or 'all'}"
        path = out / f"rbf-train_{tag}.json"
        if path.exists():
            continue
        config = TrainConfig(dataset="fashion-mnist", solver="rbf", epochs=args.train_epochs, seed=args.seed,
                             max_per_class=args.train_max_per_class, out=str(Path(args.train_dir) / tag),
                             solver_options={"search": backend, "update_interval": 10},  # as its stored runs
                             progress=False, plots=False)
        summary, seconds = _timed(lambda: train(config, overwrite=True))
        record = {"backend": backend, "epochs": args.train_epochs, "max_per_class": args.train_max_per_class,
                  "test_accuracy": summary.get("test_accuracy"), "train_s": seconds, **_machine()}
        path.write_text(json.dumps(record, indent=1))
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("rbf-train_*.json"))]
    if runs:
        print("\nRBF solver on Fashion-MNIST by search backend:")
        for r in runs:
            print(f"  {r['backend']:<11} epochs {r['epochs']:>3}  per class {r['max_per_class'] or 'all':>5}  "
                  f"test accuracy {_fmt(r['test_accuracy'], '.4f')}  "
                  f"wall {r['train_s']:.0f} s")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by ``args``; return the exit status."""
    if args.k < 1 or args.recall_sample < 1 or args.queries < 0:
        raise ConfigError("--k and --recall-sample must be >= 1 and --queries >= 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run_cases(args, out)
    results = load_results(out)
    print_table(results)
    print_crossover(crossover(results))
    plot(results, out / "recall_vs_time.png")
    print(f"\nresults and recall_vs_time.png in {out}")
    if args.train_epochs > 0:
        run_training(args, out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     prog="python -m knnsolver.bench.search", description=__doc__.split("\n")[0])
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except KnnSolverError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
