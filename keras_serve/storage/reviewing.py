"""What the review loop reads and writes in the record store: the listing, reviews, feedback.

    listing   newest first (or oldest, least sure, latest feedback), filters, keyset pages
    reviews   one row per decision (who, when, label); the latest is cached on the upload
    feedback  the public "Was this right?" answers, unverified, limited per client

The listing never uses OFFSET: a page starts after the sort key of the last row of the page
before, carried in an opaque cursor that the web layer signs (`keras_serve.web.review`), so a
page costs the same at row 20 and at row 999,980. Each filter and order has an index whose
prefix is the filter and whose rest is the order (records.REVIEW_INDEXES).
"""
from __future__ import annotations

import dataclasses
import secrets
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator, Mapping, Sequence

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from keras_serve.errors import FeedbackLimitError, UploadNotFound
from keras_serve.storage.records import (CONFIRMED, CORRECTED, NOT_REVIEWED, RecordStore, change_review_totals,
                                         feedback, instance_secrets, lock_for_review_totals, reviews, uploads)

MAX_PAGE = 200
DEFAULT_PAGE = 48


@dataclass(frozen=True)
class Order:
    name: str
    columns: tuple[sa.Column, ...]   # the sort key, ending in the id (unique): a total order
    descending: bool
    kinds: tuple[type, ...]          # what each key value is, to check a cursor's values
    requires: tuple[Any, ...] = ()   # rows without a key value are not in this order


ORDERS: dict[str, Order] = {order.name: order for order in (
    Order("newest", (uploads.c.received, uploads.c.id), True, (datetime, str)),
    Order("oldest", (uploads.c.received, uploads.c.id), False, (datetime, str)),
    Order("least_sure", (uploads.c.confidence, uploads.c.id), False, (float, str),
          (uploads.c.confidence.is_not(None),)),
    Order("feedback", (uploads.c.feedback_at, uploads.c.id), True, (datetime, str),
          (uploads.c.feedback_at.is_not(None),)),
)}


@dataclass(frozen=True)
class ListingQuery:
    """Every filter is optional; `after` is the previous page's last sort key (from a cursor)."""

    order: str = "newest"
    label: str | None = None                 # predicted label
    min_confidence: float | None = None
    max_confidence: float | None = None
    since: datetime | None = None            # received at or after (UTC, naive)
    until: datetime | None = None            # received before
    reviewed: bool | None = None
    corrected: bool | None = None            # True: the latest review disagrees with the model
    model: str | None = None                 # model version: its sha256, or its file name
    feedback: str | None = None              # "any" or "disagrees"
    limit: int = DEFAULT_PAGE
    after: tuple[Any, ...] | None = field(default=None, compare=False)
    pin_by_range: bool = False               # set by ReviewStore.page for PostgreSQL

    def equality_prefix(self) -> tuple[tuple[sa.Column, Any], ...]:
        """(column, value) an equality filter pins, when an index starts with it and goes on in this order.

        PostgreSQL only (`pin_by_range`): SQLite picks those indexes by itself for "=", and with
        the range and the longer key it scanned far more (p95 of seconds at a million rows).
        """
        if not self.pin_by_range:
            return ()
        c = uploads.c
        state = CORRECTED if self.corrected else CONFIRMED if self.corrected is False else (
            NOT_REVIEWED if self.reviewed is False else None)
        if self.order in ("newest", "oldest"):
            if self.model is not None and _is_sha256(self.model):
                return ((c.model_sha256, self.model),)
            if self.label is not None:
                return ((c.predicted_label, self.label),)
            if state is not None:
                return ((c.review_state, state),)
        elif self.order == "least_sure" and state is not None:
            return ((c.review_state, state),)
        return ()

    def conditions(self) -> list[Any]:
        c = uploads.c
        where: list[Any] = list(ORDERS[self.order].requires)
        for column, value in self.equality_prefix():
            # "between v and v", not "= v": PostgreSQL treats a column pinned by "=" as constant,
            # drops it from the ORDER BY, and may then walk the time index past every row of
            # the other values (seconds at a million rows); as a range it keeps the ORDER BY
            # that only the index starting with this column provides.
            where.append(column.between(value, value))
        pinned = {column.name for column, _ in self.equality_prefix()}
        if self.label is not None and "predicted_label" not in pinned:
            where.append(c.predicted_label == self.label)
        # In time order a confidence range is checked on the rows the time index gives (+ 0 keeps
        # the planner off the confidence index, which would sort a large share of the table).
        confidence = c.confidence if self.order == "least_sure" else c.confidence + 0
        if self.min_confidence is not None:
            where.append(confidence >= self.min_confidence)
        if self.max_confidence is not None:
            where.append(confidence <= self.max_confidence)
        if self.since is not None:
            where.append(c.received >= self.since)
        if self.until is not None:
            where.append(c.received < self.until)
        if "review_state" in pinned:
            pass
        elif self.corrected is not None:
            where.append(c.review_state == (CORRECTED if self.corrected else CONFIRMED))
        elif self.reviewed is not None:
            where.append(REVIEWED if self.reviewed else c.review_state == NOT_REVIEWED)
        if self.model is not None and "model_sha256" not in pinned:
            where.append(c.model_sha256 == self.model if _is_sha256(self.model) else c.model == self.model)
        if self.feedback in ("any", "disagrees"):
            where.append(HAS_FEEDBACK)
        if self.feedback == "disagrees":
            where.append(c.feedback_label != sa.func.coalesce(c.predicted_label, ""))
        return where


