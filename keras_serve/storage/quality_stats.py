"""Live model quality from the record store: what the admin dashboard and /api/stats show.

    QualityStats(records).stats(model_sha256, window, unsure_below, labels)

For one model version and one window (the last day, the last week, or everything) of the
uploads it answered:

    traffic   uploads per hour (or day), errors, the share answered "unsure", latency p50/p95
    reviewed  accuracy from the reviewers' labels with its 95% interval, confusion matrix,
              per-class recall, the reliability diagram and its expected calibration error
    feedback  how often visitors said the answer was wrong
    drift     the confidence and predicted-label mix against the version's first week, as PSI

Every number comes from a few GROUP BY queries, each a range scan of an index that holds the
columns it reads (records.STATS_INDEXES: model version, then time), so no query reads the
table or the rows one by one; the arithmetic on the counts is in `quality_math`. A window
holds the uploads *received* in it: an upload reviewed today counts in the week it arrived.
A week, "all" and the first week (the drift's baseline) read the traffic of their whole days
from its running counts (traffic_days, kept in the same transaction as the uploads), and only
their partial days from the uploads; "all" reads its reviews from their running totals
(review_totals). Nothing is kept between calls: every answer is as of its own reads.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Sequence

import sqlalchemy as sa

from keras_serve.storage import quality_math as qm
from keras_serve.storage.records import (CONFIDENCE_EDGES, RecordStore, confidence_bin_sql,
                                         model_promotions, model_versions, review_totals, uploads)
from keras_serve.storage.traffic_days import (CONFIDENCE, ERROR, FAILED, FINE_EDGES, LABEL, LATENCY,
                                              LATENCY_BOUNDS_MS, NO_CONFIDENCE, NO_LATENCY, coarse_bin_of_fine,
                                              latency_bucket_sql, read_days, unsure_limit)

WINDOWS: dict[str, timedelta | None] = {"day": timedelta(days=1), "week": timedelta(days=7), "all": None}
BASELINE = timedelta(days=7)  # the version's first week: what drift is measured against
# Confidence bins of the reliability diagram and the drift histogram: ten of 0.1
# (CONFIDENCE_EDGES, defined in records.py, where the review totals are kept in the same bins).
# Latency buckets: LATENCY_BOUNDS_MS (traffic_days.py, where the day counts are kept in them).
MAX_ERROR_KINDS = 10
MAX_BUCKETS = 400  # the traffic table's rows: a year of days; older ones are summed in the totals only


def _utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def _midnight(value: datetime) -> datetime:
    return value.replace(hour=0, minute=0, second=0, microsecond=0)


def iso(value: datetime | None) -> str | None:
    return value.replace(tzinfo=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z") if value else None


# the coarse confidence bin (reliability diagram, drift) of each fine bin of the day counts
COARSE_OF_FINE = {fine: coarse_bin_of_fine(fine, CONFIDENCE_EDGES) for fine in range(NO_CONFIDENCE, len(FINE_EDGES) + 1)}


def bin_range(i: int) -> tuple[float, float]:
    return (0.0 if i == 0 else CONFIDENCE_EDGES[i - 1]), (1.0 if i == len(CONFIDENCE_EDGES) else CONFIDENCE_EDGES[i])


@dataclass(frozen=True)
class Window:
    name: str
    start: datetime | None   # None: from the first upload
    end: datetime

    def conditions(self) -> list[Any]:
        where = [uploads.c.received <= self.end]
        if self.start is not None:
            where.append(uploads.c.received >= self.start)
        return where


# Written exactly as the partial indexes' conditions in records.py (SQLite uses a partial
# index only when the query has the index's own term, with no bound parameter).
REVIEWED = sa.text("uploads.review_state != 0")
HAS_FEEDBACK = sa.text("uploads.feedback_at IS NOT NULL")


class _Counts:
    """One window's traffic, added up from the uploads' GROUP BY rows and the days' running counts."""

    def __init__(self) -> None:
        self.buckets: dict[str, dict[str, Any]] = {}
        self.latency = [0] * (len(LATENCY_BOUNDS_MS) + 1)
        self.by_bin = [0] * (len(CONFIDENCE_EDGES) + 1)
        self.by_label: dict[str, int] = {}
        self.messages: dict[str, int] = {}

    def bucket(self, start: str) -> dict[str, Any]:
        return self.buckets.setdefault(start, {"start": start, "uploads": 0, "per_hour": 0.0, "errors": 0, "unsure": 0})

    def add_group(self, start: str, label: str | None, i: int, late: int, is_unsure: int, n: int) -> None:
        """A row of QualityStats._scan."""
        n = int(n)
        entry = self.bucket(start)
        entry["uploads"] += n
        if label is None:  # a failed answer: no label, no confidence
            entry["errors"] += n
            return
        entry["unsure"] += n if is_unsure else 0
        self.by_bin[int(i)] += n
        self.by_label[label] = self.by_label.get(label, 0) + n
        if int(late) != NO_LATENCY:
            self.latency[int(late)] += n

    def add_day(self, day: str, kind: int, item: str, n: int, unsure_limit: int) -> None:
        """A row of traffic_days (every upload counted there has a FAILED or a LABEL row of its day)."""
        entry = self.bucket(day)
        if kind == FAILED:
            entry["uploads"] += n
            entry["errors"] += n
        elif kind == LABEL:
            entry["uploads"] += n
            self.by_label[item] = self.by_label.get(item, 0) + n
        elif kind == CONFIDENCE:
            fine = int(item)
            self.by_bin[COARSE_OF_FINE[fine]] += n
            if fine != NO_CONFIDENCE and fine <= unsure_limit:
                entry["unsure"] += n
        elif kind == LATENCY:
            self.latency[int(item)] += n
        elif kind == ERROR:
            self.messages[item] = self.messages.get(item, 0) + n


