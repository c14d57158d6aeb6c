"""Running counts of each model version's traffic per UTC day (schema 8): what the dashboard's
week and "all" read instead of every upload of those days.

One row per (model version, day, kind, item) holding how many uploads it counts:

    FAILED      item ''              uploads with no predicted label (the traffic's "errors")
    LABEL       item = the label     answered uploads per predicted label (the label mix)
    CONFIDENCE  item = fine bin      answered uploads per confidence bin of 0.01 (FINE_EDGES; '-1': none)
    LATENCY     item = bucket        answered uploads with a time, per latency bucket (LATENCY_BOUNDS_MS)
    ERROR       item = the message   uploads with an error message (the "errors by message" table)

The counts are marginal (a label, a bin, a bucket), because that is all a window shows; an
upload's "unsure" (confidence under the server's threshold) is the sum of the fine bins under
the threshold, exact for any threshold on a bin edge (two decimals: 0.85); the dashboard counts
others from the uploads themselves. The coarse bins of the reliability diagram and the drift
histogram (records.CONFIDENCE_EDGES, tenths) are unions of fine ones.

The counts change in the same transaction as the rows they count (records.RecordStore: insert,
import, delete), with one upsert (INSERT ... ON CONFLICT DO UPDATE) of the few rows an upload
touches, so concurrent writers on PostgreSQL add up right; a count that falls to zero is deleted.
Uploads without a model version are counted nowhere (the dashboard is per version).
"""
from __future__ import annotations

import bisect
from datetime import date, datetime, timedelta
from typing import Any, Iterable, Mapping

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql as pg_dialect, sqlite as sqlite_dialect

FAILED, LABEL, CONFIDENCE, LATENCY, ERROR = 0, 1, 2, 3, 4

traffic_days = sa.Table(
    "traffic_days", sa.MetaData(),
    sa.Column("model_sha256", sa.String(64), primary_key=True),
    sa.Column("day", sa.Date(), primary_key=True),                              # UTC
    sa.Column("kind", sa.SmallInteger(), primary_key=True, autoincrement=False),
    sa.Column("item", sa.Text(), primary_key=True),
    sa.Column("uploads", sa.BigInteger(), nullable=False),
)

# 0.00, 0.01, ..., 1.00: bin i holds the confidences with i edges at or under them, so bin 0 is
# below 0, bin 101 is 1.0 and above, and "under the edge k" is "in bin k or below".
FINE_EDGES = tuple(round(0.01 * i, 2) for i in range(101))
NO_CONFIDENCE = -1
# Latency buckets (upper bounds, ms): p50 and p95 are read from these counts as Prometheus reads
# its histograms (linear inside the bucket), so no query sorts a window's rows.
LATENCY_BOUNDS_MS = (1, 2, 3, 5, 7.5, 10, 15, 20, 30, 40, 50, 65, 80, 100, 125, 150, 200, 250, 300, 400, 500,
                     750, 1000, 1500, 2000, 3000, 5000, 10000)
NO_LATENCY = -1


def fine_bin_of(confidence: float | None) -> int:
    return NO_CONFIDENCE if confidence is None else bisect.bisect_right(FINE_EDGES, confidence)


def fine_bin_sql(column: Any) -> Any:
    """fine_bin_of in SQL (CASE: the same comparisons with the same doubles, so the same bin)."""
    return sa.case((column.is_(None), NO_CONFIDENCE), *((column < edge, i) for i, edge in enumerate(FINE_EDGES)),
                   else_=len(FINE_EDGES))


def coarse_bin_of_fine(fine: int, coarse_edges: tuple[float, ...]) -> int:
    """The coarse bin (confidence_bin_of) every confidence of a fine bin falls in: the coarse
    edges are fine edges, so a fine bin never straddles one. No confidence: the last, as in SQL."""
    if fine == NO_CONFIDENCE or fine > len(FINE_EDGES) - 1:
        return len(coarse_edges)
    low = FINE_EDGES[fine - 1] if fine > 0 else float("-inf")  # the fine bin's lowest value
    return bisect.bisect_right(coarse_edges, low)