# Written exactly as the partial indexes' conditions (records.py), with no bound parameter.
REVIEWED = sa.text("uploads.review_state != 0")
HAS_FEEDBACK = sa.text("uploads.feedback_at IS NOT NULL")
# `counts()["total"]` is never older than TOTAL_MAX_AGE_S (docs/review.md): older, the request
# counts again itself. From TOTAL_REFRESH_AFTER_S on, a request starts a recount in the
# background and answers with the last total, so a page in use seldom waits for the count.
TOTAL_MAX_AGE_S = 10.0
TOTAL_REFRESH_AFTER_S = 5.0


def _is_sha256(text: str) -> bool:
    return len(text) == 64 and all(ch in "0123456789abcdef" for ch in text)


LISTED_COLUMNS = (uploads.c.id, uploads.c.received, uploads.c.bytes, uploads.c.format, uploads.c.model,
                  uploads.c.model_sha256, uploads.c.predicted_label, uploads.c.confidence, uploads.c.error,
                  uploads.c.review_label, uploads.c.review_state, uploads.c.reviewed_at,
                  uploads.c.feedback_label, uploads.c.feedback_at)


class ReviewStore:
    """The review loop's queries, on the same engine (and errors) as the upload records."""

    def __init__(self, records: RecordStore, clock=lambda: datetime.now(timezone.utc).replace(tzinfo=None),
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.records = records
        self.clock = clock
        self.monotonic = monotonic  # ages the cached total; tests freeze it
        self._total_cache: tuple[int, float] | None = None  # (total, monotonic() when its count began)
        self._total_lock = threading.Lock()
        self._recount = threading.Lock()
        self.recounting: threading.Thread | None = None  # the latest background recount

    # -- listing -------------------------------------------------------------------------

    def page(self, query: ListingQuery) -> tuple[list[dict[str, Any]], tuple[Any, ...] | None]:
        """(rows of one page, the sort key to continue after, or None on the last page)."""
        order = ORDERS[query.order]
        query = dataclasses.replace(query, pin_by_range=not self.records.is_sqlite)
        limit = max(1, min(int(query.limit), MAX_PAGE))
        statement = sa.select(*LISTED_COLUMNS).where(*query.conditions())
        prefix = query.equality_prefix()
        if query.after is not None:
            # The pinned column leads the key too: then only the index that starts with it can
            # bound the scan, and the planner no longer prefers the plain time index.
            key = sa.tuple_(*(column for column, _ in prefix), *order.columns)
            after = sa.tuple_(*(value for _, value in prefix), *query.after)
            statement = statement.where(key < after if order.descending else key > after)
        # Ordering by the filter's equality column too changes nothing in the result but names
        # the index to use (filter column first, then the order): without it PostgreSQL, at a
        # million rows, sometimes walked the time index and skipped most of it (p95 340 ms).
        sort = (*(column for column, _ in prefix), *order.columns)
        statement = statement.order_by(*(column.desc() if order.descending else column.asc()
                                         for column in sort)).limit(limit + 1)
        with self.records._errors("read", read=True), self.records._connect() as conn:
            rows = [dict(row) for row in conn.execute(statement).mappings()]
        more = len(rows) > limit
        rows = rows[:limit]
        after = tuple(rows[-1][column.name] for column in order.columns) if more else None
        return rows, after

    def counts(self) -> dict[str, int]:
        """How many uploads there are, reviewed, confirmed, corrected, with feedback that disagrees.

        The reviewed ones and the feedback are counted exactly, from indexes that hold only
        them (a few % of the rows). Counting every row takes a whole index scan (0.2 s at a
        million rows on SQLite), so `total` comes from a count at most TOTAL_MAX_AGE_S old:
        uploads of the last seconds may be missing from `total` and `to_review`. A request
        that finds it older counts itself (the first call of a process, a page opened after a
        quiet spell); one that finds it older than TOTAL_REFRESH_AFTER_S recounts in the background.
        """
        c = uploads.c
        with self.records._errors("read", read=True), self.records._connect() as conn:
            by_state = dict(conn.execute(sa.select(c.review_state, sa.func.count())
                                         .where(c.review_state.in_([CONFIRMED, CORRECTED]))
                                         .group_by(c.review_state)).all())
            disagreeing = conn.execute(sa.select(sa.func.count()).where(
                c.feedback_at.is_not(None), c.feedback_label != sa.func.coalesce(c.predicted_label, ""))).scalar()
            now = self.monotonic()
            cached = self._total_cache
            if cached is None or now - cached[1] > TOTAL_MAX_AGE_S:
                cached = (self._count_all(conn), now)
                self._keep_total(cached)
        total, counted = cached
        if now - counted > TOTAL_REFRESH_AFTER_S and self._recount.acquire(blocking=False):
            self.recounting = threading.Thread(target=self._refresh_total, name="count-uploads", daemon=True)
            self.recounting.start()
        reviewed = by_state.get(CONFIRMED, 0) + by_state.get(CORRECTED, 0)
        return {"total": total, "to_review": max(0, total - reviewed), "reviewed": reviewed,
                "confirmed": by_state.get(CONFIRMED, 0), "corrected": by_state.get(CORRECTED, 0),
                "feedback_disagrees": int(disagreeing or 0)}

    def _keep_total(self, counted: tuple[int, float]) -> None:
        """Keep a count unless a newer one is kept already (a slow background count may end last)."""
        with self._total_lock:
            if self._total_cache is None or counted[1] >= self._total_cache[1]:
                self._total_cache = counted

    @staticmethod
    def _count_all(conn: sa.Connection) -> int:
        return conn.execute(sa.select(sa.func.count()).select_from(uploads)).scalar()

    def _refresh_total(self) -> None:
        try:
            started = self.monotonic()  # the count shows the table as of now, so it ages from now
            with self.records._connect() as conn:
                self._keep_total((self._count_all(conn), started))
        except Exception:  # the next counts() tries again (or counts itself once the total is too old)
            pass
        finally:
            self._recount.release()

    def models(self) -> list[dict[str, Any]]:
        """The model versions that answered, for the filter's choices (most recent first)."""
        c = uploads.c
        with self.records._errors("read", read=True), self.records._connect() as conn:
            rows = conn.execute(sa.select(c.model, c.model_sha256).where(c.model_sha256.is_not(None))
                                .group_by(c.model, c.model_sha256).limit(50)).all()
        return [{"file": file, "sha256": sha} for file, sha in rows]

    # -- reviews -------------------------------------------------------------------------

    def review(self, decisions: Sequence[tuple[str, str | None]], reviewer: str,
               confirm_unreviewed_only: bool = False) -> dict[str, Any]:
        """Record decisions [(upload id, label or None to confirm the prediction)].

        Returns {"reviewed": [{id, label, state}], "not_found": [ids], "already_reviewed": [ids]}.
        Each decision is a new row in `reviews`; the upload's cached latest review follows; the
        prediction stays. With `confirm_unreviewed_only` (a bulk confirm: nobody looked at each
        upload), a confirm leaves an upload that has a review as it is and lists it in
        "already_reviewed": a person's decision is only ever replaced by another one.
        """
        ids = [upload_id for upload_id, _ in decisions]
        now = self.clock()
        done: list[dict[str, Any]] = []
        kept: list[str] = []
        with self.records._errors("record the review in"), self.records._begin() as conn:
            # Read under lock: the review totals (records.review_totals) move each upload from
            # where its latest review counted to where this one counts, in this transaction.
            current = {row.id: row._asdict() for row in lock_for_review_totals(conn, ids)}
            predicted = {upload_id: row["predicted_label"] for upload_id, row in current.items()}
            for upload_id, label in decisions:
                if upload_id not in predicted:
                    continue
                unreviewed_only = confirm_unreviewed_only and label is None
                if label is None:  # "confirm": the model was right
                    label = predicted[upload_id]
                    if label is None:
                        continue  # nothing to confirm: the prediction failed
                state = CONFIRMED if label == predicted[upload_id] else CORRECTED
                update = uploads.update().where(uploads.c.id == upload_id)
                if unreviewed_only:
                    # In the UPDATE itself, not read before: a review committed meanwhile by
                    # another request is seen here (a row lock on PostgreSQL, one writer on SQLite).
                    update = update.where(uploads.c.review_state == NOT_REVIEWED)
                changed = conn.execute(update.values(review_label=label, review_state=state, reviewed_at=now))
                if changed.rowcount == 0:
                    kept.append(upload_id)
                    continue
                before = current[upload_id]
                current[upload_id] = {**before, "review_label": label, "review_state": state}
                change_review_totals(conn, [(before, -1), (current[upload_id], 1)])
                conn.execute(reviews.insert().values(upload_id=upload_id, label=label, reviewer=reviewer,
                                                     created=now))
                done.append({"id": upload_id, "label": label, "state": STATE_NAMES[state]})
        not_found = [upload_id for upload_id in ids if upload_id not in predicted]
        return {"reviewed": done, "not_found": not_found, "already_reviewed": kept}

    def history(self, upload_id: str) -> list[dict[str, Any]]:
        """Every review of one upload, oldest first, then its feedback."""
        with self.records._errors("read", read=True), self.records._connect() as conn:
            rows = conn.execute(sa.select(reviews.c.label, reviews.c.reviewer, reviews.c.created)
                                .where(reviews.c.upload_id == upload_id).order_by(reviews.c.created, reviews.c.id))
            return [dict(row) for row in rows.mappings()]

    # -- public feedback -----------------------------------------------------------------

    def add_feedback(self, upload_id: str, label: str, client: str, per_hour: int) -> bool:
        """Store one visitor's answer; returns whether it agrees with the prediction.

        Raises UploadNotFound, or FeedbackLimitError when this client already gave `per_hour`
        answers in the last hour (counted in the database, so across processes and replicas).
        """
        now = self.clock()
        with self.records._errors("record the feedback in"), self.records._begin() as conn:
            predicted = conn.execute(sa.select(uploads.c.predicted_label).where(uploads.c.id == upload_id)).first()
            if predicted is None:
                raise UploadNotFound(f"No upload with id {upload_id}.")
            recent = conn.execute(sa.select(sa.func.count()).where(
                feedback.c.client == client, feedback.c.created > now - timedelta(hours=1))).scalar()
            if recent >= per_hour:
                raise FeedbackLimitError("Thank you, but this address has sent a lot of answers in the last hour.")
            agrees = label == predicted[0]
            conn.execute(feedback.insert().values(upload_id=upload_id, label=label, agrees=agrees, client=client,
                                                  created=now))
            conn.execute(uploads.update().where(uploads.c.id == upload_id).values(
                feedback_label=label, feedback_at=now))
        return agrees

    def instance_secret(self, name: str) -> str:
        """A random value made once per store and shared by every process and replica using it."""
        with self.records._errors("read", read=True), self.records._connect() as conn:
            value = conn.execute(sa.select(instance_secrets.c.value).where(instance_secrets.c.name == name)).scalar()
        if value is not None:
            return value
        try:
            with self.records._begin() as conn:
                conn.execute(instance_secrets.insert().values(name=name, value=secrets.token_hex(32)))
        except sa_exc.IntegrityError:
            pass  # another process made it first; theirs counts
        except sa_exc.SQLAlchemyError as exc:
            raise self.records._error("prepare", exc) from None
        return self.instance_secret(name)

    # -- the dataset export --------------------------------------------------------------

    def labelled(self, since: datetime | None = None, include_feedback: bool = False,
                 batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Uploads with a label a person gave: the latest review, else (if asked) the latest feedback.

        Oldest first, read in keyset batches: {id, sha256, image_key, format, label, source, decided}.
        """
        c = uploads.c
        decided = c.review_state != NOT_REVIEWED
        if include_feedback:
            decided = sa.or_(decided, c.feedback_at.is_not(None))
        after: tuple[datetime, str] | None = None
        while True:
            statement = sa.select(c.id, c.sha256, c.image_key, c.format, c.received, c.review_label, c.reviewed_at,
                                  c.review_state, c.feedback_label, c.feedback_at).where(decided)
            if since is not None:
                statement = statement.where(c.received >= since)
            if after is not None:
                statement = statement.where(sa.tuple_(c.received, c.id) > sa.tuple_(*after))
            statement = statement.order_by(c.received, c.id).limit(batch)
            with self.records._errors("read", read=True), self.records._connect() as conn:
                rows = [dict(row) for row in conn.execute(statement).mappings()]
            for row in rows:
                if row["review_state"] != NOT_REVIEWED:
                    yield {**row, "label": row["review_label"], "source": "review", "decided": row["reviewed_at"]}
                elif include_feedback and row["feedback_label"] is not None:
                    yield {**row, "label": row["feedback_label"], "source": "feedback", "decided": row["feedback_at"]}
            if len(rows) < batch:
                return
            after = (rows[-1]["received"], rows[-1]["id"])


STATE_NAMES = {NOT_REVIEWED: "not_reviewed", CONFIRMED: "confirmed", CORRECTED: "corrected"}


def listed_upload(row: Mapping[str, Any]) -> dict[str, Any]:
    """One row of the listing as the API shows it."""
    def iso(value: datetime | None) -> str | None:
        return value.replace(tzinfo=timezone.utc).isoformat(timespec="milliseconds") if value else None

    return {"id": row["id"], "received": iso(row["received"]), "bytes": row["bytes"], "format": row["format"],
            "model": {"file": row["model"], "sha256": row["model_sha256"]},
            "prediction": {"label": row["predicted_label"], "confidence": row["confidence"]} if row[
                "predicted_label"] is not None else None,
            "error": row["error"],
            "review": {"label": row["review_label"], "state": STATE_NAMES.get(row["review_state"], "not_reviewed"),
                       "at": iso(row["reviewed_at"])},
            "feedback": {"label": row["feedback_label"], "at": iso(row["feedback_at"]),
                         "agrees": row["feedback_label"] == row["predicted_label"]} if row["feedback_label"] else None}
