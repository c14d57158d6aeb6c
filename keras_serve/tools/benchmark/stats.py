"""Pure numbers: percentiles, latency summaries, tables, argument lists (unit-tested)."""
from __future__ import annotations

import math
import statistics
from typing import Any, Iterable, Sequence

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (numpy's default method)."""
    if not sorted_values:
        return math.nan
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def latency_summary_ms(latencies_s: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max in milliseconds of latencies given in seconds."""
    values = sorted(v * 1000.0 for v in latencies_s)
    if not values:
        return {"count": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "mean": math.nan, "max": math.nan}
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values),
        "max": values[-1],
    }


def parse_int_list(text: str) -> list[int]:
    """'1,8, 32' -> [1, 8, 32]; every item a positive integer."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise ValueError("expected a comma-separated list of positive integers")
    values = [int(item) for item in items]
    if any(v < 1 for v in values):
        raise ValueError(f"values must be >= 1: {text!r}")
    return values

def percent_change(before: float, after: float) -> float:
    """Relative change from `before` to `after` in percent (nan when `before` is 0)."""
    if not before:
        return math.nan
    return (after - before) / before * 100.0


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Right-aligned plain-text table; floats get a sensible number of digits."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    text_rows = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in text_rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Machine facts, /proc readings
# ----------------------------------------------------------------------------------------