def unsure_limit(unsure_below: float) -> int | None:
    """The highest fine bin whose confidences are all under `unsure_below` (and no other bin has
    any), or None when the threshold is not a bin edge: then the bins cannot tell."""
    try:
        return FINE_EDGES.index(unsure_below)
    except ValueError:
        return None


def latency_bucket_of(milliseconds: float | None) -> int:
    return NO_LATENCY if milliseconds is None else bisect.bisect_right(LATENCY_BOUNDS_MS, milliseconds)


def latency_bucket_sql(column: Any) -> Any:
    """The latency bucket 0-len(bounds) in SQL; NO_LATENCY where no time was stored."""
    return sa.case((column.is_(None), NO_LATENCY), *((column < bound, i) for i, bound in enumerate(LATENCY_BOUNDS_MS)),
                   else_=len(LATENCY_BOUNDS_MS))


Key = tuple[str, date, int, str]


def _day(received: Any) -> date:
    return (received if isinstance(received, datetime) else datetime.fromisoformat(str(received))).date()


def keys_of(row: Mapping[str, Any]) -> list[Key]:
    """The counts one upload (a row of `uploads` as a mapping) adds 1 to."""
    sha = row.get("model_sha256")
    if sha is None:
        return []
    day = _day(row["received"])
    label, error = row.get("predicted_label"), row.get("error")
    if label is None:
        keys = [(sha, day, FAILED, "")]
    else:
        keys = [(sha, day, LABEL, label), (sha, day, CONFIDENCE, str(fine_bin_of(row.get("confidence"))))]
        milliseconds = row.get("milliseconds")
        if milliseconds is not None:
            keys.append((sha, day, LATENCY, str(latency_bucket_of(milliseconds))))
    if error is not None:
        keys.append((sha, day, ERROR, error))
    return keys


COUNT_COLUMNS = ("model_sha256", "day", "kind", "item", "uploads")
ROWS_PER_STATEMENT = 64
_upserts: dict[tuple[str, int], tuple[str, tuple[str, ...] | None]] = {}


def _upsert(dialect: sa.Dialect, rows: int) -> tuple[str, tuple[str, ...] | None]:
    """The SQL of INSERT of `rows` counts ... ON CONFLICT DO UPDATE adding them up, with
    parameters named `<column>_<row>`, and their order where the driver's are positional.
    Compiled once per dialect and size and run as the driver's own SQL: SQLAlchemy compiles a
    multi-row INSERT again on every call (0.2 ms), and on the serving path (one upload, three
    or four counts) this is one statement, one round trip to PostgreSQL."""
    cached = _upserts.get((dialect.name, rows))
    if cached is None:
        insert = (pg_dialect.insert if dialect.name == "postgresql" else sqlite_dialect.insert)(traffic_days)
        insert = insert.values([{name: sa.bindparam(f"{name}_{i}", type_=traffic_days.c[name].type)
                                 for name in COUNT_COLUMNS} for i in range(rows)])
        t = traffic_days.c
        compiled = insert.on_conflict_do_update(
            index_elements=[t.model_sha256, t.day, t.kind, t.item],
            set_={"uploads": t.uploads + insert.excluded.uploads}).compile(dialect=dialect)
        cached = _upserts[(dialect.name, rows)] = (str(compiled), tuple(compiled.positiontup or ())
                                                   if compiled.positional else None)
    return cached


def change_traffic(conn: sa.Connection, changes: Iterable[tuple[Mapping[str, Any], int]]) -> None:
    """Add (+1) or take away (-1) each upload to its day's counts: one upsert statement for the
    lot (its rows in key order, so two transactions lock them in the same order), and on taking
    away one more that deletes the counts left at zero."""
    deltas: dict[Key, int] = {}
    for row, sign in changes:
        for key in keys_of(row):
            deltas[key] = deltas.get(key, 0) + sign
    entries = [(key, n) for key, n in sorted(deltas.items()) if n]
    if not entries:
        return
    as_text = conn.dialect.name == "sqlite"  # SQLAlchemy's Date is 'YYYY-MM-DD' text there
    for first in range(0, len(entries), ROWS_PER_STATEMENT):
        part = entries[first:first + ROWS_PER_STATEMENT]
        values: dict[str, Any] = {}
        for i, ((sha, day, kind, item), n) in enumerate(part):
            values.update(zip((f"{name}_{i}" for name in COUNT_COLUMNS),
                              (sha, day.isoformat() if as_text else day, kind, item, n)))
        sql, order = _upsert(conn.dialect, len(part))
        conn.exec_driver_sql(sql, tuple(values[name] for name in order) if order is not None else values)
    t = traffic_days.c
    for sha, day in sorted({(sha, day) for (sha, day, _, _), n in entries if n < 0}):
        conn.execute(traffic_days.delete().where(t.model_sha256 == sha, t.day == day, t.uploads <= 0))


