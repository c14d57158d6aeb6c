"""End to end: `python app.py` as users run it, over real HTTP."""
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from images import BLUE, RED, image_bytes
from server_process import ROOT, ServerProcess
import json
import sqlite3


def test_startup_prints_a_model_summary(colour_model_path, tmp_path):
    srv = ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path))
    output = srv.stop()  # SIGTERM, as systemd and containers stop services
    assert srv.proc.returncode == 0, output
    assert "colour.h5" in output and "input 32x32x3" in output and "labels CAT,DOG" in output
    assert "serving on http://127.0.0.1:" in output


def test_sixteen_concurrent_uploads_with_the_same_name_are_all_answered_and_stored(server):
    images = [image_bytes(RED if i % 2 else BLUE, (64 + i, 48)) for i in range(16)]

    def upload(i):
        r = requests.post(server.url + "/file/", files={"file": ("same-name.jpg", images[i], "image/jpeg")},
                          timeout=60)
        return i, r

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(upload, range(16)))
    assert all(r.status_code == 200 for _, r in results), [r.text for _, r in results]
    bodies = {i: r.json() for i, r in results}
    assert all(bodies[i]["class"] == ("DOG" if i % 2 else "CAT") for i in bodies)
    ids = {b["id"] for b in bodies.values()}
    assert len(ids) == 16
    with sqlite3.connect(server.uploads / "uploads.db") as db:  # as docs/storage.md tells operators to query
        stored = {row[0]: (row[1], json.loads(row[2])) for row in
                  db.execute("SELECT id, image_key, prediction FROM uploads")}
    for i, body in bodies.items():
        key, prediction = stored[body["id"]]
        assert (server.uploads / key).read_bytes() == images[i] and prediction["class"] == body["class"]
        assert requests.get(server.url + body["image_url"], timeout=10).content == images[i]


def test_real_http_errors_and_keep_serving(server):
    # (413 over the body limit and 405 for GET are test_server_hardening's, on every server kind)
    assert requests.post(server.url + "/file/", files={"file": ("x.jpg", b"nope")}).status_code == 415
    ok = requests.post(server.url + "/file", files={"file": ("x.jpg", image_bytes(RED))})
    assert ok.status_code == 200 and ok.json()["class"] == "DOG"
    html = requests.post(server.url + "/file/", files={"file": ("x.jpg", image_bytes(BLUE))},
                         headers={"Accept": "text/html"})
    assert html.headers["Content-Type"].startswith("text/html") and ">CAT<" in html.text


@pytest.mark.parametrize("model_arg,expected", [
    ("missing.h5", "model file not found"),
    ("README.md", "README.md"),
])
def test_unloadable_model_exits_nonzero_with_one_line(tmp_path, model_arg, expected):
    path = tmp_path / model_arg
    if model_arg == "README.md":
        path.write_text("# not a model\n")
    result = subprocess.run([sys.executable, "app.py", "--model", str(path), "--port", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_images_in_a_concurrent_burst_fail_only_themselves(server):
    good = {i: image_bytes(RED if i % 2 else BLUE, (40 + 7 * i, 30 + 3 * i)) for i in range(12)}
    bad = {12: b"not an image", 13: image_bytes(RED, (400, 300))[:600], 14: b""}

    def upload(i):
        data = good.get(i, bad.get(i))
        return i, requests.post(server.url + "/file/", files={"file": ("burst.jpg", data, "image/jpeg")}, timeout=60)

    with ThreadPoolExecutor(15) as pool:
        results = dict(pool.map(upload, range(15)))
    for i in good:
        assert results[i].status_code == 200 and results[i].json()["class"] == ("DOG" if i % 2 else "CAT")
    assert [results[i].status_code for i in (12, 13, 14)] == [415, 422, 400]
