"""Training speed on this machine: RBF against softmax, per-step overhead, the data path (issue 12).

Prints, all measured in this process:

1. Training epochs (batch loop, and whole epoch with validation) for softmax,
   HAL and RBF on the same network and data, plus the RBF bank refresh timed
   alone, amortised over ``--update-interval`` epochs; ratios against softmax.
   Once per ``--variants`` entry: ``fp32`` (eager), ``compile`` (network and
   solver maths through ``torch.compile``), ``bf16`` (autocast), ``bf16+compile``, ``compile-ro`` (the
   network compiled in mode ``reduce-overhead``: CUDA graphs on a GPU).
2. The same softmax epoch with in-memory batches gathered on the device
   against the per-item DataLoader path (the old loop).
3. The solver step alone (forward + backward on fixed random embeddings): B,
   N, d and k as flagged; ratios against softmax; eager and compiled
   (``compile_loss``); on CUDA also the device kernels and host
   synchronisations per step (torch.profiler).
4. Whole training steps (network forward and backward, solver, Adam) of softmax
   and RBF taken in turn, step by step, on the same real batches, so a change
   in the machine's speed during the run (on a shared host, 20-40% between
   minutes) weighs on both alike; the RBF epoch ratio with its refresh (timed
   in this process) amortised over ``--update-interval`` epochs. Sequential
   whole runs (section 1) cannot separate a 10% difference from such drift.
   ``--rounds R`` repeats it on fresh networks and batch orders and prints the
   spread of the epoch ratio across rounds. The refresh is timed on random
   embeddings (no clusters: the exact graph's slowest case) and on the RBF
   network's own embeddings after the round's steps (what training refreshes).
5. The evaluation embedding pass (eval mode, no gradient) of the training set
   at 64 to 1,024 rows a batch, taken in turn; the automatic
   ``eval_batch_size`` marked.

Usage: ``python benchmarks/bench_speed.py [--device cpu|cuda] [--per-class 1000] [--width 16]
[--epochs 2] [--batch 128] [--k 200] [--threads 2] [--variants fp32,compile] [--sections 1,2,3,4,5]
[--rounds 1]``. Fashion-MNIST from
``make data`` (or ``--data-dir``). ``--per-class 0`` uses all 54,000 training rows.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from knnsolver.data import build_data
from knnsolver.data.datasets import load_fashion_mnist
from knnsolver.models.factory import build_model
from knnsolver.registry import SOLVERS
from knnsolver.training import TrainConfig, train
from knnsolver.training.config import auto_eval_batch_size
from knnsolver.training.loop import LossStep


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


VARIANTS = {"fp32": {}, "compile": {"compile": True}, "bf16": {"precision": "bf16"},
            "bf16+compile": {"precision": "bf16", "compile": True},
            "compile-ro": {"compile": True, "compile_mode": "reduce-overhead"}}


def epoch_times(a: argparse.Namespace, solver: str, options: dict, slow_data: bool = False,
                variant: str = "fp32") -> dict[str, float]:
    """Seconds of a short ``train()`` with validation every epoch, medians over the epochs after the first.

    ``loop``: the batch loop; ``epoch``: a whole epoch (epoch-start hook, loop,
    validation, checkpoint); ``fill``: the first bank fill (embedding pass and
    graph); ``refresh``: the solver's own part of it (centres, graph, sigma),
    which is all a later refresh costs when it reuses the validation pass.
    """
    from knnsolver.data import batches
    from knnsolver.solvers.rbf import RBFSolver
    from knnsolver.training import loop

    marks: dict[str, list[float]] = {"fill": [], "refresh": [], "epoch": []}
    on_epoch_start, refresh, train_epoch = RBFSolver.on_epoch_start, RBFSolver.refresh, loop.train_epoch
    end_epoch = loop.end_epoch

    def timed(store, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            _sync(torch.device(a.device))
            marks[store].append(time.perf_counter() - start)
            return out
        return wrapper

    def whole_epoch(run, step, optimizer, scaler, epoch, ctx, history):
        marks.setdefault("start", []).append(time.perf_counter())
        return train_epoch(run, step, optimizer, scaler, epoch, ctx, history)

    def end(*args):
        out = end_epoch(*args)
        marks["epoch"].append(time.perf_counter() - marks["start"][-1])
        return out

    device_rows = batches.device_rows
    RBFSolver.on_epoch_start, RBFSolver.refresh = timed("fill", on_epoch_start), timed("refresh", refresh)
    loop.train_epoch, loop.end_epoch = whole_epoch, end
    if slow_data:
        batches.device_rows = lambda dataset, device: None
    try:
        with tempfile.TemporaryDirectory() as out:
            cfg = TrainConfig(dataset="fashion-mnist", data_dir=a.data_dir, solver=solver, solver_options=options,
                              epochs=a.epochs, out=out, plots=False, progress=False, model="conv28", width=a.width,
                              embedding_dim=a.dim, batch_size=a.batch, max_per_class=a.per_class or None,
                              device=a.device, eval_every=1, seed=0, **VARIANTS[variant])
            train(cfg)
            log = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    finally:
        RBFSolver.on_epoch_start, RBFSolver.refresh = on_epoch_start, refresh
        loop.train_epoch, loop.end_epoch = train_epoch, end_epoch
        batches.device_rows = device_rows
    later = slice(1, None) if len(log) > 1 else slice(None)
    return {"rows": int(log[0]["seconds"] * log[0]["samples_per_s"] + 0.5),
            "loop": statistics.median(row["seconds"] for row in log[later]),
            "epoch": statistics.median(marks["epoch"][later]),
            "fill": marks["fill"][0] if marks["fill"] else 0.0,
            "refresh": marks["refresh"][0] if marks["refresh"] else 0.0}


def refresh_time(a: argparse.Namespace, rows: int) -> float:
    """Seconds of the second of two RBF bank refreshes (graph and sigma) on ``rows`` random embeddings."""
    from knnsolver.solvers.rbf import RBFSolver

    device = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    solver = RBFSolver(a.dim, 10, rows, k=a.k).to(device)
    emb, labels = torch.randn(rows, a.dim, generator=g).to(device), (torch.arange(rows) % 10).to(device)
    times = []
    for _ in range(2):
        _sync(device)
        start = time.perf_counter()
        solver.refresh(emb, labels)
        _sync(device)
        times.append(time.perf_counter() - start)
    return times[-1]


def step_time(name: str, options: dict, a: argparse.Namespace, repeats: int, compiled: bool = False
              ) -> tuple[float, str]:
    """Median seconds of one solver forward + backward on random embeddings, and (on CUDA) the
    device kernels and host synchronisations per step."""
    device = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    n, b, d, c = a.bank, a.batch, a.dim, 10
    solver = SOLVERS.build(name, embedding_dim=d, num_classes=c, num_train=n, **options).to(device)
    labels_all = (torch.arange(n) % c).to(device)
    if name == "rbf":
        solver.refresh(torch.randn(n, d, generator=g).to(device), labels_all)
    if compiled:
        solver.compile_loss()
    rows = torch.randperm(n, generator=g)[:b].to(device)
    x = torch.randn(b, d, generator=g).to(device)

    def one() -> None:
        solver(x.clone().requires_grad_(True), labels_all[rows], rows).backward()

    times = []
    for _ in range(repeats + 3):
        _sync(device)
        start = time.perf_counter()
        one()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[3:]), launches(one, device)


def fashion_images(data_dir: str, num_rows: int, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_rows`` Fashion-MNIST training images (in [0, 1]) and labels, on ``device``."""
    source = load_fashion_mnist(data_dir)
    rows = torch.as_tensor(source.train_rows[:num_rows])
    images = source.pool.data[rows].float().mul_(source.pool.scale)
    return images.to(device), torch.as_tensor(source.labels)[rows].to(device)


