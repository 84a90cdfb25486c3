"""Render ``BENCHMARKS.md`` from stored suite results: tables, claim verdicts, plots, provenance.

Everything here is computed from the result files, so the report can be
re-rendered at any time, from partial results too. Numbers are means and
sample standard deviations over seeds. Comparisons are paired by seed, with a
95% interval of the mean difference; a claim holds or does not hold only when
the interval excludes its threshold (:mod:`knnsolver.bench.stats`). Runs
marked diverged are counted as failed and left out of every number.
"""
from __future__ import annotations

import datetime
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from knnsolver.bench.runner import TRAINING_VERSION, load_results  # noqa: E402
from knnsolver.bench.suites import (  # noqa: E402
    PAIRWISE_KNN_LOSSES,
    PRESETS,
    SCARCITY_SOLVERS,
    SUITES,
    TARGET_SOLVERS,
    UNSEEN_BASELINES,
    UNSEEN_SUBSET,
    Suite,
    ablation_variants,
    choose,
    dim_text,
    final_results,
    grid_results,
    params_text,
)
from knnsolver.bench.stats import (  # noqa: E402
    FAILS,
    HOLDS,
    OPEN,
    PairedTest,
    at_grid_edge,
    convergence,
    paired_differences,
    paired_test,
    slope_test,
    usable,
)
from knnsolver.registry import SOLVERS  # noqa: E402
SUITE_BUDGET_MINUTES = 120
TARGET_FRACTION = 0.95  # time-to-target: this fraction of the weaker method's best validation P@1
SPEEDUP_CLAIMED, SPEEDUP_TOLERANCE = 5.0, 0.8  # "about 5x": every seed at least 4x
# Baselines that equal HAL under METHODS.md's reading (ProxyNCA at scale 1/tau, NormSoftmax at temperature tau/2).
HAL_EQUIVALENT = ("proxynca", "normsoftmax")
# The speed-up is resolved only when the faster method needs at least this many evaluations to reach the target
# (one-epoch granularity cannot tell 5x from 2x when both reach it within an epoch or two).
MIN_TARGET_EVALS = 3
HAL_COST_LIMIT = 0.10
HAL_MARGIN = 0.01
RETRIEVAL_KEYS = ("precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r",
                  "r_precision", "nmi")
RETRIEVAL_NAMES = {"precision_at_1": "P@1", "recall_at_1": "R@1", "recall_at_2": "R@2", "recall_at_4": "R@4",
                   "recall_at_8": "R@8", "map_at_r": "MAP@R", "r_precision": "R-prec", "nmi": "NMI"}
CONFIG_KEYS = ("dataset", "split", "model", "width", "embedding_dim", "batch_size", "samples_per_class", "epochs",
               "max_per_class", "val_fraction", "augment", "optimizer", "lr", "weight_decay")


# ---- statistics and verdicts ----------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of values over seeds."""

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    def pct(self) -> str:
        """``85.12 ± 0.31`` in percent (``-`` when empty)."""
        if not self.values:
            return "-"
        return f"{100 * self.mean:.2f} ± {100 * self.std:.2f}" if self.n > 1 else f"{100 * self.mean:.2f}"


@dataclass(frozen=True)
class Verdict:
    status: str
    numbers: str


def by_seed(runs: Sequence[dict], key: str) -> dict[int, float]:
    """``{seed: summary[key]}`` of the usable (not diverged) runs."""
    return {int(r["seed"]): float(r["summary"][key]) for r in usable(runs)[0] if key in r.get("summary", {})}


def compare(a: Sequence[dict], b: Sequence[dict], key: str, margin: float = 0.0) -> PairedTest:
    """Whether runs ``a`` beat runs ``b`` on ``key`` by more than ``margin``: a paired test over their common seeds."""
    return paired_test(paired_differences(by_seed(a, key), by_seed(b, key)), margin)


def combine(statuses: Iterable[str]) -> str:
    """All hold: holds; any does not hold: does not hold; otherwise inconclusive."""
    statuses = list(statuses)
    if not statuses:
        return OPEN
    if all(s == HOLDS for s in statuses):
        return HOLDS
    return FAILS if FAILS in statuses else OPEN


def _values(runs: Sequence[dict], key: str) -> tuple[float, ...]:
    return tuple(float(r["summary"][key]) for r in usable(runs)[0] if key in r.get("summary", {}))


def _stat(runs: Sequence[dict], key: str) -> Stat:
    return Stat(_values(runs, key))


# ---- Markdown and plot helpers ----------------------------------------------------------------


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


