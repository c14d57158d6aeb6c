"""Ask a running server for heatmaps in a loop, to measure what they cost classification.

    python -m keras_serve.tools.heatmap_loop http://127.0.0.1:8080 --images DIR --seconds 60

Each round uploads one photo (POST /file/) and asks for its heatmap, so every heatmap is
computed, never served from the cache. Run it beside `python -m keras_serve.tools.benchmark
--port ...` against the same server; docs/heatmap.md has the numbers and the commands.
Prints how many heatmaps were made, their latency (median, 90th percentile) and the 503s.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import requests


def wait_ready(base_url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if requests.get(base_url + "/readyz", timeout=2).json().get("ready"):
                return
        except (requests.RequestException, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"{base_url} was not ready within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("url")
    p.add_argument("--images", type=Path, required=True, help="folder of JPEGs (searched recursively)")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--ready-timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    photos = sorted(args.images.rglob("*.jpg"))[:200]
    if not photos:
        raise SystemExit(f"no .jpg files under {args.images}")
    wait_ready(args.url, args.ready_timeout)
    session = requests.Session()
    latencies, busy, failed = [], 0, 0
    deadline = time.monotonic() + args.seconds
    i = 0
    while time.monotonic() < deadline:
        photo = photos[i % len(photos)]
        i += 1
        try:
            answer = session.post(args.url + "/file/", files={"file": (photo.name, photo.read_bytes())}, timeout=60)
            upload_id = answer.json()["id"]
            started = time.perf_counter()
            r = session.get(f"{args.url}/uploads/{upload_id}/heatmap.png", timeout=60)
        except (requests.RequestException, ValueError, KeyError):
            failed += 1
            time.sleep(0.5)  # the server may be gone (the benchmark stops it)
            continue
        if r.status_code == 200:
            latencies.append((time.perf_counter() - started) * 1000)
        elif r.status_code == 503:
            busy += 1
        else:
            failed += 1
    if latencies:
        p90 = statistics.quantiles(latencies, n=10)[-1] if len(latencies) >= 10 else max(latencies)
        print(f"heatmaps: {len(latencies)} in {args.seconds:.0f} s ({len(latencies) / args.seconds:.1f}/s), "
              f"median {statistics.median(latencies):.0f} ms, p90 {p90:.0f} ms; 503 busy: {busy}; failed: {failed}")
    else:
        print(f"heatmaps: none made; 503 busy: {busy}; failed: {failed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
