"""Every claim's verdict on synthetic result sets: one that holds, one that does not, one inconclusive."""
from __future__ import annotations

import math
import statistics

import pytest

from knnsolver.bench.claims import CLAIMS, claims_of, steps_to_target, regime_of
from knnsolver.bench.stats import FAILS, HOLDS, OPEN

SEEDS = range(5)
NOISE = (0.001, -0.002, 0.0015, -0.001, 0.0005)  # per seed, shared by both sides of a pair unless stated


def _run(method: str, condition: str, seed: int, **summary: float) -> dict:
    return {"run_id": f"{method}@{condition}__s{seed}", "role": "final", "kind": "train", "method": method,
            "condition": condition, "seed": seed, "summary": summary, "params": {},
            "config": {"dataset": "fashion-mnist", "model": "conv28", "width": 16, "epochs": 25, "max_per_class": 300,
                       "batch_size": 64}}


def _results(rows: list[dict]) -> dict[str, dict]:
    return {r["run_id"]: r for r in rows}


def _claim(text_start: str):
    (claim,) = [c for c in CLAIMS if c.text.startswith(text_start)]
    return claim


def _pair(method: str, base: str, gains: list[float], key: str = "test_accuracy", condition: str = "") -> list[dict]:
    rows = []
    for seed, gain in zip(SEEDS, gains):
        rows.append(_run(base, condition, seed, **{key: 0.80 + NOISE[seed]}))
        rows.append(_run(method, condition, seed, **{key: 0.80 + NOISE[seed] + gain}))
    return rows


@pytest.mark.parametrize("gains, status", [
    ([0.02, 0.021, 0.019, 0.022, 0.018], HOLDS),
    ([-0.02, -0.021, -0.019, -0.022, -0.018], FAILS),
    ([0.02, -0.02, 0.01, -0.015, 0.005], OPEN),
])
def test_rbf_beats_softmax(gains, status):
    verdict = _claim("RBF beats softmax").evaluate(_results(_pair("rbf", "softmax", gains)))
    assert verdict.status == status and "paired gain" in verdict.numbers


@pytest.mark.parametrize("gain, status", [(0.03, HOLDS), (0.0, FAILS), (0.0085, OPEN)])
def test_hal_needs_more_than_one_point_over_every_pairwise_loss(gain, status):
    rows = []
    for loss in ("nca", "triplet", "lifted", "npairs", "multisimilarity"):
        rows += [r for r in _pair("hal", loss, [gain + 0.003 * (s % 2) for s in SEEDS]) if r["method"] == loss]
    rows += [r for r in _pair("hal", "nca", [gain + 0.003 * (s % 2) for s in SEEDS]) if r["method"] == "hal"]
    rows += [_run("proxynca", "", s, test_accuracy=0.8) for s in SEEDS]
    verdict = _claim("HAL beats").evaluate(_results(rows))
    assert verdict.status == status
    assert "not compared, being HAL itself" in verdict.numbers and verdict.numbers.count("against ") == 5


def test_a_claim_of_several_comparisons_widens_each_interval_bonferroni():
    """A gain that clears the 1-point margin at 95% but not at 99% does not make HAL's five-loss claim hold."""
    from knnsolver.bench.stats import family_level

    assert family_level(5) == pytest.approx(0.99) and family_level(1) == pytest.approx(0.95)
    gains = [0.0175 + d for d in (-0.006, -0.003, 0.0, 0.003, 0.006)]
    rows = []
    for loss in ("nca", "triplet", "lifted", "npairs", "multisimilarity"):
        rows += [r for r in _pair("hal", loss, gains) if r["method"] == loss]
    rows += [r for r in _pair("hal", "nca", gains) if r["method"] == "hal"]
    verdict = _claim("HAL beats").evaluate(_results(rows))
    assert verdict.status == OPEN and "each interval at 99.0% (Bonferroni over 5 comparisons)" in verdict.numbers
    single = _claim("RBF beats softmax").evaluate(_results(_pair("rbf", "softmax", gains)))
    assert single.status == HOLDS  # one comparison: the 95% interval


