"""The admin dashboard of live model quality, for holders of the admin token (as /review).

    GET /admin                          the dashboard (HTML; charts as SVG images, a table beside each)
    GET /admin/charts/<name>.svg        one chart (keras_serve.web.charts)
    GET /api/stats                      the same numbers as JSON

All take `window` (day, week, all; default week) and `model_version` (a sha256; default the
version this process serves). Off (404) without an admin token, like /review. The numbers come
from `keras_serve.storage.quality_stats`; see docs/dashboard.md for how to read them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from flask import Blueprint, Response, abort, current_app, jsonify, render_template, request, url_for

from keras_serve.errors import ModelVersionNotFound, ReviewRequestError
from keras_serve.storage.model_registry import is_sha256
from keras_serve.storage.quality_stats import WINDOWS, QualityStats, StatsCache
from keras_serve.web import charts, quality_metrics, review
from keras_serve.web.openapi import ERROR, binary, html_page, operation
from keras_serve.web.openapi import json_body as json_answer

bp = Blueprint("dashboard", __name__)
DEFAULT_WINDOW = "week"
STATS_HINT = "See docs/dashboard.md: window is day, week or all; model_version is a model's sha256 (64 hex)."
# A chart is an SVG document shown as an image: its own <style> is all it needs; no script, nothing fetched.
SVG_CSP = "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
STATS_SCHEMA: dict = {"type": "object", "required": ["model_version", "window", "traffic", "reviewed", "feedback",
                                                     "drift", "versions", "timeline"]}


@bp.after_request
def chart_policy(response: Response) -> Response:
    # Registered before review.private, so it runs after it (Flask runs them last-registered first).
    if response.mimetype == "image/svg+xml":
        response.headers["Content-Security-Policy"] = SVG_CSP
    return response


bp.before_request(review.require_admin)
bp.after_request(review.private)


def quality() -> QualityStats:
    return current_app.extensions["quality_stats"]


def _served_sha() -> str | None:
    return current_app.extensions["classifier"].model.info.get("sha256")


def selection() -> tuple[str, str | None]:
    """(window, model version) from the query string; a 400 for anything else."""
    window = request.args.get("window", "").strip() or DEFAULT_WINDOW
    if window not in WINDOWS:
        raise ReviewRequestError(f"window must be one of: {', '.join(WINDOWS)}.", STATS_HINT)
    version = request.args.get("model_version", "").strip().lower()
    if not version:
        return window, _served_sha() or _latest_version()
    if not is_sha256(version):
        raise ReviewRequestError("model_version must be a model's sha256: 64 hexadecimal characters.", STATS_HINT)
    return window, version


def _latest_version() -> str | None:
    versions = quality().versions()
    return versions[0]["sha256"] if versions else None


def _labels_of(version: str | None, versions: list[dict[str, Any]]) -> list[str]:
    for known in versions:
        if known["sha256"] == version and known.get("labels"):
            return known["labels"]
    model = current_app.extensions["classifier"].model
    return list(model.labels) if model.info.get("sha256") == version else []


def validation_accuracy(version: str | None) -> float | None:
    """The validation accuracy its model card states (published versions, or the start-up model)."""
    cache = current_app.extensions.setdefault("validation_accuracy", {})
    if version in cache:
        return cache[version]
    import json

    from keras_serve.model.card import ModelCard

    card: dict[str, Any] = {}
    try:
        data = current_app.extensions["classifier"].store.images.get_model_file(f"{version}.json") if version else None
        if data is not None:
            card = json.loads(data)
        elif version is not None and version == _served_sha() and current_app.config.get("MODEL_PATH"):
            card = ModelCard.read(Path(current_app.config["MODEL_PATH"])).extra
    except Exception:  # a card that cannot be read says nothing; the rest of the dashboard stands
        card = {}
    accuracy = (card.get("validation") or {}).get("accuracy") if isinstance(card, dict) else None
    cache[version] = float(accuracy) if isinstance(accuracy, (int, float)) else None
    return cache[version]


def dashboard_stats(window: str, version: str | None) -> dict[str, Any]:
    """Everything /api/stats answers (cached for a few seconds: the page and its charts share it)."""
    def compute() -> dict[str, Any]:
        versions = quality().versions()
        if version is not None and is_sha256(version) and version != _served_sha() \
                and all(v["sha256"] != version for v in versions):
            raise ModelVersionNotFound(f"No upload was answered by model version {version[:12]}.")
        unsure_below = float(current_app.extensions["classifier"].unsure_below)
        stats = quality().stats(version, window, unsure_below, _labels_of(version, versions))
        stats["reviewed"]["validation_accuracy"] = validation_accuracy(version)
        stats["model_file"] = next((v["file"] for v in versions if v["sha256"] == version), None)
        stats["serving_now"] = version is not None and version == _served_sha()
        stats["versions"] = versions
        stats["timeline"] = quality().timeline()
        return stats

    return current_app.extensions["stats_cache"].get((window, version), compute)


@bp.get("/api/stats")
@operation("Live model quality for one model version and window: traffic, reviewed accuracy with its "
           "interval, confusion, calibration, visitor disagreement, drift (admin)", tags=["review"],
           description="Query: window = day | week | all (default week); model_version = a sha256 "
                       "(default: the version this server answers with). See docs/dashboard.md.",
           responses={200: json_answer(STATS_SCHEMA), 400: ERROR, 401: ERROR, 404: ERROR, 503: ERROR},
           operation_id="getStats")
def stats_json():
    window, version = selection()
    return jsonify(dashboard_stats(window, version))


@bp.get("/admin/charts/<name>.svg")
@operation("One chart of the dashboard, an SVG image (admin)", tags=["review"],
           path={"name": {"type": "string", "enum": sorted(charts.CHARTS)}},
           responses={200: binary("image/svg+xml"), 400: ERROR, 401: ERROR, 404: ERROR, 503: ERROR},
           operation_id="getDashboardChart")
def chart(name: str):
    draw = charts.CHARTS.get(name)
    if draw is None:
        abort(404)
    window, version = selection()
    stats = dashboard_stats(window, version)
    svg = draw(stats, stats["timeline"]) if name == "traffic" else draw(stats)
    return Response(svg, mimetype="image/svg+xml", headers={"X-Content-Type-Options": "nosniff"})


@bp.get("/admin")
@operation("The dashboard of live model quality (admin; browsers without a session are sent to the login form)",
           tags=["review"], responses={200: html_page(), 303: html_page(), 400: ERROR, 401: ERROR, 404: ERROR,
                                      503: ERROR}, operation_id="getDashboard")
def dashboard_page():
    window, version = selection()
    stats = dashboard_stats(window, version)
    query = {"window": window, **({"model_version": version} if version else {})}
    chart_urls = {name: url_for("dashboard.chart", name=name, **query) for name in charts.CHARTS}
    return render_template("dashboard.html", stats=stats, window=window, windows=list(WINDOWS), version=version,
                           charts=chart_urls)


def init_app(app) -> None:
    """Registered whether or not the admin token is set (its routes 404 without one, as /review)."""
    app.extensions["quality_stats"] = QualityStats(app.extensions["classifier"].store.records)
    app.extensions["stats_cache"] = StatsCache()
    app.register_blueprint(bp)
    quality_metrics.init_app(app)  # the Prometheus series: on whether or not the dashboard is
