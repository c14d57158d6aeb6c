"""The upload store on each back end (SQLite + files, PostgreSQL + S3): see conftest's storage_config."""
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from images import RED, image_bytes
from keras_serve.errors import StorageError, UploadNotFound
from keras_serve.storage import dayfiles
from keras_serve.storage.__main__ import import_day_files
from keras_serve.storage.uploads import UploadStore, is_upload_id

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0
ODD_IDS = ["", "..", "../etc/passwd", "*", "%", "' OR '1'='1", "0" * 31, "0" * 33, "0123456789ABCDEF" * 2,
           "20261125-ffffffffffff-" + "0" * 32, "20261125-0-" + "0" * 31 + "/", "x" * 10_000, "é" * 32,
           "0" * 32 + "\n", "0" * 32 + "\x00", "99999999-ffffffffffff-" + "f" * 32]


def received_day(record: dict) -> str:
    """YYYY/MM/DD of the record's time of receipt: the day its image is filed under, from the
    store's own clock reading (the test's clock would disagree across midnight UTC)."""
    return record["received"][:10].replace("-", "/")


def local(store: UploadStore) -> bool:
    return store.images.description.startswith("files")


@pytest.fixture()
def local_store(local_storage_config):
    store = UploadStore.from_config(local_storage_config)
    yield store
    store.close()


def test_save_then_read_exactly_the_bytes_and_the_record(store):
    data = image_bytes(RED, fmt="PNG")
    upload_id = store.save(data, "PNG", {"prediction": {"class": "DOG"}, "model": "m.h5",
                                         "client_filename": "../../etc/passwd.jpg", "milliseconds": 4.5})
    assert len(upload_id) == 32 and is_upload_id(upload_id)
    assert store.read_image(upload_id) == (data, "image/png")
    record = store.read_record(upload_id)
    assert record["id"] == upload_id and record["prediction"] == {"class": "DOG"} and record["model"] == "m.h5"
    assert record["bytes"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["format"] == "PNG" and record["milliseconds"] == 4.5
    # the client's name is audit data; the key comes from the day and the detected format
    assert record["client_filename"] == "../../etc/passwd.jpg"
    assert record["received"].endswith("+00:00")
    assert record["image_key"] == f"{received_day(record)}/{upload_id}.png"


def test_local_layout_is_plain_files_and_a_sqlite_database(local_store, local_storage_config):
    store, storage_config = local_store, local_storage_config
    data = image_bytes(RED)
    upload_id = store.save(data, "JPEG", {"model": "m.h5"})
    root = Path(storage_config["UPLOAD_DIR"])
    assert (root / received_day(store.read_record(upload_id)) / f"{upload_id}.jpg").read_bytes() == data
    with sqlite3.connect(root / "uploads.db") as db:  # what docs/storage.md tells operators to run
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("SELECT id, bytes, format FROM uploads").fetchall() == [(upload_id, len(data), "JPEG")]
    assert not [p for p in root.rglob(".tmp-*")]


def test_s3_layout_is_one_object_per_upload_under_the_prefix(remote_storage_config, seaweedfs):
    storage_config = remote_storage_config
    store = UploadStore.from_config(storage_config)
    data = image_bytes(RED)
    upload_id = store.save(data, "JPEG", {})
    prefix = storage_config["IMAGE_STORE"].split("/", 3)[3]
    key = f"{prefix}/{received_day(store.read_record(upload_id))}/{upload_id}.jpg"
    obj = seaweedfs.client().get_object(Bucket=seaweedfs.bucket, Key=key)
    assert obj["Body"].read() == data and obj["ContentType"] == "image/jpeg"
    store.close()


def test_the_store_facts_cannot_be_overridden_by_the_caller(store):
    upload_id = store.save(b"x", "PNG", {"id": "forged", "bytes": 99, "image_key": "../../x", "sha256": "0"})
    record = store.read_record(upload_id)
    assert record["id"] == upload_id and record["bytes"] == 1 and record["image_key"].endswith(f"{upload_id}.png")


def test_unknown_formats_are_stored_as_bin_and_served_as_octet_stream(store):
    upload_id = store.save(b"???", None, {})
    assert store.read_image(upload_id) == (b"???", "application/octet-stream")
    assert store.read_record(upload_id)["image_key"].endswith(".bin")


def test_concurrent_saves_get_unique_ids_and_keep_their_own_bytes(store):
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda i: store.save(f"image {i}".encode() * (i + 1), "PNG", {"milliseconds": i}),
                            range(120)))
    assert len(set(ids)) == 120
    for i, upload_id in enumerate(ids):
        assert store.read_image(upload_id)[0] == f"image {i}".encode() * (i + 1)
        assert store.read_record(upload_id)["milliseconds"] == i


