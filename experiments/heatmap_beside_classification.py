"""Paired measurement: does a stream of heatmap requests slow classification?

One server (python app.py, the shipped model); 8 clients classify the validation photos
throughout; a heatmap loop (upload a photo, GET its heatmap) is switched on and off in
alternate 10 s windows, so slow drifts of a shared machine hit both kinds alike.

    flock -x /work/timing.lock .venv/bin/python experiments/heatmap_beside_classification.py

Results: docs/heatmap.md.
"""
import os, sys, threading, time, statistics, requests
sys.path.insert(0, "tests"); sys.path.insert(0, ".")
from pathlib import Path
from server_process import ServerProcess
import tempfile
photos = [p.read_bytes() for p in sorted((Path(__file__).resolve().parents[2] / "shared/data/cats_vs_dogs/validation").rglob("*.jpg"))[:200]]
WINDOW, WINDOWS = 10.0, 8
with ServerProcess("--upload-dir", tempfile.mkdtemp(), startup_timeout=300) as srv:
    url = srv.url
    s = requests.Session()
    for i in range(20):  # warm up classification and the first (tracing) heatmap
        uid = s.post(url + "/file/", files={"file": ("x.jpg", photos[i])}).json()["id"]
    s.get(f"{url}/uploads/{uid}/heatmap.png")
    stop = threading.Event(); heat_on = threading.Event(); records = []; heat = []
    def client(k):
        ss = requests.Session(); i = k
        while not stop.is_set():
            t = time.perf_counter(); r = ss.post(url + "/file/", files={"file": ("x.jpg", photos[i % 200])}); i += 8
            records.append((t, time.perf_counter() - t, r.status_code, heat_on.is_set()))
    def heatmaps():
        ss = requests.Session(); i = 0
        while not stop.is_set():
            if not heat_on.wait(0.1): continue
            uid = ss.post(url + "/file/", files={"file": ("h.jpg", photos[(i * 7) % 200])}).json()["id"]; i += 1
            t = time.perf_counter(); r = ss.get(f"{url}/uploads/{uid}/heatmap.png")
            heat.append((time.perf_counter() - t, r.status_code))
    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)] + [threading.Thread(target=heatmaps)]
    for t in threads: t.start()
    time.sleep(3)
    spans = {True: [], False: []}
    for w in range(WINDOWS):
        on = w % 2 == 1
        (heat_on.set if on else heat_on.clear)()
        start = time.perf_counter(); time.sleep(WINDOW); spans[on].append((start + 1.0, time.perf_counter()))  # 1 s settle
    stop.set(); heat_on.set()
    for t in threads: t.join(60)
    for on in (False, True):
        lat = [d for (t, d, st, _) in records if st == 200 and any(a <= t < b for a, b in spans[on])]
        secs = sum(b - a for a, b in spans[on])
        lat.sort()
        print(f"heatmap loop {'ON ' if on else 'OFF'}: {len(lat) / secs:.1f} classifications/s over {secs:.0f} s, "
              f"p50 {1000 * lat[len(lat) // 2]:.0f} ms, p90 {1000 * lat[int(len(lat) * 0.9)]:.0f} ms, errors "
              f"{sum(1 for (t, d, st, _) in records if st != 200)}")
    ok = sorted(d for d, st in heat if st == 200)
    print(f"heatmaps made while ON: {len(ok)}, median {1000 * ok[len(ok) // 2]:.0f} ms; 503: {sum(1 for _, st in heat if st == 503)}")
