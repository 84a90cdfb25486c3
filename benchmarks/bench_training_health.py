"""Training health on small Fashion-MNIST subsets: the figures issue 10 ("trustworthy training") asks for.

Each run's result is written to ``--out/NAME.json`` as soon as it finishes, so a
stopped invocation resumes where it stopped. Experiments:

* ``softmax``: 100 images per class, the old settings (no BN re-estimation,
  constant learning rate, ``bn_mode=batch``) against the new defaults. Prints
  each epoch's validation accuracy, the largest change between consecutive
  epochs, and the test accuracy of the saved best weights against an
  independent re-estimation of their BatchNorm statistics
  (``torch.optim.swa_utils.update_bn`` over the training rows).
* ``rbf-scarce``: RBF at 10 images per class on 3 seeds: the largest epoch loss
  over the first epoch's (the target is under 3x).
* ``rbf-choice``: RBF at 100 images per class on 3 seeds, on validation only:
  ``bn_mode`` batch against frozen and matched, and raw against
  sphere-normalised embeddings; these choose the defaults.
* ``rbf-sigma``: RBF at 500 images per class, 30 epochs at a constant rate,
  on validation: the automatic sigma re-estimated at every refresh against
  an automatic first value that is then learned.

Usage: ``python benchmarks/bench_training_health.py [--only softmax rbf-scarce rbf-choice] [--seeds 0 1 2]``
(Fashion-MNIST from ``make data``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from knnsolver.training import TrainConfig, train
from knnsolver.training.checkpoint import load_checkpoint, write_json
from knnsolver.training.run import build_run

BASE = dict(dataset="fashion-mnist", model="conv28", width=16, embedding_dim=64, batch_size=64, optimizer="adam",
            lr=1e-3, val_fraction=0.05, plots=False, progress=False)
OLD = dict(precise_bn=False, lr_schedule="constant", bn_mode="batch")


def run(out: Path, name: str, **settings: Any) -> dict[str, Any]:
    """Train ``settings`` into ``out/runs/name`` unless ``out/name.json`` holds its result; return the result."""
    result_file = out / f"{name}.json"
    if result_file.is_file():
        return json.loads(result_file.read_text())
    cfg = TrainConfig(**{**BASE, **settings, "out": str(out / "runs" / name)})
    summary = train(cfg, overwrite=True)
    history = load_checkpoint(Path(cfg.out) / "checkpoint.pt")["history"]
    result = {"name": name, "config": cfg.to_dict(), "summary": summary, "history": history}
    if cfg.split == "standard" and cfg.solver == "softmax":
        result["fresh_bn_test_accuracy"] = fresh_bn_accuracy(cfg)
    write_json(result, result_file)
    return result


@torch.no_grad()
def fresh_bn_accuracy(cfg: TrainConfig) -> float:
    """Test accuracy of the saved best weights after torch's own BatchNorm re-estimation over the training rows."""
    from torch.optim.swa_utils import update_bn
    from torch.utils.data import DataLoader

    rebuilt = build_run(cfg)
    best = load_checkpoint(Path(cfg.out) / "best.pt")
    rebuilt.model.load_state_dict(best["model"])
    rebuilt.solver.load_state_dict(best["solver"])
    update_bn((x for x, _, _ in DataLoader(rebuilt.data.train_eval, batch_size=cfg.batch_size)), rebuilt.model)
    rebuilt.model.eval()
    correct = total = 0
    for x, y, _ in DataLoader(rebuilt.data.test, batch_size=512):
        correct += int((rebuilt.solver.predict(rebuilt.model(x)).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def val_curve(result: dict[str, Any], key: str = "val_accuracy") -> list[float]:
    return [row[key] for row in result["history"] if key in row]


def largest_step(values: list[float], skip: int = 0) -> float:
    """Largest absolute change between consecutive values from index ``skip`` on."""
    tail = values[skip:]
    return max((abs(b - a) for a, b in zip(tail, tail[1:])), default=0.0)


def largest_drop(values: list[float]) -> float:
    """Largest fall from one value to the next (0 if it never falls)."""
    return max((a - b for a, b in zip(values, values[1:])), default=0.0)


def softmax(out: Path, seeds: list[int]) -> None:
    print("## softmax, 100 images per class, 20 epochs (validation 3,000 images, test 10,000)")
    print("| settings | seed | val accuracy per epoch (%) | largest epoch-to-epoch drop (pts) | largest change "
          "from epoch 5 on (pts) | test acc | test acc after fresh BN re-estimation | gap (pts) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, extra in (("old (no precise BN, constant lr)", OLD), ("new defaults", {})):
        for seed in seeds:
            tag = "old" if extra else "new"
            r = run(out, f"softmax-{tag}-s{seed}", solver="softmax", max_per_class=100, epochs=20, seed=seed, **extra)
            curve = [100 * v for v in val_curve(r)]
            test, fresh = 100 * r["summary"]["test_accuracy"], 100 * r["fresh_bn_test_accuracy"]
            print(f"| {label} | {seed} | {' '.join(f'{v:.0f}' for v in curve)} | {largest_drop(curve):.1f} | "
                  f"{largest_step(curve, skip=4):.1f} | {test:.2f} | {fresh:.2f} | {abs(test - fresh):.2f} |")
            sys.stdout.flush()


def rbf_scarce(out: Path, seeds: list[int]) -> None:
    print("## RBF, 10 images per class (100 training images), k=50, refresh every epoch, 150 epochs (300 steps)")
    print("| sigma | seed | first-epoch loss | largest epoch loss | ratio | final sigma | median own-centre distance | "
          "best val acc | test acc | diverged |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for seed, (tag, extra) in ((s, v) for v in (("", {}), ("-learned", {"learn_sigma": True})) for s in seeds):
        r = run(out, f"rbf-scarce{tag}-s{seed}", solver="rbf", max_per_class=10, epochs=150, eval_every=10, seed=seed,
                solver_options={"k": 50, "update_interval": 1, **extra})
        losses = [row["loss"] for row in r["history"]]
        last = r["history"][-1]
        print(f"| {'learned' if tag else 're-estimated'} | {seed} | {losses[0]:.3f} | {max(losses):.3f} | {max(losses) / losses[0]:.2f} | "
              f"{last['solver_sigma']:.3f} | {last.get('solver_median_own_centre_distance', float('nan')):.3f} | "
              f"{100 * max(val_curve(r)):.2f} | {100 * r['summary']['test_accuracy']:.2f} | {r['summary']['diverged']} |")
        sys.stdout.flush()


def rbf_choice(out: Path, seeds: list[int]) -> None:
    print("## RBF defaults chosen on validation: 100 images per class, k=100, refresh every epoch, 20 epochs")
    variants = {
        "bn batch, raw": dict(bn_mode="batch", solver_options={"k": 100, "update_interval": 1}),
        "bn frozen, raw": dict(bn_mode="frozen", solver_options={"k": 100, "update_interval": 1}),
        "bn frozen, sphere": dict(bn_mode="frozen", solver_options={"k": 100, "update_interval": 1, "normalize": True}),
        "bn batch, sphere": dict(bn_mode="batch", solver_options={"k": 100, "update_interval": 1, "normalize": True}),
        "bn matched, sphere": dict(bn_mode="matched",
                                   solver_options={"k": 100, "update_interval": 1, "normalize": True}),
    }
    print("| variant | best val acc per seed (%) | mean | median own-centre distance / sigma (last epoch) | "
          "mean RBF value (last epoch) |")
    print("|---|---|---|---|---|")
    for label, settings in variants.items():
        tag = label.replace(", ", "-").replace(" ", "")
        results = [run(out, f"rbf-choice-{tag}-s{seed}", solver="rbf", max_per_class=100, epochs=20, seed=seed,
                       **settings) for seed in seeds]
        best = [100 * max(val_curve(r)) for r in results]
        drift = [r["history"][-1].get("solver_median_own_centre_distance", float("nan")) / r["history"][-1]["solver_sigma"]
                 for r in results]
        rbf = [r["history"][-1]["solver_mean_rbf_value"] for r in results]
        print(f"| {label} | {' '.join(f'{v:.2f}' for v in best)} | {statistics.mean(best):.2f} | "
              f"{statistics.mean(drift):.2f} | {statistics.mean(rbf):.3f} |")
        sys.stdout.flush()


def rbf_sigma(out: Path, seeds: list[int]) -> None:
    print("## RBF sigma rule on validation: 500 images per class, k=100, refresh every epoch, 30 epochs, constant lr")
    variants = {
        "automatic, re-estimated at every refresh": {},
        "automatic at the first fill, then learned": {"learn_sigma": True},
    }
    print("| sigma | best val acc per seed (%) | mean | best epoch per seed | final sigma per seed |")
    print("|---|---|---|---|---|")
    for label, extra in variants.items():
        tag = "learned" if extra else "auto"
        results = [run(out, f"rbf-sigma-{tag}-s{seed}", solver="rbf", max_per_class=500, epochs=30, seed=seed,
                       lr_schedule="constant", solver_options={"k": 100, "update_interval": 1, **extra})
                   for seed in seeds]
        best = [100 * max(val_curve(r)) for r in results]
        print(f"| {label} | {' '.join(f'{v:.2f}' for v in best)} | {statistics.mean(best):.2f} | "
              f"{' '.join(str(r['summary']['best_epoch']) for r in results)} | "
              f"{' '.join(format(r['history'][-1]['solver_sigma'], '.3f') for r in results)} |")
        sys.stdout.flush()


EXPERIMENTS = {"softmax": softmax, "rbf-scarce": rbf_scarce, "rbf-choice": rbf_choice, "rbf-sigma": rbf_sigma}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/training-health")
    parser.add_argument("--only", nargs="+", choices=list(EXPERIMENTS), default=list(EXPERIMENTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        EXPERIMENTS[name](out, args.seeds)


if __name__ == "__main__":
    main()
