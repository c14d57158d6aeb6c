"""Upload records: one row per upload in SQLite (the default) or PostgreSQL, via SQLAlchemy Core.

SQLite lives at `<upload dir>/uploads.db` in WAL mode, so readers never block the writer and
`sqlite3 uploads/uploads.db` works while the server runs. PostgreSQL is chosen by a URL
(`postgresql+psycopg://user@host/db`) for several servers sharing one store. Either way the
schema is created, or migrated, on start; the versions applied are in `schema_migrations`.

Every database failure leaves here as `StorageError` (503), and the server recovers by itself:
PostgreSQL connections are checked before use (`pool_pre_ping`), and a SQLite file that was
deleted or replaced while serving is noticed on the next checkout, then reopened (folder and
schema made again), instead of writes going on into a file nobody can see any more.

No call waits on PostgreSQL longer than the store timeouts (docs/storage-faults.md): a connect
timeout, the server's own statement_timeout, and a client-side limit on every wait for an
answer, which is what ends a wait on a server that is paused or behind a network black hole
(its timers do not run, and its kernel still acknowledges keepalives).

The database also holds its store id (`store_identity`), a random id made with the schema; the
image store's owner marker names it, so the orphan sweep knows whose images it may touch.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import secrets
import sqlite3
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql as pg_dialect, sqlite as sqlite_dialect

from keras_serve.errors import StorageError
from keras_serve.storage.faults import StoreTimeouts
from keras_serve.storage.traffic_days import change_traffic, counted_columns, rebuild_traffic, traffic_days

log = logging.getLogger(__name__)

metadata = sa.MetaData()

uploads = sa.Table(
    "uploads", metadata,
    sa.Column("id", sa.String(64), primary_key=True),       # 32 random hex; imported day-file ids are longer
    sa.Column("received", sa.DateTime(), nullable=False),   # UTC
    sa.Column("bytes", sa.BigInteger(), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("format", sa.String(16)),                     # detected from the content, never the name
    sa.Column("client_filename", sa.Text()),                # audit data only, never a path
    sa.Column("model", sa.Text()),
    sa.Column("prediction", sa.JSON()),
    sa.Column("error", sa.Text()),
    sa.Column("milliseconds", sa.Float()),
    sa.Column("image_key", sa.String(255), nullable=False),  # YYYY/MM/DD/<id>.<ext> in the image store
    # SQLite: the id is the table's key, not a second index beside a rowid (one page less per commit)
    sqlite_with_rowid=False,
)
received_index = sa.Index("uploads_received", uploads.c.received)

# Schema 2 (the review loop): columns added to `uploads` by ALTER TABLE, so a database made by
# an earlier version keeps its rows. They are facts copied out of the prediction (to filter and
# sort on them with an index) and a cache of the latest review and feedback, whose full history
# is in their own tables below; the prediction itself is never changed.
REVIEW_COLUMNS = (
    sa.Column("predicted_label", sa.String(64)),
    sa.Column("confidence", sa.Float()),
    sa.Column("model_sha256", sa.String(64)),
    sa.Column("review_label", sa.String(64)),      # the latest review's label
    sa.Column("review_state", sa.SmallInteger(), nullable=False, server_default="0"),  # REVIEW_STATES
    sa.Column("reviewed_at", sa.DateTime()),
    sa.Column("feedback_label", sa.String(64)),    # the latest public feedback's label
    sa.Column("feedback_at", sa.DateTime()),
)
for _column in REVIEW_COLUMNS:
    uploads.append_column(_column)
NOT_REVIEWED, CONFIRMED, CORRECTED = 0, 1, 2
NEITHER = "neither"  # a review label: the image is out of scope (neither of the model's labels)

reviews = sa.Table(
    "reviews", metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("upload_id", sa.String(64), nullable=False),
    sa.Column("label", sa.String(64), nullable=False),
    sa.Column("reviewer", sa.String(64), nullable=False),
    sa.Column("created", sa.DateTime(), nullable=False),   # UTC
)
feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("upload_id", sa.String(64), nullable=False),
    sa.Column("label", sa.String(64), nullable=False),     # what the visitor says is in the picture
    sa.Column("agrees", sa.Boolean(), nullable=False),     # ... equal to the prediction
    sa.Column("client", sa.String(32), nullable=False),    # keyed hash of the address, never the address
    sa.Column("created", sa.DateTime(), nullable=False),
)
instance_secrets = sa.Table(
    "instance_secrets", metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.String(128), nullable=False),
)
# The listing's orders and filters, each an index whose prefix is the filter and whose rest
# is the order (see keras_serve/storage/listing.py; tools/listing_speed.py measures them).
REVIEW_INDEXES = (
    sa.Index("uploads_received_id", uploads.c.received, uploads.c.id),
    sa.Index("uploads_label_received", uploads.c.predicted_label, uploads.c.received, uploads.c.id),
    sa.Index("uploads_state_received", uploads.c.review_state, uploads.c.received, uploads.c.id),
    sa.Index("uploads_confidence", uploads.c.confidence, uploads.c.id),
    sa.Index("uploads_state_confidence", uploads.c.review_state, uploads.c.confidence, uploads.c.id),
    # With the two labels in it, counting the disagreeing answers never reads the table.
    sa.Index("uploads_feedback", uploads.c.feedback_at, uploads.c.id, uploads.c.feedback_label,
             uploads.c.predicted_label),
    # Partial: only the few reviewed (or answered) uploads, newest first without a sort. The
    # listing writes these conditions with literal constants (REVIEWED, HAS_FEEDBACK): SQLite
    # uses a partial index only when the query's term is the index's own, parameters excluded.
    sa.Index("uploads_reviewed_received", uploads.c.received, uploads.c.id,
             sqlite_where=sa.text("review_state != 0"), postgresql_where=sa.text("review_state != 0")),
    sa.Index("uploads_feedback_received", uploads.c.received, uploads.c.id,
             sqlite_where=sa.text("feedback_at IS NOT NULL"), postgresql_where=sa.text("feedback_at IS NOT NULL")),
    sa.Index("uploads_model_received", uploads.c.model_sha256, uploads.c.received, uploads.c.id),
    sa.Index("reviews_upload", reviews.c.upload_id, reviews.c.created),
    sa.Index("feedback_upload", feedback.c.upload_id, feedback.c.created),
    sa.Index("feedback_client", feedback.c.client, feedback.c.created),
)
# The dashboard's statistics (keras_serve/storage/quality_stats.py): per model version and time
# range, each index holds every column its GROUP BY reads, so no statistic reads the table.
# The partial ones hold only the few reviewed, answered-by-visitors or failed uploads, and the
# column of their condition too: without it SQLite reads the table row of each.
STATS_INDEXES = (
    sa.Index("uploads_model_stats", uploads.c.model_sha256, uploads.c.received, uploads.c.predicted_label,
             uploads.c.confidence, uploads.c.milliseconds),
    sa.Index("uploads_model_reviewed", uploads.c.model_sha256, uploads.c.received, uploads.c.predicted_label,
             uploads.c.review_label, uploads.c.confidence, uploads.c.review_state,
             sqlite_where=sa.text("review_state != 0"), postgresql_where=sa.text("review_state != 0")),
    sa.Index("uploads_model_feedback", uploads.c.model_sha256, uploads.c.received, uploads.c.predicted_label,
             uploads.c.feedback_label, uploads.c.feedback_at,
             sqlite_where=sa.text("feedback_at IS NOT NULL"), postgresql_where=sa.text("feedback_at IS NOT NULL")),
    sa.Index("uploads_model_errors", uploads.c.model_sha256, uploads.c.received, uploads.c.error,
             sqlite_where=sa.text("error IS NOT NULL"), postgresql_where=sa.text("error IS NOT NULL")),
)

# Schema 4 (model versions): every model file published to the shared store, and the log of
# promotions and rollbacks. The served version is the one the log ends on; every server process
# polls it (keras_serve/pipeline/model_swap.py). A row with sha256 NULL means "the model each
# server was started with" (a rollback past the first promotion).
model_versions = sa.Table(
    "model_versions", metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("file", sa.String(128), nullable=False),     # its name when published; never a path
    sa.Column("bytes", sa.BigInteger(), nullable=False),
    sa.Column("labels", sa.JSON(), nullable=False),
    sa.Column("published", sa.DateTime(), nullable=False),
    sa.Column("published_by", sa.String(64), nullable=False),
)
model_promotions = sa.Table(
    "model_promotions", metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("sha256", sa.String(64)),                     # NULL: back to the start-up model
    sa.Column("action", sa.String(16), nullable=False),     # promote | rollback
    sa.Column("by", sa.String(64), nullable=False),
    sa.Column("created", sa.DateTime(), nullable=False),
)

# Schema 5: reviewers' browser sessions, so that logging out (or a new admin token) ends a
# session in every process and replica, not only in the browser (keras_serve/storage/admin_sessions.py).
admin_sessions = sa.Table(
    "admin_sessions", metadata,
    sa.Column("id", sa.String(64), primary_key=True),        # SHA-256 of the cookie's session id, never the id
    sa.Column("reviewer", sa.String(64), nullable=False),
    sa.Column("token_key", sa.String(32), nullable=False),   # which admin token it was made under (a keyed digest)
    sa.Column("created", sa.DateTime(), nullable=False),     # UTC
    sa.Column("expires", sa.DateTime(), nullable=False),     # UTC
)
admin_sessions_expires = sa.Index("admin_sessions_expires", admin_sessions.c.expires)

# Schema 7: running totals of the reviews, per model version, confidence bin (as the dashboard
# bins it), predicted label and reviewed label; the dashboard's "all" window reads this small
# table instead of every reviewed upload of a version. Changed in the same transaction as every
# write that changes a reviewed upload: a review (ReviewStore.review), a delete (retention), an
# import of reviewed rows. Uploads without a version, a prediction or a review label are never
# in it (the dashboard's per-version statistics never count them either).
review_totals = sa.Table(
    "review_totals", metadata,
    sa.Column("model_sha256", sa.String(64), primary_key=True),
    sa.Column("confidence_bin", sa.SmallInteger(), primary_key=True, autoincrement=False),
    sa.Column("predicted_label", sa.String(64), primary_key=True),
    sa.Column("review_label", sa.String(64), primary_key=True),
    sa.Column("reviewed", sa.BigInteger(), nullable=False),
    sa.Column("confidence_sum", sa.Float(), nullable=False),
)
# The bins' upper edges; quality_stats bins by the same ones (one definition, here, because the
# migration's backfill needs it too).
CONFIDENCE_EDGES = tuple(round(0.1 * i, 1) for i in range(1, 10))


def confidence_bin_sql(column: Any) -> Any:
    """The bin index 0-9 of a confidence, in SQL (CASE: portable, and exact at the edges; NULL is the last)."""
    return sa.case(*((column < edge, i) for i, edge in enumerate(CONFIDENCE_EDGES)), else_=len(CONFIDENCE_EDGES))


def confidence_bin_of(value: float | None) -> int:
    """The same bin in Python, for the same value (a NULL confidence falls in the last bin, as in SQL)."""
    if value is not None:
        for i, edge in enumerate(CONFIDENCE_EDGES):
            if value < edge:
                return i
    return len(CONFIDENCE_EDGES)


# What a row needs for its place in review_totals, and (besides) in traffic_days.
TOTALLED_COLUMNS = (uploads.c.id, uploads.c.model_sha256, uploads.c.confidence, uploads.c.predicted_label,
                    uploads.c.review_label, uploads.c.review_state)
DAY_COUNTED_COLUMNS = tuple(column for column in counted_columns(uploads)
                            if column.name not in {c.name for c in TOTALLED_COLUMNS})


def _totals_key(row: Any) -> tuple[str, int, str, str] | None:
    """Where an upload counts in review_totals, or None when it counts nowhere."""
    get = row.get if isinstance(row, dict) else row._mapping.get
    if not get("review_state") or get("model_sha256") is None or get("predicted_label") is None \
            or get("review_label") is None:
        return None
    return get("model_sha256"), confidence_bin_of(get("confidence")), get("predicted_label"), get("review_label")


def lock_for_review_totals(conn: sa.Connection, ids: list[str],
                           columns: tuple[Any, ...] = TOTALLED_COLUMNS) -> list[Any]:
    """The totalled columns of `ids`, read so that no other writer can change them before this
    transaction ends: on PostgreSQL the rows are locked (FOR UPDATE, in id order: no deadlock);
    on SQLite the transaction takes the database's write lock first (a write that matches no
    row), so the rows read are the latest and stay so until the commit."""
    if not ids:
        return []
    statement = sa.select(*columns).where(uploads.c.id.in_(ids)).order_by(uploads.c.id)
    if conn.dialect.name == "sqlite":
        conn.execute(sa.text("DELETE FROM review_totals WHERE 0"))
    else:
        statement = statement.with_for_update()
    return list(conn.execute(statement))


def count_uploads(conn: sa.Connection, changes: list[tuple[Any, int]]) -> None:
    """Uploads added (+1) or taken away (-1): both running counts that follow the uploads table
    (review_totals, traffic_days) change with them, in the caller's transaction. Rows are
    mappings, or rows read with TOTALLED_COLUMNS + DAY_COUNTED_COLUMNS."""
    change_review_totals(conn, changes)
    change_traffic(conn, [(row if isinstance(row, dict) else row._mapping, sign) for row, sign in changes])


def change_review_totals(conn: sa.Connection, changes: list[tuple[Any, int]]) -> None:
    """Add (+1) or take away (-1) each upload (a row with TOTALLED_COLUMNS' names) to review_totals.

    An upload taken away and added back under the same key (a re-review that did not change its
    label) changes nothing, so its sum is not rounded twice.
    """
    deltas: dict[tuple[str, int, str, str], list[float]] = {}
    for row, sign in changes:
        key = _totals_key(row)
        if key is None:
            continue
        confidence = (row.get("confidence") if isinstance(row, dict) else row.confidence) or 0.0
        entry = deltas.setdefault(key, [0, 0.0, 0])
        entry[0] += sign
        entry[1] += sign * confidence
        entry[2] += 1
    t = review_totals.c
    for (sha, i, predicted, truth), (count, confidence_sum, _) in sorted(deltas.items()):
        if count == 0:
            continue  # taken away and added back: the same uploads, so the same sum
        where = (t.model_sha256 == sha, t.confidence_bin == i, t.predicted_label == predicted, t.review_label == truth)
        if count < 0:
            conn.execute(review_totals.update().where(*where).values(
                reviewed=t.reviewed + count, confidence_sum=t.confidence_sum + confidence_sum))
            conn.execute(review_totals.delete().where(*where, t.reviewed <= 0))
            continue
        insert = (pg_dialect.insert if conn.dialect.name == "postgresql" else sqlite_dialect.insert)(
            review_totals).values(model_sha256=sha, confidence_bin=i, predicted_label=predicted, review_label=truth,
                                  reviewed=count, confidence_sum=confidence_sum)
        conn.execute(insert.on_conflict_do_update(
            index_elements=[t.model_sha256, t.confidence_bin, t.predicted_label, t.review_label],
            set_={"reviewed": t.reviewed + insert.excluded.reviewed,
                  "confidence_sum": t.confidence_sum + insert.excluded.confidence_sum}))


def rebuild_review_totals(conn: sa.Connection) -> None:
    """review_totals from scratch, from every reviewed upload (the migration; a bulk load)."""
    c = uploads.c
    conf = confidence_bin_sql(c.confidence)
    conn.execute(review_totals.delete())
    conn.execute(review_totals.insert().from_select(
        ["model_sha256", "confidence_bin", "predicted_label", "review_label", "reviewed", "confidence_sum"],
        sa.select(c.model_sha256, conf, c.predicted_label, c.review_label, sa.func.count(),
                  sa.func.coalesce(sa.func.sum(c.confidence), 0.0))
        .where(sa.text("uploads.review_state != 0"), c.model_sha256.is_not(None), c.predicted_label.is_not(None),
               c.review_label.is_not(None))
        .group_by(c.model_sha256, conf, c.predicted_label, c.review_label)))


schema_migrations = sa.Table(
    "schema_migrations", metadata,
    sa.Column("version", sa.Integer(), primary_key=True),
    sa.Column("applied", sa.DateTime(), nullable=False),
)

# One row: which store this database is. The image store's owner marker names the same id.
store_identity = sa.Table(
    "store_identity", metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),  # always 1
    sa.Column("store_id", sa.String(32), nullable=False),                   # 128 random bits, hex
    sa.Column("created", sa.DateTime(), nullable=False),
    sa.Column("checked", sa.DateTime()),  # written by the health check while the database is down
)


def _add_store_id(conn: sa.Connection) -> None:
    # A fresh id per database, made when the migration runs (never at import: two databases
    # migrated by one process must not share it).
    if conn.execute(sa.select(store_identity.c.id)).first() is None:
        conn.execute(store_identity.insert().values(id=1, store_id=secrets.token_hex(16), created=_utc_now()))




class AddColumns:
    """ALTER TABLE uploads ADD COLUMN for each column not there yet (SQLite has no IF NOT EXISTS)."""

    def __init__(self, table: sa.Table, columns: tuple[sa.Column, ...]) -> None:
        self.table, self.columns = table, columns

    def apply(self, conn: sa.Connection) -> None:
        present = {column["name"] for column in sa.inspect(conn).get_columns(self.table.name)}
        for column in self.columns:
            if column.name in present:
                continue
            kind = column.type.compile(conn.dialect)
            default = f" NOT NULL DEFAULT {column.server_default.arg}" if column.server_default is not None else ""
            conn.execute(sa.text(f"ALTER TABLE {self.table.name} ADD COLUMN {column.name} {kind}{default}"))


class BackfillPredictions:
    """Copy label and confidence out of the JSON of rows recorded before schema 2."""

    def apply(self, conn: sa.Connection) -> None:
        if conn.dialect.name == "postgresql":
            label, confidence = "prediction->>'label'", "(prediction->>'confidence')::float"
        else:
            label, confidence = "json_extract(prediction, '$.label')", "json_extract(prediction, '$.confidence')"
        conn.execute(sa.text(f"UPDATE uploads SET predicted_label = {label}, confidence = {confidence} "
                             "WHERE predicted_label IS NULL AND prediction IS NOT NULL"))


# Each migration is idempotent, so two servers starting at once cannot trip over each other.
# The first table of uploads is created from `uploads` minus the columns schema 3 adds, so
# an old database and a new one end up the same whichever way they came.
_UPLOADS_V1 = sa.Table("uploads", sa.MetaData(),
                       *(sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
                         for c in uploads.columns if c.name not in {r.name for r in REVIEW_COLUMNS}),
                       sqlite_with_rowid=False)
MIGRATIONS: tuple[tuple[int, tuple[Any, ...]], ...] = (
    (1, (sa.schema.CreateTable(_UPLOADS_V1, if_not_exists=True),
         sa.schema.CreateIndex(received_index, if_not_exists=True))),
    (2, (sa.schema.CreateTable(store_identity, if_not_exists=True), _add_store_id)),
    (3, (AddColumns(uploads, REVIEW_COLUMNS), BackfillPredictions(),
         sa.schema.CreateTable(reviews, if_not_exists=True), sa.schema.CreateTable(feedback, if_not_exists=True),
         sa.schema.CreateTable(instance_secrets, if_not_exists=True),
         *(sa.schema.CreateIndex(index, if_not_exists=True) for index in REVIEW_INDEXES))),
    (4, (sa.schema.CreateTable(model_versions, if_not_exists=True),
         sa.schema.CreateTable(model_promotions, if_not_exists=True))),
    (5, (sa.schema.CreateTable(admin_sessions, if_not_exists=True),
         sa.schema.CreateIndex(admin_sessions_expires, if_not_exists=True))),
    (6, tuple(sa.schema.CreateIndex(index, if_not_exists=True) for index in STATS_INDEXES)),  # the dashboard
    (7, (sa.schema.CreateTable(review_totals, if_not_exists=True), rebuild_review_totals)),
    # the traffic's running counts per version and day (keras_serve/storage/traffic_days.py)
    (8, (sa.schema.CreateTable(traffic_days, if_not_exists=True), lambda conn: rebuild_traffic(conn, uploads))),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
UNAVAILABLE_HINT = "The upload database is unavailable; try again shortly. If it keeps happening, " \
                   "tell the server's operator (the details are in the server's log)."


def sqlite_url(upload_dir: str | Path) -> str:
    return f"sqlite:///{Path(upload_dir).resolve() / 'uploads.db'}"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class RecordStore:
    def __init__(self, url: str, fsync: bool = False, timeouts: StoreTimeouts = StoreTimeouts()) -> None:
        self.url = sa.engine.make_url(url)
        self.is_sqlite = self.url.get_backend_name() == "sqlite"
        self.description = self.url.render_as_string(hide_password=True)
        self.timeouts = timeouts
        if self.is_sqlite:
            if not self.url.database or self.url.database == ":memory:":
                raise ValueError("SQLite needs a file path: the records must outlive the process")
            self.path = Path(self.url.database)
            self.engine = sa.create_engine(self.url, pool_size=8, max_overflow=56, pool_timeout=timeouts.timeout_s)
            self._install_sqlite_hooks(synchronous="FULL" if fsync else "NORMAL")
        elif self.url.get_backend_name() == "postgresql" and self.url.get_driver_name() == "psycopg":
            self.engine = sa.create_engine(
                self.url, pool_pre_ping=True, pool_size=8, max_overflow=24, pool_timeout=timeouts.timeout_s,
                connect_args=postgres_connect_args(timeouts))
            self._install_postgres_deadline()
        else:
            self.engine = sa.create_engine(self.url, pool_pre_ping=True, pool_size=8, max_overflow=24,
                                           pool_timeout=timeouts.timeout_s)
        self._schema_ready = False
        self._write_lock = threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        self._queue_lock = threading.Lock()
        self._queue: list[_QueuedRow] = []
        try:
            self.migrate()
        except StorageError as exc:
            # Start anyway: /readyz says the store is down, uploads get 503, and the first
            # request after the database is back creates the schema.
            log.warning("upload database not ready at start-up: %s", exc.message)

    # -- schema --------------------------------------------------------------------------

    def migrate(self) -> None:
        with self._errors("prepare"), self.engine.begin() as conn:
            self._migrate(conn)
        self._schema_ready = True

    @staticmethod
    def _migrate(conn: sa.Connection) -> None:
        # One migrator at a time: worker processes starting together on a new store would each
        # find no version applied, and all but one fail on writing it.
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(1270412)"))
        elif conn.dialect.name == "sqlite" and not conn.connection.dbapi_connection.in_transaction:
            # The driver begins a transaction only at the first write; take the write lock
            # before reading what is applied (others wait for it: busy_timeout).
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        conn.execute(sa.schema.CreateTable(schema_migrations, if_not_exists=True))
        applied = set(conn.execute(sa.select(schema_migrations.c.version)).scalars())
        for version, statements in MIGRATIONS:
            if version in applied:
                continue
            for statement in statements:
                if isinstance(statement, sa.sql.expression.Executable):
                    conn.execute(statement)
                elif hasattr(statement, "apply"):
                    statement.apply(conn)
                else:
                    statement(conn)  # a function that checks before it writes
            conn.execute(schema_migrations.insert().values(version=version, applied=_utc_now()))

    def _install_postgres_deadline(self) -> None:
        connection_class = deadline_connection_class()
        answer_timeout_s = self.timeouts.timeout_s

        @sa.event.listens_for(self.engine, "do_connect")
        def connect(dialect, conn_rec, cargs, cparams):
            connection = connection_class.connect(*cargs, **cparams)
            connection.answer_timeout_s = answer_timeout_s
            return connection

    def _install_sqlite_hooks(self, synchronous: str) -> None:
        @sa.event.listens_for(self.engine, "connect")
        def on_connect(dbapi_conn: sqlite3.Connection, record) -> None:
            cursor = dbapi_conn.cursor()
            # WAL: readers (and `sqlite3` in a shell) never block the writer. NORMAL in WAL mode
            # loses nothing when the process dies, only on power loss; FULL with --fsync-uploads.
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            # several processes may share the file: wait for their write lock, but within the store timeout
            cursor.execute(f"PRAGMA busy_timeout={int(self.timeouts.timeout_s * 1000)}")
            cursor.close()
            record.info["inode"] = _inode(self.path)

        @sa.event.listens_for(self.engine, "checkout")
        def on_checkout(dbapi_conn, record, proxy) -> None:
            # A connection to a file that was deleted (or replaced) would go on writing into the
            # unlinked inode: answered 200, then gone. Drop it; the pool opens the new file.
            if record.info.get("inode") != _inode(self.path):
                raise sa_exc.DisconnectionError("uploads.db was replaced or removed")

        @sa.event.listens_for(self.engine, "do_connect")
        def before_connect(dialect, conn_rec, cargs, cparams) -> None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)  # deleted while serving: make it again
            except OSError:
                pass  # then sqlite3 cannot open the file either, and says so (a StorageError)

    # -- rows ----------------------------------------------------------------------------

    def insert(self, row: dict[str, Any]) -> None:
        if not self.is_sqlite:
            with self._errors("record the upload in"), self._begin() as conn:
                conn.execute(uploads.insert(), row)
                count_uploads(conn, [(row, 1)])
            return
        # Group commit: SQLite takes one writer at a time, so the thread that gets the write
        # lock commits every row queued meanwhile in one transaction, and the others find
        # theirs done. At 32 clients this pays the lock hand-over, the transaction and the WAL
        # append once per group instead of once per upload.
        waiter = _QueuedRow(row)
        with self._queue_lock:
            self._queue.append(waiter)
        with self._write_lock:
            if not waiter.done:
                with self._queue_lock:
                    group, self._queue = self._queue, []
                # Every member of the group is settled however the insert ends: one left
                # unsettled would later find itself "done" without its row ever written.
                error: StorageError | None = StorageError("The upload's record could not be written.")
                try:
                    with self._errors("record the upload in"), self.engine.connect() as conn:
                        self._ensure_schema(conn)
                        with conn.begin():
                            conn.execute(uploads.insert(), [queued.row for queued in group])
                            count_uploads(conn, [(queued.row, 1) for queued in group])
                    error = None
                except StorageError as exc:
                    error = exc
                finally:
                    for queued in group:
                        queued.error, queued.done = error, True
        if waiter.error is not None:
            raise StorageError(waiter.error.message, waiter.error.hint)  # one instance per thread

    def insert_if_absent(self, row: dict[str, Any]) -> bool:
        """For imports: False (and nothing written) when the id is already there."""
        try:
            with self._begin() as conn:
                conn.execute(uploads.insert(), row)
                count_uploads(conn, [(row, 1)])  # a copied store's reviewed rows too
            return True
        except sa_exc.IntegrityError:
            return False
        except sa_exc.SQLAlchemyError as exc:
            raise self._error("record the upload in", exc) from None

    def get(self, upload_id: str) -> dict[str, Any] | None:
        with self._errors("read", read=True), self._connect() as conn:
            row = conn.execute(uploads.select().where(uploads.c.id == upload_id)).mappings().first()
        return dict(row) if row else None

    def keys_of(self, upload_ids: Iterable[str]) -> dict[str, str]:
        """id -> image key for those of `upload_ids` that have a row."""
        ids = list(upload_ids)
        if not ids:
            return {}
        with self._errors("read", read=True), self._connect() as conn:
            rows = conn.execute(sa.select(uploads.c.id, uploads.c.image_key).where(uploads.c.id.in_(ids)))
            return {row.id: row.image_key for row in rows}

    def older_than(self, cutoff: datetime, limit: int = 500) -> list[tuple[str, str]]:
        with self._errors("read", read=True), self._connect() as conn:
            rows = conn.execute(sa.select(uploads.c.id, uploads.c.image_key)
                                .where(uploads.c.received < cutoff).order_by(uploads.c.received).limit(limit))
            return [(row.id, row.image_key) for row in rows]

    def delete(self, upload_ids: Iterable[str]) -> None:
        ids = list(upload_ids)
        if ids:
            with self._errors("delete from"), self._begin() as conn:
                # the rows' columns that both running counts need, read under lock
                locked = lock_for_review_totals(conn, ids, TOTALLED_COLUMNS + DAY_COUNTED_COLUMNS)
                count_uploads(conn, [(row, -1) for row in locked])
                conn.execute(uploads.delete().where(uploads.c.id.in_(ids)))
                conn.execute(reviews.delete().where(reviews.c.upload_id.in_(ids)))
                conn.execute(feedback.delete().where(feedback.c.upload_id.in_(ids)))

    def all(self, batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Every row, oldest first, read in batches (an export must not hold the database)."""
        after: tuple[datetime, str] | None = None
        while True:
            query = sa.select(uploads).order_by(uploads.c.received, uploads.c.id).limit(batch)
            if after:
                query = query.where(sa.tuple_(uploads.c.received, uploads.c.id) > sa.tuple_(*after))
            with self._errors("read", read=True), self._connect() as conn:
                rows = [dict(row) for row in conn.execute(query).mappings()]
            yield from rows
            if len(rows) < batch:
                return
            after = (rows[-1]["received"], rows[-1]["id"])

    def has_uploads(self) -> bool:
        with self._errors("read", read=True), self._connect() as conn:
            return conn.execute(sa.select(uploads.c.id).limit(1)).first() is not None

    def store_id(self) -> str:
        """This database's store id (made with the schema)."""
        with self._errors("read", read=True), self._connect() as conn:
            store_id = conn.execute(sa.select(store_identity.c.store_id).where(store_identity.c.id == 1)).scalar()
        if store_id is None:  # the row was deleted by hand: the schema check makes it again
            with self._errors("prepare"), self._begin() as conn:
                _add_store_id(conn)
            return self.store_id()
        return store_id

    def check(self, write: bool = False) -> None:
        """The database answers; with `write`, it takes a write (a full disk, a read-only file or
        a read-only replica fail here as the uploads do)."""
        if not write:
            with self._errors("reach", read=True), self._connect() as conn:
                conn.execute(sa.text("SELECT 1"))
            return
        with self._errors("write to"), self._begin() as conn:
            conn.execute(store_identity.update().where(store_identity.c.id == 1).values(checked=_utc_now()))

    def close(self) -> None:
        self.engine.dispose()

    # -- plumbing ------------------------------------------------------------------------

    @contextmanager
    def _connect(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            self._ensure_schema(conn)
            yield conn

    @contextmanager
    def _begin(self) -> Iterator[sa.Connection]:
        # SQLite has one writer at a time. Threads that race for its lock back off in sleeps of
        # up to 100 ms (its busy handler); queueing them on a Python lock instead costs nothing.
        # Other processes sharing the file still wait through busy_timeout.
        with self._write_lock, self.engine.connect() as conn:
            self._ensure_schema(conn)
            with conn.begin():
                yield conn

    def _ensure_schema(self, conn: sa.Connection) -> None:
        if self.is_sqlite:
            # A SQLite file made anew (the old one was deleted while serving) has no tables yet.
            # Checked once per pooled connection; a new file always comes with a new connection.
            if not conn.info.get("schema_ready"):
                with conn.begin():
                    self._migrate(conn)
                conn.info["schema_ready"] = True
        elif not self._schema_ready:  # the database was down when the server started
            with conn.begin():
                self._migrate(conn)
            self._schema_ready = True

    @contextmanager
    def _errors(self, what: str, read: bool = False) -> Iterator[None]:
        try:
            yield
        except sa_exc.SQLAlchemyError as exc:
            raise self._error(what, exc, read) from None

    def _error(self, what: str, exc: Exception, read: bool = False) -> StorageError:
        # The details (host names, SQL) go to the log, not to the client.
        log.warning("upload database %s: could not %s it: %s", self.description, what, exc)
        text = str(getattr(exc, "orig", exc)).lower()
        if "disk is full" in text or "no space" in text:  # what SQLite itself said, not a guess
            message = "The server's disk is full, so the upload could not be recorded."
        else:
            message = f"Could not {what} the upload database."
        return StorageError(message, UNAVAILABLE_HINT if read else None)


def postgres_connect_args(timeouts: StoreTimeouts) -> dict[str, Any]:
    """libpq settings that bound every wait on the server (docs/storage-faults.md)."""
    statement_ms = int(timeouts.timeout_s * 1000)
    return {
        "connect_timeout": max(2, math.ceil(timeouts.connect_s)),  # libpq's unit is whole seconds, at least 2
        # The server's own limits: a statement (or a lock it waits for) that runs too long.
        "options": f"-c statement_timeout={statement_ms} -c lock_timeout={statement_ms}",
        # A peer that vanished (host down, connection dropped by a firewall) is found by the
        # kernel; a paused server is not: that is the client-side limit in DeadlineConnection.
        "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5, "keepalives_count": 3,
        "tcp_user_timeout": int(timeouts.timeout_s * 1000 + timeouts.connect_s * 1000),
    }


_deadline_connection: type | None = None


def deadline_connection_class() -> type:
    """psycopg's Connection, but no wait for the server's answer lasts longer than
    `answer_timeout_s`: a paused server (SIGSTOP) or a network black hole never runs its own
    statement_timeout, and its kernel still acknowledges keepalives, so only the client can
    end that wait. The connection is closed then (it is mid-protocol), which SQLAlchemy
    takes for a disconnect: dropped from the pool, never rolled back on it."""
    global _deadline_connection
    if _deadline_connection is None:
        import psycopg
        from psycopg import errors

        wait_timeout = getattr(errors, "_WaitTimeout", errors.OperationalError)

        class DeadlineConnection(psycopg.Connection):
            answer_timeout_s: float | None = None

            def wait(self, gen, interval=None, timeout=None):
                limit = self.answer_timeout_s if timeout is None else timeout
                try:
                    if interval is None:
                        return super().wait(gen, timeout=limit)
                    return super().wait(gen, interval, limit)
                except wait_timeout:
                    self.close()
                    raise psycopg.OperationalError(f"the database did not answer within {limit:g} s") from None

        _deadline_connection = DeadlineConnection
    return _deadline_connection


class _QueuedRow:
    __slots__ = ("row", "done", "error")

    def __init__(self, row: dict[str, Any]) -> None:
        self.row = row
        self.done = False
        self.error: StorageError | None = None


def _inode(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
