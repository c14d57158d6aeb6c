"""The access line of requests that failed: the error's code, and for a request that matched no
route (404, 405) its method and its path with the ids masked (keras_serve.web.request_log)."""
from __future__ import annotations

import logging

import pytest

from images import RED, image_bytes
from uploading import post_file, post_files

UPLOAD_ID = "0123456789abcdef0123456789abcdef"


def access_records(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "keras_serve.access"]


def only_access_record(caplog) -> logging.LogRecord:
    records = access_records(caplog)
    assert len(records) == 1, [r.getMessage() for r in records]
    return records[0]


def test_a_404_logs_method_and_masked_path_never_the_query(client, caplog):
    with caplog.at_level(logging.INFO, logger="keras_serve.access"):
        answer = client.get(f"/nothing/{UPLOAD_ID}/here/12345?token=s3cret")
    assert answer.status_code == 404
    line = only_access_record(caplog)
    assert (line.method, line.route, line.status, line.error_code) == ("GET", "unmatched", 404, "not_found")
    assert line.path == "/nothing/{id}/here/{id}"
    assert "s3cret" not in caplog.text and UPLOAD_ID not in caplog.text


def test_a_405_logs_method_path_and_code(client, caplog):
    with caplog.at_level(logging.INFO, logger="keras_serve.access"):
        answer = client.delete("/file/")
    assert answer.status_code == 405
    line = only_access_record(caplog)
    assert (line.method, line.route, line.path, line.error_code) == ("DELETE", "unmatched", "/file/",
                                                                     "method_not_allowed")


def test_a_matched_route_logs_its_rule_not_the_path(client, caplog):
    with caplog.at_level(logging.INFO, logger="keras_serve.access"):
        answer = client.get(f"/uploads/{UPLOAD_ID}/record")
    assert answer.status_code == 404  # no such upload: the rule matched, the store said no
    line = only_access_record(caplog)
    assert line.route == "/uploads/<upload_id>/record" and line.error_code == "upload_not_found"
    assert not hasattr(line, "path")


def test_an_error_answer_logs_its_code_and_a_success_none(client, caplog):
    with caplog.at_level(logging.INFO, logger="keras_serve.access"):
        assert post_file(client, b"just text", "notes.txt").status_code == 415
        assert post_file(client, image_bytes(RED)).status_code == 200
        assert post_files(client, [("a.txt", b"text"), ("b.txt", b"more")]).status_code == 415
    refused, classified, all_refused = access_records(caplog)
    assert refused.error_code == "not_an_image" and refused.route == "/file/"
    assert not hasattr(classified, "error_code")
    assert all_refused.error_code == "not_an_image"


def test_an_error_logged_at_error_level_carries_its_code(app, caplog):
    from keras_serve.errors import StorageError
    from keras_serve.web.responses import service_error_response

    with app.test_request_context("/file/", method="POST"), caplog.at_level(logging.ERROR):
        assert service_error_response(StorageError("The store did not answer.")).status_code == 503
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.error_code == "storage" and "StorageError" in record.getMessage()


@pytest.mark.parametrize("path,logged", [
    ("/uploads/" + UPLOAD_ID + "/heatmap.png", "/uploads/{id}/heatmap.png"),
    ("/api/models/" + "ab" * 32 + "/promote", "/api/models/{id}/promote"),
    ("/x/0f8fad5b-d9cb-469f-a165-70867728950e", "/x/{id}"),
    ("/order/42/items/v2", "/order/{id}/items/v2"),
    ("/key/" + "Zm9vYmFyYmF6cXV4cXV1eHh4eA", "/key/{id}"),
    ("/a\x1b[31mred\nforged line", "/a?[31mred?forged?line"),
    ("/caf\u00e9", "/caf?"),
])
def test_masked_path(path, logged):
    from keras_serve.web.request_log import masked_path

    assert masked_path(path) == logged


def test_a_masked_path_is_bounded():
    from keras_serve.web.request_log import LONGEST_LOGGED_PATH, masked_path

    assert len(masked_path("/a" * 10_000)) == LONGEST_LOGGED_PATH


def test_text_lines_show_the_code_and_the_path():
    from keras_serve.web.request_log import TextFormatter

    record = logging.LogRecord("keras_serve.access", logging.INFO, __file__, 1, "%s %s %d",
                               ("GET", "unmatched", 404), None)
    record.__dict__.update(request_id="abc", method="GET", route="unmatched", status=404, latency_ms=0.5,
                           error_code="not_found", path="/nothing/{id}")
    assert TextFormatter().format(record).endswith(
        "GET unmatched 404 request_id=abc latency_ms=0.5 error_code=not_found path=/nothing/{id}")
