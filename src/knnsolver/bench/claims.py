"""The papers' claims as objects: each names its suite, its comparison and the paper's regime, and
computes its own verdict from stored results (the report only renders them).

A verdict is ``holds``, ``does not hold`` or ``inconclusive`` by the paired rules
of :mod:`knnsolver.bench.stats`; the numbers behind it are returned with it.
The regime actually tested is read from the results' configs
(:func:`regime_of`), so a claim row always says what was run, and the
paper's regime beside it says how far that is from what the paper did.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

from knnsolver.bench.stats import (
    FAILS,
    HOLDS,
    OPEN,
    LEVEL,
    PairedTest,
    family_level,
    paired_differences,
    paired_test,
    slope_test,
    still_rising,
    usable,
)
from knnsolver.bench.suites import PAIRWISE_KNN_LOSSES, TARGET_SOLVERS, UNSEEN_BASELINES, dim_text, final_results

HAL_MARGIN = 0.01  # "more than 1% higher kNN accuracy"
HAL_COST_LIMIT = 0.10  # "under 10% of their computational cost"
HAL_PAPER_CLASSES = 10  # Fashion-MNIST and CIFAR-10, the HAL paper's datasets
HAL_EQUIVALENT = ("proxynca", "normsoftmax")  # HAL itself under METHODS.md's reading
TARGET_FRACTION = 0.95  # time-to-target: this fraction of the weaker method's converged (best) validation score
SPEEDUP_CLAIMED, SPEEDUP_TOLERANCE = 5.0, 0.8  # "about 5x": a geometric-mean speed-up above 4x
# The speed-up is resolved only when the faster method needs at least this many evaluations to reach the target.
MIN_TARGET_EVALS = 3
RETRIEVAL_NAMES = {"precision_at_1": "P@1", "recall_at_1": "R@1", "recall_at_2": "R@2", "recall_at_4": "R@4",
                   "recall_at_8": "R@8", "map_at_r": "MAP@R", "r_precision": "R-prec", "nmi": "NMI"}


@dataclass(frozen=True)
class Verdict:
    status: str
    numbers: str


Results = Mapping[str, dict]


@dataclass(frozen=True)
class Claim:
    """One claim of a paper, tested by one suite.

    Attributes:
        suite: the suite whose results decide it.
        text: the claim as the report states it.
        comparison: what is compared, with which test and threshold.
        paper_regime: where the paper made it (data, network, training), to set
            beside the regime the results record.
        evaluate: the verdict from the suite's results, or ``None`` while they
            hold too little to decide.
        regime: the regime tested, where it is not that of all the suite's training
            runs (:func:`regime_of`): a claim decided by timed loss steps, or by a
            subset of the suite's runs (the time-to-target claim).
    """

    suite: str
    text: str
    comparison: str
    paper_regime: str
    evaluate: Callable[[Results], Verdict | None]
    regime: Callable[[Results], str] | None = None

    def regime_tested(self, results: Results) -> str:
        return self.regime(results) if self.regime is not None else regime_of(results)


def combine(statuses: Sequence[str]) -> str:
    """All hold: holds; any does not hold: does not hold; otherwise inconclusive."""
    statuses = list(statuses)
    if not statuses:
        return OPEN
    if all(s == HOLDS for s in statuses):
        return HOLDS
    return FAILS if FAILS in statuses else OPEN


def _with_missing(statuses: Sequence[str], family: Sequence[str], present: Sequence[str]) -> tuple[str, str]:
    """:func:`combine` of a claim over every loss of ``family``, of which only ``present`` were run: one that does
    not hold decides it; holding needs them all, so with some missing it is inconclusive at best. Also the note
    that names the missing ones (empty when none is)."""
    missing = [b for b in family if b not in present]
    status = combine(statuses)
    return (OPEN if status == HOLDS and missing else status), (f"; not run: {', '.join(missing)}" if missing else "")


def by_seed(runs: Sequence[dict], key: str) -> dict[int, float]:
    """``{seed: summary[key]}`` of the usable (not diverged) runs."""
    return {int(r["seed"]): float(r["summary"][key]) for r in usable(runs)[0] if key in r.get("summary", {})}


def validation_curve(run: Mapping[str, Any]) -> list[float]:
    """A run's validation score by epoch, NaN for the epochs it did not evaluate."""
    return [row.get(run["val_key"], math.nan) for row in run["history"]]


