"""The HTTP side: start the server as a child, keep N uploads in flight, measure each level."""
from __future__ import annotations

import http.client
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from prometheus_client.parser import text_string_to_metric_families

from keras_serve.settings import PROJECT_ROOT
from keras_serve.tools.benchmark.inputs import Upload
from keras_serve.tools.benchmark.procstats import cpu_seconds, machine_ticks, own_cpu_seconds
from keras_serve.tools.benchmark.stats import latency_summary_ms


class BenchmarkError(RuntimeError):
    """The benchmark cannot go on (exit status 2)."""


class ServerProcess:
    """app.py as a child in its own session, so a terminal Ctrl-C reaches only us and we
    decide how it stops; SIGTERM to the whole group also takes any workers it forked."""

    def __init__(self, app_path: Path, host: str, port: int, model: Path, extra_args: list[str],
                 log_path: Path) -> None:
        self.command = [sys.executable, str(app_path), "--host", host, "--port", str(port),
                        "--model", str(model), *extra_args]
        self.host, self.port, self.log_path = host, port, log_path
        self.process: subprocess.Popen | None = None
        self.ready_after_s = math.nan
        self.stopped_by = ""  # the signal that ended it, for the report

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout_s: float, workers: int = 1) -> None:
        """Start and wait until `workers` distinct processes answer /readyz as ready."""
        started = time.perf_counter()
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command, cwd=PROJECT_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = started + timeout_s
        last_problem = "no answer yet"
        ready: set[Any] = set()
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(f"server exited with status {self.process.returncode} before it was ready; "
                                     f"log tail:\n{self.log_tail()}")
            try:
                # A new connection per poll, so the kernel hands it to any worker.
                conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
                conn.request("GET", "/readyz", headers={"Connection": "close"})
                response = conn.getresponse()
                body = response.read()
                conn.close()
                status = json.loads(body)
                if response.status == 200 and status.get("ready") is True:
                    ready.add(status.get("pid"))
                    if len(ready) >= workers:
                        self.ready_after_s = time.perf_counter() - started
                        return
                    last_problem = f"{len(ready)} of {workers} workers ready"
                    continue
                last_problem = f"/readyz answered {response.status}: {body[:200]!r}"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                last_problem = f"{type(exc).__name__}: {exc}"
            time.sleep(0.25)
        raise BenchmarkError(f"server not ready after {timeout_s:.0f} s ({last_problem}); log tail:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 10.0) -> int | None:
        """SIGINT (what Ctrl-C sends an operator's server), then SIGTERM, then SIGKILL, to the
        whole group, each after grace_s. Returns the exit status (negative: killed by signal)."""
        if self.process is None:
            return None
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=grace_s)
                self.stopped_by = sig.name
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        self.process.wait()
        self._log.close()
        return self.process.returncode


# ----------------------------------------------------------------------------------------
# HTTP load generator
# ----------------------------------------------------------------------------------------

