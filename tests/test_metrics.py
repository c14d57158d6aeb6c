"""GET /metrics: every counter and histogram moves by exactly what the requests did.

Each app has its own registry, so every test starts from zero. The multi-process tests run
real processes with PROMETHEUS_MULTIPROC_DIR set (prometheus-client reads it on import,
so they cannot run inside this process) and add them up as /metrics would.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from images import BLUE, RED, image_bytes
from server_process import free_port, wait_for_port
from uploading import post_file
from keras_serve.web import metrics as web_metrics
from keras_serve.web import metrics_processes

ROOT = Path(__file__).resolve().parent.parent
Samples = dict[tuple[str, frozenset], float]


def parse(text: str) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(client) -> Samples:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.content_type.startswith("text/plain; version=")
    return parse(r.get_data(as_text=True))


def value(samples: Samples, name: str, **labels: str) -> float:
    """0 for a series not there yet (prometheus-client shows a labelled series once it is used)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def shown(samples: Samples, name: str, **labels: str) -> float:
    """The value of a series that must be in the scrape: a 0 from here was exported as 0,
    not a metric missing or renamed."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} is not exported"
    return samples[key]


def test_requests_are_counted_by_route_method_and_status(client):
    for _ in range(3):
        assert post_file(client, image_bytes(RED)).status_code == 200
    assert post_file(client, b"not an image").status_code == 415
    assert client.get("/healthz").status_code == 200
    assert client.get("/healthz").status_code == 200
    for path in ("/wp-admin", "/.env", "/a/b/c"):
        assert client.get(path).status_code == 404
    assert client.delete("/healthz").status_code == 405

    s = scrape(client)
    requests = "keras_serve_http_requests_total"
    assert value(s, requests, route="/file/", method="POST", status="200") == 3
    assert value(s, requests, route="/file/", method="POST", status="415") == 1
    assert value(s, requests, route="/healthz", method="GET", status="200") == 2
    # Scanned paths share one series: a client cannot create one per URL.
    assert value(s, requests, route="unmatched", method="GET", status="404") == 3
    assert value(s, requests, route="unmatched", method="DELETE", status="405") == 1
    assert not any(dict(labels).get("route") in ("/wp-admin", "/.env") for _, labels in s)
    latency = "keras_serve_http_request_duration_seconds"
    assert value(s, latency + "_count", route="/file/", method="POST") == 4
    assert value(s, latency + "_bucket", route="/file/", method="POST", le="+Inf") == 4
    assert value(s, latency + "_sum", route="/file/", method="POST") > 0
    # The scrape being answered is the one request in progress; it is counted once it is done.
    assert value(s, "keras_serve_http_requests_in_progress") == 1
    assert (requests, frozenset({"route": "/metrics", "method": "GET", "status": "200"}.items())) not in s
    assert shown(scrape(client), requests, route="/metrics", method="GET", status="200") == 1


def test_invented_methods_and_paths_do_not_grow_metrics(client):
    """Any token is a valid HTTP method and any path can be asked: thousands of each must
    leave /metrics the size it was after one of each (issue 20: 5,000 methods had added
    100,000 lines)."""
    def size() -> tuple[int, int]:
        text = client.get("/metrics").get_data(as_text=True)
        return len(text.splitlines()), len(text)

    client.open("/healthz", method="FROB0")
    client.open("/nope-0", method="FROB0")
    client.get("/nope-0")
    size()  # the scrape counts itself: its own series are there from the second one on
    lines, chars = size()
    for i in range(1, 2500):
        client.open("/healthz", method=f"FROB{i}")                # a real route, an invented method
        client.open(f"/nope-{i}/{'x' * (i % 50)}", method=f"M{i}")  # an invented path and method
        client.get(f"/scan/{i}.php")
    grown_lines, grown_chars = size()
    # The same series, only their values grew (a count of 5,000 is a few characters longer than 3).
    assert grown_lines == lines and grown_chars - chars < 1000, (lines, grown_lines, chars, grown_chars)
    s = scrape(client)
    # a method no route has is a 405 (unmatched), an unknown path a 404: one series each, method "other"
    assert value(s, "keras_serve_http_requests_total", route="unmatched", method="other", status="405") \
        + value(s, "keras_serve_http_requests_total", route="unmatched", method="other", status="404") == 5000
    assert not any("FROB" in dict(labels).get("method", "") for _, labels in s)


def test_batch_sizes_and_inference_time_match_the_batcher(app):
    results = []

    def upload():
        results.append(post_file(app.test_client(), image_bytes(BLUE)).status_code)

    threads = [threading.Thread(target=upload) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 12

    s = scrape(app.test_client())
    batcher = app.extensions["classifier"].batcher
    assert value(s, "keras_serve_batch_size_sum") == 12 == batcher.items
    assert value(s, "keras_serve_batch_size_count") == batcher.batches
    assert value(s, "keras_serve_batch_size_bucket", le="+Inf") == batcher.batches
    assert value(s, "keras_serve_inference_duration_seconds_count") == batcher.batches
    assert value(s, "keras_serve_inference_duration_seconds_sum") > 0


def test_uploads_stored_count_and_bytes(client, app, monkeypatch):
    red, blue = image_bytes(RED), image_bytes(BLUE, fmt="PNG")
    assert post_file(client, red).status_code == 200
    assert post_file(client, blue).status_code == 200
    assert post_file(client, b"").status_code == 400  # rejected: nothing stored

    def failing(batch):
        raise RuntimeError("model down")

    monkeypatch.setattr(app.extensions["classifier"].batcher, "_predict_batch", failing)
    r = post_file(client, red)
    assert r.status_code == 503 and r.get_json()["error"]["id"]  # kept, with its error

    s = scrape(client)
    assert value(s, "keras_serve_uploads_stored_total") == 3
    assert value(s, "keras_serve_upload_bytes_stored_total") == 2 * len(red) + len(blue)


def test_storage_errors_are_counted_by_operation_and_kind(client, app):
    upload_dir = Path(app.config["UPLOAD_DIR"])
    # Moved away in one step, then a file put in its place. The store's background check may
    # write (and so recreate the folder) in between: then try again.
    for attempt in range(50):
        try:
            upload_dir.rename(upload_dir.with_name(f"{upload_dir.name}.gone{attempt}"))
            upload_dir.write_text("a file where the upload folder was")
            break
        except OSError:
            time.sleep(0.05)
    assert upload_dir.is_file()  # every write now fails for real
    for _ in range(2):
        r = post_file(client, image_bytes(RED))
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "storage"

    s = scrape(client)
    assert value(s, "keras_serve_storage_errors_total", operation="save", kind="storage") == 2
    assert shown(s, "keras_serve_uploads_stored_total") == 0
    assert value(s, "keras_serve_http_requests_total", route="/file/", method="POST", status="503") == 2


def test_two_apps_in_one_process_count_separately(make_app, colour_model_path, client):
    other = make_app(MODEL_PATH=str(colour_model_path)).test_client()
    client.get("/healthz")
    for _ in range(2):
        other.get("/healthz")
    s, t = scrape(client), scrape(other)
    assert shown(s, "keras_serve_http_requests_total", route="/healthz", method="GET", status="200") == 1
    assert shown(t, "keras_serve_http_requests_total", route="/healthz", method="GET", status="200") == 2


def test_multiprocess_dir_set_after_import_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="before the server starts"):
        web_metrics.init_app(Flask("late"))


# --- several processes ----------------------------------------------------------------------
WORKER = r"""
import sys, time
from flask import Flask
from keras_serve.web import metrics