def test_a_claim_over_several_losses_cannot_hold_on_a_subset_and_keeps_its_family_s_level():
    """With 2 of HAL's 5 losses run, the claim held at 97.5% intervals, while its text states 99% over 5."""
    gains = [0.05 + d for d in (-0.002, -0.001, 0.0, 0.001, 0.002)]
    rows = [r for loss in ("nca", "triplet") for r in _pair("hal", loss, gains) if r["method"] == loss]
    rows += [r for r in _pair("hal", "nca", gains) if r["method"] == "hal"]
    verdict = _claim("HAL beats").evaluate(_results(rows))
    assert verdict.status == OPEN
    assert "each interval at 99.0% (Bonferroni over 5 comparisons)" in verdict.numbers
    assert "not run: lifted, npairs, multisimilarity" in verdict.numbers
    losing = [_run("nca", "", seed, test_accuracy=0.85 + NOISE[seed] + gain) for seed, gain in zip(SEEDS, gains)]
    assert _claim("HAL beats").evaluate(_results([r for r in rows if r["method"] != "nca"] + losing)).status == FAILS


@pytest.mark.parametrize("slope_sign, status", [(-1, HOLDS), (1, FAILS), (0, OPEN)])
def test_scarcity_trend_is_the_slope_of_the_gain_against_log_size(slope_sign, status):
    import math

    rows = []
    for size in (10, 50, 100, 500):
        gains = [slope_sign * 0.01 * math.log(size) + (0.004 * NOISE[s] * 100 if slope_sign == 0 else 0.0005 * s)
                 for s in SEEDS]
        rows += _pair("rbf", "softmax", gains, condition=f"n={size}")
    rows += _pair("rbf", "softmax", [0.0] * 5, condition="n=all")  # uncapped: not on the slope
    verdict = _claim("The RBF gain").evaluate(_results(rows))
    assert verdict.status == status and "all:" in verdict.numbers


def test_a_scarcity_trend_one_size_decides_or_a_rising_side_is_withheld():
    import math

    lone = []  # the gain is flat except at 10 images per class: the slope is negative only because of n=10
    for size in (10, 50, 100, 500):
        lone += _pair("rbf", "softmax", [(0.05 if size == 10 else 0.0) + 0.001 * NOISE[s] * 100 for s in SEEDS],
                      condition=f"n={size}")
    verdict = _claim("The RBF gain").evaluate(_results(lone))
    assert verdict.status == OPEN and "not without 10 images per class" in verdict.numbers
    assert "leaving one size out: without 10 " in verdict.numbers

    rows = []
    for size in (10, 50, 100, 500):
        rows += _pair("rbf", "softmax", [-0.01 * math.log(size) + 0.0005 * s for s in SEEDS], condition=f"n={size}")
    assert _claim("The RBF gain").evaluate(_results(rows)).status == HOLDS
    for r in rows:  # softmax at 500 per class ends its budget still improving on validation
        r.update(val_key="val_accuracy", history=[{"val_accuracy": 0.5 + 0.01 * e} for e in range(10)])
        r["summary"]["best_epoch"] = 10 if (r["method"], r["condition"]) == ("softmax", "n=500") else 3
        r["config"] = dict(r["config"], epochs=10)
    verdict = _claim("The RBF gain").evaluate(_results(rows))
    assert verdict.status == OPEN and "softmax at 500 was still rising" in verdict.numbers


def test_the_scarcity_claim_names_rbfs_centre_drift_at_each_size():
    """A bank far staler at one size (2.9 sigma at 500 images per class, 0.1-0.2 at the others) confounds the
    trend: the claim line states the drift by size (median over seeds of each run's second-half median)."""
    rows = []
    for size in (10, 100, 500):
        rows += _pair("rbf", "softmax", [0.01] * 5, condition=f"n={size}")
    for r in rows:
        if r["method"] == "rbf":
            drift = {"n=10": 0.1, "n=100": 0.2, "n=500": 2.9}[r["condition"]]
            # first half far off (ignored), second half at the drift; sigma 0.5
            r["history"] = [{"solver_median_own_centre_distance": 0.5 * (9.0 if e < 4 else drift), "solver_sigma": 0.5}
                            for e in range(8)]
    verdict = _claim("The RBF gain over softmax grows").evaluate(_results(rows))
    assert "rbf's centre drift by size, in sigmas" in verdict.numbers
    assert "10: 0.1, 100: 0.2, 500: 2.9" in verdict.numbers


