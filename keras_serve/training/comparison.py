"""Two models scored on the same images: how much better is one, and could that be chance?

Both models answer the very same photos, so their mistakes are paired: what decides is the
photos only one of them gets right (the discordant pairs), not the two accuracies apart.
Hence a paired bootstrap for the 95% interval of the difference in accuracy (whole photos are
resampled, each with both answers; a fixed seed, so a report can be reproduced) and McNemar's
exact test on the discordant pairs (a two-sided binomial test of b against b + c).

The verdict says better or worse only when both agree: the interval excludes 0 AND McNemar's
p < 0.05. The two differ at the margin (the percentile bootstrap is a little narrow with few
discordant photos, the exact test a little strict): e.g. 200 photos, 12 fixed and 4 broken
give +4.0 points, CI +0.5..+8.0 but p = 0.077. Promoting a model on such evidence is what the
verdict should not encourage, so the margin reads "no detectable difference".
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
RESAMPLES = 10_000
SEED = 20_231


def paired_accuracy_difference(current_correct: np.ndarray, candidate_correct: np.ndarray,
                               seed: int = SEED, resamples: int = RESAMPLES) -> dict:
    """Candidate minus current accuracy with its paired 95% CI, and McNemar's exact p-value.

    `*_correct`: one boolean per image, the same images in the same order for both.
    """
    current = np.asarray(current_correct, dtype=bool)
    candidate = np.asarray(candidate_correct, dtype=bool)
    if current.shape != candidate.shape or current.ndim != 1:
        raise ValueError("the two models must be scored on the same images")
    n = int(current.size)
    only_current = int((current & ~candidate).sum())
    only_candidate = int((candidate & ~current).sum())
    result = {"images": n, "only_current_right": only_current, "only_candidate_right": only_candidate,
              "both_right": int((current & candidate).sum()), "both_wrong": int((~current & ~candidate).sum())}
    if n == 0:
        return {**result, "difference": None, "ci_low": None, "ci_high": None, "mcnemar_p": None}
    discordant = only_current + only_candidate
    # McNemar's exact test: under "equally good", each discordant photo is a fair coin.
    p_value = float(stats.binomtest(only_candidate, discordant, 0.5).pvalue) if discordant else 1.0
    difference = float(candidate.mean() - current.mean())
    if n < 2 or discordant == 0:
        low = high = difference  # every resample is the same: the interval is a point
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.DegenerateDataWarning)
            interval = stats.bootstrap(
                (current.astype(np.float64), candidate.astype(np.float64)),
                lambda a, b, axis=-1: b.mean(axis=axis) - a.mean(axis=axis),
                paired=True, vectorized=True, n_resamples=resamples, confidence_level=CONFIDENCE,
                method="percentile", batch=1000, rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(interval.low), float(interval.high)
    return {**result, "difference": difference, "ci_low": low, "ci_high": high, "mcnemar_p": p_value,
            "method": f"paired bootstrap, {resamples} resamples, percentile {int(CONFIDENCE * 100)}% CI, "
                      f"seed {seed}; McNemar exact (binomial) test"}


def verdict(paired: dict) -> str:
    """One line: better / worse (the CI excludes 0 and McNemar agrees) or no detectable difference."""
    if paired["difference"] is None:
        return "no images to compare on"
    points = 100 * paired["difference"]
    ci = f"95% CI {100 * paired['ci_low']:+.1f}..{100 * paired['ci_high']:+.1f}; McNemar p = {paired['mcnemar_p']:.2g}"
    direction = _direction(paired)
    if direction > 0:
        return f"candidate better by {points:.1f} points ({ci})"
    if direction < 0:
        return f"candidate worse by {-points:.1f} points ({ci})"
    return f"no detectable difference ({points:+.1f} points, {ci})"


def _direction(paired: dict) -> int:
    """+1 better, -1 worse, 0 not shown by both the interval and the exact test."""
    if paired["difference"] is None or paired["mcnemar_p"] >= SIGNIFICANCE:
        return 0
    return 1 if paired["ci_low"] > 0 else -1 if paired["ci_high"] < 0 else 0


def overall_verdict(named: list[tuple[str, dict]]) -> str:
    """Across the data sets: better on some and worse on none, worse on some and better on none,
    mixed, or no detectable difference."""
    if all(p["difference"] is None for _, p in named):
        return "no images to compare on"
    better = [name for name, p in named if _direction(p) > 0]
    worse = [name for name, p in named if _direction(p) < 0]
    if better and worse:
        return f"mixed: candidate better on {', '.join(better)}, worse on {', '.join(worse)}"
    if better:
        return f"candidate better on {', '.join(better)}, no worse elsewhere"
    if worse:
        return f"candidate worse on {', '.join(worse)}, no better elsewhere"
    return "no detectable difference"
