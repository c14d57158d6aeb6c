"""The helpers of the benchmark package (no model, no app server)."""
from __future__ import annotations

import email.parser
import math
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from keras_serve.tools.benchmark import inputs, load, procstats, stats


@pytest.mark.parametrize("q", [0, 1, 10, 50, 90, 99, 100])
def test_percentile_matches_numpy_linear(q: float) -> None:
    values = sorted(np.random.default_rng(3).exponential(10.0, size=101).tolist())
    assert stats.percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_percentile_edge_cases() -> None:
    assert math.isnan(stats.percentile([], 50))
    assert stats.percentile([7.0], 99) == 7.0
    assert stats.percentile([1.0, 3.0], 50) == 2.0
    with pytest.raises(ValueError):
        stats.percentile([1.0], 101)


def test_latency_summary_converts_to_ms() -> None:
    summary = stats.latency_summary_ms([0.010, 0.020, 0.030])
    assert summary["count"] == 3
    assert summary["p50"] == pytest.approx(20.0)
    assert summary["max"] == pytest.approx(30.0)
    assert summary["mean"] == pytest.approx(20.0)
    assert math.isnan(stats.latency_summary_ms([])["p99"])


def test_parse_int_list() -> None:
    assert stats.parse_int_list("1,8, 32,64") == [1, 8, 32, 64]
    assert stats.parse_int_list("4") == [4]
    for bad in ("", "0,1", "a", "1,-2"):
        with pytest.raises(ValueError):
            stats.parse_int_list(bad)


def test_multipart_body_parses_back_to_the_file() -> None:
    data = bytes(range(256)) * 4 + b"\r\n--not-a-boundary\r\n"
    boundary = inputs.fresh_boundary()
    body = inputs.multipart_body("file", "cat.1.jpg", "image/jpeg", data, boundary)
    header = f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n".encode()
    message = email.parser.BytesParser().parsebytes(header + body)
    parts = message.get_payload()
    assert len(parts) == 1
    assert parts[0].get_param("name", header="content-disposition") == "file"
    assert parts[0].get_filename() == "cat.1.jpg"
    assert parts[0].get_payload(decode=True) == data


def test_each_upload_request_has_a_fresh_boundary_and_parses_back() -> None:
    upload = inputs.Upload(b"\xff\xd8 jpeg \r\n-- bytes", "dog.7.jpg")
    (first, first_headers), (second, second_headers) = upload.request(), upload.request()
    assert first_headers["Content-Type"] != second_headers["Content-Type"]
    for body, headers in ((first, first_headers), (second, second_headers)):
        raw = f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body
        [part] = email.parser.BytesParser().parsebytes(raw).get_payload()
        assert part.get_filename() == "dog.7.jpg" and part.get_payload(decode=True) == upload.data


def test_percent_change() -> None:
    assert stats.percent_change(100.0, 110.0) == pytest.approx(10.0)
    assert stats.percent_change(200.0, 150.0) == pytest.approx(-25.0)
    assert math.isnan(stats.percent_change(0.0, 5.0))


def test_parse_vmrss_kb() -> None:
    status = "Name:\tpython\nVmPeak:\t 900 kB\nVmRSS:\t  123456 kB\nThreads:\t40\n"
    assert procstats.parse_vmrss_kb(status) == 123456
    assert procstats.parse_vmrss_kb("Name:\tkthreadd\n") is None


def test_parse_cpu_ticks_handles_odd_process_names() -> None:
    # Fields after the name: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime ...
    rest = "S 1 2 3 4 5 6 7 8 9 10 111 222 0 0 20 0 1"
    assert procstats.parse_cpu_ticks(f"42 (python) {rest}") == 333
    assert procstats.parse_cpu_ticks(f"42 (a b) (c) {rest}") == 333


def test_parse_cpu_ticks_of_this_process() -> None:
    text = Path("/proc/self/stat").read_text() if Path("/proc/self/stat").exists() else None
    if text is None:
        pytest.skip("no /proc on this system")
    per_second = os.sysconf("SC_CLK_TCK")

    def ticks_from_times() -> int:
        # times(2) counts the same user+system ticks as /proc/self/stat, in seconds here
        now = os.times()
        return round((now.user + now.system) * per_second)

    while ticks_from_times() < 5:  # enough CPU used that zero or a wrong field cannot match
        sum(range(10_000))
    before = ticks_from_times()
    parsed = procstats.parse_cpu_ticks(Path("/proc/self/stat").read_text())
    after = ticks_from_times()
    assert 0 < before <= parsed <= after, (before, parsed, after)


def test_parse_machine_ticks_counts_all_but_idle_and_iowait() -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    text = "cpu  100 1 20 300 5 2 3 4 50 0\ncpu0 50 0 10 150 2 1 1 2 25 0\nintr 1 2\n"
    busy, total = procstats.parse_machine_ticks(text)
    assert total == 100 + 1 + 20 + 300 + 5 + 2 + 3 + 4
    assert busy == total - 300 - 5
    with pytest.raises(ValueError):
        procstats.parse_machine_ticks("intr 1 2\n")


def test_format_table_aligns_columns() -> None:
    table = stats.format_table(["conc", "req/s"], [[1, 12.345], [64, 1234.5], [8, math.nan]])
    lines = table.splitlines()
    assert lines[0] == "conc  req/s"
    assert lines[1] == "   1  12.35"
    assert lines[2] == "  64   1234"
    assert lines[3] == "   8      -"
    assert len({len(line) for line in lines}) == 1


def test_batcher_counters_read_every_workers_batches_from_metrics() -> None:
    # What /metrics says with two workers: their histograms added up (prometheus multiprocess mode).
    registry = CollectorRegistry()
    batch_size = Histogram("keras_serve_batch_size", "Inputs per forward pass.", buckets=(1, 8, 32),
                           registry=registry)
    for size in (1, 7, 12):
        batch_size.observe(size)
    body = generate_latest(registry)

    class Metrics(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/metrics" else 404)
            self.end_headers()
            self.wfile.write(body if self.path == "/metrics" else b"{}")

        def log_message(self, *args) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Metrics) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            assert load.batcher_counters("127.0.0.1", server.server_address[1]) == (3, 20)
        finally:
            server.shutdown()
