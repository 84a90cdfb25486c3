"""A/B of the RBF training step (``knnsolver.functional.rbf.rbf_step``, forward + backward) against another
version of ``rbf.py``, interleaved in one process so a loaded machine slows both alike; checks the results agree.

    git show REV:src/knnsolver/functional/rbf.py > /tmp/rbf_old.py
    python benchmarks/ab_rbf_step.py /tmp/rbf_old.py [--threads 1]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import time
from types import ModuleType

import torch

from knnsolver.functional import rbf as new


def load_other(path: str) -> ModuleType:
    """The other ``rbf.py`` at ``path``, imported as module ``rbf_old``."""
    spec = importlib.util.spec_from_file_location("rbf_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="path of the other rbf.py")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    old = load_other(a.old)
    gen = torch.Generator().manual_seed(0)
    n, d, b, k, c = 54_000, 64, 128, 200, 10
    centres = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=1)
    centre_labels = torch.randint(0, c, (n,), generator=gen)
    rows = torch.randint(0, n, (b,), generator=gen)
    labels = centre_labels[rows]
    neighbours = torch.randint(0, n, (b, k), generator=gen)
    noise = 0.05 * torch.randn(b, d, generator=gen)

    def step(module) -> tuple[torch.Tensor, ...]:
        x = (centres[rows] + noise).requires_grad_()
        log_weights, log_sigma = torch.zeros(n, requires_grad=True), torch.tensor(-2.0, requires_grad=True)
        loss, stats, _ = module.rbf_step(x, centres, centre_labels, neighbours, log_weights, log_sigma, labels, rows, 1.0)
        loss.backward()
        return loss.detach(), x.grad, log_weights.grad, log_sigma.grad, stats

    for u, v in zip(step(old), step(new)):
        torch.testing.assert_close(u, v, rtol=1e-6, atol=1e-7)
    times: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(10):
        step(old), step(new)
    for _ in range(15):
        for name, module in (("old", old), ("new", new)):
            start = time.perf_counter()
            for _ in range(20):
                step(module)
            times[name].append((time.perf_counter() - start) / 20 * 1e3)
    o, w = statistics.median(times["old"]), statistics.median(times["new"])
    print(f"rbf_step forward+backward, B={b}, k={k}, N={n}, d={d}, {a.threads} thread(s), median of 15 x 20 "
          f"interleaved: old {o:.2f} ms, new {w:.2f} ms, new/old {w / o:.2f} (results agree to 1e-6)")


if __name__ == "__main__":
    main()
