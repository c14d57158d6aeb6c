"""The dashboard's statistics as pure functions of counts: no database, no clock, no web.

    wilson_interval(k, n)           95% interval of a proportion (reviewed accuracy)
    confusion(pairs)                confusion matrix, accuracy and per-class recall
    expected_calibration_error(bins) reliability diagram's gap, weighted by each bin's size
    population_stability_index(expected, actual)   how far one distribution moved from another
    percentile_from_histogram(...)  a latency percentile from bucket counts

Each takes the aggregates the database returns (counts per group), so none of them ever
needs the rows themselves; tests/test_dashboard.py checks them against values worked by hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

Z_95 = 1.959963984540054  # the standard normal's 97.5th percentile: a two-sided 95% interval
# Population stability index: an empty bin would make ln(a/e) infinite; each share is taken
# as at least this (the usual convention; it bounds one empty bin's term at about 0.9 for a
# bin holding 10% on the other side).
PSI_FLOOR = 1e-4
# The usual reading of a PSI (credit scoring, where it comes from, and most drift monitors).
PSI_SMALL, PSI_LARGE = 0.1, 0.25


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float] | None:
    """(low, high) of the Wilson score interval; None without observations.

    Unlike p +- z*sqrt(p(1-p)/n) it stays inside [0, 1] and is not zero-width at 0 or n
    successes, which is where a small review sample usually sits.
    """
    if total <= 0:
        return None
    if not 0 <= successes <= total:
        raise ValueError("successes must be between 0 and total")
    p = successes / total
    z2 = z * z
    denominator = 1 + z2 / total
    centre = (p + z2 / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Confusion:
    labels: list[str]                 # rows (true) and columns (predicted), in this order
    matrix: list[list[int]]           # matrix[true][predicted]
    total: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.total if self.total else None

    def recall(self) -> dict[str, float | None]:
        """Per true class: the share of its images the model named right (None: none seen)."""
        out = {}
        for i, label in enumerate(self.labels):
            row = sum(self.matrix[i])
            out[label] = self.matrix[i][i] / row if row else None
        return out


def confusion(counts: Mapping[tuple[str, str], int], labels: Sequence[str]) -> Confusion:
    """From {(true, predicted): count}. `labels` fixes the order; a label seen in `counts`
    and not in `labels` is appended (a review can say "neither", which no model predicts)."""
    order = list(labels)
    for true, predicted in counts:
        for label in (true, predicted):
            if label not in order:
                order.append(label)
    index = {label: i for i, label in enumerate(order)}
    matrix = [[0] * len(order) for _ in order]
    for (true, predicted), count in counts.items():
        matrix[index[true]][index[predicted]] += int(count)
    total = sum(int(c) for c in counts.values())
    correct = sum(int(c) for (true, predicted), c in counts.items() if true == predicted)
    return Confusion(order, matrix, total, correct)


@dataclass(frozen=True)
class ReliabilityBin:
    low: float              # confidence range [low, high)
    high: float
    count: int
    confidence_sum: float   # sum of the winning scores in the bin
    correct: int            # reviewed right

    @property
    def mean_confidence(self) -> float | None:
        return self.confidence_sum / self.count if self.count else None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.count if self.count else None


def expected_calibration_error(bins: Iterable[ReliabilityBin]) -> float | None:
    """sum over bins of (bin's share of all) * |bin's accuracy - bin's mean confidence|.

    0 is a model whose "0.9 sure" answers are right 90% of the time; None without reviews.
    """
    bins = [b for b in bins if b.count]
    total = sum(b.count for b in bins)
    if not total:
        return None
    return sum(b.count / total * abs(b.correct / b.count - b.confidence_sum / b.count) for b in bins)


def shares(counts: Sequence[float]) -> list[float]:
    total = float(sum(counts))
    return [c / total if total else 0.0 for c in counts]


def population_stability_index(expected: Sequence[float], actual: Sequence[float],
                               floor: float = PSI_FLOOR) -> float | None:
    """PSI = sum over bins of (a - e) * ln(a / e), the bins' shares of each distribution.

    `expected` and `actual` are counts (or shares) per bin, in the same order. None when
    either side is empty: there is nothing to compare.
    """
    if len(expected) != len(actual):
        raise ValueError("both distributions need the same bins")
    if not sum(expected) or not sum(actual):
        return None
    total = 0.0
    for e, a in zip(shares(expected), shares(actual)):
        e, a = max(e, floor), max(a, floor)
        total += (a - e) * math.log(a / e)
    return total


def psi_words(psi: float | None) -> str:
    """How far apart: 'like', 'somewhat unlike' or 'unlike' (PSI under 0.1, under 0.25, above)."""
    if psi is None:
        return "not comparable"
    if psi < PSI_SMALL:
        return "like"
    if psi < PSI_LARGE:
        return "somewhat unlike"
    return "unlike"


def percentile_from_histogram(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The q-th quantile (0-1) of values counted per bucket: bucket i holds values in
    [bounds[i-1], bounds[i]) (bucket 0 from 0; the last, len(bounds), beyond the last bound).
    Linear inside the bucket the quantile falls in, as Prometheus' histogram_quantile; a
    quantile in the open last bucket is its lower bound."""
    if len(counts) != len(bounds) + 1:
        raise ValueError("one count per bucket: len(bounds) + 1")
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0.0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            low = bounds[i - 1] if i > 0 else 0.0
            if i == len(bounds):
                return low
            return low + (bounds[i] - low) * max(0.0, rank - seen) / count
        seen += count
    return bounds[-1]
