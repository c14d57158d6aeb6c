"""The model-quality dashboard: its arithmetic against values worked by hand, then a store built
with known uploads, reviews, feedback and versions, checked through /api/stats, the page, its
charts and /metrics, on each storage back end (see docs/dashboard.md)."""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from datetime import datetime, timedelta

import pytest

from keras_serve.storage import quality_math as qm
from keras_serve.storage.quality_stats import CONFIDENCE_EDGES, StatsCache, drift_sentence
from keras_serve.storage.records import confidence_bin_of

TOKEN = "dashboard-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
NOW = datetime(2026, 12, 3, 12, 0, 0)
OTHER_VERSION = "b" * 64


# --- the arithmetic, by hand ------------------------------------------------------------------

def test_wilson_interval_matches_the_worked_values():
    # 8 of 10: p = .8, z = 1.96: centre (0.8 + z²/20) / (1 + z²/10) = 0.71674, half-width 0.22658
    low, high = qm.wilson_interval(8, 10)
    assert low == pytest.approx(0.49016, abs=1e-5) and high == pytest.approx(0.94331, abs=1e-5)
    low, high = qm.wilson_interval(10, 10)  # all right: the interval still has width
    assert low == pytest.approx(10 / (10 + qm.Z_95 ** 2)) and high == pytest.approx(1.0)
    low, high = qm.wilson_interval(0, 4)
    assert low == 0.0 and high == pytest.approx(0.48990, abs=1e-5)
    assert qm.wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        qm.wilson_interval(3, 2)


def test_confusion_matrix_accuracy_and_recall_include_a_label_no_model_predicts():
    counts = {("CAT", "CAT"): 5, ("CAT", "DOG"): 1, ("DOG", "DOG"): 3, ("DOG", "CAT"): 1, ("neither", "DOG"): 2}
    matrix = qm.confusion(counts, ["CAT", "DOG"])
    assert matrix.labels == ["CAT", "DOG", "neither"]
    assert matrix.matrix == [[5, 1, 0], [1, 3, 0], [0, 2, 0]]
    assert (matrix.correct, matrix.total) == (8, 12) and matrix.accuracy == pytest.approx(8 / 12)
    assert matrix.recall() == {"CAT": pytest.approx(5 / 6), "DOG": pytest.approx(3 / 4), "neither": 0.0}
    assert qm.confusion({}, ["CAT"]).accuracy is None and qm.confusion({}, ["CAT"]).recall() == {"CAT": None}


def test_expected_calibration_error_weights_each_bins_gap_by_its_size():
    bins = [qm.ReliabilityBin(0.9, 1.0, 10, 9.0, 6),    # 0.9 sure, 60% right: gap 0.3
            qm.ReliabilityBin(0.7, 0.8, 30, 21.0, 21),  # 0.7 sure, 70% right: no gap
            qm.ReliabilityBin(0.5, 0.6, 0, 0.0, 0)]     # empty: no weight
    assert qm.expected_calibration_error(bins) == pytest.approx(10 / 40 * 0.3)
    assert qm.expected_calibration_error([]) is None


def test_population_stability_index_and_its_words():
    # 50/50 -> 80/20: (.8 - .5) ln(.8/.5) + (.2 - .5) ln(.2/.5) = 0.14100 + 0.27489
    assert qm.population_stability_index([50, 50], [80, 20]) == pytest.approx(0.415888, abs=1e-6)
    assert qm.population_stability_index([1, 1], [3, 3]) == 0.0  # shares, not counts, are compared
    # an empty bin on one side is taken as 1e-4 of it, not as infinitely far
    # [1, 0] against [1, 1]: shares (1, 1e-4) against (0.5, 0.5)
    assert qm.population_stability_index([1, 0], [1, 1]) == pytest.approx(
        (0.5 - 1) * math.log(0.5 / 1) + (0.5 - 1e-4) * math.log(0.5 / 1e-4))
    assert qm.population_stability_index([0, 0], [1, 1]) is None
    assert [qm.psi_words(v) for v in (0.05, 0.1, 0.31, None)] == ["like", "somewhat unlike", "unlike",
                                                                   "not comparable"]
    assert drift_sentence("week", 0.31, 0.02, True) == (
        "This week's traffic is unlike the first week: PSI 0.31 on confidence, 0.02 on the predicted-label mix.")


