"""Throughput of 1 vs 2 replicas on one PostgreSQL and one S3 store, behind nginx.

    .venv/bin/python tests/measure_replicas.py [--seconds 20] [--concurrency 16]

Not a test (timings do not belong in tests); it lives here because it starts the same real
PostgreSQL, SeaweedFS and nginx the replica test starts. Uses the default model and real
validation photos, so the numbers compare with README Performance.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a script, not collected by pytest

from load_balancer import running_nginx  # noqa: E402
from server_process import ROOT, ServerProcess  # noqa: E402
from services import running_postgres, running_seaweedfs  # noqa: E402

PHOTOS = ROOT.parent / "shared" / "data" / "cats_vs_dogs" / "validation"


def drive(url: str, photos: list[bytes], seconds: float, concurrency: int) -> tuple[float, int]:
    stop = threading.Event()
    counts = {"ok": 0, "failed": 0}
    lock = threading.Lock()

    def client(worker: int) -> None:
        session = requests.Session()
        i = worker
        while not stop.is_set():
            r = session.post(url + "/file/", files={"file": ("x.jpg", photos[i % len(photos)], "image/jpeg")},
                             timeout=60)
            with lock:
                counts["ok" if r.status_code == 200 else "failed"] += 1
            i += concurrency

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(client, w) for w in range(concurrency)]
        time.sleep(3)  # warm-up
        with lock:
            start_ok = counts["ok"]
        started = time.monotonic()
        time.sleep(seconds)
        with lock:
            done = counts["ok"] - start_ok
        elapsed = time.monotonic() - started
        stop.set()
        for f in futures:
            f.result()
    return done / elapsed, counts["failed"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=16)
    args = p.parse_args()
    photos = [f.read_bytes() for f in sorted(PHOTOS.glob("*/*.jpg"))[:200]]
    with running_postgres() as pg, running_seaweedfs() as s3, contextlib.ExitStack() as stack:
        store_args = ("--database-url", pg.create_database(), "--image-store", f"s3://{s3.bucket}/measure")
        servers = [stack.enter_context(ServerProcess(*store_args, "--upload-dir", f"/tmp/measure-replica-{i}",
                                                     env=s3.env())) for i in range(2)]
        rows = []
        rate, failed = drive(servers[0].url, photos, args.seconds, args.concurrency)
        rows.append(("1 replica, direct", rate, failed))
        with running_nginx([servers[0].port]) as lb:
            rate, failed = drive(lb, photos, args.seconds, args.concurrency)
            rows.append(("1 replica behind nginx", rate, failed))
        with running_nginx([s.port for s in servers]) as lb:
            rate, failed = drive(lb, photos, args.seconds, args.concurrency)
            rows.append(("2 replicas behind nginx", rate, failed))
    print(f"PostgreSQL + S3 (SeaweedFS), default model, {args.concurrency} clients, {args.seconds:.0f} s each")
    for name, rate, failed in rows:
        print(f"{name:26s} {rate:7.1f} req/s  {failed} failed  ({rate / rows[0][1]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
