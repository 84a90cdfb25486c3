"""The statistics behind every benchmark verdict: paired by seed, with an interval and an effect size.

Protocol (issue 11; Musgrave et al. 2020 for the fair-comparison rules):

* Two methods are compared through their **paired differences**: for every seed
  both ran, ``a[seed] - b[seed]`` (same data subset, same initialisation seed).
* The mean difference gets a 95% **t-interval** (the paired t-test's) and,
  alongside, a seeded **bootstrap** percentile interval (shown, never used for
  a verdict: with 5 seeds it is too narrow); the effect size is Cohen's
  ``d_z = mean / sd`` of the differences.
* A claim decided by several comparisons together (HAL against five losses)
  widens each interval to ``1 - 0.05 / m`` (Bonferroni, :func:`family_level`).
* A claim "A beats B by more than ``threshold``" **holds** when the whole
  interval lies above the threshold, **does not hold** when it lies below it,
  and is **inconclusive** when the interval contains it (or fewer than 2 pairs
  exist). A claim about a trend (:func:`slope_test`) is judged the same way on
  the slope's interval against 0.
* Runs marked diverged are failed runs: they are counted and reported, never
  averaged in (:func:`usable`).
"""
from __future__ import annotations

import math
import statistics
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from scipy import stats as scipy_stats

HOLDS, FAILS, OPEN = "holds", "does not hold", "inconclusive"
LEVEL = 0.95
BOOTSTRAP_RESAMPLES = 10_000
LATE_FRACTION = 0.2  # the last 20% of epochs
CONVERGED_SHARE = 0.8  # at least 80% of final runs must peak before them
PLATEAU_POINTS = 0.003  # a late best less than this above the earlier best counts as a plateau's noise

__all__ = [
    "FAILS", "HOLDS", "OPEN", "Convergence", "PairedTest", "SlopeTest", "at_grid_edge", "bootstrap_interval",
    "convergence", "family_level", "paired_differences", "paired_test", "slope_test", "still_rising", "usable", "verdict",
]


def paired_differences(a: Mapping[int, float], b: Mapping[int, float]) -> list[float]:
    """``a[s] - b[s]`` for every seed ``s`` in both, in seed order."""
    return [float(a[s]) - float(b[s]) for s in sorted(set(a) & set(b))]


def verdict(low: float, high: float, threshold: float, n: int) -> str:
    """``holds`` if the interval lies above ``threshold``, ``does not hold`` if below, else ``inconclusive``."""
    if n < 2 or not (math.isfinite(low) and math.isfinite(high)):
        return OPEN
    return HOLDS if low > threshold else FAILS if high < threshold else OPEN


