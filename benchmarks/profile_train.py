"""Where a training run's host and device time goes: ``torch.profiler`` over a short ``train()``.

Prints the operators with the most self CPU time (host overhead: dispatch,
Python-side launches) and, on CUDA, the most self device time, plus the host
synchronisations counted. Used to decide what to fuse next (issue 12).

    python benchmarks/profile_train.py [--device cuda] [--solver rbf] [--per-class 500] [--compile]
"""
from __future__ import annotations

import argparse
import tempfile

from torch.profiler import ProfilerActivity, profile

from knnsolver.training import TrainConfig, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--solver", default="softmax")
    p.add_argument("--per-class", type=int, default=500)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--rows", type=int, default=15, help="operators printed per table")
    a = p.parse_args()
    cuda = a.device.startswith("cuda")
    options = {"k": 200, "update_interval": 1} if a.solver == "rbf" else {}
    with tempfile.TemporaryDirectory() as out:
        def run(epochs: int) -> None:
            train(TrainConfig(dataset="fashion-mnist", data_dir=a.data_dir, solver=a.solver, solver_options=options,
                              epochs=epochs, out=out, plots=False, progress=False, model="conv28", width=a.width,
                              batch_size=a.batch, max_per_class=a.per_class, device=a.device, compile=a.compile,
                              seed=0), overwrite=True)
        run(1)  # warm-up: data cache, kernels, compilation
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        with profile(activities=activities) as prof:
            run(1)
    table = prof.key_averages()
    syncs = sum(e.count for e in table if "Synchronize" in e.key)
    print(f"{a.solver}, {a.per_class} per class, batch {a.batch}, {a.device}, compile={a.compile}: "
          f"{syncs} host synchronisations in one epoch with its evaluations")
    print(table.table(sort_by="self_cpu_time_total", row_limit=a.rows, max_name_column_width=60))
    if cuda:
        print(table.table(sort_by="self_cuda_time_total", row_limit=a.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