class QualityStats:
    """The dashboard's queries, on the record store's engine and with its errors (503)."""

    def __init__(self, records: RecordStore, clock: Callable[[], datetime] = _utc_now) -> None:
        self.records = records
        self.clock = clock

    # -- one version, one window -------------------------------------------------------------

    def stats(self, model_sha256: str, window: str, unsure_below: float = 0.0,
              labels: Sequence[str] = ()) -> dict[str, Any]:
        """Everything the dashboard shows for `model_sha256` in `window` (a WINDOWS key)."""
        now = self.clock()
        span = WINDOWS[window]
        with self.records._errors("read", read=True), self.records._connect() as conn:
            first_seen, last_seen = self._seen(conn, model_sha256)
            win = Window(window, now - span if span is not None else None, now)
            result: dict[str, Any] = {
                "model_version": model_sha256, "window": window,
                "from": iso(win.start or first_seen), "until": iso(now),
                "first_seen": iso(first_seen), "last_seen": iso(last_seen), "unsure_below": unsure_below,
            }
            traffic = self._traffic(conn, model_sha256, win, unsure_below, first_seen)
            mix = traffic.pop("_mix")
            result["traffic"] = traffic
            result["reviewed"] = self._reviewed(conn, model_sha256, win, labels)
            result["feedback"] = self._feedback(conn, model_sha256, win)
            result["drift"] = self._drift(conn, model_sha256, win, first_seen, now, mix)
        return result

    def summary(self, model_sha256: str, window: str, unsure_below: float = 0.0) -> dict[str, Any]:
        """What the Prometheus series need: `stats` less the version list and the per-bucket rows."""
        now = self.clock()
        span = WINDOWS[window]
        win = Window(window, now - span if span is not None else None, now)
        with self.records._errors("read", read=True), self.records._connect() as conn:
            first_seen, _ = self._seen(conn, model_sha256)
            traffic = self._traffic(conn, model_sha256, win, unsure_below, first_seen)
            reviewed = self._reviewed(conn, model_sha256, win, ())
            feedback = self._feedback(conn, model_sha256, win)
            drift = self._drift(conn, model_sha256, win, first_seen, now, traffic.pop("_mix"))
        return {"answered": traffic["answered"], "unsure_share": traffic["unsure_share"],
                "reviewed": reviewed, "feedback": feedback, "drift": drift}

    # -- versions and their history ------------------------------------------------------------

    def versions(self) -> list[dict[str, Any]]:
        """Every model version that answered an upload, newest first: sha256, file, first/last seen.

        The distinct versions are found by skipping through the index (one probe per version,
        a recursive query), not by reading every row.
        """
        c = uploads.c
        found: list[dict[str, Any]] = []
        with self.records._errors("read", read=True), self.records._connect() as conn:
            current = conn.execute(sa.select(sa.func.min(c.model_sha256))).scalar()
            while current is not None and len(found) < 200:
                first, last = self._seen(conn, current)
                file = conn.execute(sa.select(c.model).where(c.model_sha256 == current, c.received == first)
                                    .limit(1)).scalar()
                found.append({"sha256": current, "file": file, "first_seen": iso(first), "last_seen": iso(last)})
                current = conn.execute(sa.select(sa.func.min(c.model_sha256)).where(c.model_sha256 > current)).scalar()
            published = {row.sha256: row for row in conn.execute(
                sa.select(model_versions.c.sha256, model_versions.c.file, model_versions.c.labels))}
        for version in found:
            row = published.get(version["sha256"])
            if row is not None:
                version["file"] = row.file
                version["labels"] = list(row.labels or [])
        return sorted(found, key=lambda v: v["last_seen"] or "", reverse=True)

    def timeline(self, limit: int = 200) -> list[dict[str, Any]]:
        """Promotions and rollbacks, oldest first: {at, action, sha256 (serving after it), by}."""
        p = model_promotions.c
        with self.records._errors("read", read=True), self.records._connect() as conn:
            rows = conn.execute(sa.select(p.created, p.action, p.sha256, p.by).order_by(p.id.desc())
                                .limit(limit)).all()
        return [{"at": iso(r.created), "action": r.action, "sha256": r.sha256, "by": r.by} for r in reversed(rows)]

    # -- the queries ---------------------------------------------------------------------------

    @staticmethod
    def _seen(conn: sa.Connection, sha: str) -> tuple[datetime | None, datetime | None]:
        # Two queries: each of min() and max() alone is one probe at the end of the index's
        # range; together in one SELECT, SQLite reads the whole range.
        c = uploads.c
        first = conn.execute(sa.select(sa.func.min(c.received)).where(c.model_sha256 == sha)).scalar()
        last = conn.execute(sa.select(sa.func.max(c.received)).where(c.model_sha256 == sha)).scalar()
        return first, last

    def _bucket(self, conn: sa.Connection, hours: int) -> Any:
        received = uploads.c.received
        if conn.dialect.name == "postgresql":
            return sa.func.to_char(sa.func.date_trunc("hour" if hours == 1 else "day", received),
                                   "YYYY-MM-DD HH24:00" if hours == 1 else "YYYY-MM-DD")
        return sa.func.strftime("%Y-%m-%d %H:00" if hours == 1 else "%Y-%m-%d", received)

    def _traffic(self, conn: sa.Connection, sha: str, win: Window, unsure_below: float,
                 first_seen: datetime | None = None) -> dict[str, Any]:
        """Per time bucket, latency bucket, label, confidence bin and unsure or not: for a day,
        one GROUP BY over the window's range of the covering index; for a week or more, whole
        days from their running counts (traffic_days) and only the partial days at the ends
        from the uploads."""
        hours = 1 if win.name == "day" else 24
        counts = self._counts(conn, sha, win, unsure_below, hours, first_seen)
        buckets = [counts.buckets[b] for b in sorted(counts.buckets)]
        for entry in buckets:
            entry["per_hour"] = round(entry["uploads"] / hours, 3)
        total = sum(b["uploads"] for b in buckets)
        errors = sum(b["errors"] for b in buckets)
        answered = total - errors
        unsure_total = sum(b["unsure"] for b in buckets)
        latency = counts.latency
        # most frequent first; equal counts in the order of their text, so every read agrees
        by_message = sorted(counts.messages.items(), key=lambda item: (-item[1], item[0]))[:MAX_ERROR_KINDS]
        return {
            "uploads": total, "answered": answered, "errors": errors, "unsure": unsure_total,
            "unsure_share": unsure_total / answered if answered else None,
            "bucket_hours": hours, "per_bucket": buckets[-MAX_BUCKETS:],
            "latency_ms": {"p50": qm.percentile_from_histogram(LATENCY_BOUNDS_MS, latency, 0.5),
                           "p95": qm.percentile_from_histogram(LATENCY_BOUNDS_MS, latency, 0.95),
                           "bounds": list(LATENCY_BOUNDS_MS), "counts": latency},
            "errors_by_message": [{"message": m, "count": int(n)} for m, n in by_message],
            "_mix": {"confidence": counts.by_bin, "labels": counts.by_label},  # for the drift, not shown
        }

    def _scan(self, conn: sa.Connection, sha: str, where: list[Any], unsure_below: float,
              hours: int) -> list[tuple]:
        c = uploads.c
        bucket = self._bucket(conn, hours).label("bucket")
        lat = latency_bucket_sql(c.milliseconds).label("lat")
        conf = confidence_bin_sql(c.confidence).label("bin")
        unsure = sa.case((c.confidence < unsure_below, 1), else_=0).label("unsure")
        return [tuple(row) for row in conn.execute(
            sa.select(bucket, c.predicted_label, conf, lat, unsure, sa.func.count())
            .where(c.model_sha256 == sha, *where).group_by(bucket, c.predicted_label, conf, lat, unsure))]

    def _scan_into(self, counts: "_Counts", conn: sa.Connection, sha: str, where: list[Any], unsure_below: float,
                   hours: int) -> None:
        for group in self._scan(conn, sha, where, unsure_below, hours):
            counts.add_group(*group)
        c = uploads.c
        for message, n in conn.execute(sa.select(c.error, sa.func.count()).where(
                c.model_sha256 == sha, *where, c.error.is_not(None)).group_by(c.error)):
            counts.messages[message] = counts.messages.get(message, 0) + int(n)

    def _counts(self, conn: sa.Connection, sha: str, win: Window, unsure_below: float, hours: int,
                first_seen: datetime | None) -> "_Counts":
        """The window's counts. With day buckets, the whole days between its two ends come from
        traffic_days; the part of its first day after `win.start` and today up to `win.end`
        from the uploads (the first day whole from the counts when the window starts at the
        version's first upload: none is older). A threshold that is not a fine bin's edge
        cannot be read from the counts: then every day comes from the uploads."""
        counts = _Counts()
        limit = unsure_limit(unsure_below)
        c = uploads.c
        tail = _midnight(win.end)
        if win.start is None:
            head = None
        elif first_seen is not None and win.start == first_seen:
            head = _midnight(win.start)
        else:
            head = win.start if _midnight(win.start) == win.start else _midnight(win.start) + timedelta(days=1)
        if hours != 24 or limit is None or (head is not None and head >= tail):
            self._scan_into(counts, conn, sha, win.conditions(), unsure_below, hours)
            return counts
        if head is not None and head > win.start:
            self._scan_into(counts, conn, sha, [c.received >= win.start, c.received < head], unsure_below, hours)
        for day, kind, item, n in read_days(conn, sha, head, tail):
            counts.add_day(day, kind, item, n, limit)
        self._scan_into(counts, conn, sha, [c.received >= tail, c.received <= win.end], unsure_below, hours)
        return counts

    def _mix(self, conn: sa.Connection, sha: str, win: Window, first_seen: datetime | None) -> dict[str, Any]:
        """Counts per confidence bin and per predicted label (answered uploads only)."""
        counts = self._counts(conn, sha, win, 0.0, 24, first_seen)
        return {"confidence": counts.by_bin, "labels": counts.by_label}

    def _review_groups(self, conn: sa.Connection, sha: str | None, win: Window) -> list[tuple]:
        """(predicted, reviewed label, confidence bin, count, confidence sum) of the window's reviewed uploads.

        "All" is read from the running totals (records.review_totals: a few rows per version,
        however many reviews it has) unless a reviewed upload of the version was received
        after `win.end` (a clock ahead of this one): then, as for a day or a week, from the
        reviewed uploads themselves.
        """
        c = uploads.c
        if win.start is None and sha is not None:
            later = conn.execute(sa.select(c.id).where(c.model_sha256 == sha, c.received > win.end, REVIEWED)
                                 .limit(1)).first()
            if later is None:
                t = review_totals.c
                return [tuple(row) for row in conn.execute(
                    sa.select(t.predicted_label, t.review_label, t.confidence_bin, t.reviewed, t.confidence_sum)
                    .where(t.model_sha256 == sha, t.reviewed > 0))]
        conf = confidence_bin_sql(c.confidence).label("bin")
        return [tuple(row) for row in conn.execute(
            sa.select(c.predicted_label, c.review_label, conf, sa.func.count(), sa.func.sum(c.confidence))
            .where(c.model_sha256 == sha, *win.conditions(), REVIEWED, c.predicted_label.is_not(None))
            .group_by(c.predicted_label, c.review_label, conf))]

    def _reviewed(self, conn: sa.Connection, sha: str, win: Window, labels: Sequence[str]) -> dict[str, Any]:
        pairs: dict[tuple[str, str], int] = {}
        bins = {i: [0, 0.0, 0] for i in range(len(CONFIDENCE_EDGES) + 1)}  # count, confidence sum, correct
        for predicted, truth, i, n, conf_sum in self._review_groups(conn, sha, win):
            pairs[(truth, predicted)] = pairs.get((truth, predicted), 0) + int(n)
            entry = bins[int(i)]
            entry[0] += int(n)
            entry[1] += float(conf_sum or 0.0)
            entry[2] += int(n) if truth == predicted else 0
        matrix = qm.confusion(pairs, list(labels) or sorted({p for _, p in pairs}))
        reliability = [qm.ReliabilityBin(*bin_range(i), count, total, correct)
                       for i, (count, total, correct) in sorted(bins.items())]
        interval = qm.wilson_interval(matrix.correct, matrix.total)
        return {
            "count": matrix.total, "correct": matrix.correct, "accuracy": matrix.accuracy,
            "interval_95": list(interval) if interval else None,
            "confusion": {"labels": matrix.labels, "rows_true_columns_predicted": matrix.matrix},
            "recall": matrix.recall(),
            "reliability": [{"low": b.low, "high": b.high, "count": b.count, "mean_confidence": b.mean_confidence,
                             "accuracy": b.accuracy} for b in reliability if b.count],
            "ece": qm.expected_calibration_error(reliability),
        }

    @staticmethod
    def _feedback(conn: sa.Connection, sha: str, win: Window) -> dict[str, Any]:
        c = uploads.c
        disagrees = sa.case((c.feedback_label != sa.func.coalesce(c.predicted_label, ""), 1), else_=0)
        n, d = conn.execute(sa.select(sa.func.count(), sa.func.sum(disagrees))
                            .where(c.model_sha256 == sha, *win.conditions(), HAS_FEEDBACK)).first()
        n, d = int(n or 0), int(d or 0)
        return {"count": n, "disagree": d, "disagreement_rate": d / n if n else None}

    def _baseline(self, conn: sa.Connection, sha: str, win: Window) -> dict[str, Any]:
        """The first week's mix: its days from their running counts, the end of its last day from the uploads."""
        return self._mix(conn, sha, win, win.start)

    def _drift(self, conn: sa.Connection, sha: str, win: Window, first_seen: datetime | None, now: datetime,
               mix: dict[str, Any] | None = None) -> dict[str, Any]:
        mix = mix or self._mix(conn, sha, win, first_seen)
        if first_seen is None:
            baseline_win = None
            base = {"confidence": [0] * len(mix["confidence"]), "labels": {}}
        else:
            baseline_win = Window("baseline", first_seen, min(first_seen + BASELINE, now))
            base = self._baseline(conn, sha, baseline_win)
        label_names = sorted(set(base["labels"]) | set(mix["labels"]))
        base_labels = [base["labels"].get(name, 0) for name in label_names]
        win_labels = [mix["labels"].get(name, 0) for name in label_names]
        psi_conf = qm.population_stability_index(base["confidence"], mix["confidence"])
        psi_labels = qm.population_stability_index(base_labels, win_labels) if label_names else None
        complete = first_seen is not None and now >= first_seen + BASELINE
        return {
            "baseline": {"from": iso(first_seen), "until": iso(baseline_win.end) if baseline_win else None,
                         "answered": sum(base["confidence"]), "complete": complete},
            "confidence": {"psi": psi_conf, "bins": [
                {"low": bin_range(i)[0], "high": bin_range(i)[1], "baseline": b, "window": w,
                 "baseline_share": bs, "window_share": ws}
                for i, (b, w, bs, ws) in enumerate(zip(base["confidence"], mix["confidence"],
                                                        qm.shares(base["confidence"]), qm.shares(mix["confidence"])))]},
            "labels": {"psi": psi_labels, "labels": [
                {"label": name, "baseline": b, "window": w, "baseline_share": bs, "window_share": ws}
                for name, b, w, bs, ws in zip(label_names, base_labels, win_labels, qm.shares(base_labels),
                                              qm.shares(win_labels))]},
            "sentence": drift_sentence(win.name, psi_conf, psi_labels, complete),
        }


