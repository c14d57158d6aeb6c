"""The HTTP server under hostile clients and at shutdown: a real `python app.py` over raw sockets.

Raw sockets because the point is what a client sees byte for byte: an answer or none, while
it is still sending, with idle and half-sent connections open around it. Every test runs
against one process and again against two gunicorn workers (`--workers 2`), which must be
exactly as hard to take down.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import resource
import signal
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import requests

from images import RED, image_bytes, noise_jpeg
from server_process import ServerProcess
from uploading import fresh_boundary, multipart_body
from keras_serve.web.responses import SECURITY_HEADERS

LIMIT = 1024 * 1024  # --max-upload-mb 1
PROCESSES = {"one process": (), "two workers": ("--workers", "2"),
             "granian, one process": ("--http-server", "granian", "--workers", "1"),
             "granian, two workers": ("--http-server", "granian", "--workers", "2")}


@pytest.fixture(scope="module", params=list(PROCESSES))
def processes(request) -> tuple[str, ...]:
    """The app.py arguments for one process, then for two worker processes (waitress, then granian)."""
    return PROCESSES[request.param]


def granian(processes: tuple[str, ...]) -> bool:
    """Served by granian, whose contract is restated where its HTTP layer legitimately differs:
    bare-LF line endings may be accepted, a long header line need not get 431 at waitress's
    size, and refusals it makes before the app sees a request carry its own short answer."""
    return "granian" in processes


@pytest.fixture(scope="module")
def server(processes, colour_model_path, tmp_path_factory):
    """conftest's `server` (colour model, 1 MB body limit), once per process arrangement."""
    uploads = tmp_path_factory.mktemp("uploads")
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(uploads), "--max-upload-mb", "1",
                       *processes) as srv:
        srv.uploads = uploads
        yield srv


def connect(srv: ServerProcess, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response: status, headers (title case), body; raises on a reset or no answer."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    body = response.read()
    return response.status, {k.title(): v for k, v in response.getheaders()}, body


def upload_request(data: bytes, filename: str = "photo.jpg", extra_headers: str = "") -> bytes:
    boundary = fresh_boundary()
    body = multipart_body("file", filename, "image/jpeg", data, boundary)
    head = (f"POST /file/ HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n{extra_headers}\r\n")
    return head.encode() + body


def exact_size_upload(total: int) -> tuple[bytes, str]:
    """A multipart body of exactly `total` bytes (a JPEG padded after its end marker) and its boundary."""
    boundary = fresh_boundary()
    empty = multipart_body("file", "a.jpg", "image/jpeg", b"", boundary)
    jpeg = image_bytes(RED)
    return multipart_body("file", "a.jpg", "image/jpeg", jpeg + b"\0" * (total - len(empty) - len(jpeg)),
                          boundary), boundary


def assert_serving(srv: ServerProcess, within: float = 5.0) -> float:
    """/healthz answers 200 within `within` seconds (a socket timeout: raises if late); the seconds.

    A server that is blocked or dead never answers, so a bound of seconds tells it from a live one
    as well as a tight bound would, without failing when the test machine is busy.
    """
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=within)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        assert response.status == 200 and json.loads(response.read()) == {"alive": True}
    finally:
        conn.close()
    return time.monotonic() - started


