"""`GET /metrics` in the Prometheus text format, through prometheus-client.

`init_app(app)` makes the app's metrics, registers the request hooks and the route, and
returns the `ServingMetrics` that the core (batcher, service) reports to:

    keras_serve_http_requests_total{route,method,status}     every answered request
    keras_serve_http_request_duration_seconds{route,method}  time inside the app, per request
    keras_serve_http_requests_in_progress                    requests being answered now
    keras_serve_batch_size                                   inputs per forward pass
    keras_serve_inference_duration_seconds                   one forward pass of the model
    keras_serve_uploads_stored_total, _upload_bytes_stored_total
    keras_serve_storage_errors_total{operation,kind}         save/read failures by error class
    keras_serve_model_outputs_invalid_total{model_version,problem}  answers refused: not probabilities

Every label comes from a closed set, so no client can add a series: `route` is the URL rule
(`/uploads/<upload_id>`), never the path a client sent, and `unmatched` for 404s; `method` is
one of the HTTP methods the standard defines, else `other`; `status` is a code the app answered.

Several server processes (gunicorn workers) each keep their own counts. With
PROMETHEUS_MULTIPROC_DIR set to an empty folder that all of them can write, prometheus-client
keeps every value in a file per process there, and `/metrics`, whichever process answers, adds
up all processes' files. `keras_serve.web.metrics_processes` has what the process manager
needs: setting and emptying the folder before the workers start, and gunicorn's `child_exit`.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Mapping

from flask import Flask, Response, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               ProcessCollector, generate_latest, multiprocess, values)

from keras_serve.web.metrics_processes import MULTIPROC_ENV
from keras_serve.web.openapi import Body, operation

UNMATCHED_ROUTE = "unmatched"
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE"})
OTHER = "other"


def method_label(method: str) -> str:
    """The request method as a label: invented methods (any token is valid HTTP) are one value."""
    return method if method in KNOWN_METHODS else OTHER


def status_label(status: int) -> str:
    return str(status) if 100 <= status <= 599 else OTHER
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class PrometheusMetrics:
    """The app's metrics in one registry (per app, so two apps in one process never share counts)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter("keras_serve_http_requests", "HTTP requests answered, by route, method and status.",
                                ["route", "method", "status"], registry=registry)
        self.request_seconds = Histogram(
            "keras_serve_http_request_duration_seconds",
            "Time from routing to the response, inside the app (reading the upload included).",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=registry)
        # livesum: across processes, only live ones count; child_exit drops a dead worker's.
        self.in_progress = Gauge("keras_serve_http_requests_in_progress", "HTTP requests being answered now.",
                                 registry=registry, multiprocess_mode="livesum")
        self.batch_size = Histogram("keras_serve_batch_size", "Inputs per forward pass of the model.",
                                    buckets=BATCH_SIZE_BUCKETS, registry=registry)
        self.inference_seconds = Histogram("keras_serve_inference_duration_seconds",
                                           "Duration of one forward pass of the model over a batch.",
                                           buckets=LATENCY_BUCKETS, registry=registry)
        self.uploads_stored = Counter("keras_serve_uploads_stored", "Uploads made durable in the store.",
                                      registry=registry)
        self.upload_bytes = Counter("keras_serve_upload_bytes_stored", "Bytes of uploads made durable in the store.",
                                    registry=registry)
        self.storage_errors = Counter("keras_serve_storage_errors",
                                      "Store failures, by operation (save, read) and error class.",
                                      ["operation", "kind"], registry=registry)

        # The model version (12 hex of its sha256): a label from the published versions, a set
        # only an admin can grow. "none" for a model object without a file (tests).
        self.predictions = Counter("keras_serve_predictions", "Images answered, by model version.",
                                   ["model_version"], registry=registry)
        self.model_info = Gauge("keras_serve_model_info", "1 for the model version this process serves.",
                                ["model_version", "file"], registry=registry, multiprocess_mode="liveall")
        self.model_changes = Counter("keras_serve_model_changes",
                                     "Model loads by result: started, swapped (a promotion followed), refused.",
                                     ["result"], registry=registry)
        # problem: one of served_model.OUTPUT_PROBLEMS (a closed set).
        self.model_outputs_invalid = Counter(
            "keras_serve_model_outputs_invalid",
            "Images the model answered with scores that are not probabilities (answered 503), by model "
            "version and problem: not_finite, out_of_range, not_summing_to_one.",
            ["model_version", "problem"], registry=registry)
        self._served_labels: tuple[str, str] | None = None
        # Collectors that read their values at scrape time (the store's quality numbers,
        # web/quality_metrics.py): the same in every process, so never written to the shared folder.
        self.scrape_time_collectors: list[Any] = []

    def add_collector(self, collector: Any) -> None:
        self.registry.register(collector)
        self.scrape_time_collectors.append(collector)

    # --- ServingMetrics (called by the core) ----------------------------------------------
    def batch_predicted(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)

    def upload_stored(self, size_bytes: int) -> None:
        self.uploads_stored.inc()
        self.upload_bytes.inc(size_bytes)

    def storage_failed(self, operation: str, kind: str) -> None:
        self.storage_errors.labels(operation, kind).inc()

    def predicted(self, model_sha256: str | None) -> None:
        self.predictions.labels(model_version_label(model_sha256)).inc()

    def model_output_invalid(self, model_sha256: str | None, problem: str) -> None:
        self.model_outputs_invalid.labels(model_version_label(model_sha256), problem).inc()

    def model_changed(self, result: str, info: Mapping[str, Any] | None) -> None:
        self.model_changes.labels(result).inc()
        if info is None:
            return
        labels = (model_version_label(info.get("sha256")), str(info.get("file") or "")[:128])
        if self._served_labels is not None and self._served_labels != labels:
            self.model_info.labels(*self._served_labels).set(0)  # remove() cannot reach other processes' files
        self.model_info.labels(*labels).set(1)
        self._served_labels = labels