def bootstrap_interval(values: Sequence[float], level: float = LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeded, so the report is reproducible)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return (math.nan, math.nan)
    means = x[np.random.default_rng(seed).integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def _t_interval(values: Sequence[float], level: float) -> tuple[float, float, float]:
    """(mean, low, high) of the Student t interval of the mean."""
    x = np.asarray(values, dtype=np.float64)
    mean = float(x.mean()) if x.size else math.nan
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(scipy_stats.t.ppf(0.5 + level / 2, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison of two methods over seeds (module docstring)."""

    n: int
    mean: float
    low: float
    high: float
    boot_low: float
    boot_high: float
    p_value: float
    effect_size: float
    threshold: float
    verdict: str
    note: str = ""  # why a verdict the interval alone would give was withheld
    level: float = LEVEL  # of the t-interval (and the bootstrap's): above 95% under a Bonferroni correction

    def text(self, scale: float = 100.0, unit: str = " pts") -> str:
        """``+1.23 pts [+0.40, +2.06] (paired t-test: p=0.012, d_z=2.10; bootstrap [...]; n=5)``, values times
        ``scale``; with a margin, the test and the effect size say they are taken from it, not from 0."""
        if self.n == 0:
            return "no paired runs"
        if self.n < 2:
            return f"{scale * self.mean:+.2f}{unit} (n=1: no interval)"
        margin = f" of the difference from the {scale * self.threshold:+g}{unit} margin" if self.threshold else ""
        level = f" {self.level:.1%}" if self.level != LEVEL else ""
        return (f"{scale * self.mean:+.2f}{unit} [{scale * self.low:+.2f}, {scale * self.high:+.2f}] "
                f"(paired t-test{margin}{level}: p={self.p_value:.3g}, d_z={self.effect_size:.2f}; bootstrap "
                f"[{scale * self.boot_low:+.2f}, {scale * self.boot_high:+.2f}], too narrow at n={self.n} to decide)")

    def outcome(self) -> str:
        """The verdict, with why the interval's own verdict was withheld when it was."""
        return f"{self.verdict}: {self.note}" if self.note else self.verdict


def paired_test(differences: Sequence[float], threshold: float = 0.0, level: float = LEVEL) -> PairedTest:
    """Test "the mean paired difference exceeds ``threshold``" on the t-interval (module docstring)."""
    diffs = [float(d) for d in differences]
    mean, low, high = _t_interval(diffs, level)
    boot_low, boot_high = bootstrap_interval(diffs, level)
    p_value, effect = math.nan, math.nan
    if len(diffs) >= 2:
        sd = statistics.stdev(diffs)
        if sd > 0:
            t = (mean - threshold) / (sd / math.sqrt(len(diffs)))  # the paired (one-sample) t statistic
            p_value = float(2 * scipy_stats.t.sf(abs(t), len(diffs) - 1))
            effect = (mean - threshold) / sd
        else:  # identical differences: a degenerate, exact interval
            low = high = mean
            p_value = 0.0 if mean != threshold else 1.0
            effect = math.copysign(math.inf, mean - threshold) if mean != threshold else 0.0
    return PairedTest(len(diffs), mean, low, high, boot_low, boot_high, p_value, effect, threshold,
                      verdict(low, high, threshold, len(diffs)), level=level)


def family_level(comparisons: int, level: float = LEVEL) -> float:
    """The interval level of each of ``comparisons`` tests that decide one claim together (Bonferroni): the
    chance that any of them is wrong stays at most ``1 - level``."""
    return 1 - (1 - level) / max(1, comparisons)


@dataclass(frozen=True)
class SlopeTest:
    """The trend of a paired gain against ``log(size)``: one least-squares slope per seed, then a t-interval."""

    n: int
    slope: float
    low: float
    high: float
    verdict: str  # of the claim "the gain grows as the size shrinks" (a negative slope)

    def text(self, scale: float = 100.0) -> str:
        if self.n < 2:
            return f"slope {scale * self.slope:+.2f} pts per log-unit (n={self.n}: no interval)"
        return (f"slope of the gain against ln(images per class) {scale * self.slope:+.2f} pts "
                f"[{scale * self.low:+.2f}, {scale * self.high:+.2f}] (t-interval over {self.n} seeds)")


def slope_test(gains: Mapping[int, Mapping[float, float]], level: float = LEVEL) -> SlopeTest:
    """Does the gain grow as the size shrinks? ``gains[seed][size]`` is one seed's paired gain at ``size``.

    Each seed with at least two sizes gives the least-squares slope of its gain
    against ``ln(size)``; the claim holds when the t-interval of those slopes
    lies below 0, does not hold when it lies above 0, else is inconclusive.
    """
    slopes = []
    for by_size in gains.values():
        if len(by_size) >= 2:
            x = np.log(np.asarray(sorted(by_size), dtype=np.float64))
            y = np.asarray([by_size[s] for s in sorted(by_size)], dtype=np.float64)
            slopes.append(float(np.polyfit(x, y, 1)[0]))
    mean, low, high = _t_interval(slopes, level)
    claim = verdict(-high, -low, 0.0, len(slopes))  # "gain grows as size shrinks" = slope below 0
    return SlopeTest(len(slopes), mean, low, high, claim)


def at_grid_edge(grid: Sequence[Any], chosen: Any) -> bool:
    """Whether ``chosen`` is the smallest or largest value of a numeric ``grid`` (the optimum may lie outside)."""
    values = sorted({float(v) for v in grid})
    return len(values) >= 2 and float(chosen) in (values[0], values[-1])


@dataclass(frozen=True)
class Convergence:
    """How many final runs peaked on validation in the last ``LATE_FRACTION`` of their epochs, and how many
    of those only by noise: their late best within ``PLATEAU_POINTS`` of the best before (a flat plateau,
    where the rule cannot be met by any budget) rather than still rising. ``rising`` counts the runs still
    rising by method, when methods are given, so the report names the solvers the budget is short for."""

    runs: int
    late: int
    plateau: int = 0
    rising: tuple[tuple[str, int], ...] = ()

    @property
    def ok(self) -> bool:
        return self.runs > 0 and (self.runs - self.late) >= CONVERGED_SHARE * self.runs

    def text(self) -> str:
        status = "passes" if self.ok else "FAILS: budgets too short"
        which = f" ({', '.join(f'{m} {n}' for m, n in self.rising)})" if self.rising else ""
        flat = (f"; {self.plateau} of those {self.late} peaked on a plateau (within {100 * PLATEAU_POINTS:g} points "
                f"of their earlier best), {self.late - self.plateau} were still rising{which}") if self.late else ""
        return (f"{self.late} of {self.runs} final runs had their best validation epoch in the last "
                f"{LATE_FRACTION:.0%} of epochs ({status}; the protocol asks for at most {1 - CONVERGED_SHARE:.0%})"
                + flat)


def still_rising(best_epoch: int, epochs: int, curve: Sequence[float]) -> bool:
    """Whether a run peaked in its last ``LATE_FRACTION`` of epochs by at least ``PLATEAU_POINTS`` over its best
    before them: its budget ended while it still improved. ``curve``: validation score by epoch, NaN where the
    run did not evaluate (validation every few epochs)."""
    cut = int((1 - LATE_FRACTION) * epochs)
    if best_epoch <= cut:
        return False
    before = [v for v in curve[:cut] if not math.isnan(v)]
    after = [v for v in curve[cut:] if not math.isnan(v)]
    return bool(before) and bool(after) and max(after) - max(before) >= PLATEAU_POINTS


def convergence(runs: Iterable[tuple[int, int]], curves: Iterable[Sequence[float]] | None = None,
                methods: Iterable[str] | None = None) -> Convergence:
    """``runs``: ``(best_epoch, epochs)`` of each final run (1-based best epoch); ``curves``, when given,
    their validation scores by epoch (NaN where not evaluated), to tell a late peak on a plateau from one
    still rising (:func:`still_rising`); ``methods``, when given with ``curves``, each run's method, to count
    the still-rising runs by method."""
    pairs = list(runs)
    is_late = [best > (1 - LATE_FRACTION) * epochs for best, epochs in pairs]
    names = list(methods) if methods is not None else [""] * len(pairs)
    plateau, rising = 0, Counter()
    if curves is not None:
        for late, curve, (best, epochs), name in zip(is_late, curves, pairs, names):
            if not late or not 0 < int((1 - LATE_FRACTION) * epochs) < len(curve):
                continue
            if not still_rising(best, epochs, curve):
                plateau += 1
            elif name:
                rising[name] += 1
    return Convergence(len(pairs), sum(is_late), plateau, tuple(sorted(rising.items(), key=lambda kv: (-kv[1], kv[0]))))


def late_drift(curve: Sequence[float]) -> float | None:
    """Mean validation score over the last ``LATE_FRACTION`` of epochs minus the mean over the ``LATE_FRACTION``
    before them (NaN, unevaluated, epochs skipped); ``None`` when a window has no evaluation. Unlike the epoch
    of the best score, which on a noisy plateau lands in the last 20% by chance alone, the mean of a window
    averages the noise: near 0 on a plateau, above 0 while a run still improves."""
    epochs = len(curve)
    start, cut = int((1 - 2 * LATE_FRACTION) * epochs), int((1 - LATE_FRACTION) * epochs)
    before = [v for v in curve[start:cut] if not math.isnan(v)]
    after = [v for v in curve[cut:] if not math.isnan(v)]
    return sum(after) / len(after) - sum(before) / len(before) if before and after else None


def drift_by_method(curves: Iterable[Sequence[float]], methods: Iterable[str], level: float = LEVEL
                    ) -> dict[str, tuple[int, float, float, float]]:
    """Each method's ``(runs, mean, low, high)`` of :func:`late_drift` over its runs: the mean and its
    t-interval at ``level`` (NaN bounds for a single run)."""
    drifts: dict[str, list[float]] = {}
    for curve, method in zip(curves, methods):
        value = late_drift(curve)
        if value is not None:
            drifts.setdefault(method, []).append(value)
    return {m: (len(v), *_t_interval(v, level)) for m, v in sorted(drifts.items())}


def usable(runs: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Split stored results into (usable, failed): a run whose summary says it diverged is failed."""
    good, failed = [], []
    for run in runs:
        (failed if run.get("summary", {}).get("diverged") else good).append(run)
    return good, failed
