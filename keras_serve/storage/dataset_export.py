"""`export-dataset`: the uploads people labelled, as the folders `train` reads.

    OUT/<label>/<sha256>.<ext>     exactly the bytes that were accepted (checked against the record)
    OUT/manifest.csv               id, sha256, label, source (review or feedback), sorted

One file per distinct image (sha256): the same photo uploaded twice is one example. When its
uploads were labelled differently, a review beats feedback and the later decision beats the
earlier. The result depends only on the store's contents, so running it again gives the same
folder: files already there are kept, files of ours no longer wanted (a label changed) are
removed, and nothing else in OUT is touched. "neither" (out of scope) is left out unless asked
for, since a folder of it would become a class.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from keras_serve.storage.records import NEITHER
from keras_serve.storage.reviewing import ReviewStore
from keras_serve.storage.uploads import UploadStore, is_upload_id, suffix_for

MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ("id", "sha256", "label", "source")
# A label becomes a folder name: only plain names, never a path, "." or "..".
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}")
OUR_FILE = re.compile(r"[0-9a-f]{64}\.[a-z]{2,4}")


@dataclass
class ExportCounts:
    written: int = 0
    kept: int = 0
    removed: int = 0
    duplicates: int = 0
    skipped_neither: int = 0
    skipped_label: int = 0
    missing_image: int = 0

    def summary(self) -> str:
        return (f"{self.written} written, {self.kept} already there, {self.removed} removed, "
                f"{self.duplicates} duplicate uploads merged, {self.skipped_neither} 'neither' left out, "
                f"{self.skipped_label} unusable labels, {self.missing_image} images missing or damaged")


def export_dataset(store: UploadStore, out: Path, since: datetime | None = None, include_unverified: bool = False,
                   include_neither: bool = False, folders: Mapping[str, str] | None = None) -> ExportCounts:
    counts = ExportCounts()
    folders = dict(folders or {})
    chosen: dict[str, dict[str, Any]] = {}  # sha256 -> the decision that counts
    for item in ReviewStore(store.records).labelled(since=since, include_feedback=include_unverified):
        if not is_upload_id(item["id"]) or not re.fullmatch(r"[0-9a-f]{64}", item["sha256"] or ""):
            continue
        previous = chosen.get(item["sha256"])
        if previous is not None:
            counts.duplicates += 1
            if _rank(previous) >= _rank(item):
                continue
        chosen[item["sha256"]] = item

    out.mkdir(parents=True, exist_ok=True)
    wanted: dict[Path, dict[str, Any]] = {}
    for sha, item in chosen.items():
        if item["label"] == NEITHER and not include_neither:
            counts.skipped_neither += 1
            continue
        folder = folders.get(item["label"], item["label"])
        if not isinstance(folder, str) or not FOLDER_NAME.fullmatch(folder) or folder.endswith("."):
            counts.skipped_label += 1
            continue
        wanted[out / folder / f"{sha}.{suffix_for(item['format'])}"] = item

    rows = []
    for path, item in sorted(wanted.items()):
        if _same_file(path, item["sha256"]):
            counts.kept += 1
        else:
            data = store.images.get(item["image_key"])
            if data is None or hashlib.sha256(data).hexdigest() != item["sha256"]:
                counts.missing_image += 1
                continue
            path.parent.mkdir(exist_ok=True)
            _write(path, data)
            counts.written += 1
        rows.append({"id": item["id"], "sha256": item["sha256"], "label": path.parent.name, "source": item["source"]})

    kept_paths = {p for p in wanted if p.exists()}
    for folder in out.iterdir():
        if not folder.is_dir() or folder.is_symlink():
            continue
        for file in folder.iterdir():
            if OUR_FILE.fullmatch(file.name) and file.is_file() and file not in kept_paths:
                file.unlink()
                counts.removed += 1
        try:
            folder.rmdir()  # only if it is now empty: a label nobody uses any more
        except OSError:
            pass

    text = io.StringIO()
    writer = csv.DictWriter(text, MANIFEST_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: (row["label"], row["sha256"])))
    _write(out / MANIFEST, text.getvalue().encode())
    return counts


def _rank(item: Mapping[str, Any]) -> tuple[bool, datetime, str]:
    return item["source"] == "review", item["decided"] or datetime.min, item["id"]


def _same_file(path: Path, sha256: str) -> bool:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest() == sha256
    except OSError:
        return False


def _write(path: Path, data: bytes) -> None:
    temp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    temp.write_bytes(data)
    os.replace(temp, path)