def test_healthz_answers_with_1000_idle_and_100_slowloris_connections_held_open(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))  # this process needs ~1,200
    idle = [connect(server) for _ in range(1000)]
    slow = [connect(server) for _ in range(100)]
    stop = threading.Event()

    def trickle():  # slowloris: a header line every half second, never the blank line
        for sock in slow:
            sock.sendall(b"POST /file/ HTTP/1.1\r\nHost: test\r\n")
        while not stop.wait(0.5):
            for sock in slow:
                sock.sendall(b"X-Padding: a\r\n")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        time.sleep(1.0)  # every connection accepted, the trickle under way
        # Each well inside the 30 s header timeout, so the slowloris connections are still held.
        times = [assert_serving(server) for _ in range(5)]
        # The latency is reported, not asserted (docs/operations.md quotes it): `pytest -s` shows it.
        print(f"/healthz with 1,000 idle and 100 slowloris connections open: "
              f"{', '.join(f'{t * 1000:.1f}' for t in times)} ms")
        # Those connections were held open, not shed: an idle one still gets an answer.
        idle[0].sendall(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(idle[0])[0] == 200
    finally:
        stop.set()
        trickler.join()
        for sock in idle + slow:
            sock.close()


def test_oversized_content_length_is_refused_before_the_body_is_sent(server):
    with connect(server) as sock:
        sock.sendall(b"POST /file/ HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Content-Length: 60000000\r\n\r\n" + b"x" * 1000)  # 1 KB of the announced 60 MB
        status, headers, body = read_response(sock)
    assert status == 413 and headers["Connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "request_entity_too_large" and "1,048,576-byte" in error["message"]
    assert all(headers[name] == value for name, value in SECURITY_HEADERS.items())


def test_oversized_chunked_body_is_refused_once_it_passes_the_limit(server):
    with connect(server) as sock:
        sock.sendall(b"POST /file/ HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        # A well-formed start, so that a server whose app parses the body as it arrives (granian)
        # is refusing the size, not the form.
        head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        chunk = b"%x\r\n%s\r\n" % (64 * 1024, b"x" * 64 * 1024)
        for _ in range(LIMIT // len(chunk) + 2):  # just past the limit, and no last chunk
            sock.sendall(chunk)
        status, headers, body = read_response(sock)
    assert status == 413 and json.loads(body)["error"]["code"] == "request_entity_too_large"


def test_client_that_sends_the_whole_oversized_body_first_still_reads_the_413(server):
    # requests (like browsers) sends everything before reading: the server must not reset it.
    r = requests.post(server.url + "/file/", files={"file": ("big.jpg", b"\xff" * (8 * LIMIT))}, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["status"] == 413


def test_a_body_of_exactly_the_limit_is_accepted_one_byte_more_is_not(server):
    body, boundary = exact_size_upload(LIMIT)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    assert len(body) == LIMIT
    ok = requests.post(server.url + "/file/", data=body, headers=headers, timeout=30)
    assert ok.status_code == 200 and ok.json()["class"] == "DOG"
    over = requests.post(server.url + "/file/", data=body + b"\n", headers=headers, timeout=30)
    assert over.status_code == 413


# granian's answer to each, where it differs: ("app", status): the app answers it (its JSON and
# security headers); ("layer", status): granian refuses it itself, with its own short answer and
# the connection closed; ("closed", None): granian closes the connection without an answer;
# ("either", (accepted, refused)): the app's answer or granian's refusal.
@pytest.mark.parametrize("request_bytes,status,by_granian", [
    (b"GET /healthz HTTP/1.1\nHost: test\n\n", 400, ("app", 200)),  # bare LF line endings (RFC 9112 2.2 allows)
    (b"GET / HTTP/1.1\r\nHost: test\r\nX-Big: " + b"a" * 300_000 + b"\r\n\r\n", 431,  # head over 256 KB
     ("either", (200, 431))),  # near granian's bound: how the bytes arrive decides (a 1 MB head is always refused)
    (b"POST /file/ HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: gzip\r\n\r\n", 501, ("layer", 400)),
    (b"GET /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: nope\r\n\r\n", 400, ("layer", 400)),
    (b"POST /file/ HTTP/1.1\r\nHost: test\r\nContent-Length: 1048577\r\n\r\n", 413, ("app", 413)),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, ("closed", None)),  # an HTTP/2 client's preface (it used to get a 404)
])
def test_answers_from_the_http_layer_are_the_apps_error_format_with_its_security_headers(
        server, processes, request_bytes, status, by_granian):
    kind, granian_status = by_granian if granian(processes) else ("app", status)
    with connect(server, timeout=5) as sock:  # waitress used to leave the bare-LF request hanging
        sock.sendall(request_bytes)
        if kind == "closed":
            assert sock.recv(1024) == b""  # closed, nothing sent
            assert_serving(server)  # and the server keeps serving
            return
        got, headers, body = read_response(sock)
    if kind == "either" and got == granian_status[1] or kind == "layer":
        refused = granian_status[1] if kind == "either" else granian_status
        assert got == refused and headers["Connection"] == "close"  # granian's own short answer
        assert_serving(server)
        return
    if kind == "either":
        status = granian_status[0]
    elif granian(processes):
        status = granian_status
    assert got == status
    if status == 200:  # accepted: an answer of the app's own, with its headers
        assert {name: headers.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS and headers["X-Request-Id"]
        assert_serving(server)
        return
    assert {name: headers.get(name) for name in SECURITY_HEADERS} == SECURITY_HEADERS
    error = json.loads(body)["error"]
    assert error["status"] == status and error["message"] and error["hint"]
    assert_serving(server)  # and the server keeps serving


def rss_kib(pid: int) -> int:
    """Resident memory of a process and its children, in KiB."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for each in [pid, *map(int, children)]:
        for line in Path(f"/proc/{each}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def test_a_1_mb_header_block_is_refused_or_closed_without_growing_memory(server):
    head = b"GET /healthz HTTP/1.1\r\nHost: test\r\n" + b"".join(
        b"X-Filler-%d: %s\r\n" % (i, b"a" * 1000) for i in range(1050)) + b"\r\n"
    assert len(head) > 1024 * 1024
    before = rss_kib(server.proc.pid)
    for _ in range(20):
        with connect(server, timeout=10) as sock:
            try:
                sock.sendall(head)
                got = sock.recv(65536)
            except ConnectionResetError:  # closed while still sending: refused too
                got = b""
        assert got == b"" or got.startswith(b"HTTP/1.") and b" 431 " in got.split(b"\r\n")[0], got[:200]
    # 20 MB of headers went in; none of it may stay (a few MB of allocator noise allowed)
    assert rss_kib(server.proc.pid) - before < 16 * 1024
    assert_serving(server)


# Request shapes that let two parsers disagree on where a request ends (request smuggling).
# waitress refuses every one with 400 and closes the connection; granian all but one (below).
SMUGGLING = {
    "two different Content-Lengths": b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: 4\r\n"
                                     b"Content-Length: 30\r\n\r\nabcdGET /readyz HTTP/1.1\r\nHost: test\r\n\r\n",
    "a bare CR": b"GET /healthz HTTP/1.1\r\nHost: test\rX-A: b\r\n\r\nGET /readyz HTTP/1.1\r\nHost: test\r\n\r\n",
    "obs-fold": b"GET /healthz HTTP/1.1\r\nHost: test\r\nX-A: b\r\n c\r\n\r\n"
                b"GET /readyz HTTP/1.1\r\nHost: test\r\n\r\n",
    "Content-Length and Transfer-Encoding": b"POST /healthz HTTP/1.1\r\nHost: test\r\nContent-Length: 30\r\n"
                                            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                                            b"GET /readyz HTTP/1.1\r\nHost: test\r\n\r\n",
}


def answers_on(sock: socket.socket) -> list[int]:
    """Every status answered on the connection until the server closes it (or 3 s of silence)."""
    statuses = []
    sock.settimeout(3)
    try:
        while True:
            status, headers, _ = read_response(sock)
            statuses.append(status)
            if headers.get("Connection", "").lower() == "close":
                break
    except (OSError, http.client.HTTPException):
        pass
    return statuses


@pytest.mark.parametrize("shape", list(SMUGGLING))
def test_request_smuggling_shapes_are_refused(server, processes, shape):
    with connect(server) as sock:
        sock.sendall(SMUGGLING[shape])
        statuses = answers_on(sock)
    if shape == "Content-Length and Transfer-Encoding" and granian(processes):
        # granian drops the Content-Length before the app sees the request and frames the body as
        # chunked (RFC 9112 6.3), so the body is the empty last chunk: the POST is answered 405
        # and the connection closed after it (6.1); the GET behind it is never read. Not refused,
        # as waitress's parser refuses it: a gap of this HTTP layer (docs/performance.md).
        assert statuses == [405]
    else:
        assert statuses == [400]
    assert_serving(server)


def test_http_layer_errors_are_a_page_for_browsers(server):
    with connect(server) as sock:
        sock.sendall(b"POST /file/ HTTP/1.1\r\nHost: test\r\nAccept: text/html,*/*;q=0.8\r\n"
                     b"Content-Length: 99999999\r\n\r\n")
        status, headers, body = read_response(sock)
    assert status == 413 and headers["Content-Type"].startswith("text/html")
    assert b"1,048,576-byte" in body and headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]


def test_a_10000_character_file_name_is_classified_and_stored_truncated(server):
    name = "x" * 9996 + ".jpg"
    r = requests.post(server.url + "/file/", files={"file": (name, image_bytes(RED))}, timeout=30)
    assert r.status_code == 200 and r.json()["class"] == "DOG"
    record = requests.get(server.url + r.json()["image_url"] + "/record", timeout=10).json()
    assert record["client_filename"] == name[:255]


def test_a_part_header_over_64_kib_is_a_clear_400(server):
    r = requests.post(server.url + "/file/", files={"file": ("y" * 70_000 + ".jpg", image_bytes(RED))}, timeout=30)
    assert r.status_code == 400 and "part header" in r.json()["error"]["message"]


def test_5000_empty_form_parts_are_a_413_that_says_too_many_parts_not_too_large(server):
    boundary = fresh_boundary()
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n\r\n" * 5000
            + f"--{boundary}--\r\n").encode()
    assert len(body) < LIMIT  # well under the body limit: the body size is not the problem
    r = requests.post(server.url + "/file/", data=body, timeout=30,
                      headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    error = r.json()["error"]
    assert r.status_code == 413 and error["code"] == "too_many_form_parts", r.text
    assert "parts" in error["message"] and "larger" not in error["message"] and error["hint"]


@pytest.mark.parametrize("path", ["/file", "/file/"])
def test_get_on_the_classify_route_is_405_with_allow_post(server, path):
    r = requests.get(server.url + path, timeout=10)
    assert r.status_code == 405 and "POST" in r.headers["Allow"]
    assert requests.post(server.url + path, files={"file": ("a.jpg", image_bytes(RED))}, timeout=30).status_code == 200


def test_idle_and_trickling_connections_are_closed_by_their_timeouts(processes, colour_model_path, tmp_path):
    with ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path),
                       "--idle-timeout", "1", "--header-timeout", "2", *processes) as srv:
        idle, slow = connect(srv), connect(srv)
        slow.sendall(b"GET /healthz HTTP/1.1\r\n")
        started = time.monotonic()
        closed = {}
        while len(closed) < 2 and time.monotonic() - started < 10:
            try:
                slow.sendall(b"X-Padding: a\r\n")  # activity, so only the header deadline can end it
            except OSError:
                closed.setdefault("slow", time.monotonic() - started)
            for name, sock in (("idle", idle), ("slow", slow)):
                sock.settimeout(0.2)
                try:
                    if sock.recv(1) == b"":
                        closed.setdefault(name, time.monotonic() - started)
                except TimeoutError:
                    pass
                except OSError:
                    closed.setdefault(name, time.monotonic() - started)
        assert set(closed) == {"idle", "slow"}, closed
        assert closed["idle"] >= 0.5 and closed["slow"] >= 1.5, closed


def press_ctrl_c(srv: ServerProcess) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the server and every process it started."""
    pid = srv.proc.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for each in [pid, *map(int, children)]:
        os.kill(each, signal.SIGINT)


# An upload whose body stops 997 bytes short of its Content-Length. A form, so that the app
# waits for the body too where it reads the body itself (granian) instead of answering at once.
STUCK_UPLOAD = (b"POST /file/ HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                b"Content-Length: 1000\r\n\r\nabc")

STOPS = {"SIGTERM": lambda srv: srv.proc.send_signal(signal.SIGTERM), "Ctrl-C": press_ctrl_c}


def assert_stops_listening(srv: ServerProcess, within: float = 10.0) -> None:
    """New connections are refused within `within` seconds of the stop, while the requests
    already received are still to be answered (the caller reads them after this)."""
    deadline = time.monotonic() + within
    while True:
        try:
            socket.create_connection(("127.0.0.1", srv.port), timeout=2).close()
        except ConnectionRefusedError:
            return
        assert time.monotonic() < deadline, f"still accepting connections {within} s after the stop"
        time.sleep(0.05)


@pytest.mark.parametrize("stop", list(STOPS))
def test_a_stop_under_load_answers_every_received_request_then_exits_0(stop, processes, colour_model_path,
                                                                       tmp_path):
    srv = ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path), *processes)
    try:
        images = [noise_jpeg((800, 600), seed=i, quality=95) for i in range(96)]
        sockets = [connect(srv, timeout=60) for _ in images]
        readiness = connect(srv, timeout=60)
        readiness.sendall(b"GET /readyz HTTP/1.1\r\nHost: test\r\n")  # half a request, finished after the stop
        for sock, data in zip(sockets, images):
            sock.sendall(upload_request(data))
        STOPS[stop](srv)
        if granian(processes):
            return granian_stop_under_load(srv, readiness, sockets, tmp_path)
        assert_stops_listening(srv)
        readiness.sendall(b"\r\n")
        status, headers, body = read_response(readiness)
        assert status == 503 and json.loads(body)["ready"] is False and headers["Connection"] == "close"
        answers = [read_response(sock) for sock in sockets]
        assert [status for status, _, _ in answers] == [200] * 96
        assert srv.proc.wait(timeout=30) == 0
    finally:
        output = srv.stop()
    with contextlib.closing(sqlite3.connect(tmp_path / "uploads.db")) as db:
        stored = {upload_id for (upload_id,) in db.execute("SELECT id FROM uploads")}
    assert {json.loads(body)["id"] for _, _, body in answers} <= stored, output


def granian_stop_under_load(srv: ServerProcess, readiness: socket.socket, sockets: list[socket.socket],
                            uploads: Path) -> None:
    """The stop under load as granian keeps it (docs/performance.md, Choosing the HTTP layer): a
    connection whose request granian has not started to read when it drains is closed
    unanswered (nothing stored, no answer given), so not every request sent is answered.
    What must hold: no longer listening at once, no answer but 200 or none, every 200 stored,
    /readyz never ready, exit 0."""
    assert_stops_listening(srv)
    try:
        readiness.sendall(b"\r\n")
        status, headers, body = read_response(readiness)
        assert status == 503 and json.loads(body)["ready"] is False and headers["Connection"] == "close"
    except (OSError, http.client.RemoteDisconnected):
        pass  # closed unanswered: not ready either
    answers = []
    for sock in sockets:
        try:
            answers.append(read_response(sock))
        except (OSError, http.client.RemoteDisconnected):
            answers.append(None)
    assert {answer[0] for answer in answers if answer is not None} <= {200}
    assert srv.proc.wait(timeout=30) == 0
    with contextlib.closing(sqlite3.connect(uploads / "uploads.db")) as db:
        stored = {upload_id for (upload_id,) in db.execute("SELECT id FROM uploads")}
    answered = {json.loads(body)["id"] for answer in answers if answer is not None for body in [answer[2]]}
    assert answered <= stored
    print(f"granian stop under load: {len(answered)} of {len(sockets)} answered, the rest closed unanswered")


def test_a_second_ctrl_c_stops_at_once(processes, colour_model_path, tmp_path):
    srv = ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path), *processes)
    try:
        stuck = connect(srv)
        stuck.sendall(STUCK_UPLOAD)
        time.sleep(0.5)
        press_ctrl_c(srv)
        time.sleep(1.5)
        assert srv.proc.poll() is None  # draining: the 20 s grace period waits for that request
        started = time.monotonic()
        press_ctrl_c(srv)
        srv.proc.wait(timeout=15)
        assert time.monotonic() - started < 5
    finally:
        srv.stop()


def test_shutdown_grace_period_bounds_the_wait_for_a_request_that_never_completes(
        processes, colour_model_path, tmp_path):
    srv = ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path), "--shutdown-grace", "1",
                        *processes)
    try:
        stuck = connect(srv)
        stuck.sendall(STUCK_UPLOAD)
        started = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10  # the 1 s grace, not the 20 s default
        said = (r"grace period over: killing worker \d" if granian(processes)
                else r"grace period over: closing 1 connection\(s\)")
        assert re.search(said, srv.stop())
    finally:
        srv.stop()
