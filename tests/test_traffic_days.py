"""The dashboard's running counts of traffic per version and day (traffic_days, schema 8): after
every kind of write they equal a count from scratch, and the dashboard's numbers read from them
equal those read from the uploads alone, on each storage back end."""
from __future__ import annotations

import random
import threading
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from keras_serve.storage.traffic_days import (FINE_EDGES, NO_CONFIDENCE, coarse_bin_of_fine, fine_bin_of,
                                              fine_bin_sql, traffic_days, unsure_limit)
from keras_serve.storage.uploads import image_key

NOW = datetime(2026, 12, 3, 12, 0, 0)
VERSIONS = ("a" * 64, "b" * 64)
# confidences on and beside the fine and coarse bins' edges, latencies on the buckets' bounds
CONFIDENCES = [0.0, 0.0099999, 0.01, 0.1, 0.29, 0.5, 0.8499999, 0.85, 0.855, 0.9, 0.99, 1.0, None]
LATENCIES = [None, 0.5, 1.0, 7.5, 9.99, 10000.0, 20000.0]
MESSAGES = ["The model failed.", "The image could not be decoded.", "Out of memory."]


def upload(n: int, rng: random.Random, received: datetime | None = None) -> dict:
    failed = rng.random() < 0.15
    upload_id = f"{n:032x}"
    if received is None:
        # over 20 days, some exactly at midnight, some in the last minutes
        received = rng.choice([NOW - timedelta(minutes=rng.randrange(1, 60 * 24 * 20)),
                               datetime(2026, 11, 20) + timedelta(days=rng.randrange(0, 14)), NOW - timedelta(seconds=30)])
    confidence = None if failed else (rng.choice(CONFIDENCES) if rng.random() < 0.5 else rng.random())
    return {"id": upload_id, "received": received, "bytes": 10, "sha256": "0" * 64, "format": "PNG",
            "image_key": image_key(upload_id, received, "PNG"), "model": "m.h5",
            "model_sha256": None if rng.random() < 0.05 else rng.choice(VERSIONS),
            "predicted_label": None if failed else rng.choice(["CAT", "DOG", "DOG"]), "confidence": confidence,
            "milliseconds": rng.choice(LATENCIES), "error": rng.choice(MESSAGES) if failed else None}


def kept_counts(records) -> dict:
    with records._connect() as conn:
        return {(r.model_sha256, str(r.day), r.kind, r.item): r.uploads for r in conn.execute(sa.select(traffic_days))}


def rebuilt_counts(records) -> dict:
    """What the migration's backfill makes of the same rows (in a transaction rolled back)."""
    from keras_serve.storage.records import uploads
    from keras_serve.storage.traffic_days import rebuild_traffic

    with records.engine.connect() as conn:
        trans = conn.begin()
        rebuild_traffic(conn, uploads)
        rows = {(r.model_sha256, str(r.day), r.kind, r.item): r.uploads for r in conn.execute(sa.select(traffic_days))}
        trans.rollback()
    return rows


def assert_counts_match(records) -> None:
    kept = kept_counts(records)
    assert kept == rebuilt_counts(records)
    assert all(n > 0 for n in kept.values())  # a count at zero is deleted, never kept


def stats_both_ways(records, sha: str, window: str, unsure_below: float, monkeypatch) -> tuple[dict, dict]:
    """(the dashboard's numbers as served, the same numbers with every day read from the uploads)."""
    from keras_serve.storage import quality_stats
    from keras_serve.storage.quality_stats import QualityStats

    served = QualityStats(records, clock=lambda: NOW).stats(sha, window, unsure_below, ["CAT", "DOG"])
    with monkeypatch.context() as patch:
        patch.setattr(quality_stats, "unsure_limit", lambda _: None)  # no threshold on an edge: no day counts
        scanned = QualityStats(records, clock=lambda: NOW).stats(sha, window, unsure_below, ["CAT", "DOG"])
    return served, scanned


# --- the bins ----------------------------------------------------------------------------------------

def test_fine_bins_are_exact_at_their_edges_and_agree_in_sql(tmp_path):
    from keras_serve.storage.records import CONFIDENCE_EDGES, confidence_bin_of

    values = [-0.5, 0.0, 0.005, 0.01, 0.0999999, 0.1, 0.29, 0.8499999, 0.85, 0.99, 0.9999, 1.0, 1.5, None]
    assert [fine_bin_of(v) for v in values] == [0, 1, 1, 2, 10, 11, 30, 85, 86, 100, 100, 101, 101, NO_CONFIDENCE]
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'bins.db'}")
    with engine.connect() as conn:
        for value in values:
            assert conn.execute(sa.select(fine_bin_sql(sa.literal(value, sa.Float)))).scalar() == fine_bin_of(value)
    # every confidence of a fine bin falls in the coarse bin the dashboard maps it to
    for value in values:
        assert coarse_bin_of_fine(fine_bin_of(value), CONFIDENCE_EDGES) == confidence_bin_of(value), value
    # "under 0.85" is "in fine bin 85 or below"; a threshold off the edges cannot be read from the bins
    assert unsure_limit(0.85) == 85 and unsure_limit(0.0) == 0 and unsure_limit(1.0) == 100
    assert unsure_limit(0.855) is None and unsure_limit(2.0) is None
    assert all((value < 0.85) == (fine_bin_of(value) <= 85) for value in values if value is not None)
    assert FINE_EDGES[85] == 0.85


# --- the counts against a count from scratch, after each kind of write ------------------------------

