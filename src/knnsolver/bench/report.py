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
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from knnsolver.bench.claims import (  # noqa: E402
    HAL_EQUIVALENT,
    RETRIEVAL_NAMES,
    TARGET_FRACTION,
    Claim,
    Verdict,
    by_seed,
    centre_drift,
    claims_of,
    combine,
    compare,
    hal_cost_statuses,
    step_times,
    epoch_steps,
    steps_to_target,
    target_level,
    validation_curve,
    regime_of,
)
from knnsolver.bench.runner import (  # noqa: E402
    TRAINING_VERSION,
    load_results,
    outdated,
    pending_extensions,
    stale_extensions,
)
from knnsolver.bench.suites import (  # noqa: E402
    PAIRWISE_KNN_LOSSES,
    PRESETS,
    SCARCITY_SOLVERS,
    SUITES,
    TARGET_SOLVERS,
    UNSEEN_SUBSET,
    Preset,
    Suite,
    ablation_variants,
    build_specs,
    choose,
    dim_text,
    final_results,
    grid_results,
    params_text,
    steps_per_pass,
)
from knnsolver.bench.stats import (  # noqa: E402
    FAILS,
    HOLDS,
    OPEN,
    Convergence,
    at_grid_edge,
    convergence,
    drift_by_method,
    paired_differences,
    paired_test,
    usable,
)
from knnsolver.errors import ConfigError  # noqa: E402
from knnsolver.registry import SOLVERS  # noqa: E402
SUITE_BUDGET_MINUTES = 120
RETRIEVAL_KEYS = ("precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "map_at_r",
                  "r_precision", "nmi")
CONFIG_KEYS = ("dataset", "split", "model", "width", "embedding_dim", "batch_size", "samples_per_class", "epochs",
               "epoch_steps", "eval_every", "patience", "max_per_class", "val_fraction", "augment", "optimizer", "lr",
               "lr_schedule", "weight_decay", "device")
__all__ = ["FAILS", "HOLDS", "OPEN", "combine", "compare", "render", "write_report"]


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


def wall_seconds(results: Mapping[str, dict]) -> float:
    """The wall time a suite's runs took, whatever ran side by side: the length of the union of their intervals.

    A run's interval ends at its ``date`` and starts at ``started`` (older
    results: ``date`` less its wall time); the part of a continued run spent in
    an earlier call counts as if nothing else ran then. A copied result
    (``same_run_as``) costs nothing.
    """
    spans, earlier = [], 0.0
    for r in results.values():
        if "same_run_as" in r:
            continue
        end = datetime.datetime.fromisoformat(r["date"]).timestamp()
        start = datetime.datetime.fromisoformat(r["started"]).timestamp() if "started" in r else end - r["wall_seconds"]
        spans.append((start, end))
        before = r["wall_seconds"] - (end - start)
        earlier += before if before > 1.0 else 0.0  # up to 1 s: the dates' rounding to the second
    total, reach = 0.0, -math.inf
    for start, end in sorted(spans):
        total += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return total + earlier


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
        # The grid runs on one seed: a point closer to the chosen one than the finals' seed-to-seed spread of the
        # same score could have been chosen under another seed.
        spread = Stat(tuple(r["best_val"] for r in usable(final_results(results, method, condition))[0])).std
        # in value order, so points added beyond an edge (runner: grid extensions) sit where they belong
        numeric = all(isinstance(v, (int, float)) for r in grid for v in r["params"].values())
        for r in sorted(grid, key=lambda r: tuple(r["params"].values())) if numeric else grid:
            mark = ""
            if r["run_id"] == chosen["run_id"]:
                mark = "**chosen**" + (f" (at the grid edge in {', '.join(edge)}: the optimum may lie outside)"
                                       if edge else "")
            elif spread > 0 and chosen["best_val"] - r["best_val"] <= spread:
                mark = f"within the finals' seed spread ({100 * spread:.2f}) of the chosen"
            rows.append([method + (f" ({condition})" if condition else ""), params_text(r["params"]),
                         f"{100 * r['best_val']:.2f}", mark])
    if not rows:
        return ""
    return table(["method", "grid point", f"best validation {score} (%)", ""], rows)


def _claim_line(claim: Claim, verdict: Verdict | None) -> str:
    if verdict is None:
        return f"- **{claim.text}** NOT DECIDED: too few results yet. Test: {claim.comparison}."
    return f"- **{claim.text}** {verdict.status.upper()}. Test: {claim.comparison}. {verdict.numbers}"


# ---- suite sections ---------------------------------------------------------------------------


