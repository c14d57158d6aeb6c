"""Classify every image under some folders: in parallel, one output row per file, resumable.

The output (CSV or JSON lines) has a row per file, keyed by its path as found (`DIR/sub/x.jpg`).
Rows are written as answers arrive, so an interrupted run keeps what it did. Run again with the
same output file and the files that already have an answer are skipped; files whose row is an
error are tried again, their old row dropped (the file is rewritten once, at the start), so the
output ends with one row per file.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator

from keras_serve.client.http import Client, ClientError

# What the server decodes (docs/api.md); other files in the folders are left alone.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic",
                            ".heif", ".avif"})
FIELDS = ("path", "status", "label", "confidence", "unsure", "id", "model_version", "http_status", "error_code",
          "error_message")
OK, ERROR = "ok", "error"


def image_files(paths: Iterable[Path]) -> Iterator[Path]:
    """Each path named (sent whatever its name), and the images under each folder named, in a
    stable order; hidden files and folders are skipped."""
    for path in paths:
        if not path.is_dir():
            yield path
            continue
        for root, folders, files in os.walk(path):
            folders[:] = sorted(f for f in folders if not f.startswith("."))
            for name in sorted(files):
                if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    yield Path(root) / name


def answer_row(path: str, answer: dict[str, Any]) -> dict[str, Any]:
    return {"path": path, "status": OK, "label": answer.get("label"), "confidence": answer.get("confidence"),
            "unsure": answer.get("unsure"), "id": answer.get("id"), "model_version": answer.get("model_version"),
            "http_status": 200, "error_code": None, "error_message": None}


def error_row(path: str, status: int, code: str, message: str) -> dict[str, Any]:
    return {"path": path, "status": ERROR, "label": None, "confidence": None, "unsure": None, "id": None,
            "model_version": None, "http_status": status or None, "error_code": code, "error_message": message}


class RowWriter:
    """Rows to CSV or JSON lines, flushed one by one (a crash keeps every row written)."""

    def __init__(self, out: IO[str], fmt: str, header: bool) -> None:
        self.out, self.fmt = out, fmt
        self.csv = csv.DictWriter(out, FIELDS, lineterminator="\n") if fmt == "csv" else None
        if self.csv is not None and header:
            self.csv.writeheader()

    def write(self, row: dict[str, Any]) -> None:
        if self.csv is not None:
            self.csv.writerow({k: "" if v is None else str(v).lower() if isinstance(v, bool) else v
                               for k, v in row.items()})
        else:
            self.out.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.out.flush()


def read_rows(path: Path, fmt: str) -> list[dict[str, Any]]:
    """The rows of an earlier run's output (a torn last line, from a crash, is dropped)."""
    text = path.read_text(encoding="utf-8")
    if fmt == "csv":
        rows = list(csv.DictReader(text.splitlines()))
        return [row for row in rows if row.get("path") and row.get("status") in (OK, ERROR)]
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("path") and row.get("status") in (OK, ERROR):
            rows.append(row)
    return rows


def format_for(out: Path | None, fmt: str | None) -> str:
    if fmt:
        return fmt
    return "jsonl" if out is not None and out.suffix.lower() in (".jsonl", ".ndjson", ".json") else "csv"


@dataclass
class Summary:
    sent: int = 0
    classified: int = 0
    errors: int = 0
    skipped: int = 0


def resume(out: Path, fmt: str) -> set[str]:
    """The paths already answered in `out`; its error rows are dropped (they are tried again)."""
    if not out.exists() or out.stat().st_size == 0:
        return set()
    rows = read_rows(out, fmt)
    if not rows and out.read_text(encoding="utf-8").strip():
        raise ValueError(f"{out} has no {fmt} rows of this command; choose another --out (or --format)")
    kept = {row["path"]: row for row in rows if row["status"] == OK}
    if len(kept) != len(rows):  # rewrite without the error rows, atomically
        partial = out.with_name(out.name + ".partial")
        with open(partial, "w", encoding="utf-8", newline="") as handle:
            writer = RowWriter(handle, fmt, header=True)
            for row in kept.values():
                writer.write(row)
        partial.replace(out)
    return set(kept)


def classify_folder(client: Client, paths: Iterable[Path], out: Path | None, fmt: str | None = None,
                    concurrency: int = 4,
                    progress: Callable[[Summary, int], None] | None = None) -> Summary:
    """Classify every image under `paths` into `out` (standard output when None); see the module."""
    fmt = format_for(out, fmt)
    done = resume(out, fmt) if out is not None else set()
    found = list(image_files(paths))
    todo = [path for path in found if str(path) not in done]
    summary = Summary(skipped=len(found) - len(todo))
    header = out is None or not out.exists() or out.stat().st_size == 0
    handle = open(out, "a", encoding="utf-8", newline="") if out is not None else sys.stdout
    try:
        writer = RowWriter(handle, fmt, header=header)
        pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="classify")
        try:
            futures = {pool.submit(client.classify, path): path for path in todo}
            for future in as_completed(futures):
                name = str(futures[future])
                summary.sent += 1
                try:
                    row = answer_row(name, future.result())
                    summary.classified += 1
                except ClientError as exc:
                    row = error_row(name, exc.status, exc.code, exc.message)
                    summary.errors += 1
                except OSError as exc:  # unreadable file: its own error row, the others go on
                    row = error_row(name, 0, "unreadable_file", exc.strerror or str(exc))
                    summary.errors += 1
                writer.write(row)
                if progress is not None:
                    progress(summary, len(todo))
        finally:  # interrupted (Ctrl-C): what is not sent yet is not sent; the rest stays written
            pool.shutdown(wait=True, cancel_futures=True)
    finally:
        if out is not None:
            handle.close()
    return summary
