"""Resident memory of a real server under the worst images and under a long mixed soak.

    python -m keras_serve.tools.memory_check                  # both phases, default settings
    python -m keras_serve.tools.memory_check --soak 10000 --clients 64 --server-args="--decode-budget-mb 512"

Starts `python app.py` (default model) on a free port and samples its RSS (/proc/PID/status)
every 10 ms:
  worst  64 clients at once, each posting one 7000x7000 image that costs hundreds of MB to
         decode (lossless WebP of a few bytes, float TIFF, RGBA PNG, progressive JPEG): idle RSS
         before, peak during, RSS 3 s after, and the statuses.
  soak   N requests from 64 keep-alive clients, 80% real photos (../shared/data/cats_vs_dogs/
         validation, else generated JPEGs) and 20% hostile files from the fuzz generator: RSS
         after the first 10% (warm-up) against RSS at the end.
Prints numbers; run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import io
import itertools
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

from keras_serve.settings import PROJECT_ROOT
from keras_serve.tools import fuzz

WORST = ("webp-7000", "tiff-float-7000", "png-rgba-7000", "jpeg-progressive-7000")
PHOTOS = PROJECT_ROOT.parent / "shared" / "data" / "cats_vs_dogs" / "validation"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class RssSampler:
    """Samples a process's RSS every `interval` seconds in the background; `peak` since reset()."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid, self.interval = pid, interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = rss_bytes(self.pid)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def start_server(port: int, server_args: list[str], env: dict[str, str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port), *server_args],
                            # one process: its RSS is what is sampled (auto would fork workers it does not see)
                            cwd=PROJECT_ROOT, env={"KERAS_SERVE_WORKERS": "1", **os.environ, **env},
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                if json.load(response).get("ready"):
                    return proc
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("server not ready in 180 s")


def good_photos(count: int = 200) -> list[bytes]:
    if PHOTOS.is_dir():
        files = sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:count]
        if files:
            return [f.read_bytes() for f in files]
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    photos = []
    for _ in range(count):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)).save(buf, "JPEG", quality=85)
        photos.append(buf.getvalue())
    return photos


def mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def worst_phase(url: str, pid: int, sampler: RssSampler, clients: int) -> dict:
    files = [fuzz.Case(0, i, WORST[i % len(WORST)], WORST[i % len(WORST)], fuzz._bomb(WORST[i % len(WORST)]))
             for i in range(clients)]
    time.sleep(1)
    idle = rss_bytes(pid)
    sampler.reset()
    started = time.monotonic()
    outcomes = fuzz.send(url, files, concurrency=clients)
    seconds = time.monotonic() - started
    peak = sampler.peak
    time.sleep(3)
    after = rss_bytes(pid)
    statuses = Counter((o.case.kind, o.status) for o in outcomes)
    print(f"worst: {clients} clients, one 7000x7000 file each ({', '.join(WORST)}), {seconds:.1f} s")
    print(f"  statuses: " + ", ".join(f"{k} {s}: {n}" for (k, s), n in sorted(statuses.items(), key=str)))
    print(f"  RSS idle {mib(idle)}, peak {mib(peak)}, 3 s after {mib(after)} ({(after - idle) / idle:+.1%} of idle)")
    return {"idle": idle, "peak": peak, "after": after, "statuses": statuses}


def soak_phase(url: str, pid: int, sampler: RssSampler, requests: int, clients: int, seed: int) -> dict:
    photos = good_photos()
    rng = random.Random(seed)
    hostile = itertools.count()

    def items():
        for i in range(requests):
            if rng.random() < 0.2:
                yield fuzz.case(seed, next(hostile))
            else:
                yield fuzz.Case(seed, i, "photo", "photo", photos[i % len(photos)])

    warm_up = max(requests // 10, 1)
    marks: dict[str, int] = {}
    done = itertools.count(1)

    def on_outcome(outcome: fuzz.Outcome) -> None:
        if next(done) == warm_up:
            marks["after_warm_up"] = rss_bytes(pid)

    sampler.reset()
    started = time.monotonic()
    outcomes = fuzz.send(url, items(), concurrency=clients, on_outcome=on_outcome)
    seconds = time.monotonic() - started
    time.sleep(3)
    end = rss_bytes(pid)
    statuses = Counter(o.status for o in outcomes)
    growth = (end - marks["after_warm_up"]) / marks["after_warm_up"]
    print(f"soak: {requests} requests, {clients} clients, 20% hostile, {seconds:.0f} s ({requests / seconds:.0f} req/s)")
    print(f"  statuses: " + ", ".join(f"{s}: {n}" for s, n in sorted(statuses.items(), key=str)))
    print(f"  RSS after warm-up ({warm_up} requests) {mib(marks['after_warm_up'])}, at the end {mib(end)} "
          f"({growth:+.1%}), peak {mib(sampler.peak)}")
    return {"after_warm_up": marks["after_warm_up"], "end": end, "growth": growth, "statuses": statuses}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=("worst", "soak", "both"), default="both")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--soak", type=int, default=10000, help="soak requests")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--server-args", default="", help="extra arguments for app.py, one string")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="server environment")
    args = p.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(port, shlex.split(args.server_args), env)
    url = f"http://127.0.0.1:{port}"
    sampler = RssSampler(proc.pid)
    try:
        print(f"server pid {proc.pid}, args {args.server_args or '(defaults)'}, env {env or '(inherited)'}")
        # Warm up every request thread on every code path, so "idle" is not the bare start-up.
        photos = good_photos()
        fuzz.send(url, (fuzz.Case(0, i, "photo", "photo", photos[i % len(photos)]) for i in range(4 * args.clients)),
                  args.clients)
        if args.phase in ("worst", "both"):
            worst_phase(url, proc.pid, sampler, args.clients)
        if args.phase in ("soak", "both"):
            soak_phase(url, proc.pid, sampler, args.soak, args.clients, args.seed)
        alive = fuzz.alive(url)
        print(f"server {'alive' if alive else 'NOT answering /healthz'}")
        return 0 if alive else 1
    finally:
        sampler.stop()
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    sys.exit(main())