def test_unseen_rbf_must_beat_each_pair_loss_on_recall_and_nmi():
    rows = []
    for loss in ("triplet", "lifted", "npairs"):
        for key in ("recall_at_1", "nmi"):
            rows += [r for r in _pair("rbf", loss, [0.02] * 5, key=key, condition="dim=64") if r["method"] == loss]
    for s in SEEDS:
        rows.append(_run("rbf", "dim=64", s, recall_at_1=0.82 + NOISE[s], nmi=0.82 + NOISE[s]))
    for r in rows:  # one row per (method, seed) holding both keys
        r["summary"] = {"recall_at_1": r["summary"].get("recall_at_1", 0.8), "nmi": r["summary"].get("nmi", 0.8)}
        if r["method"] != "rbf":
            r["summary"] = {"recall_at_1": 0.80 + NOISE[r["seed"]], "nmi": 0.80 + NOISE[r["seed"]]}
    assert _claim("RBF beats triplet").evaluate(_results(rows)).status == HOLDS
    for r in rows:
        if r["method"] == "lifted":
            r["summary"]["nmi"] = 0.9 + NOISE[r["seed"]]
    assert _claim("RBF beats triplet").evaluate(_results(rows)).status == FAILS


# triplet's gain per seed, when not one number: unresolved on its own and no smaller than rbf's
_NOISY = (0.09, 0.0, 0.09, 0.0, 0.045)


def _size_rows(gains: dict[tuple[str, str], float | tuple]) -> list[dict]:
    """rbf and triplet at 16-d and 128-d; ``gains[method, key]`` from 16-d to 128-d (a number, jittered per seed,
    or one value per seed)."""
    rows = []
    for method in ("rbf", "triplet"):
        for s in SEEDS:
            rows.append(_run(method, "dim=16", s, recall_at_1=0.7 + NOISE[s], nmi=0.7 + NOISE[s]))
            up = {k: (g[s] if isinstance(g, tuple) else g + 0.002 * (s % 3))
                  for (m, k), g in gains.items() if m == method}
            rows.append(_run(method, "dim=128", s, **{k: 0.7 + NOISE[s] + up.get(k, 0.0) for k in ("recall_at_1", "nmi")}))
    return rows


@pytest.mark.parametrize("rbf_gain, triplet_gain, status", [(0.05, 0.0, HOLDS), (0.05, 0.05, FAILS), (-0.05, 0.0, FAILS),
                                                           (0.05, _NOISY, OPEN)])
def test_rbf_improves_with_embedding_size_while_triplet_does_not(rbf_gain, triplet_gain, status):
    """The last case held before the interaction test: triplet's gain was merely unresolved."""
    rows = _size_rows({(m, k): g for m, g in (("rbf", rbf_gain), ("triplet", triplet_gain)) for k in ("recall_at_1", "nmi")})
    verdict = _claim("RBF's NMI and Recall").evaluate(_results(rows))
    assert verdict.status == status and "rbf's gain minus triplet's" in verdict.numbers


def test_triplets_recall_rising_with_size_does_not_decide_the_size_claim():
    """The paper contrasts rbf with triplet on NMI only (its Figure 2); Figure 3 shows rbf's Recall alone. The
    verdict once failed the claim because triplet's Recall@1 rose too (benchmarks/README.md, session 13)."""
    rows = _size_rows({("rbf", "recall_at_1"): 0.05, ("rbf", "nmi"): 0.05, ("triplet", "recall_at_1"): 0.07,
                       ("triplet", "nmi"): 0.0})
    verdict = _claim("RBF's NMI and Recall").evaluate(_results(rows))
    assert verdict.status == HOLDS
    assert "shown, not tested" in verdict.numbers and "98.8% (Bonferroni over 4 comparisons)" in verdict.numbers
    # rbf's Recall not rising fails the claim, whatever its NMI does
    rows = _size_rows({("rbf", "recall_at_1"): -0.05, ("rbf", "nmi"): 0.05, ("triplet", "nmi"): 0.0})
    assert _claim("RBF's NMI and Recall").evaluate(_results(rows)).status == FAILS


def test_the_size_claims_intervals_are_widened_for_its_four_comparisons():
    """A gain whose 95% interval excludes 0 but whose 98.75% interval does not is inconclusive."""
    from scipy import stats

    base = [0.004, -0.003, 0.001, 0.0, -0.002]  # mean 0, sd about 0.0027
    sd = statistics.stdev(base)
    # shift the mean to the half-width of a 97.5% interval: inside the 95% one, not the 98.75% one
    shift = stats.t.ppf(0.9875, 4) * sd / math.sqrt(5)
    rbf_recall = tuple(0.05 + b for b in base)
    rbf_nmi = tuple(shift + b for b in base)
    assert stats.t.ppf(0.975, 4) * sd / math.sqrt(5) < shift < stats.t.ppf(0.99375, 4) * sd / math.sqrt(5)
    rows = _size_rows({("rbf", "recall_at_1"): rbf_recall, ("rbf", "nmi"): rbf_nmi, ("triplet", "nmi"): (0.0,) * 5})
    verdict = _claim("RBF's NMI and Recall").evaluate(_results(rows))
    assert verdict.status == OPEN and "NMI from dim=16 to dim=128" in verdict.numbers