def rising(runs: Sequence[dict]) -> bool:
    """Whether most of ``runs`` (usable, with a per-epoch history) ended their budget still improving on
    validation (:func:`~knnsolver.bench.stats.still_rising`, over the epochs each trained: a run stopped early
    is judged on its own length)."""
    curves = [r for r in usable(runs)[0] if r.get("history") and "best_epoch" in r.get("summary", {})]
    up = sum(still_rising(r["summary"]["best_epoch"], len(r["history"]), validation_curve(r)) for r in curves)
    return 2 * up > len(curves)


def compare(a: Sequence[dict], b: Sequence[dict], key: str, margin: float = 0.0, names: tuple[str, str] = ("a", "b"),
            level: float = LEVEL) -> PairedTest:
    """Whether runs ``a`` beat runs ``b`` on ``key`` by more than ``margin``: a paired test over their common seeds.

    A verdict against the side that was still improving when its budget ended
    (:func:`rising`: ``holds`` over a rising ``b``, ``does not hold`` for a
    rising ``a``) is withheld as inconclusive: more training could change it.
    ``names`` name the two sides in that note; ``level`` is the interval's (:func:`family_level` where
    several comparisons decide one claim).
    """
    test = paired_test(paired_differences(by_seed(a, key), by_seed(b, key)), margin, level)
    loser = b if test.verdict == HOLDS else a if test.verdict == FAILS else None
    if loser is not None and rising(loser):
        name = names[1] if loser is b else names[0]
        return replace(test, verdict=OPEN, note=f"{test.verdict} by the interval, but {name} was still rising at the "
                                                f"end of its budget")
    return test


def _family_note(level: float, comparisons: int) -> str:
    return f"each interval at {level:.1%} (Bonferroni over {comparisons} comparisons); " if comparisons > 1 else ""


def mean_pct(runs: Sequence[dict], key: str) -> str:
    """``85.12 ± 0.31`` (percent, over the usable runs' seeds), ``-`` when none."""
    values = list(by_seed(runs, key).values())
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def size_value(condition: str) -> float:
    """``n=50`` -> 50, ``n=all`` -> inf (also ``dim=16`` -> 16)."""
    value = condition.split("=", 1)[1]
    return math.inf if value == "all" else float(value)


# ---- the verdicts -----------------------------------------------------------------------------


def _rbf_beats_softmax(results: Results) -> Verdict | None:
    rbf, soft = final_results(results, "rbf", ""), final_results(results, "softmax", "")
    if not rbf or not soft:
        return None
    test = compare(rbf, soft, "test_accuracy", names=("rbf", "softmax"))
    return Verdict(test.verdict, f"rbf {mean_pct(rbf, 'test_accuracy')} vs softmax {mean_pct(soft, 'test_accuracy')}; "
                                 f"paired gain {test.text()} ({test.outcome()}).")


def _hal_beats_knn_losses(results: Results) -> Verdict | None:
    hal = final_results(results, "hal", "")
    baselines = [b for b in PAIRWISE_KNN_LOSSES if final_results(results, b, "")]
    if not hal or not baselines:
        return None
    level = family_level(len(PAIRWISE_KNN_LOSSES))  # the claim's family, whichever of its losses were run
    each = [(b, compare(hal, final_results(results, b, ""), "test_accuracy", HAL_MARGIN, ("hal", b), level))
            for b in baselines]
    numbers = f"hal {mean_pct(hal, 'test_accuracy')}; {_family_note(level, len(PAIRWISE_KNN_LOSSES))}" + "; ".join(
        f"against {b}: {t.text()} vs the {100 * HAL_MARGIN:g}-point margin ({t.outcome()})" for b, t in each)
    status, not_run = _with_missing([t.verdict for _, t in each], PAIRWISE_KNN_LOSSES, baselines)
    numbers += not_run
    same = [b for b in HAL_EQUIVALENT if final_results(results, b, "")]
    if same:
        numbers += ("; not compared, being HAL itself under this reading (METHODS.md section 2): "
                    + ", ".join(f"{b} {mean_pct(final_results(results, b, ''), 'test_accuracy')}" for b in same))
    return Verdict(status, numbers + ".")


