"""Maintenance of the upload store, with the same settings as the server.

    python -m keras_serve.storage export --format csv > uploads.csv
    python -m keras_serve.storage export --format jsonl --images exported/
    python -m keras_serve.storage import-dayfiles uploads/      # the files of earlier versions
    python -m keras_serve.storage copy-to --to-database-url postgresql+psycopg://... --to-image-store s3://b/p
    python -m keras_serve.storage prune
    python -m keras_serve.storage quarantine [--restore | --restore-all | --empty]
    python -m keras_serve.storage claim-image-store    # this database owns the image store now
    python -m keras_serve.storage export-dataset OUT [--reviewed-only] [--since DATE] [--include-unverified]

The store is chosen like the server's: --upload-dir, --database-url, --image-store, or their
KERAS_SERVE_* environment variables (and AWS_* for S3).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from pathlib import Path, PurePath
from typing import IO, Any, Iterable

from keras_serve import settings
from keras_serve.errors import StorageError
from keras_serve.storage import dayfiles
from keras_serve.storage.images import ImageStore
from keras_serve.storage.uploads import (MIMETYPE_BY_SUFFIX, UploadStore, image_key, is_upload_id, prediction_columns,
                                         public_record,
                                         suffix_for)

FIELDS = ("id", "received", "bytes", "sha256", "format", "client_filename", "model", "prediction", "error",
          "milliseconds", "image_key", "model_sha256")


def export(store: UploadStore, out: IO[str], fmt: str, images: Path | None = None) -> int:
    """Every record, oldest first, as CSV or JSON lines; with `images`, each image as <id>.<ext>."""
    writer = csv.DictWriter(out, FIELDS) if fmt == "csv" else None
    if writer:
        writer.writeheader()
    if images:
        images.mkdir(parents=True, exist_ok=True)
    count = 0
    for row in store.records.all():
        record = public_record(row)
        if writer:
            writer.writerow({**record, "prediction": json.dumps(record["prediction"]) if record["prediction"] else ""})
        else:
            out.write(json.dumps(record) + "\n")
        if images and is_upload_id(record["id"]):  # never let stored text choose a path
            data = store.images.get(row["image_key"])
            if data is not None:
                (images / f"{record['id']}.{suffix_for(record['format'])}").write_bytes(data)
        count += 1
    return count


def import_day_files(store: UploadStore, folder: Path, log: IO[str] = sys.stderr) -> dict[str, int]:
    """Copy every intact upload of the old day files into the store; safe to run again."""
    from keras_serve.pipeline.preprocessing import image_format

    counts = {"imported": 0, "already_present": 0}
    for path in dayfiles.day_files(folder):
        before = counts["imported"]
        for upload in dayfiles.iter_day_file(path):
            if store.records.get(upload.upload_id) is not None:
                counts["already_present"] += 1
                continue
            detected = image_format(upload.data)  # the name of the extension comes from content only
            key = image_key(upload.upload_id, upload.received, detected)
            put_once(store.images, key, upload.data, detected)
            record = upload.record
            prediction = record.get("prediction")
            row = {"id": upload.upload_id, "received": upload.received, "bytes": len(upload.data),
                   "sha256": record["sha256"], "format": detected, "image_key": key,
                   "client_filename": dayfiles.text_or_none(record.get("client_filename"), 255),
                   "model": model_file_name(dayfiles.text_or_none(record.get("model"))),
                   "prediction": prediction if isinstance(prediction, dict) else None,
                   "error": dayfiles.text_or_none(record.get("error")),
                   "milliseconds": dayfiles.number_or_none(record.get("milliseconds")),
                   **prediction_columns(prediction)}
            if store.records.insert_if_absent(row):
                counts["imported"] += 1
            else:
                counts["already_present"] += 1
        print(f"{path.name}: {counts['imported'] - before} imported", file=log)
    return counts


def model_file_name(path: str | None) -> str | None:
    """Old day-file records name the model by its absolute path; records keep only its file name."""
    return PurePath(path).name if path else path


def put_once(images: ImageStore, key: str, data: bytes, image_format: str | None) -> None:
    """Store an image unless these very bytes are already under its key.

    An interrupted import or copy leaves images whose rows were never written; a rerun must
    go past them (the server's own `put` refuses an existing key: there it means a clash).
    """
    if images.get(key) != data:
        images.put(key, data, MIMETYPE_BY_SUFFIX[suffix_for(image_format)])


def copy_store(source: UploadStore, target: UploadStore) -> dict[str, int]:
    """Every upload of `source` into `target` (image, then row), keeping ids; safe to run again."""
    counts = {"copied": 0, "already_present": 0, "missing_image": 0}
    for row in source.records.all():
        if target.records.get(row["id"]) is not None:
            counts["already_present"] += 1
            continue
        data = source.images.get(row["image_key"])
        if data is None:
            counts["missing_image"] += 1
            continue
        put_once(target.images, row["image_key"], data, row["format"])
        if target.records.insert_if_absent(row):
            counts["copied"] += 1
        else:
            counts["already_present"] += 1
    return counts


def _date(text: str):
    from datetime import datetime, timezone

    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {text!r} (e.g. 2026-12-01)") from None
    return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value


STORE_OPTIONS = ("UPLOAD_DIR", "DATABASE_URL", "IMAGE_STORE")


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the store, as the server's (every command that opens it takes them)."""
    parser.add_argument("--upload-dir", dest="UPLOAD_DIR")
    parser.add_argument("--database-url", dest="DATABASE_URL")
    parser.add_argument("--image-store", dest="IMAGE_STORE")


def config_from_args(args: argparse.Namespace, names: Iterable[str] = (*STORE_OPTIONS, "UPLOAD_RETENTION_DAYS")
                     ) -> dict[str, Any]:
    """The server's settings (defaults, then KERAS_SERVE_*), then this command's own options."""
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return settings.resolve(given)


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keras_serve.storage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_store_arguments(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    export_cmd = sub.add_parser("export", help="every record, oldest first, as CSV or JSON lines")
    export_cmd.add_argument("--format", choices=["csv", "jsonl"], default="jsonl")
    export_cmd.add_argument("--out", type=Path, help="file to write (default: standard output)")
    export_cmd.add_argument("--images", type=Path, help="also write each image as <id>.<ext> into this folder")
    import_cmd = sub.add_parser("import-dayfiles", help="import the YYYY-MM-DD.uploads files of earlier versions")
    import_cmd.add_argument("folder", type=Path)
    copy_cmd = sub.add_parser("copy-to", help="copy every upload into another store (one machine -> several)")
    copy_cmd.add_argument("--to-database-url", required=True)
    copy_cmd.add_argument("--to-image-store", help="s3://bucket/prefix (default: files in --to-upload-dir)")
    copy_cmd.add_argument("--to-upload-dir")
    dataset_cmd = sub.add_parser("export-dataset", help="reviewed uploads as one folder per label + manifest.csv "
                                 "(what train reads); deduplicated by sha256; safe to run again")
    dataset_cmd.add_argument("out", type=Path)
    which = dataset_cmd.add_mutually_exclusive_group()
    which.add_argument("--reviewed-only", action="store_true",
                       help="only labels a reviewer gave (the default; say it in scripts that rely on it)")
    which.add_argument("--include-unverified", action="store_true",
                       help="also the public \"Was this right?\" answers, for uploads no reviewer labelled")
    dataset_cmd.add_argument("--since", type=_date, help="only uploads received on or after this date (UTC)")
    dataset_cmd.add_argument("--include-neither", action="store_true",
                             help="also a 'neither' folder of out-of-scope images (it becomes a class)")
    dataset_cmd.add_argument("--folder", action="append", default=[], metavar="LABEL=NAME",
                             help="write LABEL into folder NAME, e.g. CAT=cats to match the base data")
    prune_cmd = sub.add_parser("prune", help="delete uploads past retention and quarantine orphaned images now")
    prune_cmd.add_argument("--retention-days", dest="UPLOAD_RETENTION_DAYS", type=float)
    quarantine_cmd = sub.add_parser("quarantine", help="count the images in the quarantine, or restore or delete them")
    action = quarantine_cmd.add_mutually_exclusive_group()
    action.add_argument("--restore", action="store_true", help="move back those that have a record in this database")
    action.add_argument("--restore-all", action="store_true", help="move every quarantined image back")
    action.add_argument("--empty", action="store_true", help="delete every quarantined image now")
    sub.add_parser("claim-image-store", help="write this database's store id into the image store's owner marker "
                                             "(after checking that no other database owns those images)")
    args = parser.parse_args(list(argv) if argv is not None else None)

    config = config_from_args(args)
    try:
        store = UploadStore.from_config(config)
    except StorageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    try:
        if args.command == "export":
            with open(args.out, "w", newline="") if args.out else contextlib.nullcontext(sys.stdout) as out:
                count = export(store, out, args.format, args.images)
            print(f"exported {count} uploads", file=sys.stderr)
        elif args.command == "import-dayfiles":
            if not args.folder.is_dir():
                print(f"error: {args.folder} is not a folder", file=sys.stderr)
                return 1
            counts = import_day_files(store, args.folder)
            print(f"imported {counts['imported']} uploads ({counts['already_present']} were already present)",
                  file=sys.stderr)
        elif args.command == "copy-to":
            target = UploadStore.from_config({"UPLOAD_DIR": args.to_upload_dir or config["UPLOAD_DIR"],
                                              "DATABASE_URL": args.to_database_url,
                                              "IMAGE_STORE": args.to_image_store})
            try:
                counts = copy_store(store, target)
            finally:
                target.close()
            print(f"copied {counts['copied']} uploads ({counts['already_present']} were already there, "
                  f"{counts['missing_image']} had lost their image)", file=sys.stderr)
        elif args.command == "quarantine":
            if args.restore or args.restore_all:
                count = store.restore_quarantined(only_recorded=args.restore)
                print(f"restored {count} images from the quarantine", file=sys.stderr)
            elif args.empty:
                keys = list(store.images.quarantined(float("inf")))
                for key in keys:
                    store.images.delete_quarantined(key)
                print(f"deleted {len(keys)} images from the quarantine", file=sys.stderr)
            else:
                print(f"{sum(1 for _ in store.images.quarantined(float('inf')))} images in the quarantine",
                      file=sys.stderr)
        elif args.command == "claim-image-store":
            previous, store_id = store.images.read_owner(), store.records.store_id()
            store.images.write_owner(store_id)
            print(f"the image store now belongs to this database (store id {store_id}; it was {previous})",
                  file=sys.stderr)
        elif args.command == "export-dataset":
            from keras_serve.storage.dataset_export import export_dataset

            folders = dict(item.split("=", 1) for item in args.folder if "=" in item)
            counts = export_dataset(store, args.out, since=args.since, include_unverified=args.include_unverified,
                                    include_neither=args.include_neither, folders=folders)
            print(f"{args.out}: {counts.summary()}", file=sys.stderr)
        else:
            result = store.prune()
            print(f"removed {result['expired']} expired uploads, moved {result['orphans']} orphaned images to the "
                  f"quarantine and deleted {result['quarantine_deleted']} from it", file=sys.stderr)
    except StorageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
