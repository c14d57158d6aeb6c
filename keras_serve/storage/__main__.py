"""Maintenance of the upload store, with the same settings as the server.

    python -m keras_serve.storage export --format csv > uploads.csv
    python -m keras_serve.storage export --format flat-csv --out table.csv   # a column per fact
    python -m keras_serve.storage export --format jsonl --images exported/
    python -m keras_serve.storage import-dayfiles uploads/      # the files of earlier versions
    python -m keras_serve.storage copy-to --to-database-url postgresql+psycopg://... --to-image-store s3://b/p
    python -m keras_serve.storage prune
    python -m keras_serve.storage quarantine [--restore | --restore-all | --empty]
    python -m keras_serve.storage claim-image-store    # this database owns the image store now
    python -m keras_serve.storage export-dataset OUT [--reviewed-only] [--since DATE] [--include-unverified]

The store is chosen like the server's: --upload-dir, --database-url, --image-store (before or
after the command), or their KERAS_SERVE_* environment variables (and AWS_* for S3). Every
command but import-dayfiles works on an existing store: where none is, it says so and exits
with status 1, creating nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import json
import sys
from pathlib import Path, PurePath
from typing import IO, Any, Callable, Iterable, Mapping

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


# import-dayfiles fills a store, so it may make a new one; every other command works on the
# store a server made, and a mistyped path must not leave an empty store behind.
CREATES_STORE = frozenset({"import-dayfiles"})


def add_store_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that choose the store, as the server's (every command that opens it takes them).

    Their default is SUPPRESS, not None: the same options sit on the main parser and on each
    subcommand (`options_after_commands_too`), and a subcommand's default would otherwise
    overwrite a value given before the subcommand.
    """
    group = parser.add_argument_group("the store (as the server's; default: the KERAS_SERVE_* variables, "
                                      "else ./uploads)")
    for flag, name, metavar in (("--upload-dir", "UPLOAD_DIR", "DIR"), ("--database-url", "DATABASE_URL", "URL"),
                                ("--image-store", "IMAGE_STORE", "URL")):
        group.add_argument(flag, dest=name, metavar=metavar, default=argparse.SUPPRESS,
                           help=f"{settings.BY_NAME[name].help} (env {settings.BY_NAME[name].env})")


def options_after_commands_too(parser: argparse.ArgumentParser, commands: argparse._SubParsersAction,
                               add: Callable[[argparse.ArgumentParser], None] = add_store_arguments) -> None:
    """The common options on the main parser and on every subcommand added so far: people type
    them after the subcommand as often as before it. `add` must give them SUPPRESS defaults."""
    add(parser)
    for command in {id(p): p for p in commands.choices.values()}.values():  # an alias shares its parser
        add(command)


def open_existing_store(config: Mapping[str, Any]) -> UploadStore | None:
    """The store `config` names, or None after saying on stderr why it cannot be used (it does not
    exist, or does not open); never creates one."""
    if missing := missing_store(config):
        print(f"error: {missing}", file=sys.stderr)
        return None
    try:
        return UploadStore.from_config(config)
    except StorageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return None


def missing_store(config: Mapping[str, Any]) -> str | None:
    """Why the store `config` names does not exist, or None when it does; creates nothing.

    SQLite: UPLOAD_DIR/uploads.db is there. A DATABASE_URL: its database answers and has the
    uploads table (a server made it).
    """
    hint = ("start the server once with these settings to create it, or name the store in use with "
            "--upload-dir or --database-url (KERAS_SERVE_UPLOAD_DIR, KERAS_SERVE_DATABASE_URL)")
    if not config.get("DATABASE_URL"):
        upload_dir = Path(config["UPLOAD_DIR"]).resolve()  # the default is relative: say where it looked
        if (upload_dir / "uploads.db").is_file():
            return None
        return f"no upload store in {upload_dir} (it has no uploads.db); {hint}"
    import sqlalchemy as sa

    from keras_serve.storage.faults import StoreTimeouts
    from keras_serve.storage.records import postgres_connect_args

    url = sa.engine.make_url(config["DATABASE_URL"])
    connect_args = postgres_connect_args(StoreTimeouts.from_config(config)) \
        if url.get_backend_name() == "postgresql" else {}
    engine = sa.create_engine(url, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            if sa.inspect(conn).has_table("uploads"):
                return None
        return f"no upload store in the database {url.render_as_string(hide_password=True)} (no uploads table); " \
               f"{hint}"
    except sa.exc.SQLAlchemyError as exc:
        return (f"cannot open the database {url.render_as_string(hide_password=True)}: "
                f"{str(getattr(exc, 'orig', None) or exc).strip().splitlines()[0]}")
    finally:
        engine.dispose()


def config_from_args(args: argparse.Namespace, names: Iterable[str] = (*STORE_OPTIONS, "UPLOAD_RETENTION_DAYS")
                     ) -> dict[str, Any]:
    """The server's settings (defaults, then KERAS_SERVE_*), then this command's own options."""
    given = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    return settings.resolve(given)


def main(argv: Iterable[str] | None = None) -> int:
    args = build_parser().parse_args(list(argv) if argv is not None else None)
    config = config_from_args(args)
    if args.command in CREATES_STORE:
        try:
            store = UploadStore.from_config(config)
        except StorageError as exc:
            print(f"error: {exc.message}", file=sys.stderr)
            return 1
    elif (store := open_existing_store(config)) is None:
        return 1
    try:
        return run_command(args, config, store)
    except StorageError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    finally:
        store.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m keras_serve.storage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    export_cmd = sub.add_parser("export", help="every record, oldest first, as CSV or JSON lines")
    export_cmd.add_argument("--format", choices=["csv", "jsonl", "flat-csv"], default="jsonl",
                            help="flat-csv: a column per fact (prediction, confidence, unsure, model_version, "
                                 "review_label, ...) for spreadsheets")
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
    prune_cmd.add_argument("--retention-days", dest="UPLOAD_RETENTION_DAYS", type=float, metavar="DAYS",
                           help=f"{settings.BY_NAME['UPLOAD_RETENTION_DAYS'].help} "
                                f"(env {settings.BY_NAME['UPLOAD_RETENTION_DAYS'].env})")
    quarantine_cmd = sub.add_parser("quarantine", help="count the images in the quarantine, or restore or delete them")
    action = quarantine_cmd.add_mutually_exclusive_group()
    action.add_argument("--restore", action="store_true", help="move back those that have a record in this database")
    action.add_argument("--restore-all", action="store_true", help="move every quarantined image back")
    action.add_argument("--empty", action="store_true", help="delete every quarantined image now")
    sub.add_parser("claim-image-store", help="write this database's store id into the image store's owner marker "
                                             "(after checking that no other database owns those images)")
    options_after_commands_too(parser, sub)
    return parser


def run_command(args: argparse.Namespace, config: Mapping[str, Any], store: UploadStore) -> int:
    """The chosen command on the opened store; its report goes to stderr. Raises StorageError."""
    if args.command == "export":
        with open(args.out, "w", newline="") if args.out else contextlib.nullcontext(sys.stdout) as out:
            if args.format == "flat-csv":
                from keras_serve.storage.flat_export import export_flat

                count = export_flat(store, out)
            else:
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