def test_percentiles_are_read_from_bucket_counts_as_prometheus_does():
    # 10 values in [10, 20): the median is half way through the bucket
    assert qm.percentile_from_histogram([10, 20], [0, 10, 0], 0.5) == 15.0
    assert qm.percentile_from_histogram([10, 20], [0, 0, 4], 0.5) == 20.0  # the open bucket: its lower bound
    assert qm.percentile_from_histogram([10, 20], [0, 0, 0], 0.5) is None


def test_confidence_bins_are_exact_at_their_edges():
    assert [confidence_bin_of(v) for v in (0.0, 0.0999, 0.1, 0.3, 0.55, 0.9, 1.0)] == [0, 0, 1, 3, 5, 9, 9]
    assert CONFIDENCE_EDGES[2] == 0.3


def test_stats_cache_keeps_an_answer_for_its_time_only():
    clock = [0.0]
    cache = StatsCache(ttl_s=30, clock=lambda: clock[0])
    calls = []
    compute = lambda: calls.append(1) or len(calls)  # noqa: E731
    assert cache.get(("week", "a"), compute) == 1
    assert cache.get(("week", "a"), compute) == 1
    clock[0] = 31.0
    assert cache.get(("week", "a"), compute) == 2


# --- a store with known contents ------------------------------------------------------------------

def row(n: int, sha: str, received: datetime, label: str | None, confidence: float | None,
        ms: float | None, error: str | None = None) -> dict:
    return {"id": f"{n:032x}", "received": received, "bytes": 100, "sha256": "0" * 64, "image_key": f"k/{n}",
            "format": "PNG", "model": "colour.h5" if sha != OTHER_VERSION else "other.h5", "model_sha256": sha,
            "prediction": None if label is None else {"label": label, "confidence": confidence},
            "predicted_label": label, "confidence": confidence, "milliseconds": ms, "error": error}


@pytest.fixture()
def carded_model(colour_model_path, tmp_path):
    """The colour model with a model card that states a validation accuracy of 95%."""
    path = tmp_path / "model" / "colour.h5"
    path.parent.mkdir()
    shutil.copy(colour_model_path, path)
    path.with_suffix(".json").write_text(json.dumps({"validation": {"accuracy": 0.95, "images": 1000}}))
    return path