def test_counts_equal_a_count_from_scratch_after_inserts_reviews_deletes_imports(make_store, monkeypatch):
    from keras_serve.storage.reviewing import ReviewStore

    store = make_store()
    records = store.records
    rng = random.Random(8)
    rows = [upload(n, rng) for n in range(150)]
    for row in rows[:140]:
        records.insert(row)
    assert_counts_match(records)
    assert sum(n for (sha, _, kind, _), n in kept_counts(records).items() if kind in (0, 1)) == \
        sum(1 for row in rows[:140] if row["model_sha256"] is not None)

    # a review changes no traffic count
    before = kept_counts(records)
    ReviewStore(records, clock=lambda: NOW).review([(row["id"], "CAT") for row in rows[:40:3]], "alice")
    assert kept_counts(records) == before

    # an admin's delete of chosen uploads
    records.delete([row["id"] for row in rows[:20]])
    assert_counts_match(records)

    # retention: everything older than 10 days goes
    store.retention_days = 10
    store.clock = lambda: NOW.replace(tzinfo=timezone.utc).timestamp()
    assert store.prune()["expired"] > 0
    assert_counts_match(records)

    # an import (day files and store copies both add rows with insert_if_absent), once and again
    for row in rows[140:]:
        assert records.insert_if_absent(row)
        assert not records.insert_if_absent(row)  # already there: counted once
    assert_counts_match(records)

    # and the dashboard reads the same numbers from them as from the uploads
    for sha in VERSIONS:
        for window in ("week", "all"):
            for unsure_below in (0.85, 0.0):
                served, scanned = stats_both_ways(records, sha, window, unsure_below, monkeypatch)
                assert served == scanned, (sha, window, unsure_below)


def test_concurrent_writers_add_up(make_store):
    """Many threads inserting into the same days (SQLite's group commit; PostgreSQL's concurrent upserts)."""
    store = make_store()
    records = store.records
    errors = []

    def work(worker: int) -> None:
        rng = random.Random(worker)
        try:
            for k in range(25):
                records.insert(upload(worker * 1000 + k, rng, received=NOW - timedelta(hours=rng.randrange(0, 3))))
        except Exception as exc:  # pragma: no cover - the assert below shows it
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert_counts_match(records)
    with records._connect() as conn:
        total = conn.execute(sa.text("SELECT count(*) FROM uploads")).scalar()
        counted = conn.execute(sa.text("SELECT count(*) FROM uploads WHERE model_sha256 IS NOT NULL")).scalar()
    assert total == 8 * 25
    assert sum(n for (_, _, kind, _), n in kept_counts(records).items() if kind in (0, 1)) == counted


def test_a_copied_store_counts_what_it_copied(tmp_path):
    """The storage command's copy (and import) write through insert_if_absent: counted as they go in."""
    from keras_serve.storage.__main__ import copy_store
    from keras_serve.storage.uploads import UploadStore

    source = UploadStore.from_config({"UPLOAD_DIR": str(tmp_path / "source")})
    target = UploadStore.from_config({"UPLOAD_DIR": str(tmp_path / "target")})
    try:
        for n, (confidence, label) in enumerate([(0.9, "CAT"), (0.85, "DOG"), (None, None)]):
            source.save(b"\x89PNG" + bytes([n]), "PNG", {
                "model_sha256": VERSIONS[n % 2], "milliseconds": 3.0 + n, "error": None if label else "The model failed.",
                "prediction": {"label": label, "confidence": confidence} if label else None})
        assert copy_store(source, target)["copied"] == 3
        assert copy_store(source, target)["copied"] == 0  # again: nothing counted twice
        assert kept_counts(target.records) == kept_counts(source.records) == rebuilt_counts(target.records)
        assert sum(n for (_, _, kind, _), n in kept_counts(target.records).items() if kind in (0, 1)) == 3
    finally:
        source.close()
        target.close()


def test_the_dashboard_numbers_equal_a_scan_of_the_uploads_for_every_window(make_store, monkeypatch):
    store = make_store()
    rng = random.Random(5)
    for n in range(200):
        store.records.insert(upload(n, rng))
    for sha in VERSIONS:
        for window in ("day", "week", "all"):
            for unsure_below in (0.85, 0.5, 0.855, 1.0):  # 0.855 is no bin edge: read from the uploads
                served, scanned = stats_both_ways(store.records, sha, window, unsure_below, monkeypatch)
                assert served == scanned, (sha, window, unsure_below)
                assert served["traffic"]["uploads"] > 0
    # the unsure count by hand, for one window
    from keras_serve.storage.quality_stats import QualityStats

    traffic = QualityStats(store.records, clock=lambda: NOW).stats(VERSIONS[0], "all", 0.85)["traffic"]
    with store.records._connect() as conn:
        unsure = conn.execute(sa.text("SELECT count(*) FROM uploads WHERE model_sha256 = :sha AND confidence < 0.85 "
                                      "AND predicted_label IS NOT NULL AND received <= :now"),
                              {"sha": VERSIONS[0], "now": NOW}).scalar()
    assert traffic["unsure"] == unsure > 0


def test_the_migration_counts_the_traffic_of_a_database_made_before_the_counts(make_store):
    store = make_store()
    records = store.records
    rng = random.Random(13)
    for n in range(60):
        records.insert(upload(n, rng))
    records.insert(upload(60, rng, received=NOW - timedelta(days=400)))  # a year of days without uploads between
    before = kept_counts(records)
    assert before
    with records.engine.begin() as conn:  # the database as schema 7 left it
        conn.execute(sa.text("DROP TABLE traffic_days"))
        conn.execute(sa.text("DELETE FROM schema_migrations WHERE version = 8"))
    records.migrate()
    assert kept_counts(records) == before
    with records._connect() as conn:
        assert 8 in set(conn.execute(sa.text("SELECT version FROM schema_migrations")).scalars())
