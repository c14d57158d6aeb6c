#!/usr/bin/env python
"""Throughput, latency and memory of the image-classification server against the raw model.

Usage (from the project root, with the venv's python):

    .venv/bin/python -m keras_serve.tools.benchmark [--model models/cats_vs_dogs.h5]
        [--concurrency 1,8,32,64] [--duration 15] [--warmup 3]
        [--server-args="--max-batch 16 --max-wait-ms 5 --threads 8"]
        [--soak 10000 --soak-concurrency 32] [--json results.json]

Steps, all on this one machine:
  1. Raw model, in a child process so its threads and memory are gone before the server
     starts: best batched images/s through a tf.function (batch 1, 8, 16, 32, 64) and the
     single-image latency = decode+preprocess of a real JPEG + one forward at batch 1.
  2. Starts `app.py` on a free port, waits for /readyz, then drives POST /file/ over
     keep-alive connections (one thread and one http.client connection per client, a fresh
     multipart boundary per request as real clients send) at each concurrency level:
     requests/s, p50/p90/p99 latency, errors, the ratio to the raw model's best batched
     throughput, whole-machine CPU time per request and the mean batch the server formed.
  3. A 4032x3024 phone-sized JPEG end to end at one client (median, p90).
  4. Server VmRSS along the way; with --soak N, N more requests and the RSS change.
  5. A plain-text summary (and --json PATH with every number).
The server is stopped at the end (SIGINT, then SIGTERM, then SIGKILL), also on Ctrl-C or
an error. Unless --server-args names --upload-dir, the server stores uploads in a throw-away
folder uploads/.benchmark-XXXX (same disk as ./uploads), removed at the end.
--skip-raw leaves out step 1 (no ratios), to compare --server-args settings quickly.

Exit status: 0 all requests succeeded; 1 some request failed (non-200, bad body or a
connection error); 2 the benchmark could not run (server did not start, raw step failed).
Timings are only meaningful on an otherwise idle machine: the load average at the start is
printed so a busy machine shows.
"""
from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import platform
import secrets
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from keras_serve.settings import PROJECT_ROOT
from typing import Any, Iterable, Sequence

ROOT = PROJECT_ROOT
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "cats_vs_dogs" / "validation"
DEFAULT_MODEL = ROOT / "models" / "cats_vs_dogs.h5"
PHONE_SIZE = (4032, 3024)


# ----------------------------------------------------------------------------------------
# Pure helpers (unit-tested in tests/test_benchmark_helpers.py)
# ----------------------------------------------------------------------------------------