def test_two_stores_on_one_back_end_see_each_others_uploads(make_store):
    # Two server processes (or machines) share one store.
    first, second = make_store(), make_store()
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: (first if i % 2 else second).save(bytes([i]) * 5000, "PNG", {}), range(40)))
    for i, upload_id in enumerate(ids):
        assert (second if i % 2 else first).read_image(upload_id)[0] == bytes([i]) * 5000


@pytest.mark.parametrize("bad", ODD_IDS)
def test_every_odd_id_is_not_found(store, bad):
    store.save(b"someone's image", "PNG", {})
    for read in (store.read_image, store.read_record):
        with pytest.raises(UploadNotFound):
            read(bad)


def test_a_guessed_id_is_not_found(store):
    upload_id = store.save(b"secret", "PNG", {})
    for guess in ("0" * 32, upload_id[:-1] + ("0" if upload_id[-1] != "0" else "1"), f"20261125-0-{upload_id}"):
        with pytest.raises(UploadNotFound):
            store.read_image(guess)


def test_retention_removes_expired_rows_and_their_images(make_store):
    store = make_store(UPLOAD_RETENTION_DAYS=1)
    clock = [time.time() - 3 * DAY]
    store.clock = lambda: clock[0]
    old = store.save(b"old", "PNG", {})
    old_key = store.read_record(old)["image_key"]
    clock[0] = time.time()
    new = store.save(b"new", "PNG", {})
    assert store.prune() == {"expired": 1, "orphans": 0, "quarantine_deleted": 0}
    with pytest.raises(UploadNotFound):
        store.read_record(old)
    assert store.images.get(old_key) is None
    assert store.read_image(new)[0] == b"new"
    assert store.prune() == {"expired": 0, "orphans": 0, "quarantine_deleted": 0}


def test_orphaned_images_are_quarantined_once_old_enough_then_deleted(store):
    kept = store.save(b"kept", "PNG", {})
    orphan_key = time.strftime("%Y/%m/%d/", time.gmtime()) + "ab" * 16 + ".png"
    store.images.put(orphan_key, b"written, then the process died before its row", "image/png")
    assert store.prune()["orphans"] == 0  # young: its row may still be on its way
    store.clock = lambda: time.time() + 3600
    assert store.prune() == {"expired": 0, "orphans": 1, "quarantine_deleted": 0}
    assert store.images.get(orphan_key) is None and store.read_image(kept)[0] == b"kept"
    assert list(store.images.quarantined(time.time() + 60)) == [orphan_key]  # moved, not deleted
    assert list(store.images.list(time.time() + 7200)) == [store.read_record(kept)["image_key"]]
    store.clock = lambda: time.time() + 8 * DAY  # past UPLOAD_QUARANTINE_DAYS (7)
    assert store.prune()["quarantine_deleted"] == 1
    assert list(store.images.quarantined(time.time() + 9 * DAY)) == []
    assert store.read_image(kept)[0] == b"kept"


def test_a_failed_row_leaves_no_image_behind(store, monkeypatch):
    def database_down(row):
        raise StorageError("Could not record the upload in the upload database.")

    monkeypatch.setattr(store.records, "insert", database_down)
    with pytest.raises(StorageError):
        store.save(b"lost", "PNG", {})
    assert list(store.images.list(time.time() + 60)) == []


