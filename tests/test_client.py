"""The Python client and `python -m keras_serve.client URL DIR...` against a real server process."""
from __future__ import annotations

import csv
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from images import BLUE, RED, image_bytes
from keras_serve.client import Client, ClientError
from keras_serve.client.__main__ import main
from keras_serve.client.folder import FIELDS
from waiting import wait_until


def make_folder(root: Path, red: int, blue: int) -> dict[str, str]:
    """Red images (the colour model's DOG) and blue ones (CAT) in a folder with a subfolder;
    returns path -> expected label. A text file and a hidden image are left out by the client."""
    (root / "sub").mkdir(parents=True)
    expected = {}
    for i in range(red):
        path = root / f"red-{i}.jpg"
        path.write_bytes(image_bytes(RED))
        expected[str(path)] = "DOG"
    for i in range(blue):
        path = root / "sub" / f"blue-{i}.png"
        path.write_bytes(image_bytes(BLUE, fmt="PNG"))
        expected[str(path)] = "CAT"
    (root / "notes.txt").write_text("not an image, not sent")
    (root / ".hidden.jpg").write_bytes(image_bytes(RED))
    return expected


def csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def uploads_posted(server, including: frozenset[str] | set[str] = frozenset(), timeout: float = 10.0) -> int:
    """POST /file/ requests the server has logged, once the lines of the uploads `including`
    names are among them: a request's access line is written just after its answer, and read
    from the server's output by another thread, so it can lag the answer the client got."""
    def posted() -> list[str | None]:
        return [line.get("upload_id") for line in server.log_lines() if line.get("route") == "/file/"]

    wait_until(lambda: including <= set(posted()), timeout, every=0.05)
    ids = posted()
    assert including <= set(ids), f"uploads never logged: {sorted(including - set(ids))}"
    return len(ids)


def test_a_folder_is_classified_into_csv_and_a_rerun_sends_nothing_again(server, tmp_path, capsys):
    expected = make_folder(tmp_path / "photos", red=5, blue=4)
    out = tmp_path / "answers.csv"
    before = uploads_posted(server)

    assert main([server.url, str(tmp_path / "photos"), "--out", str(out), "--concurrency", "3"]) == 0
    rows = csv_rows(out)
    assert list(rows[0]) == list(FIELDS)
    assert {row["path"]: row["label"] for row in rows} == expected  # one row per image, nothing else
    assert all(row["status"] == "ok" and row["http_status"] == "200" and not row["error_code"] for row in rows)
    assert all(0.5 <= float(row["confidence"]) <= 1 and row["unsure"] in ("true", "false") for row in rows)
    assert len({row["id"] for row in rows}) == 9 and all(len(row["model_version"]) == 64 for row in rows)
    assert "9 classified, 0 errors, 0 already answered" in capsys.readouterr().err
    assert uploads_posted(server, including={row["id"] for row in rows}) - before == 9

    # The same command again: every file has its answer, so nothing is sent and nothing repeated.
    assert main([server.url, str(tmp_path / "photos"), "--out", str(out)]) == 0
    assert csv_rows(out) == rows
    assert "0 classified, 0 errors, 9 already answered" in capsys.readouterr().err

    # A new photo: only it is sent, and its row is added.
    new = tmp_path / "photos" / "sub" / "late.jpg"
    new.write_bytes(image_bytes(BLUE))
    assert main([server.url, str(tmp_path / "photos"), "--out", str(out)]) == 0
    after = csv_rows(out)
    assert after[:9] == rows and [(r["path"], r["label"]) for r in after[9:]] == [(str(new), "CAT")]
    # the new photo's line comes after any the reruns would have caused, had they sent again
    assert uploads_posted(server, including={after[9]["id"]}) - before == 10