def _still_rising(rows: list[dict], method: str, condition: str) -> None:
    """Give ``method`` at ``condition`` a validation curve still rising at its last epoch; the others flat."""
    for r in rows:
        rising = (r["method"], r["condition"]) == (method, condition)
        r.update(val_key="val_map_at_r", history=[{"val_map_at_r": 0.3 + (0.01 * e if rising else 0.0)} for e in range(10)])
        r["summary"]["best_epoch"] = 10 if rising else 1
        r["config"] = dict(r["config"], epochs=10)


def test_rbf_gaining_more_than_triplet_is_withheld_while_triplet_at_the_largest_size_still_rises():
    rows = _size_rows({("rbf", "recall_at_1"): 0.05, ("rbf", "nmi"): 0.05, ("triplet", "recall_at_1"): 0.0,
                       ("triplet", "nmi"): 0.0})
    assert _claim("RBF's NMI and Recall").evaluate(_results(rows)).status == HOLDS
    _still_rising(rows, "triplet", "dim=128")
    verdict = _claim("RBF's NMI and Recall").evaluate(_results(rows))
    assert verdict.status == OPEN and "triplet at dim=128 was still rising" in verdict.numbers


def test_a_size_verdict_against_rbf_is_withheld_while_rbf_at_the_largest_size_still_rises():
    """The interaction was withheld only in rbf's favour (triplet still rising); against a still-rising rbf
    it stood, unlike every paired comparison's (a review of the verdicts)."""
    rows = _size_rows({("rbf", "recall_at_1"): 0.05, ("rbf", "nmi"): -0.05, ("triplet", "nmi"): 0.0})
    assert _claim("RBF's NMI and Recall").evaluate(_results(rows)).status == FAILS
    _still_rising(rows, "rbf", "dim=128")
    verdict = _claim("RBF's NMI and Recall").evaluate(_results(rows))
    assert verdict.status == OPEN and "rbf at dim=128 was still rising" in verdict.numbers


def _steps(method: str, median: float, spread: float = 0.05) -> dict:
    times = [{"batch_size": b, "num_classes": c, "median_s": median * b / 256, "q1_s": median * b / 256 * (1 - spread),
              "q3_s": median * b / 256 * (1 + spread)} for b in (256, 1024) for c in (10, 100)]
    return {"run_id": f"{method}@step", "kind": "step_cost", "method": method, "condition": "step", "seed": 0,
            "role": "final", "step_times": times, "config": {"embedding_dim": 64}}


@pytest.mark.parametrize("hal, status", [(0.05, HOLDS), (0.5, FAILS), (0.098, OPEN)])
def test_hal_cost_is_judged_on_interquartile_ranges_at_every_setting(hal, status):
    rows = [_steps("hal", hal)] + [_steps(m, 1.0) for m in ("nca", "triplet", "lifted", "npairs", "multisimilarity")]
    verdict = _claim("HAL costs").evaluate(_results(rows))
    assert verdict.status == status and "4 settings" in verdict.numbers
    # its regime is the timed steps', not the suite's training runs'
    assert _claim("HAL costs").regime_tested(_results(rows)) == (
        "loss steps alone on random 64-d embeddings, batch 256/1024 by 10/100 classes, CPU (not the suites' batch of 64)")


def test_hal_cost_names_losses_not_measured_and_judges_the_papers_class_count_alone():
    """"Under the limit against every pairwise loss" once named settings where triplet and lifted were not
    measured; the 10-class verdict (the paper's datasets) is now given beside the pooled one."""
    rows = [_steps("hal", 0.05)] + [_steps(m, 1.0) for m in ("nca", "npairs", "multisimilarity", "triplet", "lifted")]
    for r in rows:  # HAL slow at 100 classes; triplet and lifted not measured at B=1024
        r["step_times"] = [dict(t, **{k: t[k] * 10 for k in ("median_s", "q1_s", "q3_s")})
                           if r["method"] == "hal" and t["num_classes"] == 100 else t for t in r["step_times"]
                           if not (r["method"] in ("triplet", "lifted") and t["batch_size"] == 1024)]
    verdict = _claim("HAL costs").evaluate(_results(rows))
    assert verdict.status == FAILS
    assert "at 10 classes, the paper's datasets' count, alone: holds" in verdict.numbers
    assert ("measured at: B=256, C=10; B=1024, C=10 (triplet and lifted not measured there);" in verdict.numbers)


