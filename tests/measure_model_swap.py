"""A model promoted while clients keep uploading: failures, latency before and during, time to switch.

    .venv/bin/python tests/measure_model_swap.py [--clients 32] [--workers 2 | --replicas 2] [--seconds 20]

Not a test (timings do not belong in tests); it lives here because it starts the same real
PostgreSQL and SeaweedFS the tests start, and tests/test_model_swap_under_load.py uses its `drive`.

It starts the server itself (the default model, a fresh store in a temporary folder; --replicas
puts two servers on one PostgreSQL and one S3 store, started from the test binaries), drives
it with N clients sending real photos (../shared, else generated ones), promotes
models/seed_baseline.h5 (the same labels, another network) half-way through with
`python -m keras_serve.model promote`, and prints: requests, failures, p50/p99 before the
promotion and in the seconds after it, their ratio, and how long until every answer came
from the new version.
"""
from __future__ import annotations

import argparse
import hashlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import requests


@dataclass
class Answer:
    sent: float      # time.monotonic() when sent
    seconds: float
    status: int      # 0: no HTTP answer at all
    version: str | None
    label: str | None = None
    image: int = 0   # which of the images was sent


@dataclass
class SwapRun:
    answers: list[Answer] = field(default_factory=list)
    promoted_at: float = 0.0   # promote() called (the CLI checks the file first)
    logged_at: float = 0.0     # promote() returned: the promotion is in the log

    @property
    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status != 200]

    def switched_at(self, new_version: str) -> float | None:
        """When the last answer from any other version was sent (after it, only the new one answers)."""
        old = [a.sent for a in self.answers if a.status == 200 and a.version != new_version]
        after = [a for a in self.answers if a.status == 200 and a.version == new_version]
        if not after:
            return None
        return max(old) if old else self.promoted_at

    def latencies(self, start: float, end: float) -> list[float]:
        return sorted(a.seconds for a in self.answers if start <= a.sent < end and a.status == 200)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def drive(urls: Sequence[str], images: Sequence[bytes], clients: int, before_s: float, after_s: float,
          promote: Callable[[], None]) -> SwapRun:
    """`clients` threads upload `images` in turn to `urls` (round robin, keep-alive) for
    `before_s`, then `promote()` runs (in this thread) while they go on for `after_s` more."""
    run = SwapRun()
    stop = threading.Event()
    lock = threading.Lock()

    def client(index: int) -> None:
        session = requests.Session()
        url = urls[index % len(urls)] + "/file/"
        n = index
        while not stop.is_set():
            image = n % len(images)
            data = images[image]
            n += clients
            sent = time.monotonic()
            try:
                r = session.post(url, files={"file": ("photo.jpg", data)}, timeout=60)
                status = r.status_code
                body = r.json() if status == 200 else {}
                version, label = body.get("model_version"), body.get("label")
            except (requests.RequestException, ValueError):
                status, version, label = 0, None, None
            with lock:
                run.answers.append(Answer(sent, time.monotonic() - sent, status, version, label, image))

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    time.sleep(before_s)
    run.promoted_at = time.monotonic()
    promote()
    run.logged_at = time.monotonic()
    time.sleep(after_s)
    stop.set()
    for t in threads:
        t.join(70)
    return run


def report(run: SwapRun, new_version: str) -> dict:
    """Latency before the promotion, and from it until 2 s after the last process switched
    (the candidate's check by the CLI, each process's load and warm-up, the swap itself)."""
    steady = run.latencies(run.answers[0].sent + 2.0 if run.answers else 0.0, run.promoted_at)  # 2 s of warm-up left out
    switched = run.switched_at(new_version)
    during = run.latencies(run.promoted_at, (switched or run.logged_at) + 2.0)
    return {"requests": len(run.answers), "failures": len(run.failures),
            "steady_p50_ms": percentile(steady, 0.5) * 1000, "steady_p99_ms": percentile(steady, 0.99) * 1000,
            "swap_p50_ms": percentile(during, 0.5) * 1000, "swap_p99_ms": percentile(during, 0.99) * 1000,
            "p99_ratio": percentile(during, 0.99) / percentile(steady, 0.99) if steady and during else float("nan"),
            "cli_check_s": run.logged_at - run.promoted_at,
            "switched_after_logged_s": (switched - run.logged_at) if switched is not None else None}


def main(argv: list[str] | None = None) -> int:
    import os
    import subprocess
    import sys
    import tempfile
    from contextlib import ExitStack
    from pathlib import Path

    from keras_serve.settings import PROJECT_ROOT
    from keras_serve.tools.benchmark.inputs import find_images

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--replicas", type=int, default=1, help="servers sharing PostgreSQL + S3 (test binaries)")
    p.add_argument("--seconds", type=float, default=20.0, help="load before the promotion, and again after it")
    p.add_argument("--candidate", type=Path, default=PROJECT_ROOT / "models" / "seed_baseline.h5")
    args = p.parse_args(argv)

    sys.path.insert(0, str(Path(__file__).resolve().parent))  # a script, not collected by pytest
    from server_process import ServerProcess
    from services import running_postgres, running_seaweedfs

    candidate_sha = hashlib.sha256(args.candidate.read_bytes()).hexdigest()
    with ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        found = find_images(PROJECT_ROOT.parent / "shared" / "data" / "cats_vs_dogs" / "validation", 200, folder)
        images = [path.read_bytes() for path in found.paths]
        env: dict[str, str] = {}
        store_args: list[str] = []
        if args.replicas > 1:
            postgres = stack.enter_context(running_postgres())
            seaweed = stack.enter_context(running_seaweedfs())
            env = seaweed.env()
            store_args = ["--database-url", postgres.create_database(), "--image-store", f"s3://{seaweed.bucket}/swap"]
        servers = [stack.enter_context(ServerProcess(
            "--upload-dir", str(folder / f"server{i}"), "--workers", str(args.workers), *store_args,
            env=env, startup_timeout=300)) for i in range(args.replicas)]
        promote_cmd = [sys.executable, "-m", "keras_serve.model", "--upload-dir", str(folder / "server0"),
                       *store_args, "promote", str(args.candidate)]

        def promote() -> None:
            subprocess.run(promote_cmd, check=True, env={**os.environ, **env}, cwd=PROJECT_ROOT)

        run = drive([s.url for s in servers], images, args.clients, args.seconds, args.seconds, promote)
        swaps = [line.strip() for s in servers for line in s.output().splitlines() if "model swapped" in line]
    result = report(run, candidate_sha)
    print(f"swap under load: {args.clients} clients, {args.replicas} replica(s) x {args.workers} worker(s), "
          f"{args.candidate.name} promoted after {args.seconds:g} s")
    for key, value in result.items():
        print(f"  {key:18} {value:.1f}" if isinstance(value, float) else f"  {key:18} {value}")
    for line in swaps:  # each process's own account: load, checks and warm-up, in seconds
        print(f"  server: {line[:300]}")
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
