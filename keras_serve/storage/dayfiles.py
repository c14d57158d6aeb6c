"""Reading the day files of earlier versions (`uploads/YYYY-MM-DD.uploads`), for import only.

A day file is a run of frames, `<record JSON line>\\n<image bytes>\\n`, appended by one or
more server processes; a crash may have torn the last frame of a run, after which the next
start began on a fresh line. Uploaded bytes are attacker-controlled and can contain text that
looks like a frame, so a frame is accepted only when all of this holds:

- its header is a JSON object at the start of a line, at most 64 KiB;
- its id is exactly `<the file's day>-<the header's own byte offset, hex>-<32 hex>`: an id
  is tied to one position in one file, so a frame planted inside another upload's bytes can
  never claim an id that a real upload has (and two frames can never share one);
- `bytes` is a whole number within limits, exactly that many bytes follow, then a newline,
  and their sha256 is the recorded one.

A frame that fails is skipped and reading resumes at the next line, as the old reader did.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, Iterator

DAY_FILE_PATTERN = re.compile(r"^(\d{4})-(\d{2})-(\d{2})\.uploads$")
MAX_RECORD_BYTES = 64 * 1024
MAX_IMAGE_BYTES = 1 << 30
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class LegacyUpload:
    upload_id: str
    received: datetime  # naive UTC, like the records table
    data: bytes
    record: dict[str, Any]


def day_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if DAY_FILE_PATTERN.match(p.name) and p.is_file())


def iter_day_file(path: Path) -> Iterator[LegacyUpload]:
    match = DAY_FILE_PATTERN.match(path.name)
    if not match:
        raise ValueError(f"not a day file name: {path.name}")
    day = "".join(match.groups())
    try:
        midnight = datetime(*map(int, match.groups()))
    except ValueError:
        return  # 2026-13-45.uploads was never written by the server
    with open(path, "rb") as handle:
        while True:
            offset = handle.tell()
            line = handle.readline(MAX_RECORD_BYTES)
            if not line:
                return
            if not line.endswith(b"\n"):
                _skip_rest_of_line(handle)  # too long to be a header (or the file's torn end)
                continue
            upload = _read_frame(handle, line, day, offset, midnight)
            if upload is None:
                handle.seek(offset + len(line))
                continue
            yield upload


def _skip_rest_of_line(handle: IO[bytes]) -> None:
    while (chunk := handle.readline(MAX_RECORD_BYTES)) and not chunk.endswith(b"\n"):
        pass


def _read_frame(handle: IO[bytes], line: bytes, day: str, offset: int, midnight: datetime) -> LegacyUpload | None:
    try:
        record = json.loads(line)
    except ValueError:  # also UnicodeDecodeError
        return None
    if not isinstance(record, dict):
        return None
    upload_id, size, digest = record.get("id"), record.get("bytes"), record.get("sha256")
    if not (isinstance(upload_id, str) and re.fullmatch(rf"{day}-{offset:x}-[0-9a-f]{{32}}", upload_id)):
        return None
    if not (type(size) is int and 0 < size <= MAX_IMAGE_BYTES):
        return None
    if not (isinstance(digest, str) and SHA256_PATTERN.fullmatch(digest)):
        return None
    data = handle.read(size)
    if len(data) != size or handle.read(1) != b"\n" or hashlib.sha256(data).hexdigest() != digest:
        return None
    return LegacyUpload(upload_id, _received(record.get("received"), midnight), data, record)


def _received(text: Any, midnight: datetime) -> datetime:
    """The recorded time if it is a sane one on that day, else the day's midnight."""
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        return midnight
    if when.tzinfo is not None:
        when = when.astimezone(timezone.utc).replace(tzinfo=None)
    return when if midnight <= when < midnight.replace(hour=23, minute=59, second=59, microsecond=999999) else midnight


def text_or_none(value: Any, limit: int = 1000) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def number_or_none(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) and value == value and abs(value) < 1e12 else None