@torch.no_grad()
def embed_rows(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The network's embeddings of ``images`` in eval mode (left in eval mode), 1,024 at a time: a bank fill."""
    model.eval()
    return torch.cat([model(images[i : i + 1024]) for i in range(0, len(images), 1024)])


def _train_rows(a: argparse.Namespace) -> int:
    """Training rows of section 1's runs (validation held out): 54,000 with ``--per-class 0``."""
    return len(build_data("fashion-mnist", data_dir=a.data_dir, max_per_class=a.per_class or None, seed=0).train)


def interleaved_steps(a: argparse.Namespace, steps: int, num_rows: int, seed: int = 0) -> dict[str, float]:
    """Median seconds of one training step for softmax and for RBF (``--k``), alternating step by step on
    the same shuffled batches of the first ``num_rows`` Fashion-MNIST training images (section 1's
    training-set size); the RBF bank holds the untrained network's embeddings of them. Each solver has
    its own copy of the same initial network and its own Adam; ``seed`` sets the network and the batch order.
    ``refresh``: seconds of a bank refresh on the RBF network's embeddings after its steps, what a refresh
    in training works on (the random embeddings of :func:`refresh_time` have no clusters)."""
    device = torch.device(a.device)
    images, labels = fashion_images(a.data_dir, num_rows, device)
    n = len(labels)
    runs = {}
    for name, options in (("softmax", {}), ("rbf", {"k": a.k})):
        torch.manual_seed(seed)
        model = build_model("conv28", (1, 28, 28), embedding_dim=a.dim, width=a.width).to(device)
        solver = SOLVERS.build(name, embedding_dim=a.dim, num_classes=10, num_train=n, **options).to(device)
        if name == "rbf":
            solver.refresh(embed_rows(model, images), labels)
        model.train()
        params = [p for p in [*model.parameters(), *solver.parameters()] if p.requires_grad]
        runs[name] = (LossStep(model, solver), torch.optim.Adam(params, lr=1e-3))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(steps + 10):
        idx = order[(i * a.batch) % (n - a.batch) :][: a.batch]
        for name, (step, optimizer) in runs.items():
            _sync(device)
            start = time.perf_counter()
            loss, _ = step(images[idx], labels[idx], idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    out = {name: statistics.median(t[10:]) for name, t in times.items()}
    model, solver = runs["rbf"][0].model, runs["rbf"][0].solver
    embeddings = embed_rows(model, images)
    _sync(device)
    start = time.perf_counter()
    solver.refresh(embeddings, labels)
    _sync(device)
    out["refresh"] = time.perf_counter() - start
    return out


def embedding_pass(a: argparse.Namespace, num_rows: int, sizes: tuple[int, ...] = (64, 128, 256, 512, 1024),
                   rows: int = 4096, repeats: int = 6) -> dict[int, float]:
    """Seconds to embed ``num_rows`` rows in eval mode at each batch size: medians of ``repeats`` rounds over
    ``rows`` Fashion-MNIST images, the sizes taken in turn within each round, scaled to ``num_rows``."""
    device = torch.device(a.device)
    images = fashion_images(a.data_dir, rows, device)[0]
    model = build_model("conv28", (1, 28, 28), embedding_dim=a.dim, width=a.width).to(device).eval()
    times: dict[int, list[float]] = {size: [] for size in sizes}
    with torch.no_grad():
        model(images[: max(sizes)])
        for _ in range(repeats):
            for size in sizes:
                _sync(device)
                start = time.perf_counter()
                for i in range(0, rows, size):
                    model(images[i : i + size])
                _sync(device)
                times[size].append((time.perf_counter() - start) * num_rows / rows)
    return {size: statistics.median(t) for size, t in times.items()}


def launches(step, device: torch.device, steps: int = 5) -> str:
    """Device kernels (and memory copies/sets) and host synchronisations per call of ``step``, on CUDA."""
    if device.type != "cuda":
        return ""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sum(e.device_type == DeviceType.CUDA for e in events)
    syncs = sum("Synchronize" in e.name for e in events) - 1  # less the one above
    return f"{kernels / steps:6.1f} device ops, {syncs / steps:4.1f} host syncs per step"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--per-class", type=int, default=1000, help="training images per class (0: all)")
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--update-interval", type=int, default=10)
    p.add_argument("--bank", type=int, default=54_000, help="bank rows for the solver-step timing")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--steps", type=int, default=200, help="interleaved training steps per solver (section 4)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--skip-slow-data", action="store_true", help="skip the per-item DataLoader comparison")
    p.add_argument("--variants", default="fp32", help=f"comma-separated, of: {', '.join(VARIANTS)}")
    p.add_argument("--sections", default="1,2,3,4,5", help="comma-separated sections to run (docstring)")
    p.add_argument("--rounds", type=int, default=1, help="section 4 rounds, each on fresh networks and batch order")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("date:   ", datetime.datetime.now().isoformat(timespec="seconds"), "commit", commit)
    gpu = torch.cuda.get_device_name() if a.device.startswith("cuda") else "no GPU used"
    print("machine:", platform.platform(), f"{os.cpu_count()} cpus, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {gpu}")

    rbf = {"k": a.k, "update_interval": a.update_interval}
    n = a.update_interval
    sections = {int(x) for x in a.sections.split(",")}
    rows = _train_rows(a) if sections & {1, 4, 5} else 0  # section 3 alone needs no data
    refresh = None
    soft = None
    for variant in a.variants.split(",") if 1 in sections else ():
        times = {name: epoch_times(a, name, options, variant=variant)
                 for name, options in (("softmax", {}), ("hal", {}), ("rbf", rbf))}
        soft, rb = times["softmax"], times["rbf"]
        print(f"\n1. training epochs [{variant}], fashion-mnist {a.per_class or 'all'} per class, conv28 width {a.width}, "
              f"batch {a.batch}, {a.device}; medians over epochs 2..{a.epochs}, validation every epoch:")
        print(f"   {'':8s} {'batch loop':>10s} {'ratio':>6s} {'whole epoch':>12s} {'ratio':>6s} {'images/s':>9s}")
        for name, t in times.items():
            print(f"   {name:8s} {t['loop']:9.2f}s {t['loop'] / soft['loop']:6.2f} {t['epoch']:11.2f}s "
                  f"{t['epoch'] / soft['epoch']:6.2f} {t['rows'] / t['loop']:9.0f}")
        refresh = refresh_time(a, rows)
        embed = rb["fill"] - rb["refresh"]
        for label, cost in (("validation's embeddings reused", refresh), ("embedding pass included", refresh + embed)):
            steady = rb["loop"] + cost / n
            print(f"   rbf training epoch with a refresh every {n} ({label}: {cost:.2f} s each): {steady:.2f} s, "
                  f"ratio {steady / soft['loop']:.2f} to softmax's batch loop")
    if 2 in sections and not a.skip_slow_data:
        soft = soft or epoch_times(a, "softmax", {})
        old = epoch_times(a, "softmax", {}, slow_data=True)
        print(f"\n2. softmax batch loop, batches gathered on the device {soft['loop']:.2f} s vs per-item DataLoader "
              f"{old['loop']:.2f} s: {old['loop'] / soft['loop']:.2f}x")
    if 3 in sections:
        print(f"\n3. solver step alone (forward + backward), B={a.batch}, N={a.bank}, d={a.dim}, median of {a.repeats}:")
        for compiled in (False, True):
            base, info = step_time("softmax", {}, a, a.repeats, compiled)
            label = "compiled" if compiled else "eager"
            print(f"   {label:8s} softmax {base * 1e3:8.3f} ms              {info}")
            for name, options in (("hal", {}), ("rbf", {"k": a.k})):
                t, info = step_time(name, options, a, a.repeats, compiled)
                print(f"   {label:8s} {name:7s} {t * 1e3:8.3f} ms   ratio {t / base:5.2f}   {info}")

    if 4 in sections:
        refresh = refresh if refresh is not None else refresh_time(a, rows)
        per_epoch = math.ceil(rows / a.batch)
        print(f"\n4. training steps taken in turn, conv28 width {a.width}, batch {a.batch}, {a.device}, median of "
              f"{a.steps} per round; rbf epoch with a refresh every {n} ({per_epoch} steps), the refresh timed on "
              f"random embeddings ({refresh:.2f} s) and on the round's trained ones:")
        ratios: dict[str, list[float]] = {"random": [], "trained": []}
        for r in range(a.rounds):
            steps = interleaved_steps(a, a.steps, rows, seed=r)
            for kind, seconds in (("random", refresh), ("trained", steps["refresh"])):
                ratios[kind].append((steps["rbf"] * per_epoch + seconds / n) / (steps["softmax"] * per_epoch))
            print(f"   round {r + 1}: softmax {steps['softmax'] * 1e3:7.2f} ms, rbf {steps['rbf'] * 1e3:7.2f} ms "
                  f"(ratio {steps['rbf'] / steps['softmax']:5.3f}, +{(steps['rbf'] - steps['softmax']) * 1e3:.2f} ms a step); "
                  f"rbf epoch ratio {ratios['random'][-1]:.3f}, or {ratios['trained'][-1]:.3f} with the refresh on "
                  f"trained embeddings ({steps['refresh']:.2f} s)")
        if a.rounds > 1:
            for kind, values in ratios.items():
                print(f"   rbf epoch ratio over {len(values)} rounds, refresh on {kind} embeddings: median "
                      f"{statistics.median(values):.3f}, range {min(values):.3f}-{max(values):.3f}")

    if 5 in sections:
        passes = embedding_pass(a, rows)
        auto = auto_eval_batch_size(torch.device(a.device))
        print(f"\n5. evaluation embedding pass of {rows:,} rows (eval mode, no gradient), conv28 width {a.width}, "
              f"{a.device}, batch sizes in turn; ratio to the automatic {auto}:")
        for size, seconds in passes.items():
            mark = "   (automatic)" if size == auto else ""
            print(f"   {size:5d} rows a batch {seconds:7.2f} s   ratio {seconds / passes[auto]:5.2f}{mark}")


if __name__ == "__main__":
    main()