@pytest.fixture()
def known(make_app, carded_model, storage_config, no_retention_thread):
    """The served version's first week (10 answers), this week (10 answers, 1 failure), its
    reviews and visitors' feedback, another version, and a promotion and a rollback.

        first week   5 CAT at 0.95, 5 DOG at 0.75              (days 20-14 ago)
        this week    2 CAT at 0.95 (45 ms), 8 DOG at 0.55 (12 ms), 1 failure   (days 6-0 ago)
                     3 of them in the last day: CAT 0.95, DOG 0.55, the failure
        reviews      the 2 CAT confirmed; 5 DOG confirmed, 3 DOG corrected to CAT
        feedback     4 answers on this week's uploads, 1 disagrees
    """
    from keras_serve.storage.records import model_promotions

    app = make_app(MODEL_PATH=str(carded_model), ADMIN_TOKEN=TOKEN, **storage_config)
    service = app.extensions["classifier"]
    sha = service.model.info["sha256"]
    records = service.store.records
    app.extensions["quality_stats"].clock = lambda: NOW
    review_store = app.extensions["review_store"]
    rows = []
    for i in range(10):
        rows.append(row(i, sha, NOW - timedelta(days=20 - i * 0.5), "CAT" if i < 5 else "DOG",
                        0.95 if i < 5 else 0.75, 30.0))
    week = [("CAT", 0.95, 45.0)] * 2 + [("DOG", 0.55, 12.0)] * 8
    for j, (label, confidence, ms) in enumerate(week):
        # j = 0 (CAT) and j = 2 (DOG) arrive in the last day; the rest over the days before
        received = NOW - timedelta(hours=3) if j in (0, 2) else NOW - timedelta(days=1 + j * 0.5)
        rows.append(row(100 + j, sha, received, label, confidence, ms))
    rows.append(row(200, sha, NOW - timedelta(hours=2), None, None, None, error="The model failed."))
    for k in range(3):
        rows.append(row(300 + k, OTHER_VERSION, NOW - timedelta(days=2), "DOG", 0.99, 8.0))
    for r in rows:
        records.insert(r)
    review_store.clock = lambda: NOW
    review_store.review([(f"{100 + j:032x}", None) for j in range(7)], "ana")          # 2 CAT + 5 DOG confirmed
    review_store.review([(f"{100 + j:032x}", "CAT") for j in range(7, 10)], "ana")    # 3 DOG were cats
    for j, label in ((0, "CAT"), (2, "DOG"), (3, "DOG"), (4, "CAT")):                 # the last one disagrees
        review_store.add_feedback(f"{100 + j:032x}", label, f"client{j}", per_hour=100)
    with records.engine.begin() as conn:
        conn.execute(model_promotions.insert(), [
            {"sha256": OTHER_VERSION, "action": "promote", "by": "ana", "created": NOW - timedelta(days=2, hours=1)},
            {"sha256": None, "action": "rollback", "by": "ana", "created": NOW - timedelta(days=1, hours=20)}])
    app.sha = sha
    return app


def stats(app, **query) -> dict:
    response = app.test_client().get("/api/stats", query_string=query, headers=BEARER)
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def test_api_stats_gives_every_number_of_the_known_week(known):
    s = stats(known, window="week")
    assert s["model_version"] == known.sha and s["window"] == "week" and s["serving_now"] is True
    t = s["traffic"]
    assert (t["uploads"], t["answered"], t["errors"]) == (11, 10, 1)
    assert t["unsure"] == 8 and t["unsure_share"] == pytest.approx(0.8)  # the 0.55s are under UNSURE_BELOW 0.85
    assert t["errors_by_message"] == [{"message": "The model failed.", "count": 1}]
    assert t["bucket_hours"] == 24 and sum(b["uploads"] for b in t["per_bucket"]) == 11
    assert t["per_bucket"][-1] == {"start": "2026-12-03", "uploads": 3, "per_hour": 0.125, "errors": 1, "unsure": 1}
    # 8 answers of 12 ms in [10, 15): the median is 5/8 of the way; 2 of 45 ms in [40, 50): p95 is 3/4 of the way
    assert t["latency_ms"]["p50"] == pytest.approx(10 + 5 * 5 / 8)
    assert t["latency_ms"]["p95"] == pytest.approx(40 + 10 * 1.5 / 2)

    r = s["reviewed"]
    assert (r["count"], r["correct"], r["accuracy"]) == (10, 7, pytest.approx(0.7))
    # Wilson, 7 of 10: centre 0.89207 / 1.38415 = 0.64449, half-width 1.41601 * sqrt(0.021 + 0.0096) = 0.24772
    assert r["interval_95"] == [pytest.approx(0.3968, abs=1e-4), pytest.approx(0.8922, abs=1e-4)]
    assert r["confusion"] == {"labels": ["CAT", "DOG"], "rows_true_columns_predicted": [[2, 3], [0, 5]]}
    assert r["recall"] == {"CAT": pytest.approx(0.4), "DOG": pytest.approx(1.0)}
    assert [(b["low"], b["count"], b["accuracy"]) for b in r["reliability"]] == [
        (0.5, 8, pytest.approx(5 / 8)), (0.9, 2, pytest.approx(1.0))]
    assert r["reliability"][0]["mean_confidence"] == pytest.approx(0.55)
    # ECE: 8/10 * |0.625 - 0.55| + 2/10 * |1.0 - 0.95|
    assert r["ece"] == pytest.approx(0.8 * 0.075 + 0.2 * 0.05)
    assert r["validation_accuracy"] == 0.95
    assert s["feedback"] == {"count": 4, "disagree": 1, "disagreement_rate": 0.25}

    d = s["drift"]
    assert d["baseline"]["answered"] == 10 and d["baseline"]["complete"] is True
    assert d["baseline"]["from"] == "2026-11-13T12:00:00Z" and d["baseline"]["until"] == "2026-11-20T12:00:00Z"
    # first week: bins 0.7 and 0.9 half each; this week: 0.5 at 80%, 0.9 at 20%; empty bins count as 1e-4
    e = 1e-4
    psi_confidence = (0.8 - e) * math.log(0.8 / e) + (e - 0.5) * math.log(e / 0.5) + (0.2 - 0.5) * math.log(0.2 / 0.5)
    assert d["confidence"]["psi"] == pytest.approx(psi_confidence)
    psi_labels = (0.2 - 0.5) * math.log(0.2 / 0.5) + (0.8 - 0.5) * math.log(0.8 / 0.5)
    assert d["labels"]["psi"] == pytest.approx(psi_labels)
    assert d["sentence"] == (f"This week's traffic is unlike the first week: PSI {psi_confidence:.2f} on confidence, "
                             f"{psi_labels:.2f} on the predicted-label mix.")
    assert [v["sha256"] for v in s["versions"]] == [known.sha, OTHER_VERSION]
    assert [(e["action"], e["sha256"]) for e in s["timeline"]] == [("promote", OTHER_VERSION), ("rollback", None)]