class Plots:
    """Saves figures into the plots folder and returns Markdown image links relative to the report."""

    def __init__(self, folder: Path, report: Path) -> None:
        self.folder, self.report = folder, report

    def save(self, fig: plt.Figure, name: str, caption: str) -> str:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        rel = os.path.relpath(path, self.report.parent).replace(os.sep, "/")
        return f"![{caption}]({rel})"


def _bar(plots: Plots, name: str, caption: str, labels: Sequence[str], stats: Sequence[Stat], ylabel: str) -> str:
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * len(labels) + 1.5), 3.5))
    ax.bar(range(len(labels)), [100 * s.mean for s in stats], yerr=[100 * s.std for s in stats], capsize=3,
           color="tab:blue")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    finite = [100 * s.mean for s in stats if not math.isnan(s.mean)]
    if finite:
        low = min(finite)
        ax.set_ylim(max(0.0, low - 0.2 * (max(finite) - low + 1) - 2), min(100.0, max(finite) + 2))
    ax.set(ylabel=ylabel, title=caption)
    return plots.save(fig, name, caption)


def _ordered_methods(results: Mapping[str, dict], condition: str | None = None) -> list[str]:
    """Methods in registry order (others after), those with results at ``condition`` only."""
    found = {r["method"] for r in results.values() if condition is None or r["condition"] == condition}
    order = SOLVERS.names()
    return sorted(found, key=lambda m: (order.index(m) if m in order else len(order), m))


def _chosen_text(results: Mapping[str, dict], method: str, condition: str) -> str:
    finals = final_results(results, method, condition)
    return params_text(finals[0]["params"]) if finals else "-"