def test_a_damaged_image_is_a_storage_error_not_wrong_bytes(store):
    upload_id = store.save(b"original bytes", "PNG", {})
    key = store.read_record(upload_id)["image_key"]
    store.images.delete(key)  # (a file is never overwritten in place: linkat refuses an existing name)
    store.images.put(key, b"tampered bytes", "image/png")
    with pytest.raises(StorageError, match="damaged"):
        store.read_image(upload_id)


def test_a_deleted_image_is_not_found(store):
    upload_id = store.save(b"bytes", "PNG", {})
    store.images.delete(store.read_record(upload_id)["image_key"])
    with pytest.raises(UploadNotFound):
        store.read_image(upload_id)


def test_health_reports_each_half_ok_or_not_and_nothing_else(store, monkeypatch):
    assert store.check_now() == {"ok": True, "records": {"ok": True}, "images": {"ok": True}}

    def unreachable(write=False):
        raise StorageError("The image store cannot be reached.")

    monkeypatch.setattr(store.images, "check", unreachable)
    assert store.check_now() == {"ok": False, "records": {"ok": True}, "images": {"ok": False}}
    assert store.health() == store.check_now()  # health() is what the checks last found


# --- failures of the medium, and recovering from them -----------------------------------

def test_a_deleted_upload_folder_is_made_again_and_nothing_answered_is_lost(make_store, storage_config):
    store = make_store()
    before = store.save(b"before", "PNG", {})
    # by hand, while serving: the folder (images and uploads.db), or every object under the prefix
    shutil.rmtree(storage_config["UPLOAD_DIR"], ignore_errors=True)
    for key in store.images.list(time.time() + 60):
        store.images.delete(key)
    # the very next save succeeds (the folder is made again, the objects written anew), and
    # so does every one after it; each is readable by a store started afresh
    saved = {store.save(f"after {i}".encode(), "PNG", {}): f"after {i}".encode() for i in range(3)}
    assert len(saved) == 3
    restarted = make_store()
    for upload_id, data in saved.items():
        assert restarted.read_image(upload_id)[0] == data
    with pytest.raises(UploadNotFound):  # its image was deleted by hand, and the store says so
        restarted.read_image(before)
    if local(store):  # the database went with the folder
        with pytest.raises(UploadNotFound):
            restarted.read_record(before)
    else:  # PostgreSQL was not touched: the record stays, its image is gone
        assert restarted.read_record(before)["id"] == before


def test_an_unwritable_upload_folder_is_a_storage_error_until_fixed(local_store, local_storage_config):
    store, storage_config = local_store, local_storage_config
    root = Path(storage_config["UPLOAD_DIR"])
    shutil.rmtree(root)
    root.write_text("a file where the folder was")  # root ignores permissions; this stops it too
    with pytest.raises(StorageError):
        store.save(b"x", "PNG", {})
    assert store.health()["ok"] is False
    root.unlink()
    upload_id = store.save(b"x", "PNG", {})
    assert store.read_image(upload_id)[0] == b"x" and store.health()["ok"] is True


def test_a_full_disk_is_a_storage_error(local_store, monkeypatch):
    store = local_store
    import keras_serve.storage.images as images

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(images.os, "open", no_space)
    with pytest.raises(StorageError, match="disk is full"):
        store.save(b"x", "PNG", {})
    monkeypatch.undo()
    assert store.read_image(store.save(b"x", "PNG", {}))[0] == b"x"


def test_postgresql_down_then_back(tmp_path):
    from services import running_postgres

    with running_postgres() as pg:
        store = UploadStore.from_config({"UPLOAD_DIR": str(tmp_path), "DATABASE_URL": pg.url()})
        try:
            first = store.save(b"first", "PNG", {})
            pg.stop()
            with pytest.raises(StorageError):
                store.save(b"while down", "PNG", {})
            with pytest.raises(StorageError):
                store.read_record(first)
            assert store.health()["ok"] is False
            pg.start()
            assert store.read_image(first)[0] == b"first"  # the stale pool recovers by itself
            assert store.read_image(store.save(b"after", "PNG", {}))[0] == b"after"
            assert store.health()["ok"] is True
        finally:
            store.close()