@dataclass
class Section:
    """A rendered suite: its Markdown body (tables and plots; the claims render from :mod:`knnsolver.bench.claims`)."""

    body: str


def _prediction_rule(solver: str) -> str:
    """How ``solver`` predicts a class at test time, in words."""
    if solver == "rbf":
        return "Eq. 4 over its k nearest bank centres"
    if solver == "softmax":
        return "its linear head"
    knn = getattr(SOLVERS.get(solver), "predicts_by_knn", False)
    return "kNN vote of the 5 nearest training embeddings" if knn else "its own classifier"


def render_classification(results: Mapping[str, dict], plots: Plots) -> Section:
    methods = _ordered_methods(results, "")
    parts = ["### Hyperparameter grids (validation accuracy, first seed)",
             grid_table(results, [(m, "") for m in methods], "accuracy")]
    stats = {m: _stat(final_results(results, m, ""), "test_accuracy") for m in methods}
    rows = [[m, _chosen_text(results, m, ""), stats[m].pct(), stats[m].n] for m in methods]
    parts += ["### Test accuracy of the chosen setting (%)", table(["solver", "chosen", "test accuracy", "seeds"], rows)]
    parts.append("Test accuracy is each solver's own prediction rule: "
                 + "; ".join(f"{m}: {_prediction_rule(m)}" for m in methods) + ".")
    same = [b for b in HAL_EQUIVALENT if b in stats]
    if same:
        parts.append(f"{', '.join(same)}: HAL itself under METHODS.md's reading (equal to 2e-15), shown, not compared.")
    elif methods:
        parts.append(f"Not run: {' and '.join(HAL_EQUIVALENT)}. Under METHODS.md's reading HAL(tau) equals ProxyNCA "
                     "(softmax_scale = 1/tau) and NormSoftmax (temperature = tau/2) exactly (float64: tests/test_hal.py), so "
                     "they are HAL itself, not rivals; the budget goes to the losses the claims compare.")
    if methods:
        parts.append(_bar(plots, "classification_accuracy", "Test accuracy (mean ± std over seeds)", methods,
                          [stats[m] for m in methods], "test accuracy (%)"))
    return Section("\n\n".join(p for p in parts if p))


def _size_key(condition: str) -> float:
    value = condition.split("=", 1)[1]
    return math.inf if value == "all" else float(value)


def _paired_gain(results: Mapping[str, dict], method: str, base: str, condition: str) -> Stat:
    """Per-seed test-accuracy gain of ``method`` over ``base`` (same seed, same training subset; diverged runs
    left out, as in the verdicts)."""
    a = by_seed(final_results(results, method, condition), "test_accuracy")
    b = by_seed(final_results(results, base, condition), "test_accuracy")
    return Stat(tuple(a[s] - b[s] for s in sorted(set(a) & set(b))))


def _epochs_by_steps(result: Mapping[str, Any]) -> str:
    """``"epochs x optimiser steps per epoch"`` of a training result (one pass unless ``epoch_steps``), ``"up to
    ..."`` where its runs stop early."""
    config, preset = result["config"], PRESETS.get(result.get("preset", ""))
    steps = config.get("epoch_steps") or (steps_per_pass(preset, config) if preset is not None else None)
    cap = "up to " if config.get("patience") else ""
    return f"{cap}{config['epochs']} x {steps}" if steps else f"{cap}{config['epochs']} x one pass"


def _drift(finals: Sequence[Mapping[str, Any]]) -> str:
    """:func:`~knnsolver.bench.claims.centre_drift` to one decimal, ``-`` when there is none."""
    drift = centre_drift(finals)
    return "-" if drift is None else f"{drift:.1f}"


