"""Measure what a hung store costs: time to the 503, and /healthz while clients wait on it.

    .venv/bin/python tests/measure_store_faults.py                     # the default timeouts
    .venv/bin/python tests/measure_store_faults.py --store-timeout 1 --connect-timeout 1 --attempts 1

Starts its own PostgreSQL and SeaweedFS (tests/services.py) and a real server (`app.py`, the
colour test model), then for each store in turn freezes it (SIGSTOP, always SIGCONT after):
one upload alone (time to its 503), five more (the breaker: at once), then `--clients`
clients uploading without pause for `--seconds` while /healthz and /readyz are asked every
50 ms on fresh connections; last, how long until /readyz is 200 once the store is back.
Prints numbers; asserts nothing (tests/test_storage_faults.py does).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]  # this checkout's keras_serve, and the test helpers

import requests  # noqa: E402

from conftest import build_colour_model  # noqa: E402
from images import BLUE, RED, image_bytes  # noqa: E402
from server_process import ServerProcess  # noqa: E402
from services import paused, running_postgres, running_seaweedfs  # noqa: E402
from test_storage_faults import hammer_while_paused  # noqa: E402


def post(url: str) -> tuple[int, float]:
    started = time.perf_counter()
    r = requests.post(url + "/file/", files={"file": ("x.png", image_bytes(BLUE, fmt="PNG"))}, timeout=120)
    return r.status_code, time.perf_counter() - started


def ms(values: list[float]) -> str:
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return (f"n={len(ordered)} p50={statistics.median(ordered) * 1000:.1f} ms p99={p99 * 1000:.1f} ms "
            f"max={ordered[-1] * 1000:.1f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store-timeout", type=float, default=3.0)
    parser.add_argument("--connect-timeout", type=float, default=2.0)
    parser.add_argument("--attempts", type=int, default=2)
    parser.add_argument("--check-interval", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder, running_postgres() as pg, running_seaweedfs() as s3:
        model = Path(folder) / "colour.h5"
        build_colour_model().save(model)
        env = {**s3.env(), "KERAS_SERVE_STORE_TIMEOUT_S": str(args.store_timeout),
               "KERAS_SERVE_STORE_CONNECT_TIMEOUT_S": str(args.connect_timeout),
               "KERAS_SERVE_STORE_ATTEMPTS": str(args.attempts),
               "KERAS_SERVE_STORE_CHECK_INTERVAL_S": str(args.check_interval)}
        server = ServerProcess("--model", str(model), "--upload-dir", str(Path(folder) / "uploads"),
                               "--database-url", pg.create_database(), "--image-store", f"s3://{s3.bucket}/measure",
                               env=env)
        try:
            print(f"timeouts: store {args.store_timeout} s, connect {args.connect_timeout} s, "
                  f"{args.attempts} attempts, checks every {args.check_interval} s; {os.cpu_count()} CPUs")
            requests.post(server.url + "/file/", files={"file": ("x.png", image_bytes(RED, fmt="PNG"))}, timeout=60)
            for name, store in (("S3 (SeaweedFS)", s3), ("PostgreSQL", pg)):
                with paused(store):
                    status, first = post(server.url)
                    after = [post(server.url) for _ in range(5)]
                    ready = requests.get(server.url + "/readyz", timeout=10).status_code
                print(f"{name} frozen: first upload {status} after {first:.2f} s; next 5: "
                      f"{sorted({s for s, _ in after})} in at most {max(t for _, t in after) * 1000:.0f} ms; "
                      f"/readyz {ready}")
                time.sleep(args.check_interval + 0.5)
                latencies, statuses = hammer_while_paused(server.url, store, args.clients, args.seconds)
                resumed = time.monotonic()
                while requests.get(server.url + "/readyz", timeout=10).status_code != 200:
                    time.sleep(0.05)
                back = time.monotonic() - resumed
                print(f"  {args.clients} clients uploading for {args.seconds:.0f} s while frozen: "
                      f"uploads answered {sorted(map(str, statuses['uploads']))}")
                print(f"  /healthz {sorted(map(str, statuses['healthz']))} {ms(latencies['healthz'])}")
                print(f"  /readyz  {sorted(map(str, statuses['readyz']))} {ms(latencies['readyz'])}")
                print(f"  ready again {back:.2f} s after the store was resumed")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
