"""How fast could the training step be on a GPU? The softmax step captured whole in one CUDA graph (issue 12).

The eager loop is bound by per-step launches (benchmarks/README.md, "On a GPU"): about 160
kernels a step at 7 us each. This prototype captures one full step (network forward and
backward, softmax loss, Adam with ``capturable=True``) in a ``torch.cuda.CUDAGraph`` and
replays it over an epoch of Fashion-MNIST batches gathered on the device, against the same
step run eagerly in this process, and against the network through
``torch.compile(mode="reduce-overhead")`` (PyTorch's own CUDA graphs of the forward and
backward; loss and Adam eager). It measures the head-room only; the trainer's guards and
logging are not in it. Each variant prints its line when it finishes; one that fails prints
its error and the others still run.

    python benchmarks/bench_cuda_graph.py --data-dir .data/fashion-mnist [--batch 128] [--width 32]

Needs CUDA (it says so and exits 0 elsewhere); ``--device cpu --rows 2000`` dry-runs the eager and
compiled variants on the CPU.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from knnsolver.data import build_data
from knnsolver.models import build_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the code (no CUDA graph there)")
    p.add_argument("--rows", type=int, default=0, help="training rows used (0 = all)")
    a = p.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("bench_cuda_graph: no CUDA device here; nothing measured")
        return
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    data = build_data("fashion-mnist", data_dir=a.data_dir, seed=0)
    rows = torch.as_tensor(data.train.rows)
    pool = data.train.pool
    x_all = (pool.data[rows].to(dev).float() * pool.scale).unsqueeze(1) if pool.data.dim() == 3 else \
        pool.data[rows].to(dev).float() * pool.scale
    y_all = data.train.labels.to(dev)
    if a.rows:
        x_all, y_all = x_all[: a.rows], y_all[: a.rows]
    n = (len(y_all) // a.batch) * a.batch  # whole batches only: a graph has one shape

    def fresh():
        torch.manual_seed(0)
        model = build_model("conv28", tuple(x_all.shape[1:]), 64, 0.0, a.width).to(dev).to(memory_format=torch.channels_last)
        head = torch.nn.Linear(64, 10).to(dev)
        params = [*model.parameters(), *head.parameters()]
        return model, head, params

    def epoch_order(epoch: int) -> torch.Tensor:
        return torch.randperm(len(y_all), generator=torch.Generator().manual_seed(epoch))[:n].to(dev).view(-1, a.batch)

    def timed(step, epochs: int) -> float:
        """The fastest epoch after the first (which includes any compilation) of ``step(idx)`` over the batches."""
        times = []
        for epoch in range(epochs):
            sync()
            start = time.perf_counter()
            for idx in epoch_order(epoch):
                step(idx)
            sync()
            times.append(time.perf_counter() - start)
        return min(times[1:] or times)

    def plain(mode: str | None) -> tuple[float, float]:
        """The eager loop, its network through ``torch.compile(mode=mode)`` when ``mode`` is given."""
        model, head, params = fresh()
        net = torch.compile(model, mode=mode) if mode else model
        opt = torch.optim.Adam(params, lr=1e-3, fused=True)
        last = []

        def step(idx):
            loss = F.cross_entropy(head(net(x_all[idx])), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last[:] = [loss.detach()]
        return timed(step, a.epochs), last[0].item()

    def graphed() -> tuple[float, float]:
        if dev.type != "cuda":
            raise RuntimeError("a CUDA graph needs a CUDA device")
        model, head, params = fresh()
        opt = torch.optim.Adam(params, lr=1e-3, capturable=True)
        static_x = x_all[: a.batch].clone()
        static_y = y_all[: a.batch].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (allocator, cuDNN choices, optimizer state)
            for _ in range(3):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(head(model(static_x)), static_y).backward()
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_loss = F.cross_entropy(head(model(static_x)), static_y)
            static_loss.backward()
            opt.step()

        def step(idx):
            static_x.copy_(x_all[idx])
            static_y.copy_(y_all[idx])
            graph.replay()
        return timed(step, a.epochs), static_loss.item()

    machine = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"softmax epoch, {n} rows, batch {a.batch}, conv28 width {a.width}, {machine}, fastest epoch after the first:")
    base = None  # the eager variant's seconds
    for name, variant in (("eager (fused Adam)", lambda: plain(None)), ("one CUDA graph per step", graphed),
                          ("network compiled, mode reduce-overhead", lambda: plain("reduce-overhead"))):
        try:
            seconds, loss = variant()
        except Exception as exc:  # noqa: BLE001 - a GPU session should still see the other variants
            print(f"   {name:40s} failed: {type(exc).__name__}: {exc}")
            continue
        base = base or (seconds if name.startswith("eager") else None)
        against = f"{base / seconds:.2f}x eager" if base else "eager failed"
        print(f"   {name:40s} {seconds:.3f} s  ({against}); last loss {loss:.4f}")


if __name__ == "__main__":
    main()