def render_scarcity(results: Mapping[str, dict], plots: Plots) -> Section:
    methods = [m for m in SCARCITY_SOLVERS if any(r["method"] == m for r in results.values())]
    sizes = sorted({r["condition"] for r in results.values()}, key=_size_key)
    grid_groups = sorted({(r["method"], r["condition"]) for r in results.values() if r["role"] == "grid"},
                         key=lambda g: (methods.index(g[0]) if g[0] in methods else 0, _size_key(g[1])))
    parts = ["### Hyperparameter grids (validation accuracy, first seed)", grid_table(results, grid_groups, "accuracy")]
    gainers = [m for m in methods if m != "softmax"] if "softmax" in methods else []
    has_rbf = "rbf" in methods
    header = ["training images per class", "epochs x steps", *[f"{m} test accuracy" for m in methods],
              *[f"{m} - softmax" for m in gainers], *(["rbf centre drift (sigma)"] if has_rbf else [])]
    stats = {(m, c): _stat(final_results(results, m, c), "test_accuracy") for m in methods for c in sizes}
    gains = {(m, c): _paired_gain(results, m, "softmax", c) for m in gainers for c in sizes}
    budget = {r["condition"]: _epochs_by_steps(r) for r in results.values() if "config" in r}
    rows = [[c.split("=", 1)[1], budget.get(c, "-"), *[stats[m, c].pct() for m in methods],
             *[gains[m, c].pct() for m in gainers], *([_drift(final_results(results, "rbf", c))] if has_rbf else [])]
            for c in sizes]
    parts += ["### Test accuracy (%) and gain over softmax (percentage points, paired by seed)", table(header, rows)]
    if has_rbf:
        parts.append("Centre drift: how far a training query lies from its own stored RBF centre, in sigmas (the "
                     "median over each final's second half, then over seeds). The bank is refreshed every epoch; "
                     "drift grows with the optimiser steps between refreshes, and at 3 sigma or more the RBF values "
                     "of a query's neighbours are near 0 (the solver warns).")
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
    return Section("\n\n".join(p for p in parts if p))


def render_unseen(results: Mapping[str, dict], plots: Plots) -> Section:
    main = dim_text(64)
    methods = _ordered_methods(results, main)
    parts = []
    if any((r["config"].get("data_dir") or "").endswith(UNSEEN_SUBSET) for r in results.values() if "config" in r):
        parts.append("Data (class-disjoint train, validation and test classes): the official Fashion-MNIST training "
                     "images of T-shirt, trouser, pullover and dress train (at most `max_per_class` per class); 750 "
                     "official training images each of coat and shirt, never trained on, validate (checkpoints and "
                     "grids); the 4,000 official test images of sandal, sneaker, bag and ankle boot, never used for "
                     "a choice, are the retrieval test set (queries and references). RBF centre weights are fixed "
                     "at 1, as the paper does for metric learning.")
    parts += ["### Hyperparameter grids (validation MAP@R on the validation classes coat and shirt, first seed)",
             grid_table(results, [(m, main) for m in methods], "MAP@R")]
    stats = {(m, k): _stat(final_results(results, m, main), k) for m in methods for k in RETRIEVAL_KEYS}
    header = ["solver", "chosen", *[f"{RETRIEVAL_NAMES[k]} (%)" for k in RETRIEVAL_KEYS]]
    rows = [[m, _chosen_text(results, m, main), *[stats[m, k].pct() for k in RETRIEVAL_KEYS]] for m in methods]
    parts += ["### Retrieval on the unseen test classes at embedding size 64", table(header, rows)]
    dims = sorted({r["condition"] for r in results.values()}, key=_size_key)
    swept = [m for m in _ordered_methods(results) if sum(1 for d in dims if final_results(results, m, d)) > 1]
    if swept:
        dim_rows = [[m, *[f"{_stat(final_results(results, m, d), 'recall_at_1').pct()} / "
                          f"{_stat(final_results(results, m, d), 'nmi').pct()}" for d in dims]] for m in swept]
        parts += ["### Recall@1 / NMI (%) by embedding size", table(["solver", *[d.split('=')[1] for d in dims]], dim_rows)]
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
    return Section("\n\n".join(p for p in parts if p))


def _cost_step_section(results: Mapping[str, dict], plots: Plots) -> list[str]:
    steps = step_times(results)
    if not steps:
        return []
    solvers = _ordered_methods({k: r for k, r in results.items() if r["kind"] == "step_cost"})
    settings = sorted({key for times in steps.values() for key in times}, key=lambda k: (k[1], k[0]))

    repeats = max((t.get("calls", 0) for times in steps.values() for t in times.values()), default=0)

    def cell(t: Mapping[str, Any]) -> str:
        few = f" ({t['calls']} calls)" if t.get("calls", repeats) < repeats else ""
        return f"{1e3 * t['median_s']:.2f} [{1e3 * t['q1_s']:.2f}, {1e3 * t['q3_s']:.2f}]{few}"

    rows = [[m, *[cell(steps[m][s]) if s in steps[m] else "-" for s in settings]] for m in solvers]
    parts = [f"### Loss step time (forward + backward on random embeddings, median [quartiles] ms of {repeats} calls; "
             "fewer where 2 s of calls ran out, as marked)",
             "A dash: not measured: a smaller batch of that solver already took longer than the step limit, or "
             "the batch is too large for the triplet miner or the lifted structure loss (their pair and triplet "
             "tables): "
             + ("; ".join(f"B={t['batch_size']}, C={t['num_classes']}: {t['why']}" for r in results.values()
                          for t in r.get("skipped", [])) or "none here") + ".",
             table(["solver", *[f"B={b}, C={c}" for b, c in settings]], rows)]
    statuses = hal_cost_statuses(steps)
    losses = [m for m in PAIRWISE_KNN_LOSSES if m in steps]
    if statuses:
        ratio_rows = []
        for b, c in settings:
            ratio_rows.append([f"B={b}, C={c}", *[
                f"{100 * steps['hal'][b, c]['median_s'] / steps[m][b, c]['median_s']:.0f}% ({statuses[b, c, m]})"
                if (b, c, m) in statuses else "-" for m in losses]])
        parts += ["### HAL step time as a share of each pairwise kNN loss (interquartile ranges decide the verdict)",
                  table(["setting", *losses], ratio_rows)]
    fig, ax = plt.subplots(figsize=(6, 4))
    classes = min(c for _, c in settings)
    for m in solvers:
        pts = sorted((b, t["median_s"]) for (b, c), t in steps[m].items() if c == classes)
        ax.plot([p[0] for p in pts], [1e3 * p[1] for p in pts], marker="o", label=m)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="ms per step", title=f"Loss step time, C={classes}")
    ax.legend(fontsize=7, ncol=2)
    parts.append(plots.save(fig, "cost_step_time", "Loss step time by batch size"))
    return parts


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