def test_windows_day_and_all_and_another_version(known):
    day = stats(known, window="day")
    assert (day["traffic"]["uploads"], day["traffic"]["errors"], day["traffic"]["unsure"]) == (3, 1, 1)
    assert day["traffic"]["bucket_hours"] == 1 and day["reviewed"]["count"] == 2
    assert day["feedback"] == {"count": 2, "disagree": 0, "disagreement_rate": 0.0}
    everything = stats(known, window="all")
    assert everything["traffic"]["uploads"] == 21 and everything["reviewed"]["count"] == 10
    assert everything["from"] == "2026-11-13T12:00:00Z"
    other = stats(known, window="week", model_version=OTHER_VERSION)
    assert other["traffic"]["uploads"] == 3 and other["serving_now"] is False
    assert other["reviewed"]["accuracy"] is None and other["reviewed"]["interval_95"] is None
    assert other["drift"]["baseline"]["complete"] is False  # its first week is not over
    assert other["drift"]["confidence"]["psi"] == pytest.approx(0.0)


def test_bad_parameters_are_a_400_with_the_error_body_and_an_unknown_version_a_404(known):
    client = known.test_client()
    for query in ({"window": "year"}, {"window": "<script>"}, {"model_version": "abc"},
                  {"model_version": "g" * 64}, {"model_version": "a" * 65}):
        response = client.get("/api/stats", query_string=query, headers=BEARER)
        assert response.status_code == 400, query
        error = response.get_json()["error"]
        assert error["status"] == 400 and error["message"] and "docs/dashboard.md" in error["hint"]
        assert error["request_id"]
    response = client.get("/api/stats", query_string={"model_version": "c" * 64}, headers=BEARER)
    assert response.status_code == 404 and response.get_json()["error"]["status"] == 404
    assert client.get("/admin/charts/nothing.svg", headers=BEARER).status_code == 404
    assert client.get("/admin", query_string={"window": "year"}, headers=BEARER).status_code == 400


