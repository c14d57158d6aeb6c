"""deploy/prometheus/alerts.yml and deploy/grafana/keras-serve-dashboard.json: the rules pass
Prometheus' own checker and unit tests (promtool, run for real on synthetic series), and every
metric name they or the Grafana panels use is one the server exports."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
GRAFANA = ROOT / "deploy" / "grafana" / "keras-serve-dashboard.json"
METRIC = re.compile(r"\bkeras_serve_[a-z0-9_]+")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",),
            "summary": ("_sum", "_count", ""), "unknown": ("",)}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool not found: install Debian's prometheus package (apt-get install prometheus), "
                    "as .ci/run does")
    return found


def test_promtool_checks_the_rules():
    result = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 7 rules found" in result.stdout


def test_promtool_unit_tests_fire_each_alert_on_its_synthetic_series():
    result = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {test["alertname"] for group in yaml.safe_load(RULE_TESTS.read_text())["tests"]
              for test in group.get("alert_rule_test", []) if test.get("exp_alerts")}
    defined = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    assert tested == defined  # every alert is shown firing at least once


def test_promtool_unit_tests_can_fail(tmp_path):
    """The same tests against rules whose threshold moved: promtool must say so (the test is not vacuous)."""
    (tmp_path / "alerts.yml").write_text(RULES.read_text().replace('window="day"}) > 0.2', 'window="day"}) > 0.4'))
    shutil.copy(RULE_TESTS, tmp_path / "alerts.test.yml")
    result = subprocess.run([promtool(), "test", "rules", "alerts.test.yml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode != 0 and "KerasServeUnsureShareHigh" in result.stdout + result.stderr


@pytest.fixture(scope="module")
def exported_names(tmp_path_factory, colour_model_path) -> set[str]:
    """Every series name the server's /metrics declares (the quality series included)."""
    from prometheus_client.parser import text_string_to_metric_families

    from keras_serve import create_app

    app = create_app({"UPLOAD_DIR": str(tmp_path_factory.mktemp("uploads")), "MODEL_PATH": str(colour_model_path),
                      "TESTING": True})
    try:
        text = app.test_client().get("/metrics").get_data(as_text=True)
    finally:
        app.extensions["classifier"].close()
    return {family.name + suffix for family in text_string_to_metric_families(text)
            for suffix in SUFFIXES[family.type]}


def test_every_metric_the_rules_use_is_exported(exported_names):
    rules = yaml.safe_load(RULES.read_text())
    used = {name for group in rules["groups"] for rule in group["rules"] for name in METRIC.findall(rule["expr"])}
    assert used and used <= exported_names, sorted(used - exported_names)


def test_the_grafana_dashboard_is_valid_and_its_queries_use_exported_metrics(exported_names):
    dashboard = json.loads(GRAFANA.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
    queries = [t["expr"] for p in panels for t in p.get("targets", [])]
    queries += [a["expr"] for a in dashboard["annotations"]["list"]]
    used = {name for query in queries for name in METRIC.findall(query)}
    assert used <= exported_names, sorted(used - exported_names)
    # the same panels as /admin: traffic, latency, errors, unsure, people's accuracy, disagreement, drift, breakers
    for needed in ("keras_serve_uploads_stored_total", "keras_serve_http_request_duration_seconds_bucket",
                   "keras_serve_http_requests_total", "keras_serve_quality_unsure_share",
                   "keras_serve_quality_reviewed_accuracy", "keras_serve_quality_validation_accuracy",
                   "keras_serve_quality_visitor_disagreement", "keras_serve_quality_drift_psi",
                   "keras_serve_storage_breaker_open", "keras_serve_model_info"):
        assert needed in used, needed


def test_the_grafana_queries_parse(tmp_path):
    """Each panel's query as a recording rule: promtool's parser must accept them all."""
    dashboard = json.loads(GRAFANA.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [a["expr"] for a in dashboard["annotations"]["list"]]
    rule_file = tmp_path / "panels.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": [
        {"record": f"grafana:panel_{i}", "expr": q} for i, q in enumerate(queries)]}]}))
    result = subprocess.run([promtool(), "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
