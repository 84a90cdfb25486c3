"""Pilot for the issue-11 budgets: one 30-epoch constant-rate run on 500 Fashion-MNIST images per class.

Usage: ``python benchmarks/pilot_budgets.py SOLVER [SOLVER_OPTIONS_JSON]``; prints the best epoch, test
accuracy, the validation curve and seconds per epoch (recorded in benchmarks/README.md).
"""
from __future__ import annotations

import json
import sys
import tempfile

import torch

from knnsolver.training import TrainConfig, train


def main() -> None:
    torch.set_num_threads(1)
    solver = sys.argv[1]
    options = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(dataset="fashion-mnist", model="conv28", width=16, embedding_dim=64, batch_size=64,
                          samples_per_class=8, epochs=30, optimizer="adam", lr=1e-3, lr_schedule="constant",
                          max_per_class=500, val_fraction=0.05, solver=solver, solver_options=options, out=out,
                          plots=False, progress=False, device="cpu")
        summary = train(cfg)
        history = [json.loads(line) for line in open(f"{out}/log.jsonl")]
    curve = [round(100 * row.get("val_accuracy", 0), 1) for row in history]
    seconds = sum(row["seconds"] for row in history) / len(history)
    print(solver, "best", summary["best_epoch"], "test", summary["test_accuracy"], "val", curve,
          "sec/epoch", round(seconds, 2))


if __name__ == "__main__":
    main()