class CountingConnection(http.client.HTTPConnection):
    """Counts TCP connects, to show whether the server really keeps connections alive."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connects = 0

    def connect(self) -> None:
        super().connect()
        self.connects += 1


@dataclass
class WorkerLog:
    records: list[tuple[float, float, bool]] = field(default_factory=list)  # (start, end, ok)
    errors: list[str] = field(default_factory=list)
    connects: int = 0


def post_once(conn: CountingConnection, upload: Upload, log: WorkerLog) -> None:
    """One POST /file/, recorded in log; a failed connection is closed so the next reconnects."""
    started = time.perf_counter()
    ok, problem = False, ""
    try:
        body, headers = upload.request()
        conn.request("POST", "/file/", body=body, headers=headers)
        response = conn.getresponse()
        payload = response.read()
        if response.status != 200:
            problem = f"HTTP {response.status}: {payload[:200]!r}"
        else:
            answer = json.loads(payload)
            if "class" in answer:
                ok = True
            else:
                problem = f"200 without 'class': {payload[:200]!r}"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
        conn.close()
    log.records.append((started, time.perf_counter(), ok))
    if not ok:
        log.errors.append(f"{upload.name}: {problem}")


def batcher_counters(host: str, port: int, timeout_s: float = 10.0) -> tuple[int, int] | None:
    """(model calls, images) so far, from the server's /metrics; None if it does not say.

    /metrics adds up every worker process (docs/operations.md, Metrics); /readyz speaks for whichever
    worker answers, so with --workers N its counters would mix processes.
    """
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        samples = {sample.name: sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples}
        return int(samples["keras_serve_batch_size_count"]), int(samples["keras_serve_batch_size_sum"])
    except (OSError, http.client.HTTPException, ValueError, KeyError, TypeError):
        return None
    finally:
        conn.close()


@dataclass
class LevelResult:
    concurrency: int
    duration_s: float
    requests: int           # successful requests completed inside the measured window
    requests_per_s: float
    latency_ms: dict[str, float]
    errors_window: int
    errors_total: int       # including the warm-up
    error_samples: list[str]
    connects: int
    total_requests: int     # including the warm-up
    server_cpu_s: float
    client_cpu_s: float
    machine_busy_pct: float      # of all cores, whole machine, during the window
    machine_cpu_ms_per_request: float
    images_per_model_call: float  # mean batch the server formed during the window


def run_level(host: str, port: int, uploads: Sequence[Upload], concurrency: int, warmup_s: float,
              duration_s: float, timeout_s: float, server_pid: int,
              max_requests: int | None = None) -> LevelResult:
    """Keep `concurrency` requests in flight for warmup+duration seconds (or until
    max_requests are sent) and measure the requests that complete after the warm-up."""
    logs = [WorkerLog() for _ in range(concurrency)]
    ticket = itertools.count()  # next() on a count is atomic under the GIL
    go, stop = threading.Event(), threading.Event()

    def worker(index: int) -> None:
        conn = CountingConnection(host, port, timeout=timeout_s)
        log = logs[index]
        go.wait()
        while not stop.is_set():
            number = next(ticket)
            if max_requests is not None and number >= max_requests:
                break
            # Consecutive tickets pick consecutive images, so concurrent requests carry different files.
            post_once(conn, uploads[number % len(uploads)], log)
        log.connects = conn.connects
        conn.close()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    try:
        start = time.perf_counter()
        go.set()
        window_start = start + warmup_s
        time.sleep(max(0.0, window_start - time.perf_counter()))
        server_cpu0, client_cpu0, machine0 = cpu_seconds(server_pid), own_cpu_seconds(), machine_ticks()
        batches0 = batcher_counters(host, port)
        window_start = time.perf_counter()
        if max_requests is None:
            time.sleep(max(0.0, window_start + duration_s - time.perf_counter()))
        else:
            while any(thread.is_alive() for thread in threads):
                time.sleep(0.05)
        # Read the meters at the end of the window, not after the in-flight stragglers finish.
        server_cpu1, client_cpu1, machine1 = cpu_seconds(server_pid), own_cpu_seconds(), machine_ticks()
        batches1 = batcher_counters(host, port)
        window_end = time.perf_counter()
    finally:
        # Also on Ctrl-C: idle the clients so the server can shut down without in-flight work.
        stop.set()
        for thread in threads:
            thread.join(timeout=timeout_s)

    records = [r for log in logs for r in log.records]
    in_window = [r for r in records if window_start <= r[1] <= window_end]
    good = [r for r in in_window if r[2]]
    elapsed = window_end - window_start
    errors = [e for log in logs for e in log.errors]
    busy_ticks, total_ticks = machine1[0] - machine0[0], machine1[1] - machine0[1]
    busy_core_ms = busy_ticks / os.sysconf("SC_CLK_TCK") * 1000.0
    calls = images = 0
    if batches0 and batches1:
        calls, images = batches1[0] - batches0[0], batches1[1] - batches0[1]
    return LevelResult(
        concurrency=concurrency,
        duration_s=elapsed,
        requests=len(good),
        requests_per_s=len(good) / elapsed if elapsed > 0 else math.nan,
        latency_ms=latency_summary_ms(end - begin for begin, end, _ in good),
        errors_window=sum(1 for r in in_window if not r[2]),
        errors_total=len(errors),
        error_samples=errors[:5],
        connects=sum(log.connects for log in logs),
        total_requests=len(records),
        server_cpu_s=server_cpu1 - server_cpu0,
        client_cpu_s=client_cpu1 - client_cpu0,
        machine_busy_pct=busy_ticks / total_ticks * 100.0 if total_ticks else math.nan,
        # Per request, all cores: model + server + this client + kernel; the budget is
        # cores * 1000 / (req/s), so this says how far the machine is from saturated.
        machine_cpu_ms_per_request=busy_core_ms / len(good) if good else math.nan,
        images_per_model_call=images / calls if calls else math.nan,
    )


def time_single_upload(host: str, port: int, upload: Upload, count: int, timeout_s: float) -> dict[str, Any]:
    """End-to-end latency of one (large) upload, one client, sequential requests."""
    conn = CountingConnection(host, port, timeout=timeout_s)
    log = WorkerLog()
    for _ in range(2):  # warm-up: the first large body grows the server's buffers
        post_once(conn, upload, log)
    warmup_errors = len(log.errors)
    log.records.clear()
    for _ in range(count):
        post_once(conn, upload, log)
    conn.close()
    good = [end - begin for begin, end, ok in log.records if ok]
    return {"requests": count, "latency_ms": latency_summary_ms(good),
            "errors": len(log.errors) - warmup_errors, "warmup_errors": warmup_errors,
            "error_samples": log.errors[:3]}


# ----------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------

