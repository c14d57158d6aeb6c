"""The HTTP API and pages through Flask's test client, against a tiny colour model."""
from datetime import datetime
from pathlib import Path

import pytest

from images import BLUE, RED, image_bytes
from uploading import post_file
from keras_serve.errors import PredictionError, StorageError
from keras_serve.storage.images import OWNER_MARKER, TEMP_PREFIX
from keras_serve.storage.uploads import is_upload_id

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


post = post_file


def test_form_page(client):
    r = client.get("/", headers=HTML)
    assert r.status_code == 200
    page = r.get_data(as_text=True)
    assert 'action="/file/"' in page and 'method="post"' in page and 'enctype="multipart/form-data"' in page
    assert '<input type="file" id="file" name="file" accept="image/*"' in page
    assert "CAT, DOG" in page


def test_json_answer_for_curl_and_api_clients(client, app):
    for headers in ({}, {"Accept": "*/*"}, {"Accept": "application/json"}):
        r = post(client, image_bytes(RED), headers=headers)
        assert r.status_code == 200 and r.is_json, headers
        body = r.get_json()
        assert body["class"] == "DOG" and body["label"] == "DOG"
        assert body["confidence"] > 0.9
        assert set(body["scores"]) == {"CAT", "DOG"}
        assert abs(sum(body["scores"].values()) - 1.0) < 1e-6
        assert is_upload_id(body["id"]) and len(body["id"]) == 32
    assert post(client, image_bytes(BLUE)).get_json()["class"] == "CAT"


def stored_images(upload_dir: Path) -> list[Path]:
    """The files under the upload folder other than the database and the store's owner marker
    (which the start-up sweep may be writing meanwhile, through its temporary name)."""
    not_images = {OWNER_MARKER, TEMP_PREFIX + OWNER_MARKER}
    return [p for p in upload_dir.rglob("*")
            if p.is_file() and not p.name.startswith("uploads.db") and p.name not in not_images]


def test_upload_is_stored_with_its_prediction(client, app):
    data = image_bytes(BLUE, fmt="PNG")
    body = post(client, data, filename="../../etc/passwd.jpg").get_json()
    upload_dir = Path(app.config["UPLOAD_DIR"])
    # named by the server: the day and the detected format, never the client's name
    # (beside it: the database and the owner marker, docs/storage-faults.md)
    [stored] = stored_images(upload_dir)
    record = client.get(f"/uploads/{body['id']}/record").get_json()
    # the folder is the UTC day of the record's own time of receipt (one clock reading, so a
    # run across midnight agrees with itself)
    day = record["received"][:10].replace("-", "/")
    assert record["received"].endswith("+00:00")
    assert stored.relative_to(upload_dir).as_posix() == f"{day}/{body['id']}.png"
    assert stored.read_bytes() == data
    assert record["id"] == body["id"] and record["prediction"]["class"] == "CAT" and record["format"] == "PNG"
    assert record["client_filename"] == "../../etc/passwd.jpg"  # kept for audit, never used as a path
    image = client.get(body["image_url"])
    assert image.status_code == 200 and image.data == data and image.mimetype == "image/png"
    assert image.headers["X-Content-Type-Options"] == "nosniff"


def test_browser_gets_a_result_page(client):
    r = post(client, image_bytes(RED), filename='<script>alert(1)</script>.jpg', headers=HTML)
    assert r.status_code == 200 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert '<h1 id="label">DOG</h1>' in page
    assert "Confidence:" in page and 'href="/"' in page
    assert "<script>" not in page  # the client's file name is never echoed
    image_src = page.split('id="upload" src="')[1].split('"')[0]
    assert client.get(image_src).status_code == 200


def test_file_without_trailing_slash_keeps_the_post(client):
    r = post(client, image_bytes(RED), path="/file")
    assert r.status_code == 200 and r.get_json()["class"] == "DOG"


@pytest.mark.parametrize("data,status,code", [
    (None, 400, "missing_file"),
    (b"", 400, "empty_image"),
    (b"this is a text file pretending to be a jpeg", 415, "not_an_image"),
    (image_bytes(RED, (400, 300))[:700], 422, "corrupt_image"),
    (image_bytes((0, 0, 0), (3000, 3000), "PNG", mode="L"), 413, "image_too_large"),
])
def test_bad_input_gets_the_right_status_and_a_helpful_body(client, app, data, status, code):
    r = post(client, data, filename="cat.jpg")
    assert r.status_code == status
    error = r.get_json()["error"]
    assert error["code"] == code and error["status"] == status
    assert error["message"] and error["hint"]
    # nothing rejected is stored, and the server keeps serving
    assert not stored_images(Path(app.config["UPLOAD_DIR"]))
    assert app.extensions["classifier"].store.records.older_than(datetime(3000, 1, 1)) == []
    assert post(client, image_bytes(RED)).status_code == 200


def test_bad_input_page_for_browsers(client):
    r = post(client, b"not an image", headers=HTML)
    assert r.status_code == 415 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert "not an image" in page and 'href="/"' in page


def test_body_over_the_size_limit_is_413(client, app):
    limit = app.config["MAX_CONTENT_LENGTH"]
    r = post(client, b"\xff\xd8" + b"0" * (limit + 10))
    assert r.status_code == 413
    assert "larger than the 2,097,152-byte (2 MiB) limit" in r.get_json()["error"]["message"]


