"""UploadStore: every accepted image on disk under an unguessable name, with its answer beside it.

Layout: <root>/<id>.<ext> holds the bytes exactly as received; <root>/<id>.json the audit
record (time, size, sha256, detected format, prediction). Ids are 128 random bits in hex;
client file names never reach the filesystem. Files are written to a temporary name and
linked into place, so a reader never sees half a file and nothing is ever overwritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Any

from errors import ServiceError

ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
SUFFIX_BY_FORMAT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff",
                    "WEBP": "webp", "MPO": "jpg", "ICO": "ico", "PPM": "ppm"}
MIMETYPE_BY_SUFFIX = {"jpg": "image/jpeg", "png": "image/png", "gif": "image/gif", "bmp": "image/bmp",
                      "tiff": "image/tiff", "webp": "image/webp", "ico": "image/x-icon",
                      "ppm": "image/x-portable-pixmap", "bin": "application/octet-stream"}


class UploadNotFound(ServiceError):
    hint = "Check the id; uploads are kept for a limited time."


class UploadStore:
    PRUNE_INTERVAL_S = 3600.0

    def __init__(self, root: str | Path, retention_days: float | None = 30.0, fsync: bool = False) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.retention_days = retention_days
        # Bytes reach the kernel before the answer either way, so a crashed server loses
        # nothing; fsync (about 4 ms per file here) only adds safety against power loss.
        self.fsync = fsync
        self._last_prune = time.monotonic()
        self._lock = threading.Lock()

    def save(self, data: bytes, image_format: str | None) -> str:
        """Store the bytes under a new id and return the id."""
        suffix = SUFFIX_BY_FORMAT.get((image_format or "").upper(), "bin")
        while True:
            upload_id = secrets.token_hex(16)
            if self._write_new(self.root / f"{upload_id}.{suffix}", data):
                break
        with self._lock:
            prune = time.monotonic() - self._last_prune > self.PRUNE_INTERVAL_S
            if prune:
                self._last_prune = time.monotonic()
        if prune:
            threading.Thread(target=self.prune, daemon=True).start()
        return upload_id

    def record(self, upload_id: str, record: dict[str, Any]) -> None:
        """Write the audit record beside the image (once per upload)."""
        self._check_id(upload_id)
        self._write_new(self.root / f"{upload_id}.json", (json.dumps(record, indent=1) + "\n").encode())

    def find(self, upload_id: str) -> tuple[Path, str]:
        """(path, mimetype) of a stored image; raises UploadNotFound."""
        self._check_id(upload_id)
        for path in self.root.glob(f"{upload_id}.*"):
            suffix = path.suffix[1:]
            if suffix != "json" and not path.name.startswith("."):
                return path, MIMETYPE_BY_SUFFIX.get(suffix, "application/octet-stream")
        raise UploadNotFound(f"No upload with id {upload_id}.")

    def read_record(self, upload_id: str) -> dict[str, Any]:
        self._check_id(upload_id)
        path = self.root / f"{upload_id}.json"
        if not path.exists():
            raise UploadNotFound(f"No record for upload {upload_id}.")
        return json.loads(path.read_text())

    def prune(self) -> int:
        """Delete uploads (and records) older than the retention period; returns files removed."""
        if not self.retention_days:
            return 0
        cutoff = time.time() - self.retention_days * 86400
        removed = 0
        for path in self.root.iterdir():
            try:
                if path.is_file() and path.name != ".gitkeep" and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    @staticmethod
    def _check_id(upload_id: str) -> None:
        if not ID_PATTERN.match(upload_id or ""):
            raise UploadNotFound("Upload ids are 32 lowercase hex characters.")

    def _write_new(self, final: Path, data: bytes) -> bool:
        """Atomically create `final` with `data`; False if the name already exists."""
        tmp = self.root / f".tmp-{secrets.token_hex(8)}"
        with open(tmp, "xb") as handle:
            handle.write(data)
            if self.fsync:
                handle.flush()
                os.fsync(handle.fileno())
        try:
            os.link(tmp, final)  # fails if final exists: never overwrite
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    @staticmethod
    def sha256(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()