def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile of already sorted values (numpy's default method)."""
    if not sorted_values:
        return math.nan
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    position = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(position)
    high = math.ceil(position)
    fraction = position - low
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * fraction


def latency_summary_ms(latencies_s: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/mean/max in milliseconds of latencies given in seconds."""
    values = sorted(v * 1000.0 for v in latencies_s)
    if not values:
        return {"count": 0, "p50": math.nan, "p90": math.nan, "p99": math.nan, "mean": math.nan, "max": math.nan}
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values),
        "max": values[-1],
    }


def parse_int_list(text: str) -> list[int]:
    """'1,8, 32' -> [1, 8, 32]; every item a positive integer."""
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise ValueError("expected a comma-separated list of positive integers")
    values = [int(item) for item in items]
    if any(v < 1 for v in values):
        raise ValueError(f"values must be >= 1: {text!r}")
    return values


def fresh_boundary() -> str:
    """A new multipart boundary in curl's style; real clients send a new one per upload."""
    return "------------------------" + secrets.token_hex(8)


def multipart_body(field_name: str, filename: str, content_type: str, data: bytes, boundary: str) -> bytes:
    """A multipart/form-data body holding one file field (what a browser form sends)."""
    head = (
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
        f"Content-Type: {content_type}\r\n\r\n"
    ).encode("ascii")
    return head + data + f"\r\n--{boundary}--\r\n".encode("ascii")


def percent_change(before: float, after: float) -> float:
    """Relative change from `before` to `after` in percent (nan when `before` is 0)."""
    if not before:
        return math.nan
    return (after - before) / before * 100.0


def parse_vmrss_kb(status_text: str) -> int | None:
    """VmRSS in kB from the text of /proc/<pid>/status (None for a zombie / kernel thread)."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return None


def parse_cpu_ticks(stat_text: str) -> int:
    """utime+stime clock ticks from /proc/<pid>/stat text.

    The command name (field 2) may contain spaces and parentheses, so split after the last ')'.
    """
    fields = stat_text[stat_text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) + int(fields[12])


def parse_machine_ticks(proc_stat_text: str) -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs from the text of /proc/stat.

    Busy counts everything but idle and iowait, so kernel work done on the server's behalf
    (filesystem journal threads, loopback networking) is included, unlike per-process times.
    """
    for line in proc_stat_text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            total = sum(values[:8])  # guest time is already inside user time
            return total - idle, total
    raise ValueError("no aggregate 'cpu' line in /proc/stat")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Right-aligned plain-text table; floats get a sensible number of digits."""
    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:.2f}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    text_rows = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text_rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in text_rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------
# Machine facts, /proc readings
# ----------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"
    for key in ("model name", "Hardware", "Processor", "cpu model"):
        for line in text.splitlines():
            if line.startswith(key) and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (app.py might fork workers)."""
    pids, queue = [], [pid]
    while queue:
        current = queue.pop()
        pids.append(current)
        task_dir = Path(f"/proc/{current}/task")
        try:
            for task in task_dir.iterdir():
                children = (task / "children").read_text().split()
                queue.extend(int(c) for c in children)
        except OSError:
            continue
    return pids


def rss_mb(pid: int) -> float:
    """Resident size of pid and its descendants, MiB."""
    total_kb = 0
    for member in process_tree(pid):
        try:
            total_kb += parse_vmrss_kb(Path(f"/proc/{member}/status").read_text()) or 0
        except OSError:
            pass
    return total_kb / 1024.0


def cpu_seconds(pid: int) -> float:
    """CPU time (user+system) used so far by pid and its live descendants."""
    ticks = 0
    for member in process_tree(pid):
        try:
            ticks += parse_cpu_ticks(Path(f"/proc/{member}/stat").read_text())
        except (OSError, ValueError, IndexError):
            pass
    return ticks / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int]:
    return parse_machine_ticks(Path("/proc/stat").read_text())


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


# ----------------------------------------------------------------------------------------
# Test images
# ----------------------------------------------------------------------------------------

@dataclass
class ImageSet:
    paths: list[Path]
    source: str            # where they came from, for the report
    synthetic: bool


def find_images(folder: Path, limit: int, scratch: Path) -> ImageSet:
    """Up to `limit` JPEGs from folder, classes interleaved; synthetic ones if it is absent."""
    if folder.is_dir():
        by_class = [sorted(p for p in sub.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
                    for sub in sorted(folder.iterdir()) if sub.is_dir()]
        by_class = [c for c in by_class if c] or [sorted(folder.glob("*.jp*g"))]
        # Interleave so every slice of the list has both classes (the server sees a mix).
        interleaved = [p for group in itertools.zip_longest(*by_class) for p in group if p is not None]
        if interleaved:
            return ImageSet(interleaved[:limit], str(folder), synthetic=False)
    return ImageSet(make_synthetic_jpegs(scratch / "synthetic", min(limit, 64)),
                    f"{min(limit, 64)} synthetic JPEGs ({folder} not found)", synthetic=True)


def make_synthetic_jpegs(folder: Path, count: int) -> list[Path]:
    """Photo-sized JPEGs with gradients and noise, so decode cost resembles real photos."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        width, height = (500, 375) if i % 2 else (375, 500)
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
        noisy = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"synthetic_{i:03d}.jpg"
        Image.fromarray(noisy).save(path, quality=90)
        paths.append(path)
    return paths


def make_phone_photo(source: Path, destination: Path) -> Path:
    """A 4032x3024 JPEG like a phone camera's: an upscaled real photo plus sensor-like noise,
    quality 90, EXIF orientation 6 (portrait shot), so it costs what a real one costs."""
    import numpy as np
    from PIL import Image

    with Image.open(source) as image:
        big = image.convert("RGB").resize(PHONE_SIZE, Image.Resampling.BICUBIC)
    pixels = np.asarray(big, dtype=np.uint8).copy()
    rng = np.random.default_rng(1)
    # In row chunks: full-frame float noise would need ~300 MB.
    for start in range(0, pixels.shape[0], 256):
        chunk = pixels[start:start + 256].astype(np.int16)
        chunk += rng.integers(-12, 13, size=chunk.shape, dtype=np.int16)
        pixels[start:start + 256] = np.clip(chunk, 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display
    Image.fromarray(pixels).save(destination, quality=90, exif=exif.tobytes())
    return destination


# ----------------------------------------------------------------------------------------
# Step 1: raw model (runs in a child process: `benchmark.py --_raw-out FILE ...`)
# ----------------------------------------------------------------------------------------

def measure_raw_model(model_path: Path, image_paths: Sequence[Path], phone_path: Path | None,
                      batch_sizes: Sequence[int], seconds_per_batch: float, single_runs: int) -> dict[str, Any]:
    """Batched throughput and single-image latency of the model called in-process."""
    import numpy as np
    import tensorflow as tf
    import keras

    import keras_serve.pipeline.preprocessing as preprocessing
    model = keras.saving.load_model(model_path, compile=False)
    _, height, width, channels = model.inputs[0].shape
    spec = preprocessing.PreprocessSpec(height=height, width=width, channels=channels)

    # A fixed signature with a free batch axis: one trace serves every batch size, as in a
    # server; model.predict would add its own per-call overhead that a server does not pay.
    @tf.function(input_signature=[tf.TensorSpec([None, height, width, channels], tf.float32)])
    def forward(x):
        return model(x, training=False)

    jpegs = [p.read_bytes() for p in image_paths]
    inputs = np.concatenate([preprocessing.preprocess(b, spec) for b in jpegs[:64]])

    batched = []
    for batch_size in batch_sizes:
        reps = math.ceil(batch_size / len(inputs))
        batch = tf.constant(np.concatenate([inputs] * reps)[:batch_size])
        for _ in range(3):  # first calls build oneDNN primitives for this shape
            forward(batch).numpy()
        calls, started = 0, time.perf_counter()
        while True:
            forward(batch).numpy()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds_per_batch and calls >= 3:
                break
        batched.append({"batch": batch_size, "images_per_s": batch_size * calls / elapsed,
                        "ms_per_batch": elapsed / calls * 1000.0, "calls": calls})
    best = max(batched, key=lambda row: row["images_per_s"])

    decode_s, forward_s, total_s = [], [], []
    for i in range(single_runs + 10):
        data = jpegs[i % len(jpegs)]
        t0 = time.perf_counter()
        x = preprocessing.preprocess(data, spec)
        t1 = time.perf_counter()
        forward(x).numpy()
        t2 = time.perf_counter()
        if i >= 10:  # the first few warm caches
            decode_s.append(t1 - t0)
            forward_s.append(t2 - t1)
            total_s.append(t2 - t0)

    phone = None
    if phone_path is not None:
        data = phone_path.read_bytes()
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            preprocessing.preprocess(data, spec)
            times.append(time.perf_counter() - t0)
        phone = {"decode_ms_median": statistics.median(times[1:]) * 1000.0}

    return {
        "input_shape": [height, width, channels],
        "batched": batched,
        "best_images_per_s": best["images_per_s"],
        "best_batch": best["batch"],
        "single": {
            "runs": len(total_s),
            "decode_ms_median": statistics.median(decode_s) * 1000.0,
            "forward_ms_median": statistics.median(forward_s) * 1000.0,
            "total_ms_median": statistics.median(total_s) * 1000.0,
            "total_ms_p90": percentile(sorted(total_s), 90) * 1000.0,
        },
        "phone_in_process": phone,
        "tf_version": tf.__version__,
        "keras_version": keras.__version__,
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
    }


def run_raw_in_child(args: argparse.Namespace, images: ImageSet, phone_path: Path | None,
                     scratch: Path) -> dict[str, Any]:
    """Run measure_raw_model in a fresh interpreter so TF's threads and memory leave with it."""
    out_path, log_path = scratch / "raw.json", scratch / "raw.log"
    list_path = scratch / "raw_images.txt"
    list_path.write_text("\n".join(str(p) for p in images.paths))
    command = [sys.executable, "-m", "keras_serve.tools.benchmark", "--_raw-out", str(out_path),
               "--_raw-images", str(list_path), "--model", str(args.model),
               "--raw-batches", ",".join(map(str, args.raw_batches)),
               "--raw-seconds", str(args.raw_seconds), "--raw-runs", str(args.raw_runs)]
    if phone_path is not None:
        command += ["--_raw-phone", str(phone_path)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    with open(log_path, "wb") as log:
        result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0 or not out_path.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise BenchmarkError(f"raw-model measurement failed (exit {result.returncode}):\n{tail}")
    return json.loads(out_path.read_text())


# ----------------------------------------------------------------------------------------
# Step 2: the server
# ----------------------------------------------------------------------------------------

class BenchmarkError(RuntimeError):
    """The benchmark cannot go on (exit status 2)."""


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


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

    def start(self, timeout_s: float) -> None:
        started = time.perf_counter()
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = started + timeout_s
        last_problem = "no answer yet"
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise BenchmarkError(f"server exited with status {self.process.returncode} before it was ready; "
                                     f"log tail:\n{self.log_tail()}")
            try:
                conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
                conn.request("GET", "/readyz")
                response = conn.getresponse()
                body = response.read()
                conn.close()
                if response.status == 200 and json.loads(body).get("ready") is True:
                    self.ready_after_s = time.perf_counter() - started
                    return
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
class Upload:
    data: bytes
    name: str

    def request(self) -> tuple[bytes, dict[str, str]]:
        """Body and headers with a fresh boundary, as curl, requests and browsers send: Werkzeug
        compiles two regular expressions per new boundary, and a fixed one would hide that."""
        boundary = fresh_boundary()
        body = multipart_body("file", self.name, "image/jpeg", self.data, boundary)
        return body, {"Content-Type": f"multipart/form-data; boundary={boundary}", "Accept": "application/json"}


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
    """(model calls, images) so far, from the server's /readyz; None if it does not say."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
    try:
        conn.request("GET", "/readyz")
        status = json.loads(conn.getresponse().read())
        return int(status["batches"]), int(status["images"])
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

def print_report(results: dict[str, Any]) -> None:
    env, raw, server = results["environment"], results.get("raw"), results["server"]
    print()
    print("=" * 78)
    print(f"machine   {env['cpu_model']}, {env['cpu_count']} cores ({env['cpu_affinity']} usable), "
          f"load avg at start {env['loadavg_start']}")
    print(f"software  Python {env['python']}, TensorFlow {env['tensorflow']}, Keras {env['keras']}, "
          f"Pillow {env['pillow']}")
    print(f"model     {results['model']}")
    print(f"server    {' '.join(server['command'][1:])}")
    print(f"          ready after {server['ready_after_s']:.1f} s; log {server['log']}")
    print(f"images    {results['images']['count']} from {results['images']['source']}, "
          f"mean {results['images']['mean_kb']:.0f} KB")

    if raw:
        print()
        print("raw model, in-process tf.function (child process, before the server started)")
        print(format_table(["batch", "images/s", "ms/batch"],
                           [[r["batch"], r["images_per_s"], r["ms_per_batch"]] for r in raw["batched"]]))
        single = raw["single"]
        print(f"best batched: {raw['best_images_per_s']:.1f} images/s at batch {raw['best_batch']}")
        print(f"single image (median of {single['runs']}): decode+preprocess {single['decode_ms_median']:.2f} ms "
              f"+ forward {single['forward_ms_median']:.2f} ms = {single['total_ms_median']:.2f} ms")

    print()
    http_info = results["http"]
    print(f"HTTP POST /file/, keep-alive, {http_info['duration_s']:.0f} s per level after "
          f"{http_info['warmup_s']:.0f} s warm-up")
    best = raw["best_images_per_s"] if raw else math.nan
    rows = []
    for level in http_info["levels"]:
        lat = level["latency_ms"]
        rows.append([level["concurrency"], level["requests_per_s"], lat["p50"], lat["p90"], lat["p99"],
                     level["errors_total"], level["requests_per_s"] / best if raw else math.nan,
                     level["server_cpu_s"] / level["duration_s"] * 100, level["client_cpu_s"] / level["duration_s"] * 100,
                     level["machine_busy_pct"], level["machine_cpu_ms_per_request"],
                     level.get("images_per_model_call", math.nan),
                     f"{level['connects']}/{level['total_requests']}"])
    print(format_table(["conc", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "vs raw", "srv CPU%",
                        "cli CPU%", "busy%", "CPU ms/req", "batch", "conns/reqs"], rows))
    print("(vs raw: req/s over the raw model's best batched images/s; CPU%: of one core, server "
          "process tree / this client; busy%: whole machine, all cores; CPU ms/req: whole-machine "
          "CPU time per answered request; batch: mean images per model call; conns/reqs: TCP "
          "connections opened / requests sent)")
    if any(level["connects"] >= 0.5 * level["total_requests"] > 0 for level in http_info["levels"]):
        # Each new TCP connection costs the server an accept and a handler thread start.
        print("note: the server closed most connections after one request (no keep-alive); "
              "see conns/reqs")
    if http_info.get("c1_p50_over_single") is not None:
        print(f"at concurrency 1: p50 / (decode + single forward) = {http_info['c1_p50_over_single']:.2f}x")

    phone = results.get("phone")
    if phone:
        lat = phone["latency_ms"]
        in_process = (raw or {}).get("phone_in_process") or {}
        decode_note = f"; in-process decode+preprocess {in_process['decode_ms_median']:.0f} ms" if in_process else ""
        print()
        print(f"phone photo {phone['size']} ({phone['bytes'] / 1e6:.1f} MB JPEG q90, EXIF-rotated), one client: "
              f"median {lat['p50']:.0f} ms, p90 {lat['p90']:.0f} ms over {lat['count']} requests, "
              f"errors {phone['errors'] + phone['warmup_errors']}{decode_note}")

    memory = results["memory"]
    print()
    print("server VmRSS (MiB): " + ", ".join(f"{k} {v:.0f}" for k, v in memory["timeline"].items()))
    soak = memory.get("soak")
    if not soak:
        print("(no soak: --soak 10000 sends that many more requests and reports the RSS change)")
    if soak:
        print(f"soak: {soak['requests']} requests at concurrency {soak['concurrency']} in {soak['seconds']:.0f} s "
              f"({soak['requests_per_s']:.1f} req/s, {soak['errors']} errors): RSS {soak['rss_before_mb']:.0f} -> "
              f"{soak['rss_after_mb']:.0f} MiB ({soak['rss_change_pct']:+.1f} %)")

    print()
    errors = results["errors_total"]
    print("result: " + ("OK, no request errors" if errors == 0 else f"{errors} request errors"))
    for sample in results["error_samples"][:5]:
        print(f"  e.g. {sample}")
    print("=" * 78)


def level_to_dict(level: LevelResult) -> dict[str, Any]:
    return dict(level.__dict__)


# ----------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="Keras model file (default: %(default)s)")
    p.add_argument("--server-args", default="", help='extra app.py options; use the = form: --server-args="--max-batch 16"')
    p.add_argument("--app", type=Path, default=ROOT / "app.py", help="server script (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="folder of JPEGs (default: %(default)s)")
    p.add_argument("--max-images", type=int, default=200, help="how many distinct images to send")
    p.add_argument("--concurrency", type=parse_int_list, default=[1, 8, 32, 64], help="levels, e.g. 1,8,32,64")
    p.add_argument("--duration", type=float, default=15.0, help="measured seconds per level")
    p.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds at the start of each level")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for /readyz")
    p.add_argument("--raw-batches", type=parse_int_list, default=[1, 8, 16, 32, 64])
    p.add_argument("--raw-seconds", type=float, default=3.0, help="seconds per raw batch size")
    p.add_argument("--raw-runs", type=int, default=200, help="single-image latency runs")
    p.add_argument("--skip-raw", action="store_true", help="no raw-model step (no ratios); to compare server settings quickly")
    p.add_argument("--phone-requests", type=int, default=20, help="4032x3024 JPEG requests (0: skip)")
    p.add_argument("--soak", type=int, default=0, metavar="N",
                   help="after the levels, send N more requests and report the RSS change (e.g. 10000)")
    p.add_argument("--soak-concurrency", type=int, default=32)
    p.add_argument("--server-log", type=Path, help="server output (default: a temporary file, kept)")
    p.add_argument("--json", type=Path, help="write every number here")
    # Internal: the child process of the raw-model step.
    p.add_argument("--_raw-out", dest="raw_out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_raw-images", dest="raw_images", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_raw-phone", dest="raw_phone", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def raw_child_main(args: argparse.Namespace) -> int:
    paths = [Path(line) for line in args.raw_images.read_text().splitlines() if line]
    result = measure_raw_model(args.model, paths, args.raw_phone, args.raw_batches, args.raw_seconds, args.raw_runs)
    args.raw_out.write_text(json.dumps(result))
    return 0


def benchmark(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """Run every step; returns the results dict (raises BenchmarkError if it cannot run)."""
    if not args.model.is_file():
        raise BenchmarkError(f"model file not found: {args.model}")
    if not args.app.is_file():
        raise BenchmarkError(f"server script not found: {args.app}")
    results: dict[str, Any] = {
        "environment": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "cpu_affinity": len(os.sched_getaffinity(0)),
            "loadavg_start": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "python": platform.python_version(),
            "tensorflow": package_version("tensorflow"),
            "keras": package_version("keras"),
            "pillow": package_version("pillow"),
        },
        "model": str(args.model),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    images = find_images(args.images, args.max_images, scratch)
    uploads = [Upload(p.read_bytes(), p.name) for p in images.paths]
    results["images"] = {"count": len(uploads), "source": images.source, "synthetic": images.synthetic,
                         "mean_kb": statistics.fmean(p.stat().st_size for p in images.paths) / 1024}
    phone_path = make_phone_photo(images.paths[0], scratch / "phone_4032x3024.jpg") if args.phone_requests else None
    log(f"{len(uploads)} images from {images.source}")

    raw = None
    if not args.skip_raw:
        log("raw model: measuring in a child process ...")
        raw = run_raw_in_child(args, images, phone_path, scratch)
        results["environment"]["tensorflow"] = raw["tf_version"]
        log(f"raw model: best {raw['best_images_per_s']:.1f} images/s at batch {raw['best_batch']}, "
            f"single image {raw['single']['total_ms_median']:.2f} ms")
    results["raw"] = raw

    port = args.port or free_port(args.host)
    log_path = args.server_log or Path(tempfile.mkstemp(prefix="benchmark-server-", suffix=".log")[1])
    server_args = shlex.split(args.server_args)
    upload_scratch: Path | None = None
    if not any(a == "--upload-dir" or a.startswith("--upload-dir=") for a in server_args):
        # The server keeps every upload; a soak would leave 10,000 of them (250 MB) in
        # ./uploads. A throw-away folder inside it is on the same disk, so writes cost the same.
        (ROOT / "uploads").mkdir(exist_ok=True)
        upload_scratch = Path(tempfile.mkdtemp(prefix=".benchmark-", dir=ROOT / "uploads"))
        server_args += ["--upload-dir", str(upload_scratch)]
    server = ServerProcess(args.app, args.host, port, args.model, server_args, log_path)
    results["server"] = {"command": server.command, "log": str(log_path), "server_args": args.server_args}
    all_errors: list[str] = []
    error_count = 0
    memory: dict[str, Any] = {"timeline": {}}
    results["memory"] = memory
    try:
        log(f"starting {' '.join(server.command[1:])}")
        server.start(args.startup_timeout)
        results["server"]["ready_after_s"] = server.ready_after_s
        results["server"]["pid"] = server.pid
        memory["timeline"]["ready"] = rss_mb(server.pid)
        log(f"server ready after {server.ready_after_s:.1f} s (pid {server.pid}, RSS {memory['timeline']['ready']:.0f} MiB)")

        levels = []
        for concurrency in args.concurrency:
            level = run_level(args.host, port, uploads, concurrency, args.warmup, args.duration, args.timeout, server.pid)
            levels.append(level)
            error_count += level.errors_total
            all_errors += level.error_samples
            memory["timeline"][f"after c={concurrency}"] = rss_mb(server.pid)
            lat = level.latency_ms
            log(f"c={concurrency:<3} {level.requests_per_s:7.1f} req/s  p50 {lat['p50']:.1f}  p90 {lat['p90']:.1f}  "
                f"p99 {lat['p99']:.1f} ms  errors {level.errors_total}")
            if server.process.poll() is not None:
                raise BenchmarkError(f"server died during the c={concurrency} level; log tail:\n{server.log_tail()}")
        http_info: dict[str, Any] = {"duration_s": args.duration, "warmup_s": args.warmup,
                                     "levels": [level_to_dict(level) for level in levels]}
        c1 = next((level for level in levels if level.concurrency == 1), None)
        if raw and c1 and c1.requests:
            http_info["c1_p50_over_single"] = c1.latency_ms["p50"] / raw["single"]["total_ms_median"]
        if raw:
            for entry in http_info["levels"]:
                entry["ratio_to_raw_best"] = entry["requests_per_s"] / raw["best_images_per_s"]
        results["http"] = http_info

        if phone_path is not None:
            phone_upload = Upload(phone_path.read_bytes(), phone_path.name)
            phone = time_single_upload(args.host, port, phone_upload, args.phone_requests, args.timeout)
            phone.update(size=f"{PHONE_SIZE[0]}x{PHONE_SIZE[1]}", bytes=phone_path.stat().st_size)
            results["phone"] = phone
            error_count += phone["errors"] + phone["warmup_errors"]
            all_errors += phone["error_samples"]
            memory["timeline"]["after phone"] = rss_mb(server.pid)
            log(f"phone photo: median {phone['latency_ms']['p50']:.0f} ms, p90 {phone['latency_ms']['p90']:.0f} ms")

        if args.soak:
            # A short unmeasured run first so the "before" RSS is after this concurrency's warm-up.
            warm = run_level(args.host, port, uploads, args.soak_concurrency, 0, args.warmup, args.timeout, server.pid)
            before = rss_mb(server.pid)
            log(f"soak: {args.soak} requests at concurrency {args.soak_concurrency}, RSS before {before:.0f} MiB ...")
            soak = run_level(args.host, port, uploads, args.soak_concurrency, 0, 0, args.timeout, server.pid,
                             max_requests=args.soak)
            after = rss_mb(server.pid)
            error_count += warm.errors_total + soak.errors_total
            all_errors += warm.error_samples + soak.error_samples
            memory["soak"] = {"requests": soak.total_requests, "concurrency": args.soak_concurrency,
                              "seconds": soak.duration_s, "requests_per_s": soak.requests_per_s,
                              "errors": soak.errors_total, "rss_before_mb": before, "rss_after_mb": after,
                              "rss_change_pct": percent_change(before, after), "latency_ms": soak.latency_ms}
            memory["timeline"]["after soak"] = after
        memory["timeline"]["end"] = rss_mb(server.pid)
    finally:
        status = server.stop()
        results["server"]["exit_status"] = status
        results["server"]["stopped_by"] = server.stopped_by
        if upload_scratch is not None:
            from keras_serve.storage.uploads import iter_day_file
            results["server"]["uploads_stored"] = sum(
                1 for day in upload_scratch.glob("*.uploads") for _ in iter_day_file(day))
            shutil.rmtree(upload_scratch, ignore_errors=True)
        log(f"server stopped by {server.stopped_by or 'itself'} (exit status {status})")

    results["errors_total"] = error_count
    results["error_samples"] = all_errors[:20]
    return results


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.raw_out:
        return raw_child_main(args)

    # `kill <pid>` should stop the server too, like Ctrl-C does.
    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    with tempfile.TemporaryDirectory(prefix="benchmark-") as scratch:
        try:
            results = benchmark(args, Path(scratch))
        except BenchmarkError as exc:
            log(f"error: {exc}")
            return 2
        except KeyboardInterrupt:
            log("interrupted")
            return 130
    print_report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        log(f"wrote {args.json}")
    return 0 if results["errors_total"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