def _cost_target_section(results: Mapping[str, dict], plots: Plots) -> list[str]:
    methods = [m for m in TARGET_SOLVERS if final_results(results, m, "target")]
    if not methods:
        return []
    parts = ["### Optimiser steps to a target validation MAP@R (unseen-class split, evaluated every epoch)",
             grid_table(results, [(m, "target") for m in methods], "MAP@R")]
    finals = {m: usable(final_results(results, m, "target"))[0] for m in methods}
    target = target_level(results)
    if target is not None:
        rows = []
        for m in methods:
            steps = [steps_to_target(r, target) for r in finals[m]]
            reached = [n for n in steps if math.isfinite(n)]
            rows.append([m, _chosen_text(results, m, "target"), Stat(tuple(r["best_val"] for r in finals[m])).pct(),
                         ", ".join("not reached" if not math.isfinite(n) else f"{n:g}" for n in steps),
                         f"{statistics.fmean(reached):.0f}" if reached else "-", _stat(finals[m], "precision_at_1").pct()])
        batches = {r["config"]["batch_size"] for runs in finals.values() for r in runs}
        parts += [f"Target: {100 * target:.2f}% validation MAP@R ({TARGET_FRACTION:.0%} of the lowest best of any run, "
                  "at most the weaker method's plateau, so every run can reach it); one evaluation per epoch (batch "
                  f"size {', '.join(map(str, batches))}).",
                  table(["solver", "chosen", "best val MAP@R (%)", "steps to target per seed", "mean steps",
                         "test P@1 (%)"], rows)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for color, m in zip(("tab:blue", "tab:orange"), methods):
        for i, r in enumerate(finals[m]):
            xs, total = [], 0.0
            for row in r["history"]:
                total += epoch_steps(r, row)
                xs.append(total)
            ax.plot(xs, [100 * row[r["val_key"]] for row in r["history"]], color=color, alpha=0.8, marker=".",
                    label=m if i == 0 else None)
    if target is not None:
        ax.axhline(100 * target, color="grey", ls="--", label="target")
    ax.set(xlabel="optimiser steps", ylabel="validation MAP@R (%)", title="Steps to target")
    ax.legend()
    parts.append(plots.save(fig, "cost_time_to_target", "Validation MAP@R against optimiser steps"))
    return parts


def render_cost(results: Mapping[str, dict], plots: Plots) -> Section:
    parts = [*_cost_step_section(results, plots), *_cost_epoch_section(results), *_cost_target_section(results, plots)]
    return Section("\n\n".join(p for p in parts if p))


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
    base_runs = final_results(results, "rbf", variants[0][1]) if variants else []
    base = by_seed(base_runs, "test_accuracy")
    rows = []
    for axis, name, _ in variants:
        finals = usable(final_results(results, "rbf", name))[0]  # diverged runs are listed apart, never counted
        if not finals:
            continue
        s = _stat(finals, "test_accuracy")
        val = Stat(tuple(r["best_val"] for r in finals))
        delta = paired_test(paired_differences(by_seed(finals, "test_accuracy"), base)) if axis != "base" else None
        shown = (f"{100 * delta.mean:+.2f} [{100 * delta.low:+.2f}, {100 * delta.high:+.2f}]" if delta and delta.n >= 2
                 else f"{100 * delta.mean:+.2f}" if delta and delta.n else "")
        rows.append([axis, name, len(finals), val.pct(), s.pct(), shown])
    if rows:
        parts += ["### Variants (accuracy %, mean ± std over seeds; test - base: the mean paired difference by seed "
                  "in points, with its 95% t-interval)",
                  table(["axis", "variant", "seeds", "validation", "test", "test - base"], rows)]
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
                    steps = run["config"].get("epoch_steps") or steps_per_pass(preset, run["config"])
                    ax.plot([e * steps for e, _ in pts], [v for _, v in pts], marker="o", label=name)
            ax.set(xlabel="optimiser steps", ylabel=key.removeprefix("solver_").replace("_", " "))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        parts += ["### Figure 6 diagnostics through training (first seed)",
                  "Mean distance from a training sample to its neighbour centres, their mean RBF value, and the "
                  "fraction of samples with no true-class centre among their neighbours, per epoch.",
                  plots.save(fig, "ablation_diagnostics", "RBF diagnostics through training by update interval")]
    return Section("\n\n".join(parts))


RENDERERS: dict[str, Callable[[Mapping[str, dict], Plots], Section]] = {
    "classification": render_classification,
    "scarcity": render_scarcity,
    "unseen-classes": render_unseen,
    "cost": render_cost,
    "ablation": render_ablation,
}


# ---- the document -----------------------------------------------------------------------------


MIN_EVALS = 5  # a final validated fewer times is left out of the convergence check


def _judged_finals(results: Mapping[str, dict]) -> tuple[list[tuple[dict, list[float]]], int]:
    """The usable training finals validated at least :data:`MIN_EVALS` times, each with its validation curve,
    and how many finals were validated fewer times."""
    finals = usable(r for r in results.values()
                    if r.get("role") == "final" and "history" in r and r.get("kind") == "train")[0]
    curves = [(r, validation_curve(r)) for r in finals]
    judged = [(r, curve) for r, curve in curves if sum(not math.isnan(v) for v in curve) >= MIN_EVALS]
    return judged, len(finals) - len(judged)


def _convergence(judged: Sequence[tuple[dict, list[float]]]) -> Convergence | None:
    """The convergence check over :func:`_judged_finals` (``None`` when no final is judged), each run over the
    epochs it trained: one stopped early is judged on its own length."""
    if not judged:
        return None
    return convergence([(r["summary"]["best_epoch"], len(curve)) for r, curve in judged],
                       [curve for _, curve in judged], [r["method"] for r, _ in judged])


def _drift_text(judged: Sequence[tuple[dict, list[float]]]) -> str:
    """Each method's :func:`~knnsolver.bench.stats.late_drift` over :func:`_judged_finals`, in points, as one
    line ("" when no final is judged): whether the late-peak count above is noise on a plateau or a run still
    improving."""
    drift = drift_by_method([curve for _, curve in judged], [r["method"] for r, _ in judged])
    if not drift:
        return ""
    parts = [f"{m} {100 * mean:+.2f}" + (f" [{100 * low:+.2f}, {100 * high:+.2f}]" if n > 1 else "") + f" (n={n})"
             for m, (n, mean, low, high) in drift.items()]
    return ("- Late drift (validation points, mean over the last 20% of epochs minus the 20% before, per final; "
            "mean and 95% t-interval by method; about 0 on a plateau, where a best epoch in the last 20% is "
            "chance): " + "; ".join(parts) + ".")


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
    # Results stored before early stopping existed trained every epoch: patience 0.
    configs = [{"patience": 0, **r["config"]} for r in results.values() if "dataset" in r.get("config", {})]
    for split in sorted({c["split"] for c in configs}):
        same = [c for c in configs if c["split"] == split]
        shared = {k: same[0].get(k) for k in CONFIG_KEYS if all(c.get(k) == same[0].get(k) for c in same)}
        varied = sorted(k for k in CONFIG_KEYS if k not in shared)
        text = ", ".join(f"{k}={v}" for k, v in shared.items())
        lines.append(f"- `{split}` split runs: {text}" + (f"; varied within the suite: {', '.join(varied)}" if varied else "") + ".")
    judged, short = _judged_finals(results)
    check = _convergence(judged)
    if check is not None:
        few = (f" ({short} runs validated fewer than {MIN_EVALS} times are not judged: a late peak means nothing "
               "there)") if short else ""
        stopped = sum(bool(r["summary"].get("stopped_early")) for r, _ in judged)
        early = (f"; {stopped} of the {len(judged)} stopped early, validation no longer improving" if stopped else "")
        lines.append("- Convergence: " + check.text() + early + few + ".")
        drift = _drift_text(judged)
        lines += [drift] if drift else []
    elif short:
        lines.append(f"- Convergence: not judged: all {short} finals validated fewer than {MIN_EVALS} times.")
    failed = usable([r for r in results.values() if "summary" in r])[1]
    if failed:
        lines.append(f"- Failed (diverged) runs, left out of every number: {', '.join(r['run_id'] for r in failed)}.")
    total = sum(r["wall_seconds"] for r in results.values() if "same_run_as" not in r)
    wall = wall_seconds(results)
    lines.append(f"- Measured compute: {total / 60:.1f} min over {len(results)} results; run by workers side by side, "
                 f"about {wall / 60:.0f} min of wall time ({'under' if wall < 60 * SUITE_BUDGET_MINUTES else 'OVER'} "
                 f"the {SUITE_BUDGET_MINUTES}-minute budget).")
    commands = sorted({r["command"] for r in results.values() if r.get("command")})
    lines.append("- Commands: " + "; ".join(f"`{c}`" for c in commands))
    commits = sorted({r["commit"] for r in results.values()})
    dates = sorted(r["date"] for r in results.values())
    machines = sorted({_machine_text(r["machine"]) for r in results.values()})
    lines.append(f"- Commit{'s' if len(commits) > 1 else ''}: {', '.join(f'`{c}`' for c in commits)}; "
                 f"dates {dates[0]} to {dates[-1]}; machine: {'; '.join(machines)}.")
    ran = [r for r in results.values() if "threads" in r.get("summary", {})]
    if any(r["summary"]["threads"] != r["machine"]["torch_threads"] for r in ran):  # changed during the run
        threads = Counter(r["summary"]["threads"] for r in ran)
        lines.append("- Torch threads at the end of the runs (the machine line has them at the start): "
                     + ", ".join(f"{t} in {n} runs" for t, n in sorted(threads.items())) + ".")
    return "\n".join(lines)


def _machine_text(m: Mapping[str, Any]) -> str:
    return (f"{m['platform']}, {m['processor']}, {m['cpu_count']} CPUs, {m['torch_threads']} torch thread(s), "
            f"Python {m['python']}, torch {m['torch']}")


def intro(preset: Preset) -> str:
    """The protocol every suite follows (issue 11), as the runner enforces it, and how to reproduce."""
    out = "benchmarks/results-gpu" if preset.hardware == "gpu" else "benchmarks/results"
    return f"""\
## Protocol

Each suite tests claims of the papers in `METHODS.md` side by side, under the fair-comparison rules
of Musgrave et al. (2020), enforced by the runner (`knnsolver.bench`):

- **Same everything but the solver** within a suite: backbone, embedding size, augmentation (none),
  batch size, schedule and step budget (preset `{preset.name}`: {preset.description}). The pairwise
  losses draw class-balanced batches (`samples_per_class` images of each of the batch's classes), whose epochs can
  hold a few more rows (3,072 against 3,000 in the full preset's classification: 48 steps against
  47), so those rivals get up to about 2% more steps an epoch.
- **One learning rate for all** (Adam at a constant 1e-3, fixed, not tuned); each solver's one key
  hyperparameter is chosen on the validation split from a 3-point grid around its expected optimum
  (first seed); when the choice is at an edge, the grid is extended outward one point at a time along
  the parameter's ladder (up to two points beyond each edge, fewer where the parameter is bounded,
  `knnsolver.bench.suites.LADDERS`) until the optimum is bracketed; a choice still at an edge is
  flagged, since the optimum may lie outside. The grid is trained on the first seed's data subset.
  Test data is used only for the final numbers.
- **5 seeds** for every final; **paired comparisons** by seed: the mean difference gets a 95%
  t-interval (the paired t-test's; the effect size d_z and a bootstrap interval beside it, the latter
  too narrow at 5 seeds to decide anything; p-values are unadjusted, so compare them with the family's
  level printed beside them). A claim **holds** when the whole interval lies beyond its
  threshold, **does not hold** when it lies on the other side, and is **inconclusive** otherwise; a
  claim decided by several comparisons together widens each interval (Bonferroni). A verdict against
  a side still improving at the end of its budget (most of its runs peaked in their last 20% of epochs,
  by 0.3 points or more over their best before) is withheld (inconclusive). A trend claim is judged
  on the interval of the per-seed slope, and withheld when leaving one size out changes its verdict,
  or while any method at any size is still improving. A speed claim counts the optimiser steps to a
  validation target, and needs at least 3 validation passes to reach it. A cost claim is judged at
  every batch size and class count measured: any setting where the interquartile ranges put the
  share at or above its limit makes it not hold (no interval: a timing is not a seed sample).
- Results of an earlier budget of the same preset, and timings measured on code that has changed
  since (each records a fingerprint of the code it runs, docstrings and comments aside), are left
  out of every table and verdict until they are run again. Training results record their commit, not
  a fingerprint: a change of the code they train with is checked by replaying their first epochs at
  both commits (`benchmarks/replay_results.py`), and runs whose computation it changes are moved out
  and run again; a change that only draws the same procedure's batches anew (the BatchNorm
  calibration's order, 2026-12-01, on Fashion-MNIST, stored shuffled) is recorded with its measured
  effect in `benchmarks/README.md` instead.
- **Early stopping** where a suite's budget says so: a run stops after a set number of validation
  passes without a new best score (`TrainConfig.patience`), within the suite's epoch cap, the same rule
  for every solver; the best validation epoch's checkpoint is tested either way.
- **Convergence check**: budgets are long enough when at least 80% of the final runs have their best
  validation epoch outside the last 20% of the epochs they trained (a run stopped early is judged on its
  own length; where the patience is a fifth of the epoch cap or more, such a run passes by
  construction, so only runs that reached the cap can fail it); each suite prints whether it passes,
  and beside it each method's late drift (validation's mean over the last 20% of epochs minus the 20%
  before), which tells a noisy plateau, where a late best epoch is chance, from a run still improving.
  Finals validated fewer than 5 times are not judged. A suite that fails the check says so beside its
  verdicts, which the still-improving rule above withholds where it applies.
- **Failed runs** (diverged) are listed and never averaged in.
- **Retrieval metrics** (unseen classes): the test set is searched against itself, each query's own
  row left out, in the solver's embedding space; Recall@K is the field's (Song et al. 2016: a query
  counts when any of its K nearest references shares its label), MAP@R and R-precision are Musgrave
  et al.'s (2020), and queries whose class has no other test image are left out of their averages;
  NMI clusters the test embeddings by k-means (scikit-learn, as many clusters as test classes, 10
  restarts, the run's seed).
- CPU and GPU results are stored apart (`benchmarks/results`, `benchmarks/results-gpu`) and never
  mixed in one table. Each CPU suite is sized for under {SUITE_BUDGET_MINUTES} minutes on this 2-core
  machine as 2 workers side by side (`benchmarks/run_suites.sh`); each result records its wall time.

Reproduce (resumable: completed runs are skipped):

```
benchmarks/run_suites.sh classification scarcity unseen-classes cost ablation   # PRESET={preset.name}
knnsolver bench report --results {out} --output BENCHMARKS.md --plots benchmarks/plots
```
"""


def render(results_dir: str | Path, output: str | Path, plots_dir: str | Path) -> str:
    """The Markdown report of every suite's results under ``results_dir`` (plots written to ``plots_dir``)."""
    results_dir, output = Path(results_dir), Path(output)
    if not results_dir.is_dir():
        raise ConfigError(f"{results_dir} does not exist or is not a folder; give the --out folder of knnsolver bench")
    plots = Plots(Path(plots_dir), output)
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    everything = {suite.name: load_results(results_dir / suite.name) for suite in SUITES.values()}
    recorded = sorted({r["preset"] for results in everything.values() for r in results.values() if r.get("preset")})
    if len(recorded) > 1:  # a report judges one preset's results (the runner refuses to mix them)
        where = "; ".join(f"{name}: {', '.join(sorted({r['preset'] for r in results.values() if r.get('preset')}))}"
                          for name, results in everything.items() if results)
        raise ConfigError(f"{results_dir} holds results of the presets {', '.join(recorded)} ({where}); a report "
                          "judges one preset's results: keep each preset's in its own folder and render them apart")
    preset = PRESETS.get(recorded[0] if recorded else "full", PRESETS["full"])
    sections, summary = [], []
    for number, suite in enumerate(SUITES.values(), 1):
        results, claims = everything[suite.name], claims_of(suite.name)
        head = [f"## {number}. {suite.title} (`{suite.name}`)",
                "Claims tested: " + (" ".join(c.text for c in claims) if claims else "none; the ablation is descriptive.")]
        if not results:
            head.append(f"Not run yet: `knnsolver bench {suite.name} --preset {preset.name} --out {results_dir}`.")
            if suite.name in preset.budgets:
                head.append(f"Budget of the {preset.name} preset: {preset.budgets[suite.name]}.")
            summary += [[suite.name, c.text, "-", c.paper_regime, "not run"] for c in claims]
            sections.append("\n\n".join(head))
            continue
        planned = build_specs(suite, preset, results_dir) if preset.name in recorded else []
        # Results an earlier budget made are left out of every table and verdict until they are run again.
        # judged with every seed stored (a call with --seeds may have run more than the preset's)
        seeds = sorted(set(preset.seeds) | {r["seed"] for r in results.values() if r.get("preset") == preset.name})
        judged = build_specs(suite, preset, results_dir, seeds=seeds) if planned else []
        # grid extensions first: a final chosen from a stale one is judged against the grid without it
        extensions = set(stale_extensions(judged, results, preset.name)) if judged else set()
        current = {k: r for k, r in results.items() if k not in extensions}
        earlier = extensions | {s.run_id for s in judged
                                if s.run_id in current and outdated(s, current[s.run_id], current, preset.name) is not None}
        # A condition the preset no longer runs (a training-set size, embedding size or variant): left out too.
        conditions = {s.condition for s in judged}
        dropped = {k for k, r in results.items()
                   if judged and r.get("preset") == preset.name and r.get("condition", "") not in conditions}
        gone = sorted({results[k].get("condition", "") for k in dropped})
        left_parts = []
        if earlier:
            left_parts.append(f"{len(earlier)} results of earlier budgets or of code changed since")
        if dropped:
            left_parts.append(f"{len(dropped)} results of conditions the preset no longer runs ({', '.join(gone)})")
        left_out = " and ".join(left_parts)
        results = {k: r for k, r in results.items() if k not in earlier | dropped}
        if not results:
            head.append(f"Not run yet under the current budgets: `knnsolver bench {suite.name} --preset {preset.name} "
                        f"--out {results_dir}` ({left_out} are left out).")
            summary += [[suite.name, c.text, "-", c.paper_regime, "not run"] for c in claims]
            sections.append("\n\n".join(head))
            continue
        section = RENDERERS[suite.name](results, plots)
        verdicts = {c: c.evaluate(results) for c in claims}
        regime = regime_of(results)
        missing = sum(spec.run_id not in results for spec in planned)
        due = pending_extensions(planned, results, preset.name) if planned and preset.extend_grids else 0
        unfinished = bool(missing or due)
        if unfinished:
            extend = f", and {due} grid(s) chose an edge and are still to be extended" if due else ""
            left = f" ({left_out} are left out of every table and verdict)" if earlier or dropped else ""
            head.append(f"**In progress: {len(planned) - missing} of {len(planned)} runs of the `{preset.name}` preset "
                        f"are done under its current budgets{extend}{left}; the verdicts below may change when the "
                        "suite completes.**")
        elif dropped:
            head.append(f"{left_out[0].upper()}{left_out[1:]} are left out of every table and verdict.")
        stale = sum(1 for r in results.values() if r.get("training", 1) < TRAINING_VERSION)
        if stale:
            head.append(f"**Stale: {stale} of {len(results)} results were produced before the training fixes of "
                        "2026-11-29 (precise BatchNorm, RBF sigma following the bank, non-finite guards, one "
                        "evaluation geometry per solver). At least two verdicts of this generation are known "
                        "artefacts of those defects; do not rely on them until the suite is re-run.**")
        head += ["### Setup", f"- Regime tested: {regime}.\n" + _setup(suite, results)]
        if claims:
            head += ["### Claims", "\n".join(_claim_line(c, v) for c, v in verdicts.items())]
        check = _convergence(_judged_finals(results)[0])
        note = " (stale results)" if stale else " (in progress)" if unfinished else ""
        if check is not None and not check.ok:
            note += " (convergence check fails: budgets short)"
        summary += [[suite.name, c.text, c.regime_tested(results), c.paper_regime,
                     (v.status if v else "too few results") + note]
                    for c, v in verdicts.items()]
        sections.append("\n\n".join([*head, section.body]))
    doc = [f"# Benchmarks\n\nRendered by `knnsolver bench report` on {now} from the results in `{results_dir}`.",
           intro(preset), "## Claims at a glance",
           "Every claim was made by its paper in another regime (the last-but-one column); a verdict here is about "
           "the regime tested, not about the paper's.",
           table(["suite", "claim", "regime tested", "paper's regime", "verdict"], summary), *sections]
    return "\n\n".join(doc).replace("\n\n\n", "\n\n") + "\n"


def write_report(results_dir: str | Path, output: str | Path, plots_dir: str | Path) -> Path:
    """Render the report and write it to ``output``."""
    output = Path(output)
    text = render(results_dir, output, plots_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    return output
