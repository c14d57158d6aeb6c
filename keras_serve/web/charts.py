"""The dashboard's charts: SVG drawn on the server by pygal from the numbers in /api/stats.

Each chart is served as its own image (`<img src=...svg>`), so the page itself carries no
inline style or script; pygal's own `<style>` lives inside the SVG document, which a browser
renders as an image (no script runs in an image, and nothing is fetched from outside).
Every series differs by more than its colour: its shape (bars, a solid line with dots, a
dashed line), its legend, the values printed on bars; the table beside each chart has the
same numbers.
"""
from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Callable

import pygal
from pygal.style import Style

# Dark blue and light orange differ in lightness too, so they stay apart in grey.
STYLE = Style(background="white", plot_background="white", foreground="#222", foreground_strong="#111",
              foreground_subtle="#888", colors=("#1f4e9c", "#e8a33d", "#555555", "#7f1d1d"),
              font_family="system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif",
              label_font_size=12, major_label_font_size=12, value_font_size=11, legend_font_size=13,
              title_font_size=15, tooltip_font_size=12)
WIDTH, HEIGHT = 640, 320
SCRIPT = re.compile(r"<script\b.*?</script>", re.S)  # pygal's tooltip config: no script in our images


def _config(**extra: Any) -> dict[str, Any]:
    return {"style": STYLE, "width": WIDTH, "height": HEIGHT, "js": [], "disable_xml_declaration": True,
            "legend_at_bottom": True, "legend_at_bottom_columns": 3, "show_y_guides": True,
            "margin": 12, "margin_bottom": 28, "truncate_label": -1, **extra}


def render(chart: Any) -> str:
    return SCRIPT.sub("", chart.render(is_unicode=True))


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value:.0%}"


def _share(value: float | None) -> str:
    """A bar's printed share; none on empty bars, which would only add noise."""
    return f"{value:.0%}" if value else ""


def _hours(stats: dict[str, Any]) -> list[tuple[datetime, float]]:
    fmt = "%Y-%m-%d %H:%M" if stats["traffic"]["bucket_hours"] == 1 else "%Y-%m-%d"
    return [(datetime.strptime(b["start"], fmt), b["per_hour"]) for b in stats["traffic"]["per_bucket"]]


def traffic(stats: dict[str, Any], timeline: list[dict[str, Any]]) -> str:
    """Uploads per hour over the window, and each promotion or rollback as a dashed vertical line."""
    points = _hours(stats)
    chart = pygal.DateTimeLine(**_config(title="Uploads per hour", x_label_rotation=30, allow_interruptions=True,
                                         show_dots=True, dots_size=3, x_value_formatter=lambda d: d.strftime(
                                             "%d %b %H:%M" if stats["traffic"]["bucket_hours"] == 1 else "%d %b")))
    chart.add("uploads per hour", points or [None])
    top = max((v for _, v in points), default=1.0) or 1.0
    start = points[0][0] if points else None
    end = points[-1][0] if points else None
    for kind, dash in (("promote", "8,4"), ("rollback", "2,4")):
        marks: list[Any] = []
        for event in timeline:
            at = datetime.fromisoformat(event["at"].replace("Z", ""))
            if event["action"] == kind and start is not None and start <= at <= end:
                marks += [(at, 0), (at, top), None]
        if marks:
            chart.add("model promoted" if kind == "promote" else "model rolled back", marks,
                      stroke_style={"width": 2, "dasharray": dash}, show_dots=False)
    return render(chart)


def confidence(stats: dict[str, Any]) -> str:
    bins = stats["drift"]["confidence"]["bins"]
    # From the lowest bin either side uses: a two-label model never answers under 0.5.
    first = next((i for i, b in enumerate(bins) if b["baseline"] or b["window"]), 0)
    bins = bins[first:]
    chart = pygal.Bar(**_config(title="Confidence: first week against this window", print_values=True,
                                value_formatter=_share, x_label_rotation=0, range=(0, 1)))
    chart.x_labels = [f"{b['low']:.1f}" for b in bins]
    chart.add("first week", [b["baseline_share"] for b in bins])
    chart.add("this window", [b["window_share"] for b in bins])
    return render(chart)


def labels(stats: dict[str, Any]) -> str:
    rows = stats["drift"]["labels"]["labels"]
    chart = pygal.HorizontalBar(**_config(title="Predicted labels: first week against this window",
                                          print_values=True, value_formatter=_share, range=(0, 1)))
    chart.x_labels = [r["label"] for r in rows]
    chart.add("first week", [r["baseline_share"] for r in rows])
    chart.add("this window", [r["window_share"] for r in rows])
    return render(chart)


def reliability(stats: dict[str, Any]) -> str:
    """Reviewed accuracy per confidence bin against the diagonal of a perfectly calibrated model."""
    bins = stats["reviewed"]["reliability"]
    chart = pygal.XY(**_config(title="Reliability: confidence against reviewed accuracy", range=(0, 1),
                               xrange=(0, 1), dots_size=5, value_formatter=_percent, x_value_formatter=_percent))
    chart.add("perfectly calibrated", [(0, 0), (1, 1)], stroke_style={"width": 2, "dasharray": "6,4"},
              show_dots=False)
    chart.add("reviewed accuracy", [(b["mean_confidence"], b["accuracy"]) for b in bins] or [None],
              stroke_style={"width": 3})
    return render(chart)


def recall(stats: dict[str, Any]) -> str:
    per_class = stats["reviewed"]["recall"]
    chart = pygal.HorizontalBar(**_config(title="Recall per true class (reviewed)", print_values=True,
                                          value_formatter=_percent, range=(0, 1), show_legend=False))
    shown = [(label, value) for label, value in per_class.items() if value is not None]
    chart.x_labels = [label for label, _ in shown]
    chart.add("recall", [value for _, value in shown] or [None])
    return render(chart)


def latency(stats: dict[str, Any]) -> str:
    lat = stats["traffic"]["latency_ms"]
    bounds, counts = lat["bounds"], lat["counts"]
    shown = [(i, n) for i, n in enumerate(counts) if n]
    chart = pygal.Bar(**_config(title="Answer time (ms): uploads per bucket", print_values=True,
                                show_legend=False, x_label_rotation=30))
    chart.x_labels = [(f"< {bounds[i]:g}" if i < len(bounds) else f">= {bounds[-1]:g}") for i, _ in shown]
    chart.add("uploads", [n for _, n in shown] or [None])
    return render(chart)


CHARTS: dict[str, Callable[..., str]] = {"traffic": traffic, "confidence": confidence, "labels": labels,
                                         "reliability": reliability, "recall": recall, "latency": latency}
