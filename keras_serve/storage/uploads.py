"""UploadStore: every accepted image and its record, on storage people already operate.

    image  -> ImageStore  (files under the upload folder, or an S3 bucket)   images.py
    record -> RecordStore (SQLite in the upload folder, or PostgreSQL)        records.py

`save` writes the image first and the row second; only then does the client hear back. A
crash between the two leaves an image without a row (an orphan, never served: lookups start
at the row), which `prune` moves to the image store's quarantine once it is older than
`orphan_minutes`, and deletes from there after `quarantine_days`. A row therefore never points
to an image that was not completely written.

The sweep never touches images another database may own (docs/storage-faults.md): it runs only
when the image store's owner marker names this database's store id (an absent marker is
written first), and never while the database has no uploads at all.

Every call into either half goes through its `ComponentHealth` (faults.py): a half that failed
or hangs answers 503 at once, and /readyz reads their state without waiting on the store.

An id is 128 random bits in hex. It is only ever looked up in the database after a strict
pattern check: no part of it is an offset, a path or anything else a client can steer.
Ids imported from the old day files (`YYYYMMDD-<hex>-<32 hex>`) keep working the same way.
"""
from __future__ import annotations

import hashlib
import logging
import re
import secrets
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

from keras_serve.errors import StorageError, UploadNotFound
from keras_serve.storage.faults import ComponentHealth, HealthMonitor, StoreTimeouts
from keras_serve.storage.images import TEMP_PREFIX, ImageStore, open_image_store
from keras_serve.storage.records import RecordStore, sqlite_url

log = logging.getLogger(__name__)

ID_PATTERN = re.compile(r"(?:\d{8}-[0-9a-f]{1,12}-)?[0-9a-f]{32}")  # fullmatch only
SUFFIX_BY_FORMAT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
                    "WEBP": "webp", "MPO": "jpg", "ICO": "ico", "PPM": "ppm"}
MIMETYPE_BY_SUFFIX = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif", "bmp": "image/bmp",
                      "tiff": "image/tiff", "webp": "image/webp", "ico": "image/x-icon",
                      "ppm": "image/x-portable-pixmap", "bin": "application/octet-stream"}
# What a caller may put in a record; the store's own facts (id, time, size, hash) win.
CALLER_FIELDS = ("client_filename", "model", "model_sha256", "prediction", "error", "milliseconds")
TEXT_FIELDS = {"client_filename": 255, "model": 1000, "error": 1000}  # and their longest stored length
# What some back end cannot store in text: NUL (PostgreSQL refuses it), the other control
# characters, and lone surrogates (not encodable as UTF-8). Each becomes U+FFFD on every back end.
UNSTORABLE_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def new_upload_id() -> str:
    return secrets.token_hex(16)


def is_upload_id(text: str) -> bool:
    return isinstance(text, str) and len(text) <= 64 and ID_PATTERN.fullmatch(text) is not None


def storable_text(value: Any, limit: int) -> str | None:
    """Client text as every back end can store it alike: no NUL, controls or lone surrogates."""
    if value is None:
        return None
    return UNSTORABLE_TEXT.sub("\ufffd", str(value)[:limit])


def suffix_for(image_format: str | None) -> str:
    return SUFFIX_BY_FORMAT.get((image_format or "").upper(), "bin")


def image_key(upload_id: str, received: datetime, image_format: str | None) -> str:
    """`YYYY/MM/DD/<id>.<ext>`: the day it arrived (UTC), the extension of its detected format."""
    return f"{received:%Y/%m/%d}/{upload_id}.{suffix_for(image_format)}"