def test_wrong_method_is_405_with_allow_header(client):
    r = client.get("/file/")
    assert r.status_code == 405
    assert "POST" in r.headers["Allow"]
    assert r.get_json()["error"]["hint"]
    assert client.delete("/").status_code == 405


def test_unknown_paths_and_ids_are_404_json(client):
    assert client.get("/nope").get_json()["error"]["code"] == "not_found"
    assert client.get("/uploads/..%2F..%2Fapp.py").status_code == 404
    for bad in ("%2E%2E", "app.py", "0" * 32, "20261125-0-" + "0" * 32):
        r = client.get(f"/uploads/{bad}")
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "upload_not_found"


def test_health_readiness_and_model_description(client):
    assert client.get("/healthz").get_json() == {"alive": True}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.get_json()["ready"] is True
    assert ready.get_json()["storage"]["ok"] is True
    model = client.get("/model").get_json()
    assert model["labels"] == ["CAT", "DOG"] and model["input"]["height"] == 32


def test_unexpected_errors_are_500_without_internals(app, client, monkeypatch):
    service = app.extensions["classifier"]

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(service.store, "save", broken)
    r = post(client, image_bytes(RED))
    assert r.status_code == 500
    assert "secret" not in r.get_data(as_text=True) and "Traceback" not in r.get_data(as_text=True)


def test_a_failed_prediction_is_503_and_keeps_the_image(app, client, monkeypatch):
    service = app.extensions["classifier"]

    def failing(prepare):
        prepare()
        raise PredictionError("The model failed on this batch.")

    monkeypatch.setattr(service.batcher, "predict_prepared", failing)
    data = image_bytes(RED, fmt="PNG")
    r = post(client, data)
    error = r.get_json()["error"]
    assert r.status_code == 503 and error["code"] == "prediction" and "kept" in error["hint"]
    assert client.get(f"/uploads/{error['id']}").data == data
    record = client.get(f"/uploads/{error['id']}/record").get_json()
    assert record["prediction"] is None and record["error"] == "The model failed on this batch."
    monkeypatch.undo()
    assert post(client, image_bytes(RED)).get_json()["class"] == "DOG"


def test_a_full_disk_is_503_with_a_hint(app, client, monkeypatch):
    def full(*args, **kwargs):
        raise StorageError("The upload could not be written to disk (No space left on device).")

    monkeypatch.setattr(app.extensions["classifier"].store, "save", full)
    r = post(client, image_bytes(RED))
    error = r.get_json()["error"]
    assert r.status_code == 503 and error["code"] == "storage"
    # the message says what is known; the hint says what to do and guesses no cause (issue 20)
    assert "No space left" in error["message"] and "disk" not in error["hint"] and "operator" in error["hint"]


def test_security_headers_on_pages(client):
    r = client.get("/")
    assert "default-src 'none'" in r.headers["Content-Security-Policy"]
    assert r.headers["X-Frame-Options"] == "DENY"


def test_config_layers_defaults_then_environment_then_argument(make_app, colour_model_path, monkeypatch):
    from keras_serve.cli import parse_args
    from keras_serve.settings import from_arguments

    model = str(colour_model_path)
    assert make_app(MODEL_PATH=model).extensions["classifier"].store.images.fsync is False  # see docs/performance.md: latency
    monkeypatch.setenv("KERAS_SERVE_UPLOAD_FSYNC", "true")
    monkeypatch.setenv("KERAS_SERVE_MAX_BATCH", "4")
    app = make_app(MODEL_PATH=model)
    assert app.extensions["classifier"].store.images.fsync is True and app.config["MAX_BATCH"] == 4
    app = make_app(MODEL_PATH=model, **from_arguments(parse_args(["--no-fsync-uploads", "--max-upload-mb", "1.5"])))
    assert app.extensions["classifier"].store.images.fsync is False and app.config["MAX_BATCH"] == 4
    assert app.config["MAX_CONTENT_LENGTH"] == 1536 * 1024
    assert from_arguments(parse_args(["--fsync-uploads"]))["UPLOAD_FSYNC"] is True
    assert "UPLOAD_FSYNC" not in from_arguments(parse_args([]))  # leaves the environment's value


def test_a_malformed_environment_value_names_the_variable(make_app, colour_model_path, monkeypatch):
    monkeypatch.setenv("KERAS_SERVE_MAX_BATCH", "lots")
    with pytest.raises(ValueError, match="KERAS_SERVE_MAX_BATCH"):
        make_app(MODEL_PATH=str(colour_model_path))


def test_the_documented_options_table_is_the_settings_table():
    from keras_serve.settings import PROJECT_ROOT, markdown_table

    assert markdown_table() in (PROJECT_ROOT / "docs" / "reference.md").read_text(), \
        "docs/reference.md's options table is stale: paste there the output of `python -m keras_serve.settings`"


def test_the_settings_table_command_prints_the_table_and_nothing_else():
    import subprocess
    import sys

    from keras_serve.settings import markdown_table

    # The command docs/reference.md names; it once also printed runpy's warning about a module imported twice.
    done = subprocess.run([sys.executable, "-m", "keras_serve.settings"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.strip() == markdown_table().strip()
