"""UploadStore: every accepted image and its record, on storage people already operate.

    image  -> ImageStore  (files under the upload folder, or an S3 bucket)   images.py
    record -> RecordStore (SQLite in the upload folder, or PostgreSQL)        records.py

`save` writes the image first and the row second; only then does the client hear back. A
crash between the two leaves an image without a row (an orphan, never served: lookups start
at the row), which `prune` removes once it is older than `orphan_minutes`. A row therefore
never points to an image that was not completely written.

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


def new_upload_id() -> str:
    return secrets.token_hex(16)


def is_upload_id(text: str) -> bool:
    return isinstance(text, str) and len(text) <= 64 and ID_PATTERN.fullmatch(text) is not None


def suffix_for(image_format: str | None) -> str:
    return SUFFIX_BY_FORMAT.get((image_format or "").upper(), "bin")


def image_key(upload_id: str, received: datetime, image_format: str | None) -> str:
    """`YYYY/MM/DD/<id>.<ext>`: the day it arrived (UTC), the extension of its detected format."""
    return f"{received:%Y/%m/%d}/{upload_id}.{suffix_for(image_format)}"


class UploadStore:
    def __init__(self, images: ImageStore, records: RecordStore, retention_days: float | None = 30.0,
                 orphan_minutes: float = 15.0, clock: Callable[[], float] = time.time) -> None:
        self.images = images
        self.records = records
        self.retention_days = retention_days
        # An image younger than this may belong to a save still writing its row, so it is not
        # an orphan yet; a save takes milliseconds, a stalled database at most its timeouts.
        self.orphan_minutes = orphan_minutes
        self.clock = clock
        self.on_deleted: list[Callable[[list[str]], None]] = []  # e.g. the thumbnail cache forgets them
        self._stop = threading.Event()
        self._maintenance: threading.Thread | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "UploadStore":
        """The store the settings describe: DATABASE_URL, IMAGE_STORE, UPLOAD_DIR and friends."""
        upload_dir = Path(config["UPLOAD_DIR"])
        fsync = bool(config.get("UPLOAD_FSYNC"))
        images = open_image_store(config.get("IMAGE_STORE"), upload_dir, fsync=fsync)
        records = RecordStore(config.get("DATABASE_URL") or sqlite_url(upload_dir), fsync=fsync)
        return cls(images, records, retention_days=float(config.get("UPLOAD_RETENTION_DAYS") or 0),
                   orphan_minutes=float(config.get("UPLOAD_ORPHAN_MINUTES") or 15.0))

    # -- the request path --------------------------------------------------------------

    def save(self, data: bytes, image_format: str | None, record: Mapping[str, Any]) -> str:
        """Store the image, then its row; returns the new id. Raises StorageError."""
        received = datetime.fromtimestamp(self.clock(), timezone.utc).replace(tzinfo=None)
        upload_id = new_upload_id()
        key = image_key(upload_id, received, image_format)
        row = {field: record.get(field) for field in CALLER_FIELDS}
        row.update(id=upload_id, received=received, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                   format=image_format, image_key=key, **prediction_columns(row["prediction"]))
        self.images.put(key, data, MIMETYPE_BY_SUFFIX[suffix_for(image_format)])
        try:
            self.records.insert(row)
        except StorageError:
            try:
                self.images.delete(key)  # best effort; otherwise the orphan sweep will
            except StorageError:
                pass
            raise
        return upload_id

    def read_image(self, upload_id: str) -> tuple[bytes, str]:
        """(exactly the accepted bytes, their media type). Raises UploadNotFound or StorageError."""
        row = self._row(upload_id)
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
        """{"ok": bool, ...}: both halves answer. For /readyz."""
        problems = []
        for part in (self.records, self.images):
            try:
                part.health()
            except StorageError as exc:
                problems.append(exc.message)
        return {"ok": not problems, "records": self.records.description, "images": self.images.description,
                **({"problems": problems} if problems else {})}

    # -- retention ---------------------------------------------------------------------

    def prune(self) -> dict[str, int]:
        """Delete uploads past retention (row first, then image) and orphaned images."""
        expired = orphans = 0
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
        orphans = self.sweep_orphans()
        return {"expired": expired, "orphans": orphans}

    def sweep_orphans(self) -> int:
        older_than = self.clock() - self.orphan_minutes * 60
        removed = 0
        batch: list[str] = []

        def flush() -> int:
            by_id = {key.rsplit("/", 1)[-1].split(".", 1)[0]: key for key in batch}
            kept = self.records.keys_of(by_id)
            gone = [key for upload_id, key in by_id.items() if kept.get(upload_id) != key]
            for key in gone:
                self.images.delete(key)
            batch.clear()
            return len(gone)

        for key in list(self.images.list(older_than)):
            if key.rsplit("/", 1)[-1].startswith(TEMP_PREFIX):
                self.images.delete(key)  # a write that never finished (the process died)
                removed += 1
                continue
            batch.append(key)
            if len(batch) >= 500:
                removed += flush()
        if batch:
            removed += flush()
        return removed

    def start_maintenance(self, interval_s: float = 3600.0) -> None:
        """Prune now and then every `interval_s` in a background thread, until `close`."""
        def loop() -> None:
            while True:
                try:
                    result = self.prune()
                    if any(result.values()):
                        log.info("upload retention: %(expired)d expired, %(orphans)d orphaned images removed", result)
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
        if self._maintenance is not None:
            self._maintenance.join(timeout=10)
        self.records.close()

    # -- internals ---------------------------------------------------------------------

    def _row(self, upload_id: str) -> dict[str, Any]:
        if not is_upload_id(upload_id):
            raise UploadNotFound("That is not an upload id.")
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

