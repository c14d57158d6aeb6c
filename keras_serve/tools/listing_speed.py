"""How fast the reviewer's listing is with many uploads: seeds N records, then times pages.

    python -m keras_serve.tools.listing_speed --rows 1000000                       # SQLite in a temp folder
    python -m keras_serve.tools.listing_speed --rows 1000000 --database-url postgresql+psycopg://...
    python -m keras_serve.tools.listing_speed --database-url sqlite:////tmp/l/uploads.db --keep   # seed once, rerun

Each page is a real `GET /api/uploads` through the app (Flask test client, Bearer token), so
the time is everything the server does for one page of 48: the query, the rows, the cursor,
the JSON. Every scenario (a filter and an order) is timed on pages from the start (following
next_cursor) and on pages deep inside the list (a cursor made from a random point), and the
p50 / p95 / max per scenario are printed. The records are synthetic (no images are stored:
the listing never reads an image), spread over 90 days, with 2% reviewed and 0.5% feedback.
This is a benchmark, not a test: it prints numbers and asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SCENARIOS: list[tuple[str, dict[str, str]]] = [
    ("newest", {}),
    ("label=CAT", {"label": "CAT"}),
    ("not reviewed", {"reviewed": "no"}),
    ("reviewed", {"reviewed": "yes"}),
    ("corrected", {"corrected": "yes"}),
    ("least sure", {"order": "least_sure"}),
    ("least sure, not reviewed", {"order": "least_sure", "reviewed": "no"}),
    ("least sure, label=DOG", {"order": "least_sure", "label": "DOG"}),
    ("confidence 0.5-0.6", {"min_confidence": "0.5", "max_confidence": "0.6"}),
    ("last 7 days", {"since": "DAYS7"}),
    ("model version", {"model": "MODEL"}),
    ("feedback disagrees", {"feedback": "disagrees"}),
    ("latest feedback", {"order": "feedback"}),
]
START = datetime(2026, 9, 1)
SPAN_S = 90 * 86400
MODELS = [("cats_vs_dogs-2026-09.h5", "a" * 64), ("cats_vs_dogs-2026-10.h5", "b" * 64),
          ("cats_vs_dogs.h5", "c" * 64)]


COLUMNS = ("id", "received", "bytes", "sha256", "format", "client_filename", "model", "model_sha256", "prediction",
           "error", "milliseconds", "image_key", "predicted_label", "confidence", "review_state", "review_label",
           "reviewed_at", "feedback_label", "feedback_at")


def synthetic_rows(first: int, last: int, rows: int, rng: random.Random):
    from keras_serve.storage.records import CONFIRMED, CORRECTED, NOT_REVIEWED

    for n in range(first, last):
        received = START + timedelta(seconds=SPAN_S * n / rows, microseconds=rng.randrange(1000))
        label = rng.choice(("CAT", "DOG"))
        confidence = 0.5 + rng.random() / 2
        upload_id = f"{rng.getrandbits(128):032x}"
        model_file, model_sha = MODELS[min(2, n * 3 // rows)]
        state, review_label, reviewed_at = NOT_REVIEWED, None, None
        if rng.random() < 0.02:
            state = CONFIRMED if rng.random() < 0.8 else CORRECTED
            review_label = label if state == CONFIRMED else ("DOG" if label == "CAT" else "neither")
            reviewed_at = received + timedelta(hours=1)
        feedback_label = feedback_at = None
        if rng.random() < 0.005:
            feedback_label = label if rng.random() < 0.7 else ("DOG" if label == "CAT" else "CAT")
            feedback_at = received + timedelta(minutes=1)
        yield (upload_id, received, 50_000, f"{rng.getrandbits(256):064x}", "JPEG", "photo.jpg", model_file,
               model_sha, json.dumps({"label": label, "confidence": round(confidence, 6)}), None, 5.0,
               f"{received:%Y/%m/%d}/{upload_id}.jpg", label, confidence, state, review_label, reviewed_at,
               feedback_label, feedback_at)


def seed(url: str, rows: int, batch: int = 50_000) -> None:
    """A million synthetic uploads into the real schema (indexes included), bulk-loaded."""
    from keras_serve.storage.records import RecordStore

    store = RecordStore(url)
    rng = random.Random(1)
    bulk_load(store, (list(synthetic_rows(first, min(first + batch, rows), rows, rng))
                      for first in range(0, rows, batch)), rows)
    store.close()


def bulk_load(store: Any, chunks: Iterable[list[tuple]], rows: int) -> None:
    """`chunks` of COLUMNS rows through the driver directly (executemany on SQLite, COPY on
    PostgreSQL), one commit per chunk, then ANALYZE: the ORM path would take most of an hour
    for a million rows, and only the reading is measured."""
    started = time.perf_counter()
    postgres = store.url.get_backend_name() == "postgresql"
    raw = store.engine.raw_connection()
    done = 0
    try:
        cursor = raw.cursor()
        for chunk in chunks:
            if postgres:
                with cursor.copy(f"COPY uploads ({', '.join(COLUMNS)}) FROM STDIN") as copy:
                    for row in chunk:
                        copy.write_row(row)
            else:
                cursor.executemany(f"INSERT INTO uploads ({', '.join(COLUMNS)}) VALUES "
                                   f"({', '.join('?' * len(COLUMNS))})",
                                   [tuple(v.strftime('%Y-%m-%d %H:%M:%S.%f') if isinstance(v, datetime) else v for v in row)
                                    for row in chunk])
            raw.commit()
            before, done = done, done + len(chunk)
            if done // 100_000 > before // 100_000 or done == rows:
                print(f"  seeded {done:,} rows ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        if postgres:
            raw.commit()
            raw.driver_connection.autocommit = True
            cursor.execute("VACUUM ANALYZE uploads")
        else:
            cursor.execute("ANALYZE")
            raw.commit()
    finally:
        raw.close()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--database-url", help="default: SQLite in a new temp folder")
    p.add_argument("--keep", action="store_true", help="seed only if the database is empty; keep it afterwards")
    p.add_argument("--pages", type=int, default=40, help="pages timed per scenario")
    p.add_argument("--model", default=None, help="model file the app loads (default: the shipped one)")
    args = p.parse_args(argv)

    import sqlalchemy as sa

    from keras_serve import create_app
    from keras_serve.storage.records import RecordStore, uploads
    from keras_serve.web.review import encode_cursor

    folder = Path(tempfile.mkdtemp(prefix="listing-speed-"))
    url = args.database_url or f"sqlite:///{folder / 'uploads.db'}"
    probe = RecordStore(url)
    with probe.engine.connect() as conn:
        existing = conn.execute(sa.select(sa.func.count()).select_from(uploads)).scalar()
    probe.close()
    if existing == 0:
        print(f"seeding {args.rows:,} records into {sa.engine.make_url(url).render_as_string()}", file=sys.stderr)
        seed(url, args.rows)
    else:
        print(f"using the {existing:,} records already there", file=sys.stderr)

    token = "listing-speed-" + "x" * 16
    config = {"UPLOAD_DIR": str(folder), "DATABASE_URL": url, "ADMIN_TOKEN": token, "ENGINE": "tensorflow",
              "MAX_BATCH": 1, "UPLOAD_RETENTION_DAYS": 0}
    if args.model:
        config["MODEL_PATH"] = args.model
    app = create_app(config)
    client = app.test_client()
    headers = {"Authorization": f"Bearer {token}"}
    rng = random.Random(2)
    end = START + timedelta(seconds=SPAN_S)
    print(f"{'scenario':30} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}  rows/page")
    all_times: list[float] = []
    for name, query in SCENARIOS:
        query = dict(query)
        if query.get("since") == "DAYS7":
            query["since"] = (end - timedelta(days=7)).date().isoformat()
        if query.get("model") == "MODEL":
            query["model"] = MODELS[1][1]
        order = query.get("order", "newest")
        times, sizes = [], []
        cursor = None
        for page in range(args.pages):
            q = dict(query)
            if page % 2 == 1:  # a page deep inside the list: a cursor from a random point
                point = START + timedelta(seconds=rng.randrange(SPAN_S))
                key = {"newest": (point, "f" * 32), "oldest": (point, "0" * 32),
                       "least_sure": (0.5 + rng.random() / 2, "0" * 32), "feedback": (point, "f" * 32)}[order]
                with app.app_context():
                    q["cursor"] = encode_cursor(order, key)
            elif cursor:
                q["cursor"] = cursor
            started = time.perf_counter()
            r = client.get("/api/uploads", query_string=q, headers=headers)
            times.append((time.perf_counter() - started) * 1000)
            body = r.get_json()
            if r.status_code != 200:
                print(f"{name}: {r.status_code} {body}", file=sys.stderr)
                break
            sizes.append(len(body["uploads"]))
            if page % 2 == 0:
                cursor = body["next_cursor"]
        all_times += times
        print(f"{name:30} {statistics.median(times):8.1f} {percentile(times, 95):8.1f} {max(times):8.1f}  "
              f"{statistics.mean(sizes):.0f}")
    counts = []
    for _ in range(5):
        started = time.perf_counter()
        client.get("/api/uploads/counts", headers=headers)
        counts.append((time.perf_counter() - started) * 1000)
    print(f"{'ALL listing pages':30} {statistics.median(all_times):8.1f} {percentile(all_times, 95):8.1f} "
          f"{max(all_times):8.1f}")
    print(f"{'GET /api/uploads/counts':30} {statistics.median(counts):8.1f} {percentile(counts, 95):8.1f} "
          f"{max(counts):8.1f}")
    app.extensions["classifier"].close()
    if not args.keep and not args.database_url:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