WINDOW_SUBJECT = {"day": "Today's traffic", "week": "This week's traffic", "all": "All traffic so far"}


def drift_sentence(window: str, psi_confidence: float | None, psi_labels: float | None, complete: bool) -> str:
    """One line an operator can read: how unlike the first week this window is, and by how much."""
    if psi_confidence is None:
        return "No answered uploads to compare with the first week yet."
    worst = max(psi_confidence, psi_labels or 0.0)
    text = (f"{WINDOW_SUBJECT.get(window, 'The traffic')} is {qm.psi_words(worst)} the first week: "
            f"PSI {psi_confidence:.2f} on confidence")
    if psi_labels is not None:
        text += f", {psi_labels:.2f} on the predicted-label mix"
    text += "."
    if not complete:
        text += " The first week is not over yet, so part of this window is the baseline itself."
    return text


class StatsCache:
    """The last answer per (version, window) for a few seconds: one page view asks for the same
    numbers once for the page and once per chart; Prometheus scrapes every few seconds."""

    def __init__(self, ttl_s: float = 30.0, clock: Callable[[], float] = time.monotonic, capacity: int = 64) -> None:
        self.ttl_s, self.clock, self.capacity = ttl_s, clock, capacity
        self._entries: dict[tuple[Any, ...], tuple[float, Any]] = {}

    def get(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        now = self.clock()
        hit = self._entries.get(key)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        value = compute()
        if len(self._entries) >= self.capacity:
            self._entries.clear()  # bounded: the keys are versions x windows, a handful in practice
        self._entries[key] = (now, value)
        return value
