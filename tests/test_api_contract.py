"""The API contract (/openapi.json), request ids and the per-request log line.

The Schemathesis run checks a live `python app.py` against the document the server publishes:
every operation, every check (`st run --checks all`), 0 failures allowed. Settings for it:
tests/schemathesis.toml. Reproduce by hand (server on :8080):

    st --config-file tests/schemathesis.toml run http://127.0.0.1:8080/openapi.json --checks all
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from images import BLUE, image_bytes
from server_process import ROOT, ServerProcess
from waiting import wait_until

HEX_ID = re.compile(r"[0-9a-f]{32}")
ST = Path(sys.executable).with_name("st")
SCHEMATHESIS_SEED = 20261202
SCHEMATHESIS_EXAMPLES = 25  # per operation and phase; about 600 requests in all


@pytest.fixture(scope="module")
def live(colour_model_path, tmp_path_factory):
    """`python app.py` with the colour model, a 1 MB body limit and JSON logs (the default)."""
    uploads = tmp_path_factory.mktemp("contract-uploads")
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(uploads),
                       "--max-upload-mb", "1") as srv:
        yield srv


def access_line(server: ServerProcess, request_id: str, timeout: float = 5.0) -> dict:
    """The access log line of one request (the server writes it just after answering)."""
    def found() -> list[dict]:
        return [line for line in server.log_lines()
                if line.get("logger") == "keras_serve.access" and line.get("request_id") == request_id]

    wait_until(found, timeout, every=0.05)
    lines = found()
    assert len(lines) == 1, f"{len(lines)} access lines for {request_id}: {server.output()[-3000:]}"
    return lines[0]


# --- the document -----------------------------------------------------------------------------

def test_every_route_the_app_serves_is_in_the_contract(app):
    from keras_serve.web.openapi import undescribed_routes

    missing = undescribed_routes(app)
    assert not missing, "routes without a declared contract:\n" + "\n".join(missing)


def test_a_new_route_without_a_contract_is_named_with_what_to_add(make_app, colour_model_path):
    from keras_serve.web.api_models import Liveness
    from keras_serve.web.openapi import build_spec, json_body, operation, undescribed_routes

    app = make_app(MODEL_PATH=str(colour_model_path))

    def thumbnail(upload_id: str):
        return "webp"

    app.add_url_rule("/uploads/<upload_id>/small.webp", "thumbnail", thumbnail)
    missing = undescribed_routes(app)
    assert len(missing) == 1, missing
    assert missing[0].startswith("GET /uploads/<upload_id>/small.webp (endpoint 'thumbnail', view ")
    assert "add @operation(" in missing[0] and "keras_serve.web.openapi" in missing[0]
    assert "/uploads/{upload_id}/small.webp" not in build_spec(app)["paths"]

    operation("A thumbnail", responses={200: json_body(Liveness)})(thumbnail)
    assert undescribed_routes(app) == []
    described = build_spec(app)["paths"]["/uploads/{upload_id}/small.webp"]["get"]
    assert [p["name"] for p in described["parameters"] if p["in"] == "path"] == ["upload_id"]


def test_the_document_is_openapi_3_1_and_every_answer_has_the_request_id_and_error_body(client, app):
    answer = client.get("/openapi.json")
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json"
    doc = answer.get_json()
    assert doc["openapi"] == "3.1.0"
    from keras_serve.web.openapi import ADMIN_BLUEPRINTS

    # The admin's routes are routed but 404 while no admin token is set: out of the document then.
    served = {(re.sub(r"<(?:[^<>:]+:)?([^<>:]+)>", r"{\1}", rule.rule), method.lower())
              for rule in app.url_map.iter_rules() for method in rule.methods - {"HEAD", "OPTIONS"}
              if rule.endpoint.partition(".")[0] not in ADMIN_BLUEPRINTS}
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    # POST /file is POST /file/ without its slash: served, listed once under /file/.
    assert documented == served - {("/file", "post")}
    assert "/file" not in doc["paths"]
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            assert op["summary"] and op["operationId"], (method, path)
            assert "500" in op["responses"], (method, path)
            for status, response in op["responses"].items():
                assert "X-Request-ID" in response["headers"], (method, path, status)
                if status in ("400", "404", "413", "415", "422", "500") or (status == "503" and path != "/readyz"):
                    schema = response["content"]["application/json"]["schema"]
                    if path == "/file/" and status != "500":  # several files, all refused: their results
                        assert schema == {"oneOf": [error_ref, {"$ref": "#/components/schemas/ClassificationList"}]}
                    else:
                        assert schema == error_ref, (method, path, status)
    upload = doc["paths"]["/file/"]["post"]
    assert upload["requestBody"]["content"]["multipart/form-data"]["schema"]["required"] == ["file"]
    assert upload["responses"]["200"]["links"]["UploadRecord"]["operationId"] == "getUploadRecord"
    detail = doc["components"]["schemas"]["ErrorDetail"]
    assert {"status", "code", "message", "hint", "request_id"} <= set(detail["required"])


def test_operation_ids_are_readable_unique_and_the_links_point_at_them(make_app, colour_model_path):
    app = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN="a" * 32)
    doc = app.test_client().get("/openapi.json").get_json()
    ids = {f"{method.upper()} {path}": op["operationId"] for path, item in doc["paths"].items()
           for method, op in item.items()}
    assert len(set(ids.values())) == len(ids)
    assert all(re.fullmatch(r"[a-z]+(?:[A-Z0-9][a-z0-9]*)*", name) for name in ids.values()), ids
    assert ids["POST /file/"] == "classify" and ids["GET /uploads/{upload_id}/record"] == "getUploadRecord"
    assert ids["GET /api/uploads"] == "listUploads" and ids["GET /openapi.json"] == "getOpenApiDocument"
    for link in doc["paths"]["/file/"]["post"]["responses"]["200"]["links"].values():
        assert link["operationId"] in ids.values()


def test_several_file_parts_are_described_as_an_array_of_binaries(client):
    body = client.get("/openapi.json").get_json()["paths"]["/file/"]["post"]["requestBody"]
    form = body["content"]["multipart/form-data"]
    files = form["schema"]["properties"]["file"]
    assert files["type"] == "array" and files["minItems"] == 1 and files["maxItems"] == 20
    assert files["items"]["format"] == "binary" and files["items"]["contentMediaType"] == "image/*"
    assert "image/*" in form["encoding"]["file"]["contentType"]
    schemas = client.get("/openapi.json").get_json()["components"]["schemas"]
    assert "filename" in schemas["ClassifiedItem"]["required"] and "filename" in schemas["ItemError"]["required"]


def test_security_follows_the_configuration(make_app, colour_model_path):
    """No scheme while nothing needs a credential; API tokens on POST /file/ and the heatmap when
    set (optional with anonymous uploads); the admin's bearer or cookie on every admin route but
    the login."""
    plain = make_app(MODEL_PATH=str(colour_model_path)).test_client().get("/openapi.json").get_json()
    assert "securitySchemes" not in plain.get("components", {})
    assert not [op for item in plain["paths"].values() for op in item.values() if "security" in op]

    doc = make_app(MODEL_PATH=str(colour_model_path), API_TOKENS="t" * 24,
                   ADMIN_TOKEN="a" * 32).test_client().get("/openapi.json").get_json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["apiToken"] == {**schemes["apiToken"], "type": "http", "scheme": "bearer"}
    assert schemes["adminToken"]["scheme"] == "bearer"
    assert schemes["adminSession"] == {**schemes["adminSession"], "type": "apiKey", "in": "cookie",
                                       "name": "keras_serve_review"}
    guarded = {(method, path) for path, item in doc["paths"].items() for method, op in item.items()
               if op.get("security") == [{"apiToken": []}]}
    assert guarded == {("post", "/file/"), ("get", "/uploads/{upload_id}/heatmap.png")}
    admin = [{"adminToken": []}, {"adminSession": []}]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            is_admin = path.startswith(("/api/uploads", "/api/models", "/api/stats", "/admin", "/review"))
            public = path == "/review/login"
            assert (op.get("security") == admin) == (is_admin and not public), (method, path)

    anonymous = make_app(MODEL_PATH=str(colour_model_path), API_TOKENS="t" * 24, ALLOW_ANONYMOUS_UPLOADS=True)
    classify = anonymous.test_client().get("/openapi.json").get_json()["paths"]["/file/"]["post"]
    assert classify["security"] == [{"apiToken": []}, {}]


def test_schemathesis_finds_no_failure_on_any_route(live, tmp_path):
    """Every operation, all checks, all phases (examples, coverage, fuzzing, stateful links)."""
    doc = requests.get(live.url + "/openapi.json", timeout=10).json()
    operations = sum(len(item) for item in doc["paths"].values())
    report = tmp_path / "schemathesis.json"
    done = subprocess.run(
        [str(ST), "--config-file", str(ROOT / "tests" / "schemathesis.toml"), "run", live.url + "/openapi.json",
         "--checks", "all", "--max-examples", str(SCHEMATHESIS_EXAMPLES), "--seed", str(SCHEMATHESIS_SEED),
         # One worker: on CPython 3.11.7 two threads in ast.parse (Hypothesis describing its
         # filters) trip "AST constructor recursion depth mismatch" (CPython gh-106905).
         "--workers", "1", "--request-timeout", "30", "--report", "json", "--report-json-path", str(report)],
        cwd=tmp_path, capture_output=True, text=True, timeout=540, env={**os.environ, "NO_COLOR": "1"})
    summary = json.loads(report.read_text())
    counts = summary["test_cases"]
    print(f"schemathesis: {summary['operations']['tested']} operations, {counts['generated']} cases, "
          f"{counts['with_failures']} with failures, {len(summary['errors'])} errors")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert summary["failures"] == [] and summary["errors"] == [] and counts["with_failures"] == 0
    # Schemathesis leaves out the document's own URL (GET /openapi.json); every other operation runs.
    assert summary["operations"]["tested"] == operations - 1, summary["operations"]
    assert all(phase["status"] == "success" for phase in summary["phases"].values()), summary["phases"]
    assert not [line for line in live.log_lines() if line["level"] == "ERROR"], "the server logged an error"
    assert "Traceback" not in live.output()


# --- request ids --------------------------------------------------------------------------------

@pytest.mark.parametrize("sent,kept", [
    ("req-42", True),
    ("0f8fad5b-d9cb-469f-a165-70867728950e", True),   # a UUID, as proxies send
    ("trace:abc.DEF_1", True),
    ("a" * 128, True),
    ("a" * 129, False),           # too long
    ("two words", False),         # a space
    ("x<script>", False),
    ("", False),
])
def test_a_sane_request_id_is_kept_and_anything_else_replaced(client, sent, kept):
    answer = client.get("/no/such/page", headers={"X-Request-ID": sent})
    request_id = answer.headers["X-Request-ID"]
    assert answer.get_json()["error"]["request_id"] == request_id
    if kept:
        assert request_id == sent
    else:
        assert HEX_ID.fullmatch(request_id)


def test_every_answer_has_its_own_id_and_the_error_page_shows_it(client):
    ids = {client.get("/healthz").headers["X-Request-ID"] for _ in range(3)}
    assert len(ids) == 3 and all(HEX_ID.fullmatch(i) for i in ids)
    page = client.post("/file/", data={}, headers={"Accept": "text/html", "X-Request-ID": "page-7"})
    assert page.status_code == 400 and page.headers["X-Request-ID"] == "page-7"
    assert '<code id="request-id">page-7</code>' in page.get_data(as_text=True)


def test_one_json_log_line_per_request_with_route_status_latency_and_upload(live):
    secret = "s3cr3t-token-value"
    headers = {"X-Request-ID": "log-upload-1", "Authorization": f"Bearer {secret}", "Cookie": f"session={secret}"}
    answer = requests.post(live.url + "/file/", files={"file": ("b.png", image_bytes(BLUE, fmt="PNG"))},
                           headers=headers, timeout=30)
    assert answer.status_code == 200 and answer.headers["X-Request-ID"] == "log-upload-1"
    upload_id = answer.json()["id"]
    line = access_line(live, "log-upload-1")
    assert {k: line[k] for k in ("logger", "level", "method", "route", "status", "upload_id")} == {
        "logger": "keras_serve.access", "level": "INFO", "method": "POST", "route": "/file/", "status": 200,
        "upload_id": upload_id}
    assert isinstance(line["latency_ms"], float) and 0 < line["latency_ms"] < 30_000 and line["time"]

    record = requests.get(f"{live.url}/uploads/{upload_id}/record", headers={"X-Request-ID": "log-record-1"},
                          timeout=10)
    assert record.status_code == 200
    line = access_line(live, "log-record-1")
    assert line["route"] == "/uploads/<upload_id>/record" and line["upload_id"] == upload_id  # the rule, not the path

    # A path a scanner invents is not logged as a route, and a made-up id is not logged as an upload id.
    requests.get(live.url + "/uploads/..%2F..%2Fetc%2Fpasswd/record", headers={"X-Request-ID": "log-probe"},
                 timeout=10)
    probe = access_line(live, "log-probe")
    assert probe["status"] == 404 and "upload_id" not in probe
    assert secret not in live.output()


def raw_exchange(port: int, request: bytes) -> tuple[bytes, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return head, body


@pytest.mark.parametrize("request_bytes,status,kept", [
    # A body over the 1 MB limit: waitress answers 413 from the headers, which it has parsed.
    (b"POST /file/ HTTP/1.1\r\nHost: test\r\nContent-Length: 99999999\r\nX-Request-ID: big-1\r\n\r\n", 413, "big-1"),
    # Bare LF line ends: 400 before the headers are parsed, so the id is a new one.
    (b"GET / HTTP/1.1\nHost: test\nX-Request-ID: raw-lf-1\n\n", 400, None),
])
def test_waitress_own_error_answers_carry_a_request_id_and_a_log_line(live, request_bytes, status, kept):
    head, body = raw_exchange(live.port, request_bytes)
    assert re.match(rb"HTTP/1\.[01] %d " % status, head), head
    header_id = re.search(rb"\r\nX-Request-ID: ([^\r\n]+)", head, re.IGNORECASE).group(1).decode()
    assert header_id == kept if kept else HEX_ID.fullmatch(header_id)
    assert json.loads(body)["error"]["request_id"] == header_id
    line = access_line(live, header_id)
    assert line["status"] == status and line["route"] is None


def test_text_log_format_keeps_the_fields_for_people():
    import logging

    from keras_serve.web.request_log import TextFormatter

    record = logging.LogRecord("keras_serve.access", logging.INFO, __file__, 1, "%s %s %d",
                               ("GET", "/model", 200), None)
    record.__dict__.update(request_id="abc", method="GET", route="/model", status=200, latency_ms=1.25)
    text = TextFormatter().format(record)
    assert text.endswith("INFO keras_serve.access: GET /model 200 request_id=abc latency_ms=1.25")


def test_log_format_text_on_the_command_line(colour_model_path, tmp_path):
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path),
                       "--log-format", "text") as srv:
        requests.get(srv.url + "/model", headers={"X-Request-ID": "text-1"}, timeout=10)
        output = srv.output_once_it_says("request_id=text-1")
    line = next(l for l in output.splitlines() if "request_id=text-1" in l)
    assert "INFO keras_serve.access: GET /model 200 request_id=text-1 latency_ms=" in line
    # the start-up lines stay readable
    assert any(line.startswith("serving on http://127.0.0.1:") for line in output.splitlines()[:5])
