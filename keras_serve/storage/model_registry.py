"""Model versions shared by every server process: the published files and the promotion log.

    publish(path, labels, by)   the file (and its card) into the image store as models/<sha256>.<ext>,
                                and a row in `model_versions`; publishing the same bytes again is a no-op
    promote(sha256, by)         a row in `model_promotions`: every server swaps to it within seconds
    rollback(by)                back to what served before the promotion in effect
    served()                    the version the log ends on (None: the model each server started with)
    fetch(version, folder)      the file and its card into a local folder, checked against the sha256

The log is a stack: a promotion pushes a version, a rollback pops one. Each row also records
the version that serves after it, so the servers' poll reads one row, the last.
Both halves of the store are shared by every process and replica (one database, one image
store), which is what lets them all follow one promotion.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

from keras_serve.errors import ModelFileDamaged, ModelVersionNotFound, NothingToRollBack, StorageError
from keras_serve.storage.images import ImageStore
from keras_serve.storage.records import RecordStore, model_promotions, model_versions

# .onnx: an engine file with its card, the int8 variant `python -m keras_serve.model optimize` writes.
MODEL_SUFFIXES = (".h5", ".keras", ".onnx")
# The name a version is shown with: the published file's own, reduced to plain characters.
SHOWN_NAME = re.compile(r"[^A-Za-z0-9._-]+")
SHA256 = re.compile(r"[0-9a-f]{64}")
PROMOTE, ROLLBACK = "promote", "rollback"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def is_sha256(text: str) -> bool:
    return bool(SHA256.fullmatch(text))


@dataclass(frozen=True)
class ModelVersion:
    sha256: str
    file: str          # the name it was published under (shown, never used as a path)
    bytes: int
    labels: list[str]
    published: datetime
    published_by: str

    @property
    def suffix(self) -> str:
        return Path(self.file).suffix.lower()  # as published: models/<sha256><suffix>

    def as_json(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "file": self.file, "bytes": self.bytes, "labels": self.labels,
                "published": self.published.isoformat() + "Z", "published_by": self.published_by}


class ModelRegistry:
    def __init__(self, records: RecordStore, images: ImageStore,
                 clock: Callable[[], datetime] = _utc_now) -> None:
        self.records = records
        self.images = images
        self.clock = clock

    # -- publishing ------------------------------------------------------------------------

    def publish(self, path: Path, labels: list[str], by: str, name: str | None = None) -> ModelVersion:
        """Copy a model file (and the card beside it, `<name>.json`) into the shared store;
        `name`: what to show it as (default: the file's own name)."""
        path = Path(path)
        if path.suffix.lower() not in MODEL_SUFFIXES:
            raise ValueError(f"{path.name}: a model file ends in {' or '.join(MODEL_SUFFIXES)}")
        data = path.read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        existing = self._version(sha256)
        if existing is not None:
            stored = self.images.get_model_file(sha256 + existing.suffix)
            if stored is None or hashlib.sha256(stored).hexdigest() != sha256:  # publishing again repairs it
                self.images.put_model_file(sha256 + existing.suffix, data)
            return existing
        self.images.put_model_file(sha256 + path.suffix.lower(), data)
        card = path.with_suffix(".json")
        if card.is_file():
            self.images.put_model_file(sha256 + ".json", card.read_bytes())
        name = SHOWN_NAME.sub("_", Path(name or path.name).name)[-128:]
        if Path(name).suffix.lower() != path.suffix.lower():
            name = Path(name).stem[:120] + path.suffix.lower()
        row = {"sha256": sha256, "file": name, "bytes": len(data), "labels": list(labels),
               "published": self.clock(), "published_by": by[:64]}
        with self.records._errors("record a model version in"), self.records._begin() as conn:
            # Another publisher of the same bytes may have won meanwhile: its row stands.
            raced = conn.execute(sa.select(model_versions).where(model_versions.c.sha256 == sha256)).mappings().first()
            if raced is None:
                conn.execute(model_versions.insert().values(**row))
        return ModelVersion(**(raced or row))

    def versions(self) -> list[ModelVersion]:
        """Every published version, newest first."""
        with self.records._errors("read model versions from", read=True), self.records._connect() as conn:
            rows = conn.execute(sa.select(model_versions).order_by(model_versions.c.published.desc())).mappings().all()
        return [ModelVersion(**row) for row in rows]

    def version(self, sha256: str) -> ModelVersion:
        """The published version; raises ModelVersionNotFound (also for anything not a sha256)."""
        found = self._version(sha256) if is_sha256(sha256) else None
        if found is None:
            raise ModelVersionNotFound(f"No published model version {sha256[:64]!r}.")
        return found

    def _version(self, sha256: str) -> ModelVersion | None:
        with self.records._errors("read model versions from", read=True), self.records._connect() as conn:
            row = conn.execute(sa.select(model_versions).where(model_versions.c.sha256 == sha256)).mappings().first()
        return ModelVersion(**row) if row else None

    def fetch(self, version: ModelVersion, folder: Path) -> Path:
        """The version's file (and card) under `folder`/<sha256>/<its name>; checked against its sha256."""
        target = Path(folder) / version.sha256 / (Path(version.file).stem + version.suffix)
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == version.sha256:
            return target
        data = self.images.get_model_file(version.sha256 + version.suffix)
        if data is None:
            raise StorageError(f"The published model file {version.file} ({version.sha256[:12]}) is "
                               "missing from the image store.")
        if hashlib.sha256(data).hexdigest() != version.sha256:
            raise ModelFileDamaged(f"The published model file {version.file} ({version.sha256[:12]}) is "
                                   "damaged in the image store: its content no longer matches its sha256.")
        target.parent.mkdir(parents=True, exist_ok=True)
        card = self.images.get_model_file(version.sha256 + ".json")
        if card is not None:
            target.with_suffix(".json").write_bytes(card)
        target.write_bytes(data)
        return target

    # -- candidate checks passed -----------------------------------------------------------

    def record_check(self, sha256: str, settings_digest: str, result: dict[str, Any]) -> None:
        """Note that the version passed the candidate check under settings with this digest
        (keras_serve/model/candidate_check.py), so processes with the same settings need not
        check it again before they load it."""
        self.images.put_model_file(f"{sha256}.checked-{settings_digest}.json", json.dumps(result).encode())

    def was_checked(self, sha256: str, settings_digest: str) -> bool:
        return self.images.get_model_file(f"{sha256}.checked-{settings_digest}.json") is not None

    # -- the promotion log -----------------------------------------------------------------

    def served(self) -> ModelVersion | None:
        """The version every server should answer with now; None: the one it started with."""
        with self.records._errors("read the served model version from", read=True), self.records._connect() as conn:
            sha256 = conn.execute(sa.select(model_promotions.c.sha256)
                                  .order_by(model_promotions.c.id.desc()).limit(1)).scalar()
        return self.version(sha256) if sha256 else None

    def promote(self, sha256: str, by: str) -> ModelVersion:
        version = self.version(sha256)
        self._log(PROMOTE, version.sha256, by)
        return version

    def rollback(self, by: str) -> ModelVersion | None:
        """Serve what served before the promotion in effect; returns it (None: the start-up model).
        Raises NothingToRollBack when no promotion is in effect."""
        with self.records._errors("roll back the model version in"), self.records._begin() as conn:
            self._lock_log(conn)
            stack = self._stack(conn)
            if not stack:
                raise NothingToRollBack("No promotion is in effect: every server already answers with "
                                        "the model it was started with.")
            stack.pop()
            now_serving = stack[-1] if stack else None
            conn.execute(model_promotions.insert().values(sha256=now_serving, action=ROLLBACK, by=by[:64],
                                                          created=self.clock()))
        return self.version(now_serving) if now_serving else None

    def history(self, limit: int = 50) -> list[dict[str, Any]]:
        """The log, newest first: {action, sha256 (what served after it), by, at}."""
        with self.records._errors("read the model log from", read=True), self.records._connect() as conn:
            rows = conn.execute(sa.select(model_promotions).order_by(model_promotions.c.id.desc())
                                .limit(limit)).mappings().all()
        return [{"action": r["action"], "sha256": r["sha256"], "by": r["by"], "at": r["created"].isoformat() + "Z"}
                for r in rows]

    def _log(self, action: str, sha256: str | None, by: str) -> None:
        with self.records._errors("promote a model version in"), self.records._begin() as conn:
            self._lock_log(conn)
            conn.execute(model_promotions.insert().values(sha256=sha256, action=action, by=by[:64],
                                                          created=self.clock()))

    @staticmethod
    def _lock_log(conn: sa.Connection) -> None:
        # Two admins at once: a rollback must pop the stack it read. SQLite writes one at a time anyway.
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(1270413)"))

    @staticmethod
    def _stack(conn: sa.Connection) -> list[str]:
        stack: list[str] = []
        for action, sha256 in conn.execute(sa.select(model_promotions.c.action, model_promotions.c.sha256)
                                           .order_by(model_promotions.c.id)):
            if action == PROMOTE:
                stack.append(sha256)
            elif stack:
                stack.pop()
        return stack
