"""Do the stored training results still stand for today's code? Replay them at both commits and compare.

Every stored training result (``benchmarks/results/<suite>/*.json``) records the commit it ran at, but the
code has changed since, and a result records no fingerprint of the code it trained with (the timings do). This
script checks, one representative run per suite, method and condition (the seed-0 final), that the change
does not alter what was trained: it replays the run's first ``--epochs`` epochs from its stored configuration
twice on this machine, once with the source tree of the commit the result records and once with the source
tree of ``--head`` (default ``HEAD``), each in a fresh process with one torch thread as the suites run, and
compares the two: every epoch's loss, every validation score logged, and the summary's metrics (accuracy,
or Recall@K, MAP@R and NMI) of the best epoch replayed. Identical figures mean the code changed since does not touch that run, so its
stored result stands; figures that differ name a run whose suite must be run again, or a difference to
explain (a change of rounding grows through training, so the first epoch's loss tells rounding, about 1e-6
relative, from a change of what is computed).

The stored history itself comes from another machine (its CPU's kernels round differently), so it is shown
beside, not compared: its first epoch's loss agrees to rounding, later ones drift apart as any chaotic
computation does. Replaying cuts each run at ``--epochs`` (the suites all use a constant learning rate, so
the first epochs are those of the full run); each source tree is ``git archive``'s copy of ``src/``, so an
uncommitted change never enters. Each finished comparison is appended to ``--out`` as one JSON line, and a
second call skips the runs already there (resumable).

    .venv/bin/python benchmarks/replay_results.py --epochs 5 --workers 2 --out benchmarks/replays.jsonl
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

# Runs in a fresh interpreter whose knnsolver is the commit's source tree: only APIs every stored commit has.
_CHILD = r"""
import json, sys, tempfile
from dataclasses import replace
import torch
torch.set_num_threads(1)
from knnsolver.training.config import TrainConfig
from knnsolver.training.trainer import train
result = json.loads(open(sys.argv[1]).read())
out = tempfile.mkdtemp(prefix="knnsolver-replay-") + "/run"
cfg = replace(TrainConfig.from_dict(result["config"]), out=out, epochs=int(sys.argv[2]), progress=False)
summary = train(cfg)
log = [json.loads(line) for line in open(out + "/log.jsonl")]
scored = [row[result["val_key"]] for row in log if row.get(result["val_key"]) is not None]
metrics = {k: v for k, v in summary.items() if isinstance(v, float) and k != "best_val_score"}
print("REPLAY " + json.dumps({"losses": [row["loss"] for row in log], "val": scored, "test": metrics}))
"""


def representatives(results: Path) -> list[Path]:
    """One stored training result per suite, method and condition: the seed-0 final, else the first by name."""
    chosen: dict[tuple[str, str, str], Path] = {}
    for path in sorted(results.glob("*/*.json")):
        result = json.loads(path.read_text())
        if result.get("kind") != "train":
            continue
        key = (result["suite"], result["method"], result.get("condition", ""))
        best = chosen.get(key)
        if best is None or (result.get("role") == "final" and result.get("seed") == 0):
            chosen[key] = path
    return list(chosen.values())


def source_tree(commit: str, cache: Path) -> Path:
    """``src/`` of ``commit``, unpacked once into ``cache``."""
    tree = cache / commit
    if not tree.is_dir():  # unpacked beside, then renamed: another worker never sees half a tree
        cache.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(dir=cache))
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "src"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(partial)], input=archive, check=True)
        try:
            partial.rename(tree)
        except OSError:  # another worker was first
            shutil.rmtree(partial, ignore_errors=True)
    return tree / "src"


def replay(result_path: Path, src: Path, epochs: int) -> dict[str, Any]:
    """The first ``epochs`` epochs of a stored run, trained by the knnsolver in ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, str(result_path), str(epochs)], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("REPLAY ")]
    if done.returncode != 0 or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1][len("REPLAY "):])


def _largest_relative(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b)), default=math.nan)


def compare(result_path: Path, head: str, epochs: int, cache: Path) -> dict[str, Any]:
    """Replay one stored run at its commit and at ``head``; what differs."""
    result = json.loads(result_path.read_text())
    then = replay(result_path, source_tree(result["commit"], cache), epochs)
    now = replay(result_path, source_tree(head, cache), epochs)
    row: dict[str, Any] = {"result": str(result_path.relative_to(ROOT)), "commit": result["commit"], "head": head,
                           "epochs": epochs, "then": then, "now": now}
    if "error" in then or "error" in now:
        row["verdict"] = "error"
        return row
    same = then["losses"] == now["losses"] and then["val"] == now["val"] and then["test"] == now["test"]
    row["verdict"] = "identical" if same else "differs"
    row["loss_rel_diff"] = _largest_relative(then["losses"], now["losses"])
    row["first_loss_rel_diff"] = _largest_relative(then["losses"][:1], now["losses"][:1])
    row["stored_first_loss_rel_diff"] = _largest_relative([r["loss"] for r in result["history"][:1]], then["losses"][:1])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--epochs", type=int, default=5, help="epochs replayed of each run (default 5)")
    parser.add_argument("--head", default="HEAD", help="the commit to compare with (default HEAD)")
    parser.add_argument("--workers", type=int, default=2, help="replays side by side, one thread each (default 2)")
    parser.add_argument("--only", default="", help="replay only results whose path contains this text")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "replays.jsonl")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "knnsolver-replay-src")
    args = parser.parse_args()
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", args.head], check=True, capture_output=True,
                          text=True).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.out.is_file():
        done = {(row["result"], row["head"], row["epochs"]) for row in map(json.loads, args.out.read_text().splitlines())
                if row["verdict"] != "error"}  # a failed replay is tried again
    todo = [p for p in representatives(args.results)
            if args.only in str(p) and (str(p.relative_to(ROOT)), head, args.epochs) not in done]
    print(f"{len(todo)} run(s) to replay at their commits and at {head[:7]}, {args.epochs} epochs each", flush=True)

    def one(path: Path) -> None:
        row = compare(path, head, args.epochs, args.cache)
        with open(args.out, "a") as out:  # one line per finished comparison: a killed call keeps the rest
            out.write(json.dumps(row) + "\n")
        detail = (f"losses {row['loss_rel_diff']:.1e} apart (epoch 1: {row['first_loss_rel_diff']:.1e}), "
                  f"val {row['then']['val']} / {row['now']['val']}" if row["verdict"] == "differs" else
                  row.get("then", {}).get("error") or row.get("now", {}).get("error") or "")
        print(f"{row['verdict']:>9}  {row['result']} ({row['commit'][:7]}) {detail}", flush=True)

    with ThreadPoolExecutor(args.workers) as pool:
        list(pool.map(one, todo))


if __name__ == "__main__":
    main()
