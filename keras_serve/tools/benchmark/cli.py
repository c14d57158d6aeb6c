"""Throughput, latency and memory of the image-classification server against the machine's
own limits for the same model, measured in the same run.

    .venv/bin/python -m keras_serve.tools.benchmark [--model models/cats_vs_dogs.h5]
        [--concurrency 1,8,32,64] [--duration 15] [--warmup 3] [--compare-engines]
        [--server-args="--workers 2 --engine onnxruntime --threads 32"]
        [--soak 10000 --soak-concurrency 32] [--json results.json]
    .venv/bin/python -m keras_serve.tools.benchmark --peers fastapi,flask,litserve,bento,pytriton [...]
        (side by side with the peer servers: peers.py)

Steps, all on this one machine:
  1. Limits (limits.py), in a child process so its threads and memory are gone before the
     server starts: raw forward images/s per batch size, the in-process pipeline limit
     (decode + resize + scale + batched forward of the same JPEGs on every core, no HTTP),
     single-image decode + forward; with --compare-engines, every engine's speed and its
     difference to TensorFlow on --fidelity-images photos (the 1,000 validation photos).
  2. Starts `app.py` on a free port, waits until every worker answers /readyz, then drives
     POST /file/ over keep-alive connections at each concurrency level (load.py): req/s,
     latency, errors, each as a ratio to both limits, whole-machine CPU ms per request.
  3. A 4032x3024 phone-sized JPEG end to end at one client (median, p90).
  4. Server VmRSS (process tree) along the way; with --soak N, N more requests and the change.
  5. The report (report.py), with the speed targets, and --json PATH with every number.
The server is stopped at the end (SIGINT, then SIGTERM, then SIGKILL), also on Ctrl-C or an
error. Unless --server-args names --upload-dir, uploads go to a throw-away folder
uploads/.benchmark-XXXX (same disk as ./uploads), removed at the end. --skip-limits leaves
out step 1 (no ratios), to compare --server-args settings quickly.

Exit status: 0 all requests succeeded; 1 some request failed; 2 the benchmark could not run.
Timings are only meaningful on an otherwise idle machine: the load average at the start is
printed so a busy machine shows.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from keras_serve.settings import DEFAULT_MODEL_PATH, PROJECT_ROOT
from keras_serve.tools.benchmark.inputs import PHONE_SIZE, ImageSet, Upload, find_images, make_phone_photo
from keras_serve.tools.benchmark.limits import measure_limits
from keras_serve.tools.benchmark.load import (BenchmarkError, ServerProcess, run_level,
                                              time_single_upload)
from keras_serve.tools.benchmark.procstats import cpu_model, package_version, rss_mb
from keras_serve.tools.benchmark.report import print_report
from keras_serve.tools.benchmark.stats import parse_int_list, percent_change
from keras_serve.tools.ports import free_port

DEFAULT_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "cats_vs_dogs" / "validation"
DEFAULT_MODEL = DEFAULT_MODEL_PATH


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m keras_serve.tools.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="Keras model file (default: %(default)s)")
    p.add_argument("--server-args", default="", help='extra app.py options; use the = form: --server-args="--workers 2"')
    p.add_argument("--app", type=Path, default=PROJECT_ROOT / "app.py", help="server script (default: %(default)s)")
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
    p.add_argument("--raw-seconds", type=float, default=3.0, help="seconds per raw batch size (pipeline: twice)")
    p.add_argument("--raw-runs", type=int, default=200, help="single-image latency runs")
    p.add_argument("--skip-limits", "--skip-raw", dest="skip_limits", action="store_true",
                   help="no limits step (no ratios); to compare server settings quickly")
    p.add_argument("--compare-engines", action="store_true",
                   help="also time every engine and compare its answers to TensorFlow's")
    p.add_argument("--fidelity-images", type=int, default=1000, help="photos for the engine comparison")
    p.add_argument("--phone-requests", type=int, default=20, help="4032x3024 JPEG requests (0: skip)")
    p.add_argument("--soak", type=int, default=0, metavar="N",
                   help="after the levels, send N more requests and report the RSS change (e.g. 10000)")
    p.add_argument("--soak-concurrency", type=int, default=32)
    p.add_argument("--server-log", type=Path, help="server output (default: a temporary file, kept)")
    p.add_argument("--json", type=Path, help="write every number here")
    # Internal: the child process of the limits step.
    p.add_argument("--_limits-out", dest="limits_out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_engine", dest="engine", default="auto", help=argparse.SUPPRESS)
    p.add_argument("--_images", dest="image_list", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_fidelity", dest="fidelity_list", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_phone", dest="phone", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def expected_workers(app: Path, server_args: list[str]) -> int:
    """How many processes the server starts, so that the benchmark waits for each to be ready:
    `--workers auto` (the default) as app.py decides it (keras_serve/worker_count.py), from the
    same CPUs and memory; another script (floor_server) serves one process."""
    from keras_serve import settings
    from keras_serve.worker_count import AUTO, MIB, parse_workers, plan_workers

    setting = parse_workers(flag_value(server_args, "--workers") or os.environ.get("KERAS_SERVE_WORKERS") or AUTO)
    if setting != AUTO:
        return int(setting)
    if app.resolve() != (PROJECT_ROOT / "app.py").resolve():
        return 1
    budget_mb = flag_value(server_args, "--decode-budget-mb")
    budget = float(budget_mb) * MIB if budget_mb else settings.resolve()["DECODE_BUDGET_BYTES"]
    return plan_workers(int(budget)).workers


def flag_value(args: list[str], flag: str) -> str | None:
    """The value given to `flag` in a server command line (`--flag V` or `--flag=V`), else None."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def limits_child_main(args: argparse.Namespace) -> int:
    def paths(list_file: Path | None) -> list[Path]:
        return [Path(line) for line in list_file.read_text().splitlines() if line] if list_file else []

    result = measure_limits(args.model, args.engine, paths(args.image_list), paths(args.fidelity_list),
                            args.phone, args.raw_batches, args.raw_seconds, args.raw_runs,
                            compare_engines=args.compare_engines)
    args.limits_out.write_text(json.dumps(result))
    return 0


