"""Every upload record as one flat CSV row: what a spreadsheet or a quick script wants.

`export --format csv` keeps the record as stored (the prediction as one JSON cell); this one
gives each fact its own column: the predicted label, its confidence, whether the model was
unsure, the model version (sha256 of the model file) and the latest review.

Cells come from clients (the file name) and from the store; a cell that a spreadsheet would
run as a formula (starting with = + - @, a tab or a carriage return) is written with a leading
apostrophe, the usual guard, so opening the file runs nothing.
"""
from __future__ import annotations

import csv
from datetime import datetime, timezone
from typing import IO, Any, Mapping

from keras_serve.storage.records import CONFIRMED, CORRECTED
from keras_serve.storage.uploads import UploadStore

FLAT_FIELDS = ("id", "received", "client_filename", "format", "bytes", "prediction", "confidence", "unsure",
               "model_version", "model", "error", "review_label", "review_state", "reviewed_at", "feedback_label")
REVIEW_STATE_NAMES = {CONFIRMED: "confirmed", CORRECTED: "corrected"}
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(text: str | None) -> str:
    """Text for a CSV cell that no spreadsheet runs as a formula."""
    if not text:
        return ""
    return "'" + text if text.startswith(FORMULA_STARTS) else text


def _iso(value: Any) -> str:
    if isinstance(value, datetime):
        return value.replace(tzinfo=timezone.utc).isoformat(timespec="milliseconds")
    return "" if value is None else str(value)


def flat_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """One record's row; empty cells where the record has no such fact."""
    prediction = row.get("prediction") if isinstance(row.get("prediction"), Mapping) else {}
    confidence = prediction.get("confidence")
    unsure = prediction.get("unsure")
    return {
        "id": row["id"],
        "received": _iso(row["received"]),
        "client_filename": spreadsheet_safe(row.get("client_filename")),
        "format": row.get("format") or "",
        "bytes": row.get("bytes"),
        "prediction": spreadsheet_safe(prediction.get("label")),
        "confidence": f"{confidence:.6f}" if isinstance(confidence, (int, float)) else "",
        "unsure": "" if not isinstance(unsure, bool) else str(unsure).lower(),
        "model_version": row.get("model_sha256") or "",
        "model": spreadsheet_safe(row.get("model")),
        "error": spreadsheet_safe(row.get("error")),
        "review_label": spreadsheet_safe(row.get("review_label")),
        "review_state": REVIEW_STATE_NAMES.get(row.get("review_state"), ""),
        "reviewed_at": _iso(row.get("reviewed_at")),
        "feedback_label": spreadsheet_safe(row.get("feedback_label")),
    }


def export_flat(store: UploadStore, out: IO[str]) -> int:
    """Every record, oldest first, as flat CSV; returns how many."""
    writer = csv.DictWriter(out, FLAT_FIELDS)
    writer.writeheader()
    count = 0
    for row in store.records.all():
        writer.writerow(flat_row(row))
        count += 1
    return count