def grid_table(results: Mapping[str, dict], groups: Sequence[tuple[str, str]], score: str) -> str:
    """Every grid point of each (method, condition) with its validation score; the chosen one in bold."""
    rows = []
    for method, condition in groups:
        grid = grid_results(results, method, condition)
        if not grid:
            continue
        chosen = choose(grid)
        edge = [k for k, v in chosen["params"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and at_grid_edge([r["params"][k] for r in grid], v)]
        for r in grid:
            mark = ""
            if r["run_id"] == chosen["run_id"]:
                mark = "**chosen**" + (f" (at the grid edge in {', '.join(edge)}: the optimum may lie outside)"
                                       if edge else "")
            rows.append([method + (f" ({condition})" if condition else ""), params_text(r["params"]),
                         f"{100 * r['best_val']:.2f}", mark])
    if not rows:
        return ""
    return table(["method", "grid point", f"best validation {score} (%)", ""], rows)


def _claim_line(claim: str, verdict: Verdict) -> str:
    return f"- **{claim}** {verdict.status.upper()}. {verdict.numbers}"


# ---- suite sections ---------------------------------------------------------------------------


@dataclass
class Section:
    """A rendered suite: its Markdown body and its claims with verdicts (for the summary)."""

    body: str
    claims: list[tuple[str, Verdict]]


def render_classification(results: Mapping[str, dict], plots: Plots) -> Section:
    methods = _ordered_methods(results, "")
    parts = ["### Hyperparameter grids (validation accuracy, first seed)",
             grid_table(results, [(m, "") for m in methods], "accuracy")]
    stats = {m: _stat(final_results(results, m, ""), "test_accuracy") for m in methods}
    rows = [[m, _chosen_text(results, m, ""), stats[m].pct(), stats[m].n] for m in methods]
    parts += ["### Test accuracy of the chosen setting (%)", table(["solver", "chosen", "test accuracy", "seeds"], rows)]
    claims = []
    finals = {m: final_results(results, m, "") for m in methods}
    if "rbf" in stats and "softmax" in stats:
        test = compare(finals["rbf"], finals["softmax"], "test_accuracy")
        claims.append((SUITES["classification"].claims[0], Verdict(
            test.verdict, f"rbf {stats['rbf'].pct()} vs softmax {stats['softmax'].pct()}; paired gain {test.text()}.")))
    baselines = [b for b in PAIRWISE_KNN_LOSSES if b in stats]
    if "hal" in stats and baselines:
        each = [(b, compare(finals["hal"], finals[b], "test_accuracy", HAL_MARGIN)) for b in baselines]
        numbers = f"hal {stats['hal'].pct()}; " + "; ".join(
            f"against {b}: {t.text()} vs the {100 * HAL_MARGIN:g}-point margin ({t.verdict})" for b, t in each)
        same = [b for b in HAL_EQUIVALENT if b in stats]
        if same:
            numbers += ("; not compared, being HAL itself under this reading (METHODS.md section 2): "
                        + ", ".join(f"{b} {stats[b].pct()}" for b in same))
        claims.append((SUITES["classification"].claims[1], Verdict(combine(t.verdict for _, t in each), numbers + ".")))
    if methods:
        parts.append(_bar(plots, "classification_accuracy", "Test accuracy (mean ± std over seeds)", methods,
                          [stats[m] for m in methods], "test accuracy (%)"))
    return Section("\n\n".join(p for p in parts if p), claims)


def _size_key(condition: str) -> float:
    value = condition.split("=", 1)[1]
    return math.inf if value == "all" else float(value)


def _paired_gain(results: Mapping[str, dict], method: str, base: str, condition: str) -> Stat:
    """Per-seed test-accuracy gain of ``method`` over ``base`` (same seed, same training subset)."""
    a = {r["seed"]: r["summary"]["test_accuracy"] for r in final_results(results, method, condition)}
    b = {r["seed"]: r["summary"]["test_accuracy"] for r in final_results(results, base, condition)}
    return Stat(tuple(a[s] - b[s] for s in sorted(set(a) & set(b))))


def render_scarcity(results: Mapping[str, dict], plots: Plots) -> Section:
    methods = [m for m in SCARCITY_SOLVERS if any(r["method"] == m for r in results.values())]
    sizes = sorted({r["condition"] for r in results.values()}, key=_size_key)
    grid_groups = sorted({(r["method"], r["condition"]) for r in results.values() if r["role"] == "grid"},
                         key=lambda g: methods.index(g[0]) if g[0] in methods else 0)
    parts = ["### Hyperparameter grids (validation accuracy, first seed)", grid_table(results, grid_groups, "accuracy")]
    gainers = [m for m in methods if m != "softmax"] if "softmax" in methods else []
    header = ["training images per class", "epochs", *[f"{m} test accuracy" for m in methods],
              *[f"{m} - softmax" for m in gainers]]
    stats = {(m, c): _stat(final_results(results, m, c), "test_accuracy") for m in methods for c in sizes}
    gains = {(m, c): _paired_gain(results, m, "softmax", c) for m in gainers for c in sizes}
    epochs = {r["condition"]: r["config"]["epochs"] for r in results.values()}
    rows = [[c.split("=", 1)[1], epochs[c], *[stats[m, c].pct() for m in methods], *[gains[m, c].pct() for m in gainers]]
            for c in sizes]
    parts += ["### Test accuracy (%) and gain over softmax (percentage points, paired by seed)", table(header, rows)]
    claims = []
    finite = [c for c in sizes if math.isfinite(_size_key(c))]
    if "rbf" in gainers and len(finite) >= 2:
        per_seed: dict[int, dict[float, float]] = {}
        for c in finite:
            rbf = by_seed(final_results(results, "rbf", c), "test_accuracy")
            soft = by_seed(final_results(results, "softmax", c), "test_accuracy")
            for seed in set(rbf) & set(soft):
                per_seed.setdefault(seed, {})[_size_key(c)] = rbf[seed] - soft[seed]
        trend = slope_test(per_seed)
        gains_text = ", ".join(f"{c.split('=', 1)[1]}: {gains['rbf', c].pct()}" for c in sizes)
        claims.append((SUITES["scarcity"].claims[0], Verdict(
            trend.verdict, f"{trend.text()} (the claim needs a negative slope: a larger gain with fewer images; sizes "
                           f"with a cap only); RBF gain over softmax by size: {gains_text}.")))
    if methods and sizes:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
        xs = range(len(sizes))
        for m in methods:
            s = [stats[m, c] for c in sizes]
            ax1.errorbar(xs, [100 * v.mean for v in s], yerr=[100 * v.std for v in s], marker="o", capsize=3, label=m)
        for m in gainers:
            g = [gains[m, c] for c in sizes]
            ax2.errorbar(xs, [100 * v.mean for v in g], yerr=[100 * v.std for v in g], marker="o", capsize=3, label=m)
        ax2.axhline(0, color="grey", lw=0.8)
        for ax, ylabel in ((ax1, "test accuracy (%)"), (ax2, "gain over softmax (points)")):
            ax.set_xticks(list(xs), [c.split("=", 1)[1] for c in sizes])
            ax.set(xlabel="training images per class", ylabel=ylabel)
            ax.legend()
        parts.append(plots.save(fig, "scarcity", "Accuracy and gain over softmax by training-set size"))
    return Section("\n\n".join(p for p in parts if p), claims)


def render_unseen(results: Mapping[str, dict], plots: Plots) -> Section:
    main = dim_text(64)
    methods = _ordered_methods(results, main)
    parts = []
    if any((r["config"].get("data_dir") or "").endswith(UNSEEN_SUBSET) for r in results.values() if "config" in r):
        parts.append("Data: the official Fashion-MNIST training images of classes 0-4 train (at most `max_per_class` "
                     "per class) and validate (`val_fraction` of them, carved before the cap); the 5,000 official "
                     "test images of the unseen classes 5-9 are the retrieval test set (queries and references).")
    parts += ["### Hyperparameter grids (validation Precision@1 on held-out images of classes 0-4, first seed)",
             grid_table(results, [(m, main) for m in methods], "P@1")]
    stats = {(m, k): _stat(final_results(results, m, main), k) for m in methods for k in RETRIEVAL_KEYS}
    header = ["solver", "chosen", *[f"{RETRIEVAL_NAMES[k]} (%)" for k in RETRIEVAL_KEYS]]
    rows = [[m, _chosen_text(results, m, main), *[stats[m, k].pct() for k in RETRIEVAL_KEYS]] for m in methods]
    parts += ["### Retrieval on the unseen classes 5-9 at embedding size 64", table(header, rows)]
    dims = sorted({r["condition"] for r in results.values()}, key=_size_key)
    swept = [m for m in _ordered_methods(results) if sum(1 for d in dims if final_results(results, m, d)) > 1]
    if swept:
        dim_rows = [[m, *[f"{_stat(final_results(results, m, d), 'recall_at_1').pct()} / "
                          f"{_stat(final_results(results, m, d), 'nmi').pct()}" for d in dims]] for m in swept]
        parts += ["### Recall@1 / NMI (%) by embedding size", table(["solver", *[d.split('=')[1] for d in dims]], dim_rows)]
    claims = []
    baselines = [b for b in UNSEEN_BASELINES if b in methods]
    if "rbf" in methods and baselines:
        each = [(b, k, compare(final_results(results, "rbf", main), final_results(results, b, main), k))
                for b in baselines for k in ("recall_at_1", "nmi")]
        numbers = "; ".join(f"{RETRIEVAL_NAMES[k]}: rbf {stats['rbf', k].pct()} vs {b} {stats[b, k].pct()}, paired "
                            f"{t.text()} ({t.verdict})" for b, k, t in each)
        claims.append((SUITES["unseen-classes"].claims[0], Verdict(combine(t.verdict for _, _, t in each), numbers + ".")))
    if {"rbf", "triplet"} <= set(swept):
        low, high = dims[0], dims[-1]
        parts_n, statuses = [], []
        for k in ("recall_at_1", "nmi"):
            rbf_gain = compare(final_results(results, "rbf", high), final_results(results, "rbf", low), k).verdict
            tri_gain = compare(final_results(results, "triplet", high), final_results(results, "triplet", low), k).verdict
            statuses.append(HOLDS if rbf_gain == HOLDS and tri_gain != HOLDS
                            else FAILS if rbf_gain == FAILS or tri_gain == HOLDS else OPEN)
            parts_n.append(
                f"{RETRIEVAL_NAMES[k]} from {low} to {high}: rbf {_stat(final_results(results, 'rbf', low), k).pct()} -> "
                f"{_stat(final_results(results, 'rbf', high), k).pct()} (gain {rbf_gain}), triplet "
                f"{_stat(final_results(results, 'triplet', low), k).pct()} -> "
                f"{_stat(final_results(results, 'triplet', high), k).pct()} (gain {tri_gain})")
        claims.append((SUITES["unseen-classes"].claims[1], Verdict(combine(statuses), "; ".join(parts_n) + ".")))
    if methods:
        parts.append(_bar(plots, "unseen_recall_at_1", "Recall@1 on unseen classes, embedding size 64", methods,
                          [stats[m, "recall_at_1"] for m in methods], "Recall@1 (%)"))
    if swept:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, k in zip(axes, ("recall_at_1", "nmi")):
            for m in swept:
                pts = [(int(d.split("=")[1]), _stat(final_results(results, m, d), k)) for d in dims
                       if final_results(results, m, d)]
                ax.errorbar([p[0] for p in pts], [100 * p[1].mean for p in pts], yerr=[100 * p[1].std for p in pts],
                            marker="o", capsize=3, label=m)
            ax.set_xscale("log", base=2)
            ax.set(xlabel="embedding size", ylabel=f"{RETRIEVAL_NAMES[k]} (%)")
            ax.legend()
        parts.append(plots.save(fig, "unseen_embedding_size", "Recall@1 and NMI by embedding size"))
    return Section("\n\n".join(p for p in parts if p), claims)


def _step_rows(results: Mapping[str, dict]) -> dict[str, dict[tuple[int, int], dict]]:
    return {r["method"]: {(t["batch_size"], t["num_classes"]): t for t in r["step_times"]}
            for r in results.values() if r["kind"] == "step_cost"}


def _time_to_target(run: Mapping[str, Any], target: float) -> float:
    """Training seconds (sum of the epochs' batch loops) until validation P@1 first reaches ``target``."""
    elapsed = 0.0
    for row in run["history"]:
        elapsed += row["seconds"]
        if row.get(run["val_key"], -math.inf) >= target:
            return elapsed
    return math.inf


def _evals_to_target(run: Mapping[str, Any], target: float) -> float:
    """The number of evaluations (epochs here) until validation P@1 first reaches ``target``."""
    for count, row in enumerate(run["history"], 1):
        if row.get(run["val_key"], -math.inf) >= target:
            return count
    return math.inf


def _cost_step_section(results: Mapping[str, dict], plots: Plots) -> tuple[list[str], list[tuple[str, Verdict]]]:
    steps = _step_rows(results)
    if not steps:
        return [], []
    solvers = _ordered_methods({k: r for k, r in results.items() if r["kind"] == "step_cost"})
    settings = sorted({key for times in steps.values() for key in times}, key=lambda k: (k[1], k[0]))
    rows = [[m, *[f"{1e3 * steps[m][s]['median_s']:.2f}" if s in steps[m] else "-" for s in settings]] for m in solvers]
    parts = ["### Loss step time (forward + backward on random embeddings, median ms)",
             "A dash: not measured, a smaller batch of that solver already took longer than the step limit.",
             table(["solver", *[f"B={b}, C={c}" for b, c in settings]], rows)]
    claims = []
    losses = [m for m in PAIRWISE_KNN_LOSSES if m in steps]
    if "hal" in steps and losses:
        ratio_rows, statuses = [], {}
        for b, c in settings:
            row = [f"B={b}, C={c}"]
            for m in losses:
                hal, other = steps["hal"].get((b, c)), steps[m].get((b, c))
                if hal is None or other is None:
                    row.append("-")
                    continue
                high, low = hal["q3_s"] / other["q1_s"], hal["q1_s"] / other["q3_s"]
                status = HOLDS if high < HAL_COST_LIMIT else FAILS if low >= HAL_COST_LIMIT else OPEN
                statuses[b, c, m] = status
                row.append(f"{100 * hal['median_s'] / other['median_s']:.0f}% ({status})")
            ratio_rows.append(row)
        parts += ["### HAL step time as a share of each pairwise kNN loss (interquartile ranges decide the verdict)",
                  table(["setting", *losses], ratio_rows)]
        batch = 64 if any(b == 64 for b, _ in settings) else max(b for b, _ in settings)
        classes = min(c for _, c in settings)
        at = [statuses[batch, classes, m] for m in losses if (batch, classes, m) in statuses]
        numbers = (f"At the benchmarks' batch size B={batch} with C={classes} classes: "
                   + ", ".join(f"{m} {100 * steps['hal'][batch, classes]['median_s'] / steps[m][batch, classes]['median_s']:.0f}%"
                               for m in losses if (batch, classes) in steps[m]) + ".")
        claims.append((SUITES["cost"].claims[0], Verdict(combine(at), numbers)))
    fig, ax = plt.subplots(figsize=(6, 4))
    classes = min(c for _, c in settings)
    for m in solvers:
        pts = sorted((b, t["median_s"]) for (b, c), t in steps[m].items() if c == classes)
        ax.plot([p[0] for p in pts], [1e3 * p[1] for p in pts], marker="o", label=m)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per step", title=f"Loss step time, C={classes}")
    ax.legend(fontsize=7, ncol=2)
    parts.append(plots.save(fig, "cost_step_time", "Loss step time by batch size"))
    return parts, claims


def _cost_epoch_section(results: Mapping[str, dict]) -> list[str]:
    epochs = {r["method"]: r for r in results.values() if r["kind"] == "epoch_cost"}
    if not epochs:
        return []
    rows = []
    for m in _ordered_methods({r["run_id"]: r for r in epochs.values()}):
        r = epochs[m]
        loop = statistics.fmean(row["seconds"] for row in r["history"])
        rate = statistics.fmean(row["samples_per_s"] for row in r["history"])
        rows.append([m, f"{loop:.2f}", f"{r['refresh_seconds']:.2f}", f"{loop + r['refresh_seconds']:.2f}", f"{rate:.0f}"])
    return ["### Epoch wall time (training split of the classification suite)",
            "The batch loop is the trainer's per-epoch `seconds`; the refresh is one `on_epoch_start` "
            "(bank refresh with its neighbour search, or nothing) timed on a fresh run.",
            table(["solver", "batch loop (s)", "refresh (s)", "epoch with refresh (s)", "samples/s"], rows)]


def _cost_target_section(results: Mapping[str, dict], plots: Plots) -> tuple[list[str], list[tuple[str, Verdict]]]:
    methods = [m for m in TARGET_SOLVERS if final_results(results, m, "target")]
    if not methods:
        return [], []
    parts = ["### Time to a target validation Precision@1 (unseen-class split, evaluated every epoch)",
             grid_table(results, [(m, "target") for m in methods], "P@1")]
    finals = {m: final_results(results, m, "target") for m in methods}
    best = {m: Stat(tuple(r["best_val"] for r in finals[m])) for m in methods}
    target = TARGET_FRACTION * min(best[m].mean for m in methods)
    times = {m: {r["seed"]: _time_to_target(r, target) for r in finals[m]} for m in methods}
    rows = []
    for m in methods:
        reached = [t for t in times[m].values() if math.isfinite(t)]
        rows.append([m, _chosen_text(results, m, "target"), best[m].pct(),
                     ", ".join("not reached" if not math.isfinite(t) else f"{t:.1f}" for t in times[m].values()),
                     f"{statistics.fmean(reached):.1f}" if reached else "-",
                     _stat(finals[m], "precision_at_1").pct()])
    parts += [f"Target: {100 * target:.2f}% validation P@1 ({TARGET_FRACTION:.0%} of the weaker method's mean best).",
              table(["solver", "chosen", "best val P@1 (%)", "seconds to target per seed", "mean seconds", "test P@1 (%)"],
                    rows)]
    claims = []
    if set(TARGET_SOLVERS) <= set(methods):
        seeds = sorted(set(times["centralized"]) & set(times["triplet"]))
        ratios = [times["triplet"][s] / times["centralized"][s] for s in seeds]
        bound = SPEEDUP_CLAIMED * SPEEDUP_TOLERANCE
        evals = {m: [_evals_to_target(r, target) for r in finals[m]] for m in TARGET_SOLVERS}
        resolved = min(min(e) for e in evals.values()) >= MIN_TARGET_EVALS
        status = OPEN if len(ratios) < 2 or not resolved else HOLDS if all(r >= bound for r in ratios) else (
            FAILS if all(r < bound for r in ratios) else OPEN)
        note = "" if resolved else (
            f"; not resolved: a method reached the target within {min(min(e) for e in evals.values())} evaluation(s), "
            f"so per-epoch timing cannot tell a {SPEEDUP_CLAIMED:g}x speed-up from a smaller one")
        claims.append((SUITES["cost"].claims[1], Verdict(
            status, f"triplet / centralized time to target per seed: {', '.join(f'{r:.2f}x' for r in ratios)} "
                    f"(holds when every seed is at least {bound:g}x){note}.")))
    fig, ax = plt.subplots(figsize=(6, 4))
    for color, m in zip(("tab:blue", "tab:orange"), methods):
        for i, r in enumerate(finals[m]):
            xs, total = [], 0.0
            for row in r["history"]:
                total += row["seconds"]
                xs.append(total)
            ax.plot(xs, [100 * row[r["val_key"]] for row in r["history"]], color=color, alpha=0.8, marker=".",
                    label=m if i == 0 else None)
    ax.axhline(100 * target, color="grey", ls="--", label="target")
    ax.set(xlabel="training seconds", ylabel="validation P@1 (%)", title="Time to target")
    ax.legend()
    parts.append(plots.save(fig, "cost_time_to_target", "Validation P@1 against training time"))
    return parts, claims


def render_cost(results: Mapping[str, dict], plots: Plots) -> Section:
    step_parts, step_claims = _cost_step_section(results, plots)
    target_parts, target_claims = _cost_target_section(results, plots)
    parts = [*step_parts, *_cost_epoch_section(results), *target_parts]
    return Section("\n\n".join(p for p in parts if p), step_claims + target_claims)


def render_ablation(results: Mapping[str, dict], plots: Plots) -> Section:
    parts = []
    grid = grid_results(results, "rbf", "sigma")
    if grid:
        best = choose(grid)["run_id"]
        rows = [[params_text(r["params"]), f"{100 * r['best_val']:.2f}", f"{100 * r['summary']['test_accuracy']:.2f}",
                 "**chosen**" if r["run_id"] == best else ""] for r in grid]
        parts += ["### sigma (first seed; the other variants use the chosen sigma)",
                  table(["sigma (0 = automatic)", "best validation accuracy (%)", "test accuracy (%)", ""], rows)]
    preset = PRESETS.get(next(iter(results.values()))["preset"]) if results else None
    variants = ablation_variants(preset) if preset else []
    base = _stat(final_results(results, "rbf", variants[0][1]), "test_accuracy") if variants else Stat(())
    rows = []
    for axis, name, _ in variants:
        finals = final_results(results, "rbf", name)
        if not finals:
            continue
        s = _stat(finals, "test_accuracy")
        val = Stat(tuple(r["best_val"] for r in finals))
        delta = f"{100 * (s.mean - base.mean):+.2f}" if base.values and axis != "base" else ""
        rows.append([axis, name, val.pct(), s.pct(), delta])
    if rows:
        parts += ["### Variants (accuracy %, mean ± std over seeds; difference to the base in points)",
                  table(["axis", "variant", "validation", "test", "test - base"], rows)]
    diag_variants = [(name, final_results(results, "rbf", name)) for axis, name, _ in variants
                     if axis in ("base", "update interval")]
    diag_variants = [(n, f[0]) for n, f in diag_variants if f]
    keys = ("solver_mean_neighbour_distance", "solver_mean_rbf_value", "solver_frac_true_class_absent")
    if diag_variants:
        fig, axes = plt.subplots(1, len(keys), figsize=(12, 3.5))
        for ax, key in zip(axes, keys):
            for name, run in diag_variants:
                pts = [(row["epoch"], row[key]) for row in run["history"] if key in row]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set(xlabel="epoch", ylabel=key.removeprefix("solver_").replace("_", " "))
            ax.legend(fontsize=7)
        parts += ["### Figure 6 diagnostics through training (first seed)",
                  "Mean distance from a training sample to its neighbour centres, their mean RBF value, and the "
                  "fraction of samples with no true-class centre among their neighbours, per epoch.",
                  plots.save(fig, "ablation_diagnostics", "RBF diagnostics through training by update interval")]
    return Section("\n\n".join(parts), [])


RENDERERS: dict[str, Callable[[Mapping[str, dict], Plots], Section]] = {
    "classification": render_classification,
    "scarcity": render_scarcity,
    "unseen-classes": render_unseen,
    "cost": render_cost,
    "ablation": render_ablation,
}


# ---- the document -----------------------------------------------------------------------------


def _setup(suite: Suite, results: Mapping[str, dict]) -> str:
    """Preset, budget, settings, measured time, commands and provenance of a suite's results."""
    lines = []
    presets = sorted({r["preset"] for r in results.values()})
    for name in presets:
        preset = PRESETS.get(name)
        if preset:
            lines.append(f"- Preset `{name}`: {preset.description}.")
            if suite.name in preset.budgets:
                lines.append(f"- Budget: {preset.budgets[suite.name]}.")
    configs = [r["config"] for r in results.values() if "dataset" in r.get("config", {})]
    for split in sorted({c["split"] for c in configs}):
        same = [c for c in configs if c["split"] == split]
        shared = {k: same[0].get(k) for k in CONFIG_KEYS if all(c.get(k) == same[0].get(k) for c in same)}
        varied = sorted(k for k in CONFIG_KEYS if k not in shared)
        text = ", ".join(f"{k}={v}" for k, v in shared.items())
        lines.append(f"- `{split}` split runs: {text}" + (f"; varied within the suite: {', '.join(varied)}" if varied else "") + ".")
    finals = [r for r in results.values() if r.get("role") == "final" and "history" in r and r.get("kind") == "train"]
    if finals:
        lines.append("- Convergence: " + convergence(
            (r["summary"]["best_epoch"], r["config"]["epochs"]) for r in usable(finals)[0]).text() + ".")
    failed = usable([r for r in results.values() if "summary" in r])[1]
    if failed:
        lines.append(f"- Failed (diverged) runs, left out of every number: {', '.join(r['run_id'] for r in failed)}.")
    total = sum(r["wall_seconds"] for r in results.values() if "same_run_as" not in r)
    lines.append(f"- Measured compute: {total / 60:.1f} min over {len(results)} results "
                 f"({'under' if total < 60 * SUITE_BUDGET_MINUTES else 'OVER'} the {SUITE_BUDGET_MINUTES}-minute budget).")
    commands = sorted({r["command"] for r in results.values() if r.get("command")})
    lines.append("- Commands: " + "; ".join(f"`{c}`" for c in commands))
    commits = sorted({r["commit"] for r in results.values()})
    dates = sorted(r["date"] for r in results.values())
    machines = sorted({_machine_text(r["machine"]) for r in results.values()})
    lines.append(f"- Commit{'s' if len(commits) > 1 else ''}: {', '.join(f'`{c}`' for c in commits)}; "
                 f"dates {dates[0]} to {dates[-1]}; machine: {'; '.join(machines)}.")
    return "\n".join(lines)


def _machine_text(m: Mapping[str, Any]) -> str:
    return (f"{m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch thread(s), "
            f"Python {m['python']}, torch {m['torch']}")


INTRO = """\
Each suite tests claims of the papers in `METHODS.md` side by side on Fashion-MNIST, under the
fair-comparison rules of Musgrave et al. (2020): within a suite every solver gets the same backbone,
embedding size, augmentation (none), batch size and epoch budget; each solver's one key hyperparameter
is chosen on the validation split from the small grid shown (first seed), and the test data is used
only for the final numbers of the chosen setting over all seeds. Numbers are mean ± standard deviation
over seeds. Comparisons are paired by seed: the mean difference gets a 95% t-interval (the paired
t-test's; a bootstrap interval and the effect size d_z are shown beside it), and a claim "A beats B
(by more than m)" **holds** when the whole interval lies above m, **does not hold** when it lies below
m, and is **inconclusive** otherwise or with fewer than two seeds. A trend claim is judged on the
interval of the per-seed slope. Runs that diverged are failed runs, listed and left out. Every suite is sized to finish in under 90 minutes on 2 CPU cores
(1 torch thread); each result file records its own wall time.

Reproduce (each command resumes where it stopped; completed runs are skipped):

```
knnsolver bench classification --preset full --out benchmarks/results
knnsolver bench scarcity --preset full --out benchmarks/results
knnsolver bench unseen-classes --preset full --out benchmarks/results
knnsolver bench cost --preset full --out benchmarks/results
knnsolver bench ablation --preset full --out benchmarks/results
knnsolver bench report --results benchmarks/results --output BENCHMARKS.md --plots benchmarks/plots
```
"""


def render(results_dir: str | Path, output: str | Path, plots_dir: str | Path) -> str:
    """The Markdown report of every suite's results under ``results_dir`` (plots written to ``plots_dir``)."""
    results_dir, output = Path(results_dir), Path(output)
    plots = Plots(Path(plots_dir), output)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    sections, summary = [], []
    for number, suite in enumerate(SUITES.values(), 1):
        results = load_results(results_dir / suite.name)
        head = [f"## {number}. {suite.title} (`{suite.name}`)",
                "Claims tested: " + (" ".join(suite.claims) if suite.claims else "none; the ablation is descriptive.")]
        if not results:
            head.append(f"Not run yet: `knnsolver bench {suite.name} --preset full --out {results_dir}`.")
            if suite.name in PRESETS["full"].budgets:
                head.append(f"Budget of the full preset: {PRESETS['full'].budgets[suite.name]}.")
            summary += [[suite.name, claim, "not run"] for claim in suite.claims]
            sections.append("\n\n".join(head))
            continue
        section = RENDERERS[suite.name](results, plots)
        verdicts = dict(section.claims)
        stale = sum(1 for r in results.values() if r.get("training", 1) < TRAINING_VERSION)
        if stale:
            head.append(f"**Stale: {stale} of {len(results)} results were produced before the training fixes of "
                        "2026-11-29 (precise BatchNorm, RBF sigma following the bank, non-finite guards, one "
                        "evaluation geometry per solver). At least two verdicts of this generation are known "
                        "artefacts of those defects; do not rely on them until the suite is re-run.**")
        head += ["### Setup", _setup(suite, results)]
        if section.claims:
            head += ["### Claims", "\n".join(_claim_line(c, v) for c, v in section.claims)]
        note = " (stale results)" if stale else ""
        summary += [[suite.name, claim, (verdicts[claim].status if claim in verdicts else "no data") + note]
                    for claim in suite.claims]
        sections.append("\n\n".join([*head, section.body]))
    doc = [f"# Benchmarks\n\nRendered by `knnsolver bench report` on {now} from the results in `{results_dir}`.",
           INTRO, "## Claims at a glance", table(["suite", "claim", "verdict"], summary), *sections]
    return "\n\n".join(doc).replace("\n\n\n", "\n\n") + "\n"


def write_report(results_dir: str | Path, output: str | Path, plots_dir: str | Path) -> Path:
    """Render the report and write it to ``output``."""
    output = Path(output)
    text = render(results_dir, output, plots_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return output