def test_a_bad_file_is_an_error_row_and_a_non_zero_exit_and_is_tried_again(server, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "good.jpg").write_bytes(image_bytes(RED))
    broken = photos / "broken.jpg"
    broken.write_bytes(b"this is text, not a JPEG")
    (photos / "empty.png").write_bytes(b"")
    out = tmp_path / "answers.jsonl"

    assert main([server.url, str(photos), "--out", str(out)]) == 1
    rows = {row["path"]: row for row in map(json.loads, out.read_text().splitlines())}
    assert rows[str(photos / "good.jpg")]["status"] == "ok"
    bad = rows[str(broken)]
    assert bad["status"] == "error" and bad["error_code"] == "not_an_image" and bad["http_status"] == 415
    assert bad["error_message"] and bad["label"] is None
    empty = rows[str(photos / "empty.png")]
    assert (empty["status"], empty["error_code"], empty["http_status"]) == ("error", "empty_image", 400)
    assert "1 classified, 2 errors" in capsys.readouterr().err

    # Fixed, the next run sends only the two that failed; the file ends with one row per image.
    broken.write_bytes(image_bytes(BLUE))
    (photos / "empty.png").write_bytes(image_bytes(RED, fmt="PNG"))
    assert main([server.url, str(photos), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["path"] for row in rows) == sorted(str(p) for p in photos.iterdir())
    assert {row["path"]: row["label"] for row in rows}[str(broken)] == "CAT"
    assert "2 classified, 0 errors, 1 already answered" in capsys.readouterr().err


def test_an_unreachable_server_gives_error_rows_and_exit_1(tmp_path, capsys):
    (tmp_path / "a.jpg").write_bytes(image_bytes(RED))
    assert main(["http://127.0.0.1:9", str(tmp_path / "a.jpg"), "--format", "jsonl", "--retries", "0"]) == 1
    [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert row["status"] == "error" and row["error_code"] == "connection_error" and row["http_status"] is None


def test_usage_errors_exit_2(tmp_path):
    with pytest.raises(SystemExit) as missing:
        main(["http://127.0.0.1:9", str(tmp_path / "nowhere")])
    assert missing.value.code == 2
    not_ours = tmp_path / "other.csv"
    not_ours.write_text("a,b\n1,2\n")
    (tmp_path / "a.jpg").write_bytes(image_bytes(RED))
    with pytest.raises(SystemExit) as wrong_out:
        main(["http://127.0.0.1:9", str(tmp_path / "a.jpg"), "--out", str(not_ours)])
    assert wrong_out.value.code == 2 and not_ours.read_text() == "a,b\n1,2\n"  # left as it was


class Stub(BaseHTTPRequestHandler):
    """Answers 429 (Retry-After: 0) to the first POST, then a classification; records headers."""

    seen: list[dict[str, str]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        Stub.seen.append({"path": self.path, "authorization": self.headers.get("Authorization", "")})
        if len(Stub.seen) == 1:
            body, status, extra = b'{"error": {"code": "rate_limited", "message": "slow down"}}', 429, {"Retry-After": "0"}
        else:
            body, status, extra = b'{"label": "CAT", "confidence": 0.9, "unsure": false, "id": "x"}', 200, {}
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **extra}.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_the_token_comes_from_the_environment_and_429_is_tried_again(monkeypatch):
    Stub.seen = []
    stub = ThreadingHTTPServer(("127.0.0.1", 0), Stub)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("KERAS_SERVE_API_TOKEN", "tok-" + "x" * 20)
        client = Client(f"http://127.0.0.1:{stub.server_port}/file")
        assert "tok-" not in repr(client)
        assert client.classify(image_bytes(RED), "a.jpg")["label"] == "CAT"
        assert Stub.seen == [{"path": "/file/", "authorization": "Bearer tok-" + "x" * 20}] * 2

        Stub.seen = []
        with pytest.raises(ClientError) as refused:
            Client(f"http://127.0.0.1:{stub.server_port}", retries=0).classify(image_bytes(RED))
        assert (refused.value.status, refused.value.code) == (429, "rate_limited")
    finally:
        stub.shutdown()
        stub.server_close()