def test_the_page_shows_the_same_numbers_with_no_inline_script_or_style(known):
    response = known.test_client().get("/admin?window=week", headers={**BEARER, "Accept": "text/html"})
    assert response.status_code == 200
    csp = response.headers["Content-Security-Policy"]
    assert "unsafe-inline" not in csp and "script-src 'self'" in csp and "style-src 'self'" in csp
    assert response.headers["Cache-Control"] == "no-store"
    html = response.get_data(as_text=True)
    assert "<script" not in html and " style=" not in html and "<style" not in html
    assert not re.search(r'(src|href)="(https?:)?//', html)  # nothing from another site
    stat = dict(re.findall(r'data-stat="([a-z_0-9]+)">([^<]*)<', html))
    assert stat["uploads"] == "11" and stat["unsure_share"] == "80.0%" and stat["accuracy"] == "70.0%"
    assert stat["interval"] == "39.7% to 89.2%" and stat["ece"] == "0.070" and stat["disagreement"].startswith("1 of 4")
    assert stat["p50"] == "13.1 ms" and stat["p95"] == "47.5 ms"
    assert stat["psi_labels"] == "0.416"
    assert "below it by more than its interval" in html  # 89.2% < the card's 95%
    assert "This week&#39;s traffic is unlike the first week" in html
    confusion = re.search(r'<table id="confusion-table".*?</table>', html, re.S).group(0)
    assert re.findall(r"<td[^>]*>(\d+)</td>", confusion) == ["2", "3", "0", "5"]
    for name in ("traffic", "confidence", "labels", "reliability", "recall", "latency"):
        assert f"/admin/charts/{name}.svg?window=week" in html


def test_every_chart_is_an_svg_image_without_script(known):
    client = known.test_client()
    for name in ("traffic", "confidence", "labels", "reliability", "recall", "latency"):
        response = client.get(f"/admin/charts/{name}.svg", query_string={"window": "week"}, headers=BEARER)
        assert response.status_code == 200 and response.mimetype == "image/svg+xml"
        svg = response.get_data(as_text=True)
        assert svg.startswith("<svg") and "<script" not in svg and "http-equiv" not in svg
        assert "script-src" not in response.headers["Content-Security-Policy"]  # default-src 'none' covers it
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    labels = client.get("/admin/charts/labels.svg?window=week", headers=BEARER).get_data(as_text=True)
    assert "first week" in labels and "this window" in labels and "80%" in labels  # legend and printed values