def _target_run(method: str, seed: int, curve: list[float]) -> dict:
    run = _run(method, "target", seed, precision_at_1=curve[-1])
    run.update(best_val=max(curve), val_key="val_precision_at_1",
               history=[{"seconds": 1.0, "samples_per_s": 64 * 24, "val_precision_at_1": v} for v in curve])
    return run


@pytest.mark.parametrize("fast_epoch, status", [(3, HOLDS), (12, FAILS), (1, OPEN)])
def test_centralized_speedup_counts_optimiser_steps_to_the_target(fast_epoch, status):
    rows = []
    for s in SEEDS:
        slow = [0.1] * 19 + [0.9]  # triplet reaches the target at epoch 20
        fast = [0.1] * (fast_epoch - 1) + [0.9] * (21 - fast_epoch)
        rows += [_target_run("triplet", s, slow), _target_run("centralized", s, fast)]
    verdict = _claim("The centralized").evaluate(_results(rows))
    assert verdict.status == status
    assert steps_to_target(rows[0], 0.855) == 20 * 24


@pytest.mark.parametrize("fast_epochs, status", [((3, 4, 3, 4, 3), HOLDS), ((12, 10, 14, 12, 11), FAILS),
                                                  ((3, 9, 4, 12, 5), OPEN)])
def test_the_speedup_is_judged_on_the_interval_of_the_log_ratio_with_a_target_every_run_reaches(fast_epochs, status):
    rows = []
    for s, fast_epoch in zip(SEEDS, fast_epochs):
        top = 0.8 if s == 1 else 0.9  # triplet seed 1 peaks lower: under 95% of the mean best (0.855)
        slow = [0.1] * 19 + [top]
        fast = [0.1] * (fast_epoch - 1) + [0.9] * (21 - fast_epoch)
        rows += [_target_run("triplet", s, slow), _target_run("centralized", s, fast)]
    verdict = _claim("The centralized").evaluate(_results(rows))
    assert verdict.status == status, verdict.numbers
    assert "76.00% validation MAP@R" in verdict.numbers and "inf" not in verdict.numbers  # 0.95 x 0.8
    assert "geometric mean" in verdict.numbers


def test_the_speedup_regime_is_the_target_runs_alone():
    """The cost suite also trains every solver (rbf too) for 2 epochs to time them; the time-to-target claim's
    regime names only its own runs: 90 epochs on the class-disjoint split, no rbf bank."""
    timing = _run("rbf", "epoch", 0, test_accuracy=0.5)
    timing["config"].update(epochs=2, split="standard")
    rows = [timing]
    for s in SEEDS:
        for method in ("triplet", "centralized"):
            run = _target_run(method, s, [0.1, 0.9])
            run["config"].update(epochs=90, split="disjoint", optimizer="adam", lr=0.001, lr_schedule="constant")
            rows.append(run)
    assert _claim("The centralized").regime_tested(_results(rows)) == (
        "from scratch, conv28 width 16, fashion-mnist (300 images per class; class-disjoint split: retrieval on "
        "unseen classes), 90 epochs, Adam 0.001 constant, batch 64, CPU")
    suite = regime_of(_results(rows))  # the whole suite's: both splits named
    assert "2-90 epochs" in suite and "rbf" in suite and "(300 images per class; standard and class-disjoint splits)" in suite


def test_every_suite_with_claims_has_them_as_objects_naming_regimes():
    assert {c.suite for c in CLAIMS} == {"classification", "scarcity", "unseen-classes", "cost"}
    assert not claims_of("ablation")
    for claim in CLAIMS:
        assert claim.comparison and claim.paper_regime and callable(claim.evaluate)
        assert claim.evaluate({}) is None  # no results: not decided
    regime = regime_of(_results(_pair("rbf", "softmax", [0.0] * 5)))
    assert regime == ("from scratch, conv28 width 16, fashion-mnist (300 images per class), 25 epochs, Adam 0.001 "
                      "cosine, batch 64, CPU; rbf on the unit sphere, its bank refreshed every 10 epochs")
