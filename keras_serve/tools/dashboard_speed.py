"""How fast the model-quality dashboard's numbers are with many uploads: seeds N records, then
times every statistic the dashboard and /api/stats show.

    python -m keras_serve.tools.dashboard_speed --rows 1000000 --reviews 100000     # SQLite in a temp folder
    python -m keras_serve.tools.dashboard_speed --database-url postgresql+psycopg://...
    python -m keras_serve.tools.dashboard_speed --database-url sqlite:////tmp/d/uploads.db --keep  # seed once, rerun
    python -m keras_serve.tools.dashboard_speed --versions 1    # the worst case: one version answered all of them

The records are synthetic (no images: no statistic reads one), spread over 90 days and split
evenly between `--versions` model versions (the newest answered the last days); `--reviews`
of them are reviewed (a tenth corrected), 0.5% have a visitor's answer, 0.5% failed. The
dashboard's clock stands at the newest upload, the last second of a day full of traffic: the
worst case for a week or "all", whose partial days (today, and the first day of a week) are
read from the uploads and their whole days from the running counts (traffic_days). Each
scenario (a version and a window) runs `QualityStats.stats` (every query of one page view,
without the 30 s answer cache) cold, in a new process's first QualityStats, then on a new
QualityStats each run (it keeps nothing, so that is a first view too: "cold" runs also
count the database's own cache warming up), and warm, the same one again; p50 / p95 / max
are printed, and so are the version list, the promotion log and the Prometheus summary.
This is a benchmark, not a test: it prints numbers and asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path

from keras_serve.tools.listing_speed import bulk_load, percentile  # shared with the listing benchmark

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

END = datetime(2026, 12, 1)
SPAN = timedelta(days=90)


def versions(count: int) -> list[tuple[str, str]]:
    return [(f"cats_vs_dogs-v{i + 1}.h5", f"{i + 10:x}" * 32) for i in range(count)]


def synthetic_rows(first: int, last: int, rows: int, review_share: float, models: list[tuple[str, str]],
                   rng: random.Random):
    from keras_serve.storage.records import CONFIRMED, CORRECTED, NOT_REVIEWED

    start = END - SPAN
    for n in range(first, last):
        received = start + SPAN * (n / rows) + timedelta(microseconds=rng.randrange(1000))
        model_file, model_sha = models[min(len(models) - 1, n * len(models) // rows)]
        upload_id = f"{rng.getrandbits(128):032x}"
        failed = rng.random() < 0.005
        # later traffic is less sure (drift for the PSI to find)
        confidence = None if failed else min(0.999999, 0.5 + rng.betavariate(5 - 2 * n / rows, 1.5) / 2)
        label = None if failed else rng.choice(("CAT", "DOG", "DOG"))
        state, review_label, reviewed_at = NOT_REVIEWED, None, None
        if not failed and rng.random() < review_share:
            state = CONFIRMED if rng.random() < 0.9 else CORRECTED
            review_label = label if state == CONFIRMED else ("CAT" if label == "DOG" else "DOG")
            reviewed_at = received + timedelta(hours=1)
        feedback_label = feedback_at = None
        if not failed and rng.random() < 0.005:
            feedback_label = label if rng.random() < 0.8 else ("CAT" if label == "DOG" else "DOG")
            feedback_at = received + timedelta(minutes=1)
        prediction = None if failed else json.dumps({"label": label, "confidence": round(confidence, 6)})
        yield (upload_id, received, 50_000, f"{rng.getrandbits(256):064x}", "JPEG", "photo.jpg", model_file,
               model_sha, prediction, "The model failed." if failed else None,
               None if failed else round(rng.lognormvariate(3.2, 0.5), 2), f"{received:%Y/%m/%d}/{upload_id}.jpg",
               label, confidence, state, review_label, reviewed_at, feedback_label, feedback_at)


def seed(url: str, rows: int, reviews: int, models: list[tuple[str, str]], batch: int = 50_000) -> None:
    """Through the driver directly (executemany on SQLite, COPY on PostgreSQL), as listing_speed."""
    from keras_serve.storage.faults import StoreTimeouts
    from keras_serve.storage.records import RecordStore, model_promotions, rebuild_review_totals, uploads
    from keras_serve.storage.traffic_days import rebuild_traffic

    # the real schema, the dashboard's indexes included; loading 50,000 rows per statement takes
    # longer than the server's 3 s statement limit on a busy machine
    store = RecordStore(url, timeouts=StoreTimeouts(timeout_s=600.0))
    rng = random.Random(1)
    bulk_load(store, (list(synthetic_rows(first, min(first + batch, rows), rows, reviews / rows, models, rng))
                      for first in range(0, rows, batch)), rows)
    with store.engine.begin() as conn:
        # the rows went in past RecordStore, so their review totals and day counts are counted
        # here, as the migrations count those of a database older than them
        rebuild_review_totals(conn)
        rebuild_traffic(conn, uploads)
        for i, (_, sha) in enumerate(models[1:], start=1):
            conn.execute(model_promotions.insert().values(sha256=sha, action="promote", by="bench",
                                                          created=END - SPAN + SPAN * (i / len(models))))
    store.close()


def timed(function, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        out.append((time.perf_counter() - started) * 1000)
    return out


def _first_view(url: str, sha: str, window: str, at: str) -> int:
    from keras_serve.storage.quality_stats import QualityStats
    from keras_serve.storage.records import RecordStore

    records = RecordStore(url)
    now = datetime.fromisoformat(at)
    started = time.perf_counter()
    QualityStats(records, clock=lambda: now).stats(sha, window, 0.85, ["CAT", "DOG"])
    print(f"{(time.perf_counter() - started) * 1000:.3f}")
    records.close()
    return 0


def first_views(url: str, sha: str, window: str, at: datetime, repeats: int) -> list[float]:
    """The first page view of a new process, each in its own: its compiled statements start
    empty, and its one connection has only checked the schema, so SQLite's page cache holds
    next to nothing (the operating system's file cache is warm, as on a server that restarts)."""
    out = []
    for _ in range(repeats):
        answer = subprocess.run([sys.executable, "-m", "keras_serve.tools.dashboard_speed", "--database-url", url,
                                 "--first-view", sha, window, at.isoformat()],
                                capture_output=True, text=True, check=True)
        out.append(float(answer.stdout.strip().splitlines()[-1]))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--reviews", type=int, default=100_000, help="about this many reviewed uploads")
    p.add_argument("--versions", type=int, default=3, help="model versions sharing the rows (default 3)")
    p.add_argument("--database-url", help="default: SQLite in a new temp folder")
    p.add_argument("--keep", action="store_true", help="seed only if the database is empty; keep it afterwards")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per scenario")
    p.add_argument("--first-view", nargs=3, metavar=("SHA256", "WINDOW", "AT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.first_view:  # one page view in this new process, timed (what "first view" runs)
        return _first_view(args.database_url, *args.first_view)

    import sqlalchemy as sa

    from keras_serve.storage.quality_stats import WINDOWS, QualityStats
    from keras_serve.storage.records import RecordStore

    models = versions(args.versions)
    folder = None
    url = args.database_url
    if url is None:
        folder = tempfile.TemporaryDirectory(prefix="dashboard-speed-")
        url = f"sqlite:///{Path(folder.name) / 'uploads.db'}"
    records = RecordStore(url)
    with records.engine.connect() as conn:
        present = conn.execute(sa.text("SELECT count(*) FROM uploads")).scalar()
    if not present:
        print(f"seeding {args.rows:,} uploads, about {args.reviews:,} reviewed, {args.versions} version(s) ...",
              file=sys.stderr)
        seed(url, args.rows, args.reviews, models)
        with records.engine.connect() as conn:
            present = conn.execute(sa.text("SELECT count(*) FROM uploads")).scalar()
    with records.engine.connect() as conn:
        reviewed = conn.execute(sa.text("SELECT count(*) FROM uploads WHERE review_state != 0")).scalar()
        # the dashboard's clock: the newest upload, late in a day full of them (see above)
        at = conn.execute(sa.text("SELECT max(received) FROM uploads")).scalar()
    at = at if isinstance(at, datetime) else datetime.fromisoformat(str(at))
    stats = QualityStats(records, clock=lambda: at)
    labels = ["CAT", "DOG"]
    print(f"{records.description.split('://')[0]}: {present:,} uploads, {reviewed:,} reviewed, "
          f"{len(models)} version(s), at {at:%Y-%m-%d %H:%M:%S}; {args.repeats} runs each "
          f"(cold: a quarter; first view: 3, each in a new process), ms")
    print(f"{'scenario':44} {'uploads':>9} {'p50':>8} {'p95':>8} {'max':>8}")

    def report(name: str, times: list[float], uploads: int | str = "") -> None:
        print(f"{name:44} {uploads:>9} {statistics.median(times):8.1f} {percentile(times, 95):8.1f} {max(times):8.1f}")

    newest = models[-1][1]
    scenarios = [(f"newest version, {window}", newest, window) for window in WINDOWS]
    if len(models) > 1:
        scenarios.append(("oldest version, all", models[0][1], "all"))
    # first view: a new process; cold: a new QualityStats each run (it keeps nothing between
    # views anyway); warm: the same one again, its connection and compiled statements reused.
    for name, sha, window in scenarios:
        result = stats.stats(sha, window, 0.85, labels)
        report(f"stats, first view: {name}", first_views(url, sha, window, at, 3), result["traffic"]["uploads"])
        report(f"stats, cold: {name}", timed(lambda: QualityStats(records, clock=lambda: at).stats(
            sha, window, 0.85, labels), max(3, args.repeats // 4)), result["traffic"]["uploads"])
        report(f"stats, warm: {name}", timed(lambda: stats.stats(sha, window, 0.85, labels), args.repeats),
               result["traffic"]["uploads"])
    report("versions (the version list)", timed(stats.versions, args.repeats))
    report("timeline (promotions)", timed(stats.timeline, args.repeats))
    report("Prometheus summary, warm: newest, day + week",
           timed(lambda: [stats.summary(newest, w, 0.85) for w in ("day", "week")], args.repeats))
    records.close()
    if folder is not None and not args.keep:
        folder.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