app = Flask("worker")
app.add_url_rule("/ping", "ping", lambda: "pong")
app.add_url_rule("/slow", "slow", lambda: (print("inside", flush=True), time.sleep(120), "late")[-1])
recorder = metrics.init_app(app)
client = app.test_client()
requests, batches, upload_bytes = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for _ in range(requests):
    assert client.get("/ping").status_code == 200
for size in map(int, batches.split(",")):
    recorder.batch_predicted(size, 0.25)
recorder.upload_stored(upload_bytes)
recorder.storage_failed("save", "storage")
if "--hang" in sys.argv:
    client.get("/slow")  # killed in here, its request still in progress
elif "--scrape" in sys.argv:
    sys.stdout.write(client.get("/metrics").get_data(as_text=True))
"""


def run_worker(shared_dir: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared_dir)}
    return subprocess.Popen([sys.executable, "-c", WORKER, *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return out


def aggregate(shared_dir: Path) -> Samples:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(shared_dir))
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in registry.collect() for s in family.samples}


def test_counts_from_several_processes_add_up(tmp_path):
    shared = tmp_path / "prometheus"
    first, second = run_worker(shared, "2", "3", "1000"), run_worker(shared, "5", "4,1", "500")
    finish(first), finish(second)
    assert len(list(shared.glob("*.db"))) >= 2  # one file per process and metric type

    s = aggregate(shared)
    assert value(s, "keras_serve_http_requests_total", route="/ping", method="GET", status="200") == 7
    assert value(s, "keras_serve_http_request_duration_seconds_count", route="/ping", method="GET") == 7
    assert value(s, "keras_serve_batch_size_count") == 3
    assert value(s, "keras_serve_batch_size_sum") == 8
    assert value(s, "keras_serve_batch_size_bucket", le="1.0") == 1
    assert value(s, "keras_serve_batch_size_bucket", le="4.0") == 3
    assert value(s, "keras_serve_inference_duration_seconds_sum") == pytest.approx(0.75)
    assert value(s, "keras_serve_uploads_stored_total") == 2
    assert value(s, "keras_serve_upload_bytes_stored_total") == 1500
    assert value(s, "keras_serve_storage_errors_total", operation="save", kind="storage") == 2

    # A third process's /metrics answers with everyone's counts, its own included.
    scraped = parse(finish(run_worker(shared, "1", "2", "10", "--scrape")))
    assert value(scraped, "keras_serve_http_requests_total", route="/ping", method="GET", status="200") == 8
    assert value(scraped, "keras_serve_batch_size_sum") == 10
    assert value(scraped, "keras_serve_upload_bytes_stored_total") == 1510
    assert value(scraped, "keras_serve_http_requests_in_progress") == 1  # the scrape itself


def test_a_killed_worker_stops_counting_as_in_progress_after_child_exit(tmp_path, monkeypatch):
    shared = tmp_path / "prometheus"
    worker = run_worker(shared, "1", "1", "100", "--hang")
    try:
        assert worker.stdout.readline().strip() == "inside"
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.communicate()
    s = aggregate(shared)
    assert value(s, "keras_serve_http_requests_in_progress") == 1  # the dead worker's request
    assert value(s, "keras_serve_http_requests_total", route="/ping", method="GET", status="200") == 1

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    metrics_processes.child_exit(server=None, worker=SimpleNamespace(pid=worker.pid))  # what gunicorn calls
    s = aggregate(shared)
    assert value(s, "keras_serve_http_requests_in_progress") == 0
    # Counters of a dead worker stay: the requests it answered did happen.
    assert value(s, "keras_serve_http_requests_total", route="/ping", method="GET", status="200") == 1


def test_clear_multiprocess_dir_empties_the_folder(tmp_path, monkeypatch):
    shared = tmp_path / "prometheus"
    finish(run_worker(shared, "1", "1", "1"))
    assert list(shared.iterdir())
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    metrics_processes.clear_multiprocess_dir()
    assert shared.is_dir() and not list(shared.iterdir())


MANAGER = r"""
import os, sys
from keras_serve.web import metrics_processes