def centre_drift(finals: Sequence[Mapping[str, Any]]) -> float | None:
    """Median over ``finals`` (usable ones) of each run's median own-centre distance over sigma in its second half:
    how stale the RBF bank was (the solver warns from 3 sigma, where the RBF values are near 0)."""
    per_run = []
    for r in usable(finals)[0]:
        rows = [h for h in r.get("history", []) if h.get("solver_median_own_centre_distance") is not None]
        tail = [h["solver_median_own_centre_distance"] / h["solver_sigma"] for h in rows[len(rows) // 2:]
                if h.get("solver_sigma")]
        if tail:
            per_run.append(statistics.median(tail))
    return statistics.median(per_run) if per_run else None


def _scarcity_trend(results: Results) -> Verdict | None:
    sizes = sorted({r["condition"] for r in results.values() if r.get("condition", "").startswith("n=")}, key=size_value)
    finite = [c for c in sizes if math.isfinite(size_value(c))]
    if len(finite) < 2:
        return None
    per_seed: dict[int, dict[float, float]] = {}
    for c in finite:
        rbf = by_seed(final_results(results, "rbf", c), "test_accuracy")
        soft = by_seed(final_results(results, "softmax", c), "test_accuracy")
        for seed in set(rbf) & set(soft):
            per_seed.setdefault(seed, {})[size_value(c)] = rbf[seed] - soft[seed]
    if not per_seed:
        return None
    trend = slope_test(per_seed)
    status, notes = trend.verdict, []
    if len(finite) >= 3:  # the slope with each size left out: a verdict one size decides is not a trend
        left_out = {c: slope_test({seed: {k: v for k, v in by_size.items() if k != size_value(c)}
                                   for seed, by_size in per_seed.items()}) for c in finite}
        notes.append("leaving one size out: " + ", ".join(
            f"without {c.split('=', 1)[1]} {100 * t.slope:+.2f} [{100 * t.low:+.2f}, {100 * t.high:+.2f}] ({t.verdict})"
            for c, t in left_out.items()))
        decided_by = [c.split("=", 1)[1] for c, t in left_out.items() if t.verdict != trend.verdict]
        if status != OPEN and decided_by:
            status = OPEN
            notes.append(f"{trend.verdict} by the interval, but not without {' or '.join(decided_by)} images per "
                         "class: inconclusive")
    up = [f"{m} at {c.split('=', 1)[1]}" for c in finite for m in ("rbf", "softmax")
          if rising(final_results(results, m, c))]
    if status != OPEN and up:
        status = OPEN
        notes.append(f"{trend.verdict} by the interval, but {', '.join(up)} was still rising at the end of its "
                     "budget: inconclusive")
    tests = {c: compare(final_results(results, "rbf", c), final_results(results, "softmax", c), "test_accuracy",
                        names=("rbf", "softmax")) for c in sizes}
    gains = "; ".join(f"{c.split('=', 1)[1]}: {t.text()} ({t.outcome()})" for c, t in tests.items())
    drift = {c: centre_drift(final_results(results, "rbf", c)) for c in sizes}
    if any(d is not None for d in drift.values()):  # a bank staler at some sizes confounds the trend
        notes.append("rbf's centre drift by size, in sigmas (a query's distance to its own stored centre; the bank "
                     "is stale from 3): " + ", ".join(f"{c.split('=', 1)[1]}: {d:.1f}" for c, d in drift.items()
                                                       if d is not None))
    return Verdict(status, f"{trend.text()} (the claim needs a negative slope: a larger gain with fewer images; "
                           f"sizes with a cap only); {'; '.join(notes) + '; ' if notes else ''}paired RBF gain over "
                           f"softmax by size: {gains}.")


def _rbf_beats_pair_losses(results: Results) -> Verdict | None:
    main = dim_text(64)
    rbf = final_results(results, "rbf", main)
    baselines = [b for b in UNSEEN_BASELINES if final_results(results, b, main)]
    if not rbf or not baselines:
        return None
    level = family_level(2 * len(UNSEEN_BASELINES))  # the claim's family, whichever of its losses were run
    each = [(b, k, compare(rbf, final_results(results, b, main), k, names=("rbf", b), level=level)) for b in baselines
            for k in ("recall_at_1", "nmi")]
    numbers = _family_note(level, 2 * len(UNSEEN_BASELINES)) + "; ".join(
        f"{RETRIEVAL_NAMES[k]}: rbf {mean_pct(rbf, k)} vs {b} {mean_pct(final_results(results, b, main), k)}, "
        f"paired {t.text()} ({t.outcome()})" for b, k, t in each)
    status, not_run = _with_missing([t.verdict for _, _, t in each], UNSEEN_BASELINES, baselines)
    return Verdict(status, numbers + not_run + ".")


_SIZE_INTERVALS = 4  # the size claim's: rbf's NMI and R@1 gains, the NMI interaction, triplet's NMI gain


def _rbf_grows_with_size(results: Results) -> Verdict | None:
    """The paper's Figures 2 and 3: rbf's NMI rises with the embedding size while triplet's does not (the
    interaction, paired by seed, and triplet's own gain), and rbf's Recall rises; triplet's Recall is shown
    beside it but decides nothing (the paper contrasts the two on NMI only)."""
    dims = sorted({r["condition"] for r in results.values() if r.get("condition", "").startswith("dim=")}, key=size_value)
    dims = [d for d in dims if final_results(results, "rbf", d) and final_results(results, "triplet", d)]
    if len(dims) < 2:
        return None
    low, high = dims[0], dims[-1]
    runs = {(m, d): final_results(results, m, d) for m in ("rbf", "triplet") for d in (low, high)}
    level = family_level(_SIZE_INTERVALS)

    def gain(method: str, key: str) -> PairedTest:
        return compare(runs[method, high], runs[method, low], key, names=(f"{method} at {high}", f"{method} at {low}"),
                       level=level)

    def change(method: str, key: str) -> str:
        return f"{method} {mean_pct(runs[method, low], key)} -> {mean_pct(runs[method, high], key)}"

    nmi_rbf, nmi_triplet, recall_rbf = gain("rbf", "nmi"), gain("triplet", "nmi"), gain("rbf", "recall_at_1")
    # The interaction, paired by seed: how much more rbf's NMI gains than triplet's does.
    v = {m_d: by_seed(r, "nmi") for m_d, r in runs.items()}
    seeds = sorted(set.intersection(*(set(x) for x in v.values())))
    more = paired_test([(v["rbf", high][s] - v["rbf", low][s]) - (v["triplet", high][s] - v["triplet", low][s])
                        for s in seeds], level=level)
    if more.verdict == HOLDS and rising(runs["triplet", high]):  # triplet's gain may be understated
        more = replace(more, verdict=OPEN, note=f"holds by the interval, but triplet at {high} was still rising "
                                                "at the end of its budget")
    if rising(runs["rbf", high]):  # rbf's gain may be understated: a verdict against it waits, as compare()'s does
        still = f"does not hold by the interval, but rbf at {high} was still rising at the end of its budget"
        more = replace(more, verdict=OPEN, note=still) if more.verdict == FAILS else more
        nmi_rbf = replace(nmi_rbf, verdict=OPEN, note=still) if nmi_rbf.verdict == FAILS else nmi_rbf
    nmi = (HOLDS if nmi_rbf.verdict == HOLDS and more.verdict == HOLDS and nmi_triplet.verdict != HOLDS
           else FAILS if FAILS in (nmi_rbf.verdict, more.verdict) or nmi_triplet.verdict == HOLDS else OPEN)
    numbers = (_family_note(level, _SIZE_INTERVALS)
               + f"NMI from {low} to {high}: {change('rbf', 'nmi')} (gain {nmi_rbf.outcome()}), "
               f"{change('triplet', 'nmi')} (gain {nmi_triplet.outcome()}); rbf's gain minus triplet's {more.text()} "
               f"({more.outcome()}); R@1: {change('rbf', 'recall_at_1')} (gain {recall_rbf.text()}, "
               f"{recall_rbf.outcome()}), {change('triplet', 'recall_at_1')} (shown, not tested: the paper "
               f"contrasts triplet on NMI only).")
    return Verdict(combine([nmi, recall_rbf.verdict]), numbers)


def step_times(results: Results) -> dict[str, dict[tuple[int, int], dict]]:
    """``{solver: {(batch size, classes): timing}}`` of the cost suite's loss-step runs."""
    return {r["method"]: {(t["batch_size"], t["num_classes"]): t for t in r["step_times"]}
            for r in results.values() if r["kind"] == "step_cost"}


def hal_cost_statuses(steps: Mapping[str, Mapping[tuple[int, int], dict]]) -> dict[tuple[int, int, str], str]:
    """Per (batch size, classes, loss): HAL's step under the cost limit of that loss's, judged on the
    interquartile ranges (holds when HAL's upper quartile is under the limit times the loss's lower one)."""
    out = {}
    for m in PAIRWISE_KNN_LOSSES:
        for key, other in steps.get(m, {}).items():
            hal = steps.get("hal", {}).get(key)
            if hal is None:
                continue
            high, low = hal["q3_s"] / other["q1_s"], hal["q1_s"] / other["q3_s"]
            out[(*key, m)] = HOLDS if high < HAL_COST_LIMIT else FAILS if low >= HAL_COST_LIMIT else OPEN
    return out


def _hal_cost(results: Results) -> Verdict | None:
    steps = step_times(results)
    statuses = hal_cost_statuses(steps)
    if not statuses:
        return None
    settings = sorted({(b, c) for b, c, _ in statuses}, key=lambda k: (k[1], k[0]))

    def held(b: int, c: int) -> str | None:
        """``B=.., C=..`` where HAL is under the limit against every loss measured there (naming those that were
        not: too large for their miner or table, or past the step limit)."""
        if not all(s == HOLDS for (bb, cc, _), s in statuses.items() if (bb, cc) == (b, c)):
            return None
        absent = [m for m in PAIRWISE_KNN_LOSSES if (b, c, m) not in statuses]
        return f"B={b}, C={c}" + (f" ({' and '.join(absent)} not measured there)" if absent else "")

    under = [h for b, c in settings if (h := held(b, c)) is not None]
    paper = [s for (_, c, _), s in statuses.items() if c == HAL_PAPER_CLASSES]
    worst = {m: max(steps["hal"][b, c]["median_s"] / steps[m][b, c]["median_s"] for b, c, mm in statuses if mm == m)
             for m in {m for _, _, m in statuses}}
    numbers = (f"judged at every measured batch size and class count ({len(settings)} settings); "
               + (f"at {HAL_PAPER_CLASSES} classes, the paper's datasets' count, alone: {combine(paper)}; " if paper
                  else "")
               + f"under the limit against every pairwise loss measured at: {'; '.join(under) or 'none'}; HAL's "
               "largest share of each loss's step: " + ", ".join(f"{m} {100 * v:.0f}%" for m, v in sorted(worst.items()))
               + ".")
    return Verdict(combine(list(statuses.values())), numbers)


def step_regime(results: Results) -> str:
    """The regime of the timed loss steps: random embeddings, the batch sizes and class counts measured."""
    steps = step_times(results)
    if not steps:
        return "-"
    keys = {k for times in steps.values() for k in times}
    batches, classes = sorted({b for b, _ in keys}), sorted({c for _, c in keys})
    dims = sorted({r["config"].get("embedding_dim") for r in results.values() if r["kind"] == "step_cost"} - {None})
    return (f"loss steps alone on random {'/'.join(map(str, dims))}-d embeddings, batch {'/'.join(map(str, batches))} "
            f"by {'/'.join(map(str, classes))} classes, CPU (not the suites' batch of 64)")


def target_regime(results: Results) -> str:
    """The regime of the time-to-target runs alone, without the cost suite's epoch-timing runs (every solver,
    rbf included, for the preset's ``cost_epochs``)."""
    return regime_of({k: r for k, r in results.items() if r.get("condition") == "target"})


def epoch_steps(run: Mapping[str, Any], row: Mapping[str, Any]) -> int:
    """Optimiser steps of one logged epoch: its rows over the batch size, a partial last batch counted."""
    rows = row["seconds"] * row["samples_per_s"]
    return math.ceil(rows / run["config"]["batch_size"] - 1e-6)


def steps_to_target(run: Mapping[str, Any], target: float) -> float:
    """Optimiser steps until the run's validation score (``val_key``: MAP@R on this split) first reaches
    ``target`` (evaluated after every epoch)."""
    steps = 0
    for row in run["history"]:
        steps += epoch_steps(run, row)
        if row.get(run["val_key"], -math.inf) >= target:
            return steps
    return math.inf


def target_level(results: Results) -> float | None:
    """The time-to-target level: ``TARGET_FRACTION`` of the lowest best validation score of any run of either
    method (at most the weaker method's plateau), so every run can reach it (at 95% of the weaker method's
    mean best, a seed of it that peaked lower never did, and its ratio was infinite)."""
    finals = {m: usable(final_results(results, m, "target"))[0] for m in TARGET_SOLVERS}
    if not all(finals.values()):
        return None
    return TARGET_FRACTION * min(r["best_val"] for runs in finals.values() for r in runs)


def _centralized_speedup(results: Results) -> Verdict | None:
    target = target_level(results)
    if target is None:
        return None
    finals = {m: {r["seed"]: r for r in usable(final_results(results, m, "target"))[0]} for m in TARGET_SOLVERS}
    seeds = sorted(set(finals["centralized"]) & set(finals["triplet"]))
    steps = {m: {s: steps_to_target(finals[m][s], target) for s in seeds} for m in TARGET_SOLVERS}
    ratios = [steps["triplet"][s] / steps["centralized"][s] for s in seeds]
    bound = SPEEDUP_CLAIMED * SPEEDUP_TOLERANCE
    evals = [next((i for i, row in enumerate(finals[m][s]["history"], 1) if row.get(finals[m][s]["val_key"], -1) >= target),
                  math.inf) for m in TARGET_SOLVERS for s in seeds]
    resolved = bool(evals) and min(evals) >= MIN_TARGET_EVALS
    finite = all(math.isfinite(r) and r > 0 for r in ratios)
    # The speed-up is a ratio: its geometric mean gets the paired t-interval on log(ratio), against log(bound).
    test = paired_test([math.log(r) for r in ratios], math.log(bound)) if finite else None
    status = test.verdict if test is not None and resolved else OPEN
    note = "" if resolved else (
        f"; not resolved: a method reached the target within {min(evals)} evaluation(s), so the evaluation "
        f"granularity cannot tell a {SPEEDUP_CLAIMED:g}x speed-up from a smaller one")
    if not finite:
        note += "; a run never reached the target: no interval"
    per_seed = ", ".join(f"{steps['triplet'][s]:g}/{steps['centralized'][s]:g}" for s in seeds)
    interval = (f"; geometric mean {math.exp(test.mean):.2f}x [{math.exp(test.low):.2f}x, {math.exp(test.high):.2f}x] "
                f"(t-interval of the mean log ratio, n={test.n})" if test is not None and test.n >= 2 else "")
    return Verdict(status, f"optimiser steps to {100 * target:.2f}% validation MAP@R, triplet/centralized per seed: "
                           f"{per_seed}; ratios {', '.join(f'{r:.2f}x' for r in ratios)}{interval} (holds when the "
                           f"interval lies above {bound:g}x){note}.")


_RBF_PAPER = ("Meyer, Harwood & Drummond (ICIP 2018): ImageNet-pretrained VGG-16 fine-tuned by SGD at lr 1e-5, "
              "batch 20, raw embeddings (sigma 10-100), its bank refreshed every 10 epochs")
CLAIMS: tuple[Claim, ...] = (
    Claim("classification", "RBF beats softmax.",
          "test accuracy, rbf - softmax, paired by seed; holds when the 95% interval lies above 0",
          _RBF_PAPER + " on CUB-200, Cars196, Oxford Flowers and Leafsnap", _rbf_beats_softmax),
    Claim("classification",
          "HAL beats the pairwise batch kNN losses (NCA, triplet, lifted structure, N-pairs, multi-similarity) by "
          "more than 1%.",
          "kNN test accuracy, hal - each loss, paired by seed; holds when every interval lies above 1 point (each "
          "at 99%: Bonferroni over the 5 losses)",
          "Ye et al. (Applied Intelligence 2023): Fashion-MNIST and CIFAR-10 (network and budget per the paper; "
          "METHODS.md has the abstract only)", _hal_beats_knn_losses),
    Claim("scarcity", "The RBF gain over softmax grows as training data shrinks.",
          "per-seed least-squares slope of the paired gain against ln(images per class); holds when the 95% "
          "interval of the slope lies below 0",
          _RBF_PAPER + " (its Figure 5, on subsets of the training images)", _scarcity_trend),
    Claim("unseen-classes", "RBF beats triplet, lifted structure and N-pairs.",
          "Recall@1 and NMI on unseen classes at 64-d, rbf - each loss, paired by seed; holds when every interval "
          "lies above 0 (each at 99.2%: Bonferroni over the 6 comparisons)", _RBF_PAPER + " on unseen classes of CUB-200 and Cars196 (its Table 1)", _rbf_beats_pair_losses),
    Claim("unseen-classes", "RBF's NMI and Recall improve with embedding size, while triplet's NMI does not.",
          "largest minus smallest embedding size, paired by seed; holds when rbf's NMI gain, rbf's NMI gain minus "
          "triplet's (the interaction, paired by seed) and rbf's Recall@1 gain lie above 0 and triplet's NMI gain "
          f"does not (each at {family_level(_SIZE_INTERVALS):.1%}: Bonferroni over the {_SIZE_INTERVALS} "
          "intervals); triplet's Recall is shown, not tested, as the paper contrasts the two on NMI only (its "
          "Figure 2; its Figure 3 shows rbf's Recall alone); the smaller and larger sizes reuse the "
          "hyperparameters chosen at 64-d",
          _RBF_PAPER + " on unseen classes of CUB-200 and Cars196", _rbf_grows_with_size),
    Claim("cost", "HAL costs under 10% of the kNN (pairwise batch) losses.",
          "loss step time (forward + backward, median of 50 repeats, or of as many as 2 s allow for slower steps: "
          "the table's calls) of hal over each pairwise loss at every batch size and class count; holds where "
          "the interquartile ranges put it under 10%",
          "Ye et al. (Applied Intelligence 2023): cost relative to batch kNN losses, setting not stated in the "
          "abstract", _hal_cost, step_regime),
    Claim("cost", "The centralized ranking loss trains about 5x faster than triplet.",
          "optimiser steps to reach 95% of the lowest best validation MAP@R of any run (at most the weaker "
          "method's plateau), triplet over centralized per seed; holds when the 95% t-interval of the mean log ratio lies "
          "above log 4 (about 5x), does not hold when it lies below",
          "Zheng, Ji et al. (AAAI 2019): Cars196, CUB-200 and SOP with an ImageNet-pretrained network",
          _centralized_speedup, target_regime),
)


def claims_of(suite: str) -> tuple[Claim, ...]:
    return tuple(c for c in CLAIMS if c.suite == suite)


def _refresh_text(config: Mapping[str, Any]) -> str:
    """How often an rbf run refreshes its bank: ``"1 epoch"``, ``"10 epochs"`` or ``"1 epoch of 16 steps"``."""
    interval = config.get("solver_options", {}).get("update_interval", 10)  # the solver's default
    steps = f" of {config['epoch_steps']} steps" if config.get("epoch_steps") else ""
    return f"{interval} epoch{'s' if interval != 1 else ''}{steps}"


def regime_of(results: Results) -> str:
    """The regime the results record: data, network, budget and hardware (from their configs and presets)."""
    configs = [r["config"] for r in results.values() if "dataset" in r.get("config", {})]
    if not configs:
        return "-"
    first = configs[0]
    per_class = sorted({c.get("max_per_class") for c in configs}, key=lambda v: (v is None, v or 0))
    sizes = ", ".join("all" if v is None else str(v) for v in per_class)
    disjoint = sorted({c.get("split") == "disjoint" for c in configs})
    split = {(True,): "; class-disjoint split: retrieval on unseen classes",
             (False, True): "; standard and class-disjoint splits"}.get(tuple(disjoint), "")
    epochs = sorted({c["epochs"] for c in configs})
    patience = sorted({c.get("patience", 0) for c in configs} - {0})
    stopping = f" (stopped after {' / '.join(map(str, patience))} validation passes without a new best)" if patience else ""
    device = "GPU" if any(c.get("device", "").startswith("cuda") for c in configs) else "CPU"
    pretrained = "pretrained" if any(c.get("pretrained") for c in configs) else "from scratch"
    schedule = f"{first.get('optimizer', 'adam').capitalize()} {first.get('lr', 1e-3):g} {first.get('lr_schedule', 'cosine')}"
    rbf = [r["config"] for r in results.values() if r.get("method") == "rbf" and "dataset" in r.get("config", {})]
    every = sorted({_refresh_text(c) for c in rbf})
    space = sorted({"raw embeddings" if c.get("solver_options", {}).get("normalize") is False else "the unit sphere"
                    for c in rbf})
    bank = f"; rbf on {' / '.join(space)}, its bank refreshed every {' / '.join(every)}" if rbf else ""
    return (f"{pretrained}, {first['model']} width {first['width']}, {first['dataset']} ({sizes} images per class{split}), "
            f"{'up to ' if patience else ''}{'-'.join(map(str, (epochs[0], epochs[-1]))) if len(epochs) > 1 else epochs[0]} "
            f"epochs{stopping}, {schedule}, "
            f"batch {first['batch_size']}, {device}{bank}")