def model_version_label(sha256: str | None) -> str:
    return sha256[:12] if sha256 else "none"


def multiprocess_dir() -> Path | None:
    """The shared folder when several processes serve, else None; checks it can work."""
    path = os.environ.get(MULTIPROC_ENV)
    if not path:
        return None
    if values.ValueClass is values.MutexValue:
        # prometheus-client chose in-memory values when it was imported: this process's counts
        # would never reach the folder, and /metrics would silently show other processes only.
        # ValueError: the CLI prints it as one line, like a malformed KERAS_SERVE_* value.
        raise ValueError(f"{MULTIPROC_ENV} was set after prometheus_client was imported; "
                         "set it in the environment before the server starts.")
    Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


def init_app(app: Flask) -> PrometheusMetrics:
    shared_dir = multiprocess_dir()
    registry = CollectorRegistry()
    metrics = PrometheusMetrics(registry)
    if shared_dir is None:
        ProcessCollector(registry=registry)  # CPU, memory and open files of this one process
    app.extensions["metrics"] = metrics

    @app.before_request
    def start_timer() -> None:
        g.metrics_started = time.perf_counter()
        metrics.in_progress.inc()

    @app.after_request
    def count_request(response: Response) -> Response:
        started = g.get("metrics_started")
        if started is not None:
            route = request.url_rule.rule if request.url_rule is not None else UNMATCHED_ROUTE
            method = method_label(request.method)
            metrics.requests.labels(route, method, status_label(response.status_code)).inc()
            metrics.request_seconds.labels(route, method).observe(time.perf_counter() - started)
        return response

    @app.teardown_request
    def end_in_progress(exc: BaseException | None) -> None:
        # teardown runs however the request ended; only undo what start_timer did.
        if g.pop("metrics_started", None) is not None:
            metrics.in_progress.dec()

    @operation("Prometheus metrics of this server (text exposition format)", tags=["operations"],
               responses={200: Body("text/plain", {"type": "string"})})
    def scrape() -> Response:
        if shared_dir is None:
            body = generate_latest(registry)
        else:
            aggregate = CollectorRegistry()
            multiprocess.MultiProcessCollector(aggregate, path=str(shared_dir))
            for collector in metrics.scrape_time_collectors:
                aggregate.register(collector)
            body = generate_latest(aggregate)
        return Response(body, mimetype=None, content_type=CONTENT_TYPE_LATEST,
                        headers={"Cache-Control": "no-store"})

    app.add_url_rule("/metrics", endpoint="metrics", view_func=scrape, methods=["GET"])
    return metrics
