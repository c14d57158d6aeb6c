"""Prometheus series of live model quality and of the store's circuit breakers, read at scrape time.

    keras_serve_quality_answered{model_version,window}              answered uploads in the window
    keras_serve_quality_unsure_share{model_version,window}          share answered "unsure"
    keras_serve_quality_visitor_answers{model_version,window}       visitors' answers ("Was this right?")
    keras_serve_quality_visitor_disagreement{model_version,window}  share of them that disagree
    keras_serve_quality_reviewed{model_version,window}              reviewed uploads
    keras_serve_quality_reviewed_accuracy{model_version,window}     and its Wilson 95% interval:
    keras_serve_quality_reviewed_accuracy_low / _high{model_version,window}
    keras_serve_quality_validation_accuracy{model_version}          what the model card states
    keras_serve_quality_drift_psi{model_version,window,feature}     against the version's first week
    keras_serve_storage_breaker_open{component}                     1 while uploads fail fast (storage/faults.py)
    keras_serve_storage_up{component}                               what /readyz says of each half

Labels come from closed sets: model_version is "current" (what this process serves) or
"previous" (the version that answered most recently before it), never a hash, so a
promotion adds no series; window is "day" or "week" (the last 24 hours, 7 days);
feature is "confidence" or "label"; component is "records" or "images". A number that
has nothing to stand on (no reviews yet) is left out rather than exported as 0.

The numbers come from the record store (keras_serve.storage.quality_stats), at most once a
minute per process (StatsCache), so a scrape every few seconds costs a few cheap queries a
minute. Any process answers the same: the store is shared.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

from flask import Flask
from prometheus_client.core import GaugeMetricFamily

from keras_serve.storage.quality_stats import StatsCache

log = logging.getLogger(__name__)
WINDOWS = ("day", "week")
VERSION_LABELS = ("current", "previous")
CACHE_S = 60.0


class QualityCollector:
    def __init__(self, app: Flask) -> None:
        self.app = app
        self.cache = StatsCache(ttl_s=CACHE_S)

    def describe(self) -> list:
        return []  # no collect() at registration time: that would query the store while the app starts

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield from self._breakers()
        try:
            samples = self.cache.get(("quality",), self._quality)
        except Exception as exc:  # the store is down: /metrics still answers, without these
            log.warning("quality metrics unavailable: %s", getattr(exc, "message", exc))
            samples = {}
        for name, (help_text, labels, rows) in samples.items():
            family = GaugeMetricFamily(name, help_text, labels=list(labels))
            for values, value in rows:
                family.add_metric(list(values), value)
            yield family

    def _breakers(self) -> Iterator[GaugeMetricFamily]:
        store = self.app.extensions["classifier"].store
        opened = GaugeMetricFamily("keras_serve_storage_breaker_open",
                                   "1 while the store's circuit breaker for this half is open: requests fail "
                                   "fast with 503 (docs/storage-faults.md).", labels=["component"])
        up = GaugeMetricFamily("keras_serve_storage_up", "1 when this half of the store answers (as /readyz).",
                               labels=["component"])
        for health in (store.records_health, store.images_health):
            opened.add_metric([health.name], 1.0 if health.breaker_open() else 0.0)
            up.add_metric([health.name], 1.0 if health.ok() else 0.0)
        yield opened
        yield up

    def _versions(self) -> dict[str, str]:
        """"current" and "previous" -> sha256, for those that exist."""
        from keras_serve.web.dashboard import quality

        served = self.app.extensions["classifier"].model.info.get("sha256")
        known = [v["sha256"] for v in quality().versions()]  # newest answer first
        current = served or (known[0] if known else None)
        previous = next((sha for sha in known if sha != current), None)
        return {label: sha for label, sha in zip(VERSION_LABELS, (current, previous)) if sha is not None}

    def _quality(self) -> dict[str, tuple[str, tuple[str, ...], list[tuple[tuple[str, ...], float]]]]:
        from keras_serve.web.dashboard import quality, validation_accuracy

        out: dict[str, tuple[str, tuple[str, ...], list[tuple[tuple[str, ...], float]]]] = {}

        def put(name: str, help_text: str, labels: tuple[str, ...], values: tuple[str, ...], value: Any) -> None:
            entry = out.setdefault(name, (help_text, labels, []))
            if value is not None:
                entry[2].append((values, float(value)))

        version_window = ("model_version", "window")
        with self.app.app_context():
            unsure_below = float(self.app.extensions["classifier"].unsure_below)
            for label, sha in self._versions().items():
                put("keras_serve_quality_validation_accuracy", "Validation accuracy stated by the model card.",
                    ("model_version",), (label,), validation_accuracy(sha))
                for window in WINDOWS:
                    s = quality().summary(sha, window, unsure_below)
                    key = (label, window)
                    reviewed = s["reviewed"]
                    interval = reviewed["interval_95"] or (None, None)
                    put("keras_serve_quality_answered", "Uploads answered in the window.", version_window, key,
                        s["answered"])
                    put("keras_serve_quality_unsure_share", "Share of the window's answers marked unsure.",
                        version_window, key, s["unsure_share"])
                    put("keras_serve_quality_visitor_answers", "Visitors' answers on the window's uploads.",
                        version_window, key, s["feedback"]["count"])
                    put("keras_serve_quality_visitor_disagreement",
                        "Share of visitors' answers in the window that disagree with the model.", version_window, key,
                        s["feedback"]["disagreement_rate"])
                    put("keras_serve_quality_reviewed", "Uploads of the window a reviewer labelled.", version_window,
                        key, reviewed["count"])
                    put("keras_serve_quality_reviewed_accuracy", "Accuracy on the window's reviewed uploads.",
                        version_window, key, reviewed["accuracy"])
                    put("keras_serve_quality_reviewed_accuracy_low", "Lower end of its Wilson 95% interval.",
                        version_window, key, interval[0])
                    put("keras_serve_quality_reviewed_accuracy_high", "Upper end of its Wilson 95% interval.",
                        version_window, key, interval[1])
                    for feature, psi in (("confidence", s["drift"]["confidence"]["psi"]),
                                         ("label", s["drift"]["labels"]["psi"])):
                        put("keras_serve_quality_drift_psi",
                            "Population stability index of the window against the version's first week.",
                            ("model_version", "window", "feature"), (label, window, feature), psi)
        return out


def init_app(app: Flask) -> None:
    metrics = app.extensions.get("metrics")
    if metrics is not None:
        metrics.add_collector(QualityCollector(app))
