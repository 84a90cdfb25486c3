"""A/B of the RBF maths (``knnsolver.functional.rbf``) inside whole training steps, against another version of
``rbf.py``: softmax, RBF with the other file and RBF with this tree's, one step each in turn (the order reversed
every other step) on the same Fashion-MNIST batches, each with its own conv28 network and Adam (issue 12).

An operator removed from the RBF step alone can cost nothing in the loop, where the network's forward has
filled the caches; this measures what a change saves where users train.

    git show REV:src/knnsolver/functional/rbf.py > /tmp/rbf_old.py
    python benchmarks/ab_rbf_loop.py /tmp/rbf_old.py [--width 32] [--steps 300] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from ab_rbf_step import load_other
from bench_speed import embed_rows, fashion_images

from knnsolver.models import build_model
from knnsolver.registry import SOLVERS
from knnsolver.training.loop import LossStep


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="path of the other rbf.py")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--rows", type=int, default=54_000, help="training rows (the bank's size)")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    old = load_other(a.old)
    images, labels = fashion_images(a.data_dir, a.rows)
    n = len(labels)
    runs = {}
    for name in ("softmax", "old", "new"):
        torch.manual_seed(0)
        model = build_model("conv28", (1, 28, 28), embedding_dim=64, width=a.width)
        options = {} if name == "softmax" else {"k": a.k}
        solver = SOLVERS.build("softmax" if name == "softmax" else "rbf", embedding_dim=64, num_classes=10,
                               num_train=n, **options)
        if name != "softmax":
            solver.refresh(embed_rows(model, images), labels)
        if name == "old":
            solver._step = old.rbf_step
        model.train()
        params = [q for q in [*model.parameters(), *solver.parameters()] if q.requires_grad]
        runs[name] = (LossStep(model, solver), torch.optim.Adam(params, lr=1e-3))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, float] = {}
    for i in range(a.steps + 10):
        idx = order[(i * 128) % (n - 128) :][:128]
        for name, (step, optimizer) in (runs.items() if i % 2 else reversed(runs.items())):
            start = time.perf_counter()
            loss, _ = step(images[idx], labels[idx], idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
            losses[name] = loss.item()
    soft = statistics.median(times["softmax"][10:])
    print(f"conv28 width {a.width}, batch 128, {n} rows, k={a.k}, {torch.get_num_threads()} threads, median of "
          f"{a.steps} steps: softmax {soft * 1e3:.2f} ms")
    for name in ("old", "new"):
        t = statistics.median(times[name][10:])
        print(f"   rbf {name}: {t * 1e3:.2f} ms, ratio {t / soft:.3f} (+{(t - soft) * 1e3:.2f} ms a step), "
              f"last loss {losses[name]:.6f}")


if __name__ == "__main__":
    main()