# What a row needs for its place in traffic_days.
def counted_columns(uploads: sa.Table) -> tuple[sa.Column, ...]:
    c = uploads.c
    return c.model_sha256, c.received, c.predicted_label, c.confidence, c.milliseconds, c.error


def _day_sql(conn: sa.Connection, column: Any) -> Any:
    if conn.dialect.name == "postgresql":
        return sa.cast(column, sa.Date)
    return sa.func.date(column)  # 'YYYY-MM-DD', the text SQLAlchemy's Date is stored as on SQLite


def rebuild_traffic(conn: sa.Connection, uploads: sa.Table, days_per_statement: int = 1) -> None:
    """traffic_days from scratch, from every upload (the migration; a bulk load). Each statement
    reads one day (days without uploads are skipped), so each stays inside the store's
    statement time limit however many days there are: a day of ten thousand uploads takes
    milliseconds."""
    c = uploads.c
    conn.execute(traffic_days.delete())
    first = conn.execute(sa.select(sa.func.min(c.received))).scalar()
    last = conn.execute(sa.select(sa.func.max(c.received))).scalar()
    if first is None or last is None:
        return
    if isinstance(first, str):  # SQLite without the column's type (a raw aggregate)
        first, last = datetime.fromisoformat(first), datetime.fromisoformat(last)
    day = datetime.combine(first.date(), datetime.min.time())
    text = sa.String()
    while day <= last:
        end = day + timedelta(days=days_per_statement)
        where = (c.model_sha256.is_not(None), c.received >= day, c.received < end)
        day_of = _day_sql(conn, c.received)
        answered = c.predicted_label.is_not(None)
        # constants written into the SQL (not parameters): PostgreSQL cannot type a parameter alone in a SELECT
        parts = [
            (FAILED, None, (c.predicted_label.is_(None),)),
            (LABEL, c.predicted_label, (answered,)),
            (CONFIDENCE, sa.cast(fine_bin_sql(c.confidence), text), (answered,)),
            (LATENCY, sa.cast(latency_bucket_sql(c.milliseconds), text), (answered, c.milliseconds.is_not(None))),
            (ERROR, c.error, (c.error.is_not(None),)),
        ]
        for kind, item, condition in parts:
            groups = (c.model_sha256, day_of) if item is None else (c.model_sha256, day_of, item)
            conn.execute(traffic_days.insert().from_select(list(COUNT_COLUMNS), sa.select(
                c.model_sha256, day_of, sa.literal_column(str(kind)),
                sa.literal_column("''") if item is None else item, sa.func.count())
                .where(*where, *condition).group_by(*groups)))
        following = conn.execute(sa.select(sa.func.min(c.received)).where(c.received >= end)).scalar()
        if following is None:
            break
        if isinstance(following, str):
            following = datetime.fromisoformat(following)
        day = max(end, datetime.combine(following.date(), datetime.min.time()))


def read_days(conn: sa.Connection, sha: str, first_day: datetime | None, end_day: datetime) -> list[tuple]:
    """(day 'YYYY-MM-DD', kind, item, uploads) of `sha`'s days in [first_day, end_day) (no first: from the start)."""
    t = traffic_days.c
    where = [t.model_sha256 == sha, t.day < end_day.date()]
    if first_day is not None:
        where.append(t.day >= first_day.date())
    return [(str(day), kind, item, int(n)) for day, kind, item, n in conn.execute(
        sa.select(t.day, t.kind, t.item, t.uploads).where(*where))]