class UploadStore:
    def __init__(self, images: ImageStore, records: RecordStore, retention_days: float | None = 30.0,
                 orphan_minutes: float = 15.0, clock: Callable[[], float] = time.time,
                 quarantine_days: float = 7.0, timeouts: StoreTimeouts = StoreTimeouts()) -> None:
        self.images = images
        self.records = records
        self.retention_days = retention_days
        # An image younger than this may belong to a save still writing its row, so it is not
        # an orphan yet; a save takes milliseconds, a stalled database at most its timeouts.
        self.orphan_minutes = orphan_minutes
        self.quarantine_days = quarantine_days
        self.clock = clock
        # A call waiting longer than one timeout means that half hangs (a healthy store answers
        # in milliseconds); a failure that took half a timeout was most likely one.
        stall_after_s, slow_after_s = timeouts.timeout_s, timeouts.timeout_s / 2
        self.records_health = ComponentHealth("records", "upload database", stall_after_s, slow_after_s)
        self.images_health = ComponentHealth("images", "image store", stall_after_s, slow_after_s)
        self.on_deleted: list[Callable[[list[str]], None]] = []  # e.g. the thumbnail cache forgets them
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None
        self._monitor: HealthMonitor | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "UploadStore":
        """The store the settings describe: DATABASE_URL, IMAGE_STORE, UPLOAD_DIR and friends."""
        upload_dir = Path(config["UPLOAD_DIR"])
        fsync = bool(config.get("UPLOAD_FSYNC"))
        timeouts = StoreTimeouts.from_config(config)
        images = open_image_store(config.get("IMAGE_STORE"), upload_dir, fsync=fsync, timeouts=timeouts)
        records = RecordStore(config.get("DATABASE_URL") or sqlite_url(upload_dir), fsync=fsync, timeouts=timeouts)
        quarantine_days = config.get("UPLOAD_QUARANTINE_DAYS")
        return cls(images, records, retention_days=float(config.get("UPLOAD_RETENTION_DAYS") or 0),
                   orphan_minutes=float(config.get("UPLOAD_ORPHAN_MINUTES") or 15.0),
                   quarantine_days=7.0 if quarantine_days is None else float(quarantine_days), timeouts=timeouts)

    # -- the request path --------------------------------------------------------------

    def save(self, data: bytes, image_format: str | None, record: Mapping[str, Any]) -> str:
        """Store the image, then its row; returns the new id. Raises StorageError."""
        received = datetime.fromtimestamp(self.clock(), timezone.utc).replace(tzinfo=None)
        upload_id = new_upload_id()
        key = image_key(upload_id, received, image_format)
        row = {field: record.get(field) for field in CALLER_FIELDS}
        row.update({field: storable_text(row[field], limit) for field, limit in TEXT_FIELDS.items()})
        row.update(id=upload_id, received=received, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                   format=image_format, image_key=key, **prediction_columns(row["prediction"]))
        with self.images_health.call():
            self.images.put(key, data, MIMETYPE_BY_SUFFIX[suffix_for(image_format)])
        try:
            with self.records_health.call():
                self.records.insert(row)
        except StorageError:
            if self.images_health.ok():
                try:
                    self.images.delete(key)  # best effort; otherwise the orphan sweep will
                except StorageError:
                    pass
            raise
        return upload_id

    def read_image(self, upload_id: str) -> tuple[bytes, str]:
        """(exactly the accepted bytes, their media type). Raises UploadNotFound or StorageError."""
        row = self._row(upload_id)
        with self.images_health.call():
            data = self.images.get(row["image_key"])
        if data is None:
            log.error("upload %s has a record but its image %s is gone from %s", upload_id,
                      row["image_key"], self.images.description)
            raise UploadNotFound(f"The image of upload {upload_id} is no longer stored.")
        if len(data) != row["bytes"] or hashlib.sha256(data).hexdigest() != row["sha256"]:
            log.error("upload %s: stored image %s does not match its record", upload_id, row["image_key"])
            raise StorageError(f"The stored image of upload {upload_id} is damaged.",
                               "This is a server problem; the operator can find the details in the log.")
        return data, MIMETYPE_BY_SUFFIX[suffix_for(row["format"])]

    def read_record(self, upload_id: str) -> dict[str, Any]:
        return public_record(self._row(upload_id))

    def health(self) -> dict[str, Any]:
        """{"ok": bool, "records": {"ok": bool}, "images": {"ok": bool}}, for /readyz: what the
        calls and background checks last found, without waiting on the store. No names, paths or
        URLs: the details of a failure are in the log."""
        parts = {part.name: {"ok": part.ok()} for part in (self.records_health, self.images_health)}
        return {"ok": all(part["ok"] for part in parts.values()), **parts}

    def check_now(self) -> dict[str, Any]:
        """Check both halves now (what the background checks do), then `health()`."""
        self.records_health.check(self.records.check)
        self.images_health.check(self.images.check)
        return self.health()

    def start_health_checks(self, interval_s: float = 2.0) -> None:
        """Check both halves now, then every `interval_s` in the background, until `close`."""
        self._monitor = HealthMonitor([(self.records_health, self.records.check),
                                       (self.images_health, self.images.check)], interval_s)
        self._monitor.start()

    # -- retention ---------------------------------------------------------------------

    def prune(self) -> dict[str, int]:
        """Delete uploads past retention (row first, then image), move orphaned images to the
        quarantine, and delete what has been in the quarantine for `quarantine_days`."""
        expired = 0
        if self.retention_days:
            cutoff = datetime.fromtimestamp(self.clock() - self.retention_days * 86400, timezone.utc)
            while batch := self.records.older_than(cutoff.replace(tzinfo=None)):
                # Row first: if deleting the image fails, it is an orphan the sweep below
                # finds again, never a row pointing at nothing.
                self.records.delete(upload_id for upload_id, _ in batch)
                for _, key in batch:
                    self.images.delete(key)
                for forget in self.on_deleted:
                    forget([upload_id for upload_id, _ in batch])
                expired += len(batch)
        refusal = self.sweep_refusal()
        if refusal:
            return {"expired": expired, "orphans": 0, "quarantine_deleted": 0}
        return {"expired": expired, "orphans": self._sweep_orphans(), "quarantine_deleted": self._empty_quarantine()}

    def sweep_refusal(self) -> str | None:
        """Why the orphan sweep must not run now (logged), or None when it may.

        It may only when the image store is this database's: its owner marker names this
        database's store id (an absent marker is written now: first use), and the database has
        uploads (an empty one is a wrong URL or a lost database far more often than a store
        whose every upload expired, and then every image would look orphaned).
        """
        store_id = self.records.store_id()
        owner = self.images.read_owner()
        if owner is None:
            self.images.write_owner(store_id)
            log.info("image store %s: owner marker written for upload database %s (store id %s)",
                     self.images.description, self.records.description, store_id)
            owner = self.images.read_owner()
        if owner != store_id:
            reason = (f"the image store {self.images.description} belongs to another upload database "
                      f"(its owner marker says store id {owner}; {self.records.description} has {store_id}); "
                      f"images without a record here may be that database's. If this database really is the "
                      f"owner now, run `python -m keras_serve.storage claim-image-store` (docs/storage-faults.md)")
            log.error("orphan sweep REFUSED: %s", reason)
            return reason
        if not self.records.has_uploads():
            reason = f"the upload database {self.records.description} has no uploads at all"
            # Worth a warning only when there are images it would have judged: an empty store
            # (a first start) is the normal case, not a wrong database URL.
            if next(iter(self.images.list(float("inf"))), None) is not None:
                log.warning("orphan sweep skipped: %s; no image is treated as an orphan", reason)
            return reason
        return None

    def sweep_orphans(self) -> int:
        """Move orphaned images to the quarantine, if `sweep_refusal` allows; how many were moved."""
        return 0 if self.sweep_refusal() else self._sweep_orphans()

    def _sweep_orphans(self) -> int:
        older_than = self.clock() - self.orphan_minutes * 60
        moved = 0
        batch: list[str] = []

        def flush() -> int:
            by_id = {key.rsplit("/", 1)[-1].split(".", 1)[0]: key for key in batch}
            kept = self.records.keys_of(by_id)
            gone = [key for upload_id, key in by_id.items() if kept.get(upload_id) != key]
            for key in gone:
                self.images.quarantine(key)
            batch.clear()
            return len(gone)

        for key in list(self.images.list(older_than)):
            if key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
                self.images.delete(key)  # a write that never finished (the process died): never answered
                continue
            batch.append(key)
            if len(batch) >= 500:
                moved += flush()
        if batch:
            moved += flush()
        if moved:
            log.warning("orphan sweep: moved %d images without a record to the quarantine of %s", moved,
                        self.images.description)
        return moved

    def _empty_quarantine(self) -> int:
        if not self.quarantine_days:
            return 0
        deleted = 0
        for key in list(self.images.quarantined(self.clock() - self.quarantine_days * 86400)):
            self.images.delete_quarantined(key)
            deleted += 1
        return deleted

    def restore_quarantined(self, only_recorded: bool = True) -> int:
        """Move quarantined images back; with `only_recorded`, those whose id has a row here."""
        keys = list(self.images.quarantined(float("inf")))
        if only_recorded:
            by_id = {key.rsplit("/", 1)[-1].split(".", 1)[0]: key for key in keys}
            recorded: dict[str, str] = {}
            ids = list(by_id)
            for start in range(0, len(ids), 500):
                recorded.update(self.records.keys_of(ids[start:start + 500]))
            keys = [key for upload_id, key in by_id.items() if recorded.get(upload_id) == key]
        for key in keys:
            self.images.restore(key)
        return len(keys)

    def start_maintenance(self, interval_s: float = 3600.0) -> None:
        """Prune now and then every `interval_s` in a background thread, until `close`."""
        def loop() -> None:
            while True:
                try:
                    result = self.prune()
                    if any(result.values()):
                        log.info("upload retention: %(expired)d expired, %(orphans)d orphaned images moved to the "
                                 "quarantine, %(quarantine_deleted)d deleted from it", result)
                except StorageError as exc:
                    log.warning("upload retention skipped this time: %s", exc.message)
                except Exception:
                    log.exception("upload retention failed")
                if self._stop.wait(interval_s):
                    return

        self._maintenance = threading.Thread(target=loop, name="upload-retention", daemon=True)
        self._maintenance.start()

    def close(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.stop()
        if self._maintenance is not None:
            self._maintenance.join(timeout=10)
        self.records.close()

    # -- internals ---------------------------------------------------------------------

    def _row(self, upload_id: str) -> dict[str, Any]:
        if not is_upload_id(upload_id):
            raise UploadNotFound("That is not an upload id.")
        with self.records_health.call():
            row = self.records.get(upload_id)
        if row is None:
            raise UploadNotFound(f"No upload with id {upload_id}.")
        return row


def prediction_columns(prediction: Any) -> dict[str, Any]:
    """The label and confidence of a prediction, as their own columns (the listing filters on them)."""
    if not isinstance(prediction, Mapping):
        return {"predicted_label": None, "confidence": None}
    label, confidence = prediction.get("label"), prediction.get("confidence")
    return {"predicted_label": str(label)[:64] if label is not None else None,
            "confidence": float(confidence) if isinstance(confidence, (int, float)) else None}


def public_record(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as the API and the exports show it (same keys as the old day-file records)."""
    received = row["received"]
    if isinstance(received, datetime):
        received = received.replace(tzinfo=timezone.utc).isoformat(timespec="milliseconds")
    return {"id": row["id"], "received": received, "bytes": row["bytes"], "sha256": row["sha256"],
            "format": row["format"], "client_filename": row["client_filename"], "model": row["model"],
            "prediction": row["prediction"], "error": row["error"], "milliseconds": row["milliseconds"],
            "image_key": row["image_key"], "model_sha256": row.get("model_sha256")}

