"""`--workers N`: N processes on one port, each with its own model, started and stopped as one."""
from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from images import BLUE, RED, image_bytes
from server_process import ROOT, ServerProcess, ready_pids


def test_two_workers_share_the_port_and_both_answer(colour_model_path, tmp_path):
    home, runtime = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    runtime.mkdir()
    srv = ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path), "--workers", "2",
                        "--threads", "4", env={"HOME": str(home), "XDG_RUNTIME_DIR": str(runtime)})
    try:
        pids = ready_pids(srv.url)
        assert len(pids) == 2 and srv.proc.pid not in pids  # two workers, neither is the arbiter
        images = [image_bytes(RED if i % 2 else BLUE, (64 + i, 48)) for i in range(16)]
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(lambda i: requests.post(
                srv.url + "/file/", files={"file": ("x.jpg", images[i], "image/jpeg")}, timeout=60), range(16)))
        assert [r.status_code for r in answers] == [200] * 16
        assert [r.json()["class"] for r in answers] == ["DOG" if i % 2 else "CAT" for i in range(16)]
        with contextlib.closing(sqlite3.connect(tmp_path / "uploads.db")) as db:
            stored = {upload_id for (upload_id,) in db.execute("SELECT id FROM uploads")}
        assert {r.json()["id"] for r in answers} <= stored  # both processes write to the same uploads.db
        for _ in range(4):  # whichever worker answers, /metrics counts both workers' uploads
            scrape = requests.get(srv.url + "/metrics", headers={"Connection": "close"}, timeout=10).text
            samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                       for family in text_string_to_metric_families(scrape) for s in family.samples}
            assert samples[("keras_serve_uploads_stored_total", ())] == 16
            assert samples[("keras_serve_batch_size_sum", ())] == 16
            assert samples[("keras_serve_http_requests_total",
                            (("method", "POST"), ("route", "/file/"), ("status", "200")))] == 16
    finally:
        output = srv.stop()  # SIGTERM: gunicorn stops its workers gracefully
    assert srv.proc.returncode == 0, output
    assert output.count(" ready: model colour.h5") == 2 and "2 worker processes" in output
    # No gunicorn control socket: nothing but the port is opened to manage the server.
    assert not (home / ".gunicorn").exists() and list(runtime.iterdir()) == [] and "Control socket" not in output
    for pid in pids:  # no worker outlives the arbiter
        assert subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0


def test_a_killed_worker_is_replaced_while_the_other_keeps_answering(colour_model_path, tmp_path):
    srv = ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path), "--workers", "2",
                        "--threads", "4")
    try:
        victim, survivor = sorted(ready_pids(srv.url))
        os.kill(victim, signal.SIGKILL)
        answer = requests.post(srv.url + "/file/", files={"file": ("x.png", image_bytes(RED), "image/png")},
                               timeout=60)
        assert answer.status_code == 200 and answer.json()["class"] == "DOG"
        deadline = time.monotonic() + 90
        pids: set[int] = set()
        while time.monotonic() < deadline and len(pids) < 2:
            pids = ready_pids(srv.url)  # the replacement loads its own model, then answers too
        assert survivor in pids and len(pids) == 2 and victim not in pids
    finally:
        output = srv.stop()
    assert srv.proc.returncode == 0, output


def test_a_model_that_cannot_load_stops_every_worker_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "app.py", "--host", "127.0.0.1", "--port", "0", "--workers", "2",
                             "--model", str(tmp_path / "missing.h5"), "--upload-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error: model file not found" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("cpu_count", [1, 2], ids=["taskset 1 CPU", "taskset 2 CPUs"])
def test_with_no_workers_setting_the_server_starts_one_worker_per_usable_cpu(cpu_count, colour_model_path,
                                                                             tmp_path):
    """`python app.py` with no --workers and no KERAS_SERVE_WORKERS (the suite sets it to 1 for
    every other server, tests/conftest.py): auto, one worker per CPU of its affinity."""
    from keras_serve.worker_count import MIB, plan_workers

    cpus = sorted(os.sched_getaffinity(0))[:cpu_count]
    budget_mb = 64  # 814 MiB per worker: memory is not what this test is about (tests/test_worker_count.py)
    # As many as this machine's CPU quota and memory allow too (a machine with one CPU gets 1 twice).
    expected = min(len(cpus), plan_workers(budget_mb * MIB).workers)
    srv = ServerProcess("--model", str(colour_model_path), "--upload-dir", str(tmp_path), "--threads", "4",
                        "--decode-budget-mb", str(budget_mb), unset=("KERAS_SERVE_WORKERS",),
                        wrapper=("taskset", "-c", ",".join(map(str, cpus))))
    try:
        if expected == 1:  # one process, no arbiter: the pid that answers is the one started
            assert requests.get(srv.url + "/readyz", timeout=10).json()["pid"] == srv.proc.pid
        else:
            pids = ready_pids(srv.url)
            assert len(pids) == expected and srv.proc.pid not in pids
        answer = requests.post(srv.url + "/file/", files={"file": ("x.png", image_bytes(RED), "image/png")},
                               timeout=60)
        assert answer.status_code == 200 and answer.json()["class"] == "DOG"
    finally:
        output = srv.stop()
    assert srv.proc.returncode == 0, output
    [line] = [line for line in output.splitlines() if "workers auto:" in line]
    plural = "es" if expected > 1 else ""
    assert f"{expected} worker process{plural} for {len(cpus)} usable CPU" in line, line
    assert "814 MiB per worker" in line, line
    assert output.count(" ready: model colour.h5") == (expected if expected > 1 else 0), output
    assert (f"{expected} worker processes under gunicorn" in output) == (expected > 1), output