def run_limits_in_child(args: argparse.Namespace, engine: str, images: ImageSet, fidelity: ImageSet,
                        phone_path: Path | None, scratch: Path) -> dict[str, Any]:
    """Run measure_limits in a fresh interpreter so its threads and memory leave with it."""
    out_path, log_path = scratch / "limits.json", scratch / "limits.log"
    image_list, fidelity_list = scratch / "images.txt", scratch / "fidelity.txt"
    image_list.write_text("\n".join(str(p) for p in images.paths))
    fidelity_list.write_text("\n".join(str(p) for p in fidelity.paths))
    command = [sys.executable, "-m", "keras_serve.tools.benchmark", "--_limits-out", str(out_path),
               "--_engine", engine, "--_images", str(image_list), "--_fidelity", str(fidelity_list),
               "--model", str(args.model), "--raw-batches", ",".join(map(str, args.raw_batches)),
               "--raw-seconds", str(args.raw_seconds), "--raw-runs", str(args.raw_runs)]
    if args.compare_engines:
        command.append("--compare-engines")
    if phone_path is not None:
        command += ["--_phone", str(phone_path)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
    with open(log_path, "wb") as log_file:
        result = subprocess.run(command, cwd=PROJECT_ROOT, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0 or not out_path.exists():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise BenchmarkError(f"limits measurement failed (exit {result.returncode}):\n{tail}")
    return json.loads(out_path.read_text())


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
            "onnxruntime": package_version("onnxruntime"),
            "ai-edge-litert": package_version("ai-edge-litert"),
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

    server_args = shlex.split(args.server_args)
    limits = None
    if not args.skip_limits:
        engine = flag_value(server_args, "--engine") or os.environ.get("KERAS_SERVE_ENGINE", "auto")
        log(f"limits: measuring in a child process (engine {engine}) ...")
        fidelity = find_images(args.images, args.fidelity_images, scratch) if args.compare_engines else images
        limits = run_limits_in_child(args, engine, images, fidelity, phone_path, scratch)
        results["environment"]["tensorflow"] = limits["tf_version"]
        log(f"limits: raw forward {limits['best_images_per_s']:.1f} images/s at batch {limits['best_batch']}, "
            f"pipeline {limits['pipeline_images_per_s']:.1f} images/s, "
            f"single image {limits['single']['total_ms_median']:.2f} ms ({limits['engine']['name']})")
    results["limits"] = limits

    port = args.port or free_port(args.host)
    log_path = args.server_log or Path(tempfile.mkstemp(prefix="benchmark-server-", suffix=".log")[1])
    workers = expected_workers(args.app, server_args)
    upload_scratch: Path | None = None
    if not any(a == "--upload-dir" or a.startswith("--upload-dir=") for a in server_args):
        # The server keeps every upload; a soak would leave 10,000 of them (250 MB) in
        # ./uploads. A throw-away folder inside it is on the same disk, so writes cost the same.
        (PROJECT_ROOT / "uploads").mkdir(exist_ok=True)
        upload_scratch = Path(tempfile.mkdtemp(prefix=".benchmark-", dir=PROJECT_ROOT / "uploads"))
        server_args += ["--upload-dir", str(upload_scratch)]
    server = ServerProcess(args.app, args.host, port, args.model, server_args, log_path)
    results["server"] = {"command": server.command, "log": str(log_path), "server_args": args.server_args}
    all_errors: list[str] = []
    error_count = 0
    memory: dict[str, Any] = {"timeline": {}}
    results["memory"] = memory
    try:
        log(f"starting {' '.join(server.command[1:])}")
        server.start(args.startup_timeout, workers)
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
                                     "levels": [dict(level.__dict__) for level in levels]}
        c1 = next((level for level in levels if level.concurrency == 1), None)
        if limits and c1 and c1.requests:
            http_info["c1_p50_over_single"] = c1.latency_ms["p50"] / limits["single"]["total_ms_median"]
        if limits:
            for entry in http_info["levels"]:
                entry["ratio_to_raw"] = entry["requests_per_s"] / limits["best_images_per_s"]
                entry["ratio_to_pipeline"] = entry["requests_per_s"] / limits["pipeline_images_per_s"]
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
            results["server"]["uploads_stored"] = count_stored_uploads(upload_scratch)
            shutil.rmtree(upload_scratch, ignore_errors=True)
        log(f"server stopped by {server.stopped_by or 'itself'} (exit status {status})")

    results["errors_total"] = error_count
    results["error_samples"] = all_errors[:20]
    return results


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

def count_stored_uploads(upload_dir: Path) -> int:
    """Rows in the server's SQLite store; or frames in day files (a server before the database)."""
    import sqlite3

    from keras_serve.storage.dayfiles import day_files, iter_day_file

    if (upload_dir / "uploads.db").exists():
        with contextlib.closing(sqlite3.connect(upload_dir / "uploads.db")) as db:
            return db.execute("SELECT count(*) FROM uploads").fetchone()[0]
    return sum(1 for path in day_files(upload_dir) for _ in iter_day_file(path))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a == "--peers" or a.startswith("--peers=") for a in argv):  # side by side with the peer servers
        from keras_serve.tools.benchmark import peers

        return peers.main(argv)
    args = parse_args(argv)
    if args.limits_out:
        return limits_child_main(args)

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