if "--import-prometheus-first" in sys.argv:
    import prometheus_client  # the mistake the module exists to prevent
assert ("prometheus_client" in sys.modules) == ("--import-prometheus-first" in sys.argv)
with metrics_processes.share_between_processes() as folder:
    print("folder", folder, flush=True)
    workers = []
    for requests in (2, 3):
        pid = os.fork()
        if pid == 0:  # a worker, as gunicorn forks them
            from flask import Flask
            from keras_serve.web import metrics
            app = Flask("worker")
            app.add_url_rule("/ping", "ping", lambda: "pong")
            try:
                metrics.init_app(app)
            except ValueError as exc:
                print(exc, flush=True)
                os._exit(7)
            client = app.test_client()
            for _ in range(requests):
                client.get("/ping")
            os._exit(0)
        workers.append(pid)
    print("exit codes", [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in workers], flush=True)
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    print("pings", registry.get_sample_value("keras_serve_http_requests_total",
                                              {"route": "/ping", "method": "GET", "status": "200"}))
print("after", os.path.exists(folder), os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
"""


def run_manager(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", MANAGER, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, env={k: v for k, v in {**os.environ, **env}.items()
                                             if k != "PROMETHEUS_MULTIPROC_DIR" or v})
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_a_manager_that_forks_workers_shares_their_counts(tmp_path):
    shared = tmp_path / "prometheus"
    shared.mkdir()
    (shared / "counter_999999.db").write_bytes(b"left by an earlier run")
    out = run_manager({"PROMETHEUS_MULTIPROC_DIR": str(shared)})
    assert "exit codes [0, 0]" in out and "pings 5.0" in out
    assert not (shared / "counter_999999.db").exists()
    assert f"after True {shared}" in out  # the operator's folder stays
    s = aggregate(shared)
    assert value(s, "keras_serve_http_requests_total", route="/ping", method="GET", status="200") == 5


def test_without_a_folder_the_manager_uses_a_private_one_and_removes_it():
    out = run_manager({"PROMETHEUS_MULTIPROC_DIR": ""})
    folder = Path(out.split("folder ", 1)[1].split()[0])
    assert folder.name.startswith("keras-serve-metrics-")
    assert "exit codes [0, 0]" in out and "pings 5.0" in out
    assert "after False None" in out and not folder.exists()


def test_workers_of_a_manager_that_imported_prometheus_too_early_refuse_to_start():
    # The variable is unset when prometheus_client is imported, and set (by the manager) after.
    out = run_manager({"PROMETHEUS_MULTIPROC_DIR": ""}, "--import-prometheus-first")
    assert "exit codes [7, 7]" in out and "before the server starts" in out


GUNICORN_CONFIG = """
from keras_serve.web import metrics_processes

on_starting = lambda server: metrics_processes.clear_multiprocess_dir()
child_exit = metrics_processes.child_exit
"""


def get(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def dropped(outcome: object) -> bool:
    """Whether a request ended by the server closing its connection (a killed worker)."""
    if isinstance(outcome, urllib.error.URLError):
        outcome = outcome.reason
    return isinstance(outcome, ConnectionError)


def test_real_gunicorn_workers_answer_metrics_for_all_of_them(tmp_path):
    shared, config, slow_pid = tmp_path / "prometheus", tmp_path / "gunicorn.conf.py", tmp_path / "slow.pid"
    config.write_text(GUNICORN_CONFIG)
    port = free_port()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared), "SLOW_PID_FILE": str(slow_pid)}
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", str(config), "--workers", "2", "--bind", f"127.0.0.1:{port}",
         "--pythonpath", str(ROOT / "tests"), "--timeout", "120", "metrics_app:create()"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_port(port, server)
        answers: list[str] = []
        senders = [threading.Thread(target=lambda: answers.append(get(url + "/pid"))) for _ in range(8)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        assert len(answers) == 8 and len(set(answers)) == 2, answers  # both workers answered
        # Whichever worker answers the scrape, it reports both workers' requests.
        for _ in range(6):
            s = parse(get(url + "/metrics"))
            assert value(s, "keras_serve_http_requests_total", route="/pid", method="GET", status="200") == 8

        slow_outcome: list[object] = []

        def ask_slow() -> None:  # an exception here is kept and judged in the test's own thread
            try:
                slow_outcome.append(get(url + "/slow", 30))
            except Exception as exc:
                slow_outcome.append(exc)

        slow = threading.Thread(target=ask_slow, daemon=True)
        slow.start()
        deadline = time.monotonic() + 20
        while not slow_pid.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert value(parse(get(url + "/metrics")), "keras_serve_http_requests_in_progress") == 2  # slow + scrape
        os.kill(int(slow_pid.read_text()), signal.SIGKILL)  # gunicorn reaps it and calls child_exit
        slow.join(60)
        # the kill cut the slow request off: the connection dropped, not a timeout nor an answer
        assert len(slow_outcome) == 1 and dropped(slow_outcome[0]), slow_outcome
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            s = parse(get(url + "/metrics"))
            if value(s, "keras_serve_http_requests_in_progress") == 1:
                break
            time.sleep(0.1)
        assert value(s, "keras_serve_http_requests_in_progress") == 1  # only this scrape
        assert value(s, "keras_serve_http_requests_total", route="/pid", method="GET", status="200") == 8
    finally:
        server.terminate()  # communicate, not wait: it drains the pipe the server writes its log into
        try:
            server.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.communicate()