def test_s3_down_then_back(tmp_path, monkeypatch):
    from services import running_seaweedfs

    with running_seaweedfs() as s3:
        for name, value in s3.env().items():
            monkeypatch.setenv(name, value)
        # short store timeouts: a call to the stopped S3 ends in StorageError (a 503) after one
        # try of a second at most, rather than the defaults' retries; how long it takes is for
        # tests/measure_store_faults.py, not a bound here
        store = UploadStore.from_config({"UPLOAD_DIR": str(tmp_path), "IMAGE_STORE": f"s3://{s3.bucket}/x",
                                         "STORE_TIMEOUT_S": 1.0, "STORE_CONNECT_TIMEOUT_S": 1.0,
                                         "STORE_ATTEMPTS": 1})
        try:
            first = store.save(b"first", "PNG", {})
            s3.stop()
            with pytest.raises(StorageError):
                store.save(b"while down", "PNG", {})
            with pytest.raises(StorageError):
                store.read_image(first)
            assert store.health()["ok"] is False
            s3.start()
            assert store.read_image(first)[0] == b"first"
            assert store.read_image(store.save(b"after", "PNG", {}))[0] == b"after"
        finally:
            store.close()


# --- the old day files: import and export ---------------------------------------------------

def day_file_frame(day: str, offset: int, data: bytes, **record) -> tuple[str, bytes]:
    """One frame exactly as the day-file store of earlier versions appended it."""
    upload_id = f"{day}-{offset:x}-" + hashlib.sha256(data + day.encode()).hexdigest()[:32]
    header = {"client_filename": "cat.jpg", "model": "m.h5", "prediction": {"class": "CAT"}, **record,
              "id": upload_id, "received": f"{day[:4]}-{day[4:6]}-{day[6:]}T10:00:00.000+00:00",
              "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "format": "PNG", "suffix": "png"}
    return upload_id, json.dumps(header).encode() + b"\n" + data + b"\n"


def write_day_file(folder: Path, day: str, parts: list[bytes | tuple[str, bytes]]) -> list[str]:
    """Frames (and raw junk) appended in order; returns the ids of the frames."""
    content, ids = b"", []
    for part in parts:
        if callable(part):
            part = part(len(content))
        if isinstance(part, tuple):
            ids.append(part[0])
            part = part[1]
        content += part
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{day[:4]}-{day[4:6]}-{day[6:]}.uploads").write_bytes(content)
    return ids


def test_import_day_files_keeps_ids_bytes_and_records(store, tmp_path):
    day = time.strftime("%Y%m%d", time.gmtime())  # within retention
    png = image_bytes(RED, fmt="PNG")
    ids = write_day_file(tmp_path / "old", day, [
        lambda at: day_file_frame(day, at, png),
        lambda at: day_file_frame(day, at, b"not an image", prediction=None, error="The model failed."),
    ])
    counts = import_day_files(store, tmp_path / "old", log=open(os.devnull, "w"))
    assert counts == {"imported": 2, "already_present": 0}
    assert store.read_image(ids[0]) == (png, "image/png")  # old links keep working
    record = store.read_record(ids[1])
    assert record["error"] == "The model failed." and record["format"] is None  # detected, not trusted
    assert record["image_key"].endswith(".bin") and record["received"].startswith(
        f"{day[:4]}-{day[4:6]}-{day[6:]}T10:00:00")
    assert import_day_files(store, tmp_path / "old", log=open(os.devnull, "w")) == {
        "imported": 0, "already_present": 2}


def test_import_rejects_planted_torn_and_absurd_frames(store, tmp_path):
    day = time.strftime("%Y%m%d", time.gmtime())
    genuine_id, genuine = day_file_frame(day, 0, image_bytes(RED, fmt="PNG"))
    planted_header = json.dumps({"id": genuine_id, "bytes": 12000, "sha256": "0" * 64}).encode()
    # An accepted upload carrying a fake frame that claims the first upload's id.
    fake_data = b"planted"
    fake = json.dumps({"id": genuine_id, "bytes": len(fake_data),
                       "sha256": hashlib.sha256(fake_data).hexdigest()}).encode() + b"\n" + fake_data + b"\n"
    carrier = image_bytes(RED, fmt="PNG") + b"\n" + fake
    torn_header = json.dumps({"id": f"{day}-0-" + "1" * 32, "bytes": 5000, "sha256": "0" * 64}).encode()
    parts = [
        (genuine_id, genuine),
        lambda at: day_file_frame(day, at, carrier),
        torn_header + b"\nonly part of the image then a crash" + b"\n" + fake,  # torn, then planted bytes
        b'{"id": "' + day.encode() + b'-ffffffffffff-' + b"0" * 32 + b'", "bytes": 1e15}\n',
        lambda at: json.dumps({"id": f"{day}-{at:x}-" + "2" * 32, "bytes": 10 ** 15,
                               "sha256": hashlib.sha256(b"huge").hexdigest()}).encode() + b"\nhuge\n",
        b"\n" + planted_header + b"\n",
        lambda at: day_file_frame(day, at, b"last, after the tear"),
    ]
    ids = write_day_file(tmp_path / "old", day, parts)
    imported = {u.upload_id: u.data for u in dayfiles.iter_day_file(next((tmp_path / "old").glob("*.uploads")))}
    # the genuine frames, each once, with their own bytes; the carrier intact with its payload
    assert imported == {ids[0]: image_bytes(RED, fmt="PNG"), ids[1]: carrier, ids[2]: b"last, after the tear"}
    import_day_files(store, tmp_path / "old", log=open(os.devnull, "w"))
    assert store.read_image(genuine_id)[0] == image_bytes(RED, fmt="PNG")
    assert store.read_image(ids[1])[0] == carrier


def test_day_file_reader_survives_garbage(tmp_path):
    day = "20261125"
    junk = [b"\xff" * 70_000 + b"\n", b"[1,2]\n", b'{"id": 5}\n', b'"text"\n', b"\x00\n", b'{"bytes": -1}\n']
    write_day_file(tmp_path, day, junk)
    (tmp_path / "2026-13-45.uploads").write_bytes(junk[1])
    assert [list(dayfiles.iter_day_file(p)) for p in dayfiles.day_files(tmp_path)] == [[], []]


def run_storage_command(storage_config, *args):
    env = {**os.environ, "KERAS_SERVE_UPLOAD_DIR": storage_config["UPLOAD_DIR"]}
    for name in ("DATABASE_URL", "IMAGE_STORE"):
        if storage_config.get(name):
            env[f"KERAS_SERVE_{name}"] = storage_config[name]
    return subprocess.run([sys.executable, "-m", "keras_serve.storage", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_export_command_lists_every_upload_as_csv_or_json_lines(store, storage_config, tmp_path):
    ids = [store.save(image_bytes(RED, fmt="PNG"), "PNG", {"prediction": {"class": "DOG"}, "model": "m.h5"}),
           store.save(b"???", None, {"error": "failed"})]
    result = run_storage_command(storage_config, "export", "--format", "jsonl", "--images", str(tmp_path / "img"))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["id"] for r in records] == ids and records[0]["prediction"] == {"class": "DOG"}
    assert (tmp_path / "img" / f"{ids[0]}.png").read_bytes() == image_bytes(RED, fmt="PNG")
    assert (tmp_path / "img" / f"{ids[1]}.bin").read_bytes() == b"???"
    result = run_storage_command(storage_config, "export", "--format", "csv", "--out", str(tmp_path / "u.csv"))
    assert result.returncode == 0 and "exported 2 uploads" in result.stderr
    import csv
    rows = list(csv.DictReader(open(tmp_path / "u.csv")))
    assert [r["id"] for r in rows] == ids and json.loads(rows[0]["prediction"]) == {"class": "DOG"}
    assert rows[1]["error"] == "failed"


def test_import_command_on_a_folder_of_day_files(storage_config, tmp_path):
    day = time.strftime("%Y%m%d", time.gmtime())
    ids = write_day_file(tmp_path / "old", day, [lambda at: day_file_frame(day, at, b"abc")])
    result = run_storage_command(storage_config, "import-dayfiles", str(tmp_path / "old"))
    assert result.returncode == 0 and "imported 1 uploads" in result.stderr, result.stderr
    result = run_storage_command(storage_config, "export")
    assert json.loads(result.stdout)["id"] == ids[0]
    assert run_storage_command(storage_config, "import-dayfiles", str(tmp_path / "nope")).returncode == 1


def test_copy_to_moves_a_single_machine_store_to_postgresql_and_s3(local_storage_config, remote_storage_config):
    from keras_serve.storage.__main__ import copy_store

    source, target = UploadStore.from_config(local_storage_config), UploadStore.from_config(remote_storage_config)
    try:
        ids = [source.save(image_bytes(RED, fmt="PNG"), "PNG", {"prediction": {"class": "DOG"}}),
               source.save(b"???", None, {"error": "failed"})]
        assert copy_store(source, target) == {"copied": 2, "already_present": 0, "missing_image": 0}
        for upload_id in ids:
            assert target.read_image(upload_id) == source.read_image(upload_id)
            assert target.read_record(upload_id) == source.read_record(upload_id)
        assert copy_store(source, target)["already_present"] == 2
    finally:
        source.close()
        target.close()


def test_where_nameless_files_are_not_supported_images_are_renamed_into_place(local_store, monkeypatch):
    import errno

    import keras_serve.storage.images as images

    real_open = os.open

    def no_tmpfile(path, flags, *args, **kwargs):
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(images.os, "open", no_tmpfile)
    upload_id = local_store.save(b"renamed", "PNG", {})
    assert local_store.images._anonymous_files is False
    assert local_store.read_image(upload_id)[0] == b"renamed"
    assert not list(Path(local_store.images.root).rglob(".tmp-*"))


def test_fsync_uploads_syncs_the_image_and_its_folder(local_storage_config, monkeypatch):
    import keras_serve.storage.images as images

    synced = []
    monkeypatch.setattr(images.os, "fdatasync", lambda fd: synced.append("data"))
    monkeypatch.setattr(images.os, "fsync", lambda fd: synced.append("folder"))
    for fsync, expected in ((False, []), (True, ["data", "folder"])):
        store = UploadStore.from_config({**local_storage_config, "UPLOAD_FSYNC": fsync})
        try:
            synced.clear()
            assert store.read_image(store.save(b"durable", "PNG", {}))[0] == b"durable"
            assert synced == expected
        finally:
            store.close()


def test_a_failed_group_commit_fails_every_upload_in_it_and_the_next_ones_succeed(local_store, local_storage_config):
    store, root = local_store, Path(local_storage_config["UPLOAD_DIR"])
    store.save(b"first", "PNG", {})
    for name in ("uploads.db", "uploads.db-wal", "uploads.db-shm"):
        (root / name).unlink(missing_ok=True)
    (root / "uploads.db").mkdir()  # the database cannot be opened at all now

    def save(i):
        try:
            return store.save(bytes([i]) * 100, "PNG", {})
        except StorageError:
            return None

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(save, range(16))) == [None] * 16
    (root / "uploads.db").rmdir()
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(save, range(16)))
    assert all(ids) and [store.read_image(i)[0] for i in ids] == [bytes([i]) * 100 for i in range(16)]


def test_a_copy_interrupted_between_image_and_row_can_be_run_again(local_storage_config, tmp_path):
    from keras_serve.storage.__main__ import copy_store

    target_config = {**local_storage_config, "UPLOAD_DIR": str(tmp_path / "target")}
    source, target = UploadStore.from_config(local_storage_config), UploadStore.from_config(target_config)
    try:
        upload_id = source.save(image_bytes(RED, fmt="PNG"), "PNG", {})
        row = source.records.get(upload_id)
        target.images.put(row["image_key"], source.images.get(row["image_key"]), "image/png")  # then it stopped
        assert copy_store(source, target) == {"copied": 1, "already_present": 0, "missing_image": 0}
        assert target.read_image(upload_id) == source.read_image(upload_id)
    finally:
        source.close()
        target.close()