def test_admin_is_off_without_a_token_and_needs_the_credential(make_app, colour_model_path, tmp_path, known):
    off = make_app(MODEL_PATH=str(colour_model_path), UPLOAD_DIR=str(tmp_path / "off")).test_client()
    for path in ("/admin", "/api/stats", "/admin/charts/traffic.svg"):
        assert off.get(path, headers=BEARER).status_code == 404, path
    client = known.test_client()
    for path in ("/api/stats", "/admin/charts/traffic.svg", "/admin"):
        assert client.get(path).status_code == 401, path
        assert client.get(path, headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"}).status_code == 401
    page = client.get("/admin", headers={"Accept": "text/html"})
    assert page.status_code == 303 and page.headers["Location"].endswith("/review/login?next=/admin")


def test_api_stats_is_in_the_openapi_document(known):
    document = known.test_client().get("/openapi.json").get_json()
    operation = document["paths"]["/api/stats"]["get"]
    assert operation["operationId"] == "getStats"
    assert document["paths"]["/admin"]["get"]["operationId"] == "getDashboard"
    assert set(operation["responses"]) >= {"200", "400", "401", "404"}
    assert "window" in operation["description"]
    name = next(p for p in document["paths"]["/admin/charts/{name}.svg"]["get"]["parameters"] if p["name"] == "name")
    assert "reliability" in name["schema"]["enum"]


def test_openapi_leaves_the_dashboard_out_while_admin_is_off(make_app, colour_model_path, tmp_path):
    off = make_app(MODEL_PATH=str(colour_model_path), UPLOAD_DIR=str(tmp_path / "off")).test_client()
    paths = off.get("/openapi.json").get_json()["paths"]
    assert "/api/stats" not in paths and "/admin" not in paths and "/healthz" in paths


# --- Prometheus ----------------------------------------------------------------------------------

def scrape(app) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = app.test_client().get("/metrics").get_data(as_text=True)
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_metrics_carry_the_quality_numbers_with_labels_from_closed_sets(known):
    samples = scrape(known)

    def value(name, **labels):
        return samples[(name, tuple(sorted(labels.items())))]

    current = {"model_version": "current", "window": "week"}
    assert value("keras_serve_quality_answered", **current) == 10
    assert value("keras_serve_quality_unsure_share", **current) == pytest.approx(0.8)
    assert value("keras_serve_quality_visitor_disagreement", **current) == pytest.approx(0.25)
    assert value("keras_serve_quality_reviewed", **current) == 10
    assert value("keras_serve_quality_reviewed_accuracy", **current) == pytest.approx(0.7)
    assert value("keras_serve_quality_reviewed_accuracy_low", **current) == pytest.approx(0.3968, abs=1e-4)
    assert value("keras_serve_quality_reviewed_accuracy_high", **current) == pytest.approx(0.8922, abs=1e-4)
    assert value("keras_serve_quality_validation_accuracy", model_version="current") == 0.95
    assert value("keras_serve_quality_drift_psi", feature="label", **current) == pytest.approx(0.415888, abs=1e-6)
    assert value("keras_serve_quality_answered", model_version="current", window="day") == 2
    assert value("keras_serve_quality_answered", model_version="previous", window="week") == 3
    # nothing reviewed for the previous version: no accuracy series rather than a 0
    assert ("keras_serve_quality_reviewed_accuracy", (("model_version", "previous"), ("window", "week"))) not in samples
    assert value("keras_serve_storage_breaker_open", component="records") == 0
    assert value("keras_serve_storage_up", component="images") == 1
    for (name, labels) in samples:
        labels = dict(labels)
        if name.startswith("keras_serve_quality_"):
            assert labels["model_version"] in ("current", "previous")
            assert labels.get("window", "day") in ("day", "week")
            assert labels.get("feature", "label") in ("label", "confidence")


def test_the_breaker_metric_follows_a_store_that_timed_out(make_app, colour_model_path, tmp_path):
    from keras_serve.errors import StorageError

    # no background check during the test: one would close the breaker again at once
    app = make_app(MODEL_PATH=str(colour_model_path), UPLOAD_DIR=str(tmp_path / "u"), STORE_CHECK_INTERVAL_S=3600)
    health = app.extensions["classifier"].store.records_health
    clock = [time.monotonic() + 60]  # after every check the store's monitor has made
    health.clock = lambda: clock[0]
    with pytest.raises(StorageError):
        with health.call():
            clock[0] += health.slow_after_s + 0.1  # a failure that took this long was a timeout
            raise StorageError("timed out")
    assert health.breaker_open()
    samples = scrape(app)
    assert samples[("keras_serve_storage_breaker_open", (("component", "records"),))] == 1
    assert samples[("keras_serve_storage_breaker_open", (("component", "images"),))] == 0


def test_a_week_follows_a_delete_of_a_past_day_and_an_upload_of_today_at_once(known):
    from keras_serve.storage.quality_stats import QualityStats

    records = known.extensions["classifier"].store.records
    quality = QualityStats(records, clock=lambda: NOW)
    assert quality.stats(known.sha, "week", 0.85)["traffic"]["uploads"] == 11
    records.delete([f"{100 + 9:032x}"])                    # an upload of a past day (5.5 days ago) goes
    records.insert(row(400, known.sha, NOW - timedelta(minutes=5), "CAT", 0.99, 5.0))  # one arrives now
    traffic = quality.stats(known.sha, "week", 0.85)["traffic"]
    assert traffic["uploads"] == 11 - 1 + 1  # the past day's running count and today's uploads, both as of now
    assert QualityStats(records, clock=lambda: NOW).stats(known.sha, "week", 0.85)["traffic"] == traffic


# --- "all" from the running review totals, against a count from scratch -----------------------

def _scratch_reviewed(stats, sha, labels):
    """The reviewed numbers of everything up to NOW, read from the reviewed uploads themselves."""
    from keras_serve.storage.quality_stats import Window

    with stats.records._connect() as conn:
        return stats._reviewed(conn, sha, Window("all", datetime(2000, 1, 1), NOW), labels)


def _assert_same_numbers(got, want, where="reviewed"):
    """Equal in every count, label and bin; floats equal but for rounding in the last digits (a
    running sum adds the same confidences in another order than SUM() does)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key in want:
            _assert_same_numbers(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same_numbers(a, b, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(got, int):
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15), where
    else:
        assert got == want and type(got) is type(want), where


def _totals_rows(records):
    import sqlalchemy as sa

    from keras_serve.storage.records import review_totals
    with records._connect() as conn:
        return {(r.model_sha256, r.confidence_bin, r.predicted_label, r.review_label): (r.reviewed, r.confidence_sum)
                for r in conn.execute(sa.select(review_totals))}


def _rebuilt_totals(records):
    """What the migration's backfill makes of the same rows (in a transaction rolled back)."""
    from keras_serve.storage.records import rebuild_review_totals

    with records.engine.connect() as conn:
        trans = conn.begin()
        rebuild_review_totals(conn)
        import sqlalchemy as sa

        from keras_serve.storage.records import review_totals
        rows = {(r.model_sha256, r.confidence_bin, r.predicted_label, r.review_label): (r.reviewed, r.confidence_sum)
                for r in conn.execute(sa.select(review_totals))}
        trans.rollback()
    return rows


def _assert_totals_match(records):
    kept, rebuilt = _totals_rows(records), _rebuilt_totals(records)
    assert kept.keys() == rebuilt.keys()
    for key, (count, total) in rebuilt.items():
        assert kept[key][0] == count and kept[key][1] == pytest.approx(total, rel=1e-12, abs=1e-12), key


def test_all_window_from_review_totals_equals_a_count_from_scratch_after_random_changes(make_store):
    import random

    from keras_serve.storage.quality_stats import QualityStats
    from keras_serve.storage.reviewing import ReviewStore

    store = make_store()
    records = store.records
    reviews = ReviewStore(records, clock=lambda: NOW)
    rng = random.Random(33)
    versions = ("a" * 64, OTHER_VERSION)
    labels = ["CAT", "DOG"]
    # confidences on and beside the bins' edges, and one upload received after NOW (a clock
    # ahead): "all" then counts it from the uploads, as the window's end excludes it
    edges = [0.0, 0.0999, 0.1, 0.5, 0.8999999, 0.9, 0.95, 1.0]
    ids = []
    for n in range(120):
        failed = n % 17 == 0
        received = NOW - timedelta(hours=rng.randrange(1, 24 * 40)) if n != 7 else NOW + timedelta(minutes=5)
        upload_id = f"{n:032x}"
        ids.append(upload_id)
        records.insert({"id": upload_id, "received": received, "bytes": 10, "sha256": "0" * 64, "format": "PNG",
                        "image_key": f"x/{upload_id}.png", "model": "m.h5", "model_sha256": versions[n % 2],
                        "predicted_label": None if failed else rng.choice(labels),
                        "confidence": None if failed else (rng.choice(edges) if n % 3 == 0 else rng.random()),
                        "error": "The model failed." if failed else None})
    stats = QualityStats(records, clock=lambda: NOW)
    copied = 0
    for step in range(60):
        action = rng.choice(("review", "review", "rereview", "bulk", "delete", "copy"))
        if action in ("review", "rereview"):
            chosen = rng.sample(ids, rng.randrange(1, 6))
            reviews.review([(i, rng.choice(labels + ["neither", None])) for i in chosen], "alice")
        elif action == "bulk":
            reviews.review([(i, None) for i in rng.sample(ids, 10)], "bulk", confirm_unreviewed_only=True)
        elif action == "delete":  # what retention does
            gone = rng.sample(ids, 3)
            records.delete(gone)
            ids = [i for i in ids if i not in gone]
        else:  # an imported (copied) upload that was reviewed in its first store
            copied += 1
            upload_id = f"c{copied:031x}"
            records.insert_if_absent({"id": upload_id, "received": NOW - timedelta(days=2), "bytes": 10,
                                      "sha256": "0" * 64, "format": "PNG", "image_key": f"x/{upload_id}.png",
                                      "model": "m.h5", "model_sha256": versions[0], "predicted_label": "CAT",
                                      "confidence": rng.random(), "review_state": 2, "review_label": "DOG",
                                      "reviewed_at": NOW - timedelta(days=1)})
            ids.append(upload_id)
        _assert_totals_match(records)
        for sha in versions:
            from_totals = stats.stats(sha, "all", 0.5, labels)["reviewed"]
            _assert_same_numbers(from_totals, _scratch_reviewed(stats, sha, labels))
    final = stats.stats(versions[0], "all", 0.5, labels)["reviewed"]
    assert final["count"] > 10 and final["ece"] is not None  # the sequence did review a good share


def test_the_migration_counts_the_reviews_of_a_database_made_before_the_totals(make_store):
    import sqlalchemy as sa

    from keras_serve.storage.reviewing import ReviewStore

    store = make_store()
    records = store.records
    for n in range(30):
        records.insert({"id": f"{n:032x}", "received": NOW - timedelta(hours=n), "bytes": 10, "sha256": "0" * 64,
                        "format": "PNG", "image_key": f"x/{n}.png", "model_sha256": "a" * 64,
                        "predicted_label": "CAT", "confidence": n / 30})
    ReviewStore(records).review([(f"{n:032x}", "DOG" if n % 4 else None) for n in range(0, 30, 2)], "alice")
    before = _totals_rows(records)
    assert sum(count for count, _ in before.values()) == 15
    with records.engine.begin() as conn:  # the database as schema 6 left it
        conn.execute(sa.text("DROP TABLE review_totals"))
        conn.execute(sa.text("DELETE FROM schema_migrations WHERE version = 7"))
    records.migrate()
    after = _totals_rows(records)
    assert after.keys() == before.keys()
    assert all(after[k][0] == before[k][0] and after[k][1] == pytest.approx(before[k][1]) for k in before)


def test_logging_in_from_the_dashboard_lands_back_on_it_and_only_a_path_here_is_followed(known):
    client = known.test_client()
    html = {"Accept": "text/html"}
    sent = client.get("/admin?window=all", headers=html)
    assert sent.status_code == 303
    form = client.get(sent.headers["Location"], headers=html).get_data(as_text=True)
    assert '<input type="hidden" name="next" value="/admin?window=all">' in form

    def log_in(next_value):
        page = client.get("/review/login", headers=html).get_data(as_text=True)
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        return client.post("/review/login", headers=html,
                           data={"csrf_token": csrf, "token": TOKEN, "name": "ana", "next": next_value})

    landed = log_in("/admin?window=all")
    assert landed.status_code == 303 and landed.headers["Location"] == "/admin?window=all"
    assert client.get(landed.headers["Location"], headers=html).status_code == 200
    # anything that could leave the site is ignored: the login goes to the review page
    for hostile in ("https://evil.example/admin", "//evil.example/admin", "/\\evil.example", "\\/evil.example",
                    "http:/admin", "javascript:alert(1)", "/admin\r\nSet-Cookie: x=1", " /admin", "admin", ""):
        landed = log_in(hostile)
        assert landed.status_code == 303, hostile
        assert landed.headers["Location"] in ("/review", "http://localhost/review"), hostile
    # and a hostile next in the form's own address never reaches the form
    form = client.get("/review/login?next=//evil.example", headers=html).get_data(as_text=True)
    assert 'name="next"' not in form
