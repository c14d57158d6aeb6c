import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import keras_serve.storage.uploads as uploads
from keras_serve.errors import ServiceError
from keras_serve.storage.uploads import StorageError, UploadNotFound, UploadStore, iter_day_file

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0


def day_files(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != ".gitkeep")


def test_save_then_read_image_and_record(tmp_path):
    store = UploadStore(tmp_path)
    upload_id = store.save(b"\xff\xd8jpeg bytes", "JPEG", {"prediction": {"class": "CAT"}})
    assert store.read_image(upload_id) == (b"\xff\xd8jpeg bytes", "image/jpeg")
    record = store.read_record(upload_id)
    assert record["prediction"] == {"class": "CAT"} and record["id"] == upload_id
    assert record["bytes"] == 12 and record["format"] == "JPEG" and len(record["sha256"]) == 64
    assert uploads.ID_PATTERN.match(upload_id)


def test_one_day_file_holds_every_upload_of_that_day(tmp_path):
    now = time.mktime((2026, 11, 25, 12, 0, 0, 0, 0, 0)) - time.timezone
    store = UploadStore(tmp_path, clock=lambda: now)
    ids = [store.save(f"image {i}".encode(), "PNG", {"n": i}) for i in range(3)]
    assert day_files(tmp_path) == ["2026-11-25.uploads"]
    assert all(i.startswith("20261125-") for i in ids)
    frames = list(iter_day_file(tmp_path / "2026-11-25.uploads"))
    assert [(r["id"], r["n"], data) for r, data in frames] == [(ids[i], i, f"image {i}".encode()) for i in range(3)]


def test_concurrent_saves_get_unique_ids_and_keep_their_own_bytes(tmp_path):
    store = UploadStore(tmp_path)
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda i: store.save(f"image {i}".encode() * (i + 1), "PNG", {"n": i}), range(200)))
    assert len(set(ids)) == 200
    for i, upload_id in enumerate(ids):
        assert store.read_image(upload_id)[0] == f"image {i}".encode() * (i + 1)
        assert store.read_record(upload_id)["n"] == i


def test_two_stores_on_one_folder_do_not_interleave(tmp_path):
    # Two server processes may share a folder; flock keeps each frame whole.
    first, second = UploadStore(tmp_path), UploadStore(tmp_path)
    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda i: (first if i % 2 else second).save(bytes([i]) * 5000, "PNG", {}), range(100)))
    for i, upload_id in enumerate(ids):
        assert first.read_image(upload_id)[0] == bytes([i]) * 5000
    assert len(list(iter_day_file(next(tmp_path.glob("*.uploads"))))) == 100


def test_the_store_fields_cannot_be_overridden_by_the_caller(tmp_path):
    store = UploadStore(tmp_path)
    upload_id = store.save(b"x", "PNG", {"id": "forged", "bytes": 99})
    record = store.read_record(upload_id)
    assert record["id"] == upload_id and record["bytes"] == 1


@pytest.mark.parametrize("bad", ["../etc/passwd", "..", "", "0123456789abcdef0123456789abcdef",
                                 "20261125-0-0123456789abcdef0123456789abcde/", "*",
                                 "20261125-0-0123456789ABCDEF0123456789ABCDEF",
                                 "2026112-0-0123456789abcdef0123456789abcdef"])
def test_only_well_formed_ids_reach_the_filesystem(tmp_path, bad):
    store = UploadStore(tmp_path)
    with pytest.raises(UploadNotFound):
        store.read_image(bad)


def test_a_guessed_token_or_offset_is_not_found(tmp_path):
    store = UploadStore(tmp_path)
    upload_id = store.save(b"secret", "PNG", {})
    day, offset, token = upload_id.split("-")
    wrong_token = f"{day}-{offset}-{'0' * 32 if token != '0' * 32 else '1' * 32}"
    wrong_offset = f"{day}-{int(offset, 16) + 1:x}-{token}"
    for guess in (wrong_token, wrong_offset, f"19990101-0-{token}"):
        with pytest.raises(UploadNotFound):
            store.read_image(guess)
        with pytest.raises(UploadNotFound):
            store.read_record(guess)


def test_prune_removes_only_expired_days(tmp_path):
    clock = [time.time() - 3 * DAY]
    store = UploadStore(tmp_path, retention_days=1, clock=lambda: clock[0])
    old = store.save(b"old", "PNG", {})
    clock[0] += 3 * DAY
    new = store.save(b"new", "PNG", {})  # opening today's file prunes the expired one
    assert len(day_files(tmp_path)) == 1
    with pytest.raises(UploadNotFound):
        store.read_image(old)
    assert store.read_image(new)[0] == b"new"
    assert store.prune() == 0  # today's file is never removed
    (tmp_path / "notes.txt").write_text("not ours")
    (tmp_path / "2020-13-45.uploads").write_text("not a date")
    assert store.prune() == 0 and (tmp_path / "notes.txt").exists() and (tmp_path / "2020-13-45.uploads").exists()


def test_an_unwritable_folder_is_a_storage_error(tmp_path):
    store = UploadStore(tmp_path / "uploads")
    (tmp_path / "uploads").rmdir()
    (tmp_path / "uploads").write_text("a file where the folder was")
    with pytest.raises(StorageError):
        store.save(b"x", "PNG", {})


def test_unknown_formats_are_served_as_octet_stream(tmp_path):
    store = UploadStore(tmp_path)
    assert store.read_image(store.save(b"???", None, {}))[1] == "application/octet-stream"


def test_a_failed_write_leaves_no_torn_frame(tmp_path, monkeypatch):
    store = UploadStore(tmp_path)
    first = store.save(b"kept", "PNG", {})
    real_write = os.write
    monkeypatch.setattr(uploads.os, "write", lambda fd, data: real_write(fd, bytes(data[:10])) if len(data) > 10
                        else (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(StorageError) as caught:
        store.save(b"lost" * 100, "PNG", {})
    assert isinstance(caught.value, ServiceError) and "No space left" in caught.value.message
    monkeypatch.undo()
    after = store.save(b"after", "PNG", {})
    assert store.read_image(first)[0] == b"kept" and store.read_image(after)[0] == b"after"
    assert [data for _, data in iter_day_file(next(tmp_path.glob("*.uploads")))] == [b"kept", b"after"]


def test_a_torn_frame_from_a_crash_is_skipped_and_later_uploads_still_read(tmp_path):
    store = UploadStore(tmp_path)
    before = store.save(b"whole", "PNG", {})
    store.close()
    path = next(tmp_path.glob("*.uploads"))
    with open(path, "ab") as handle:  # a crash in the middle of a frame: header, part of the image
        handle.write(json.dumps({"id": "x", "bytes": 100, "sha256": "0" * 64}).encode() + b"\nonly\npart")
    assert [data for _, data in iter_day_file(path)] == [b"whole"]
    restarted = UploadStore(tmp_path)
    after = [restarted.save(f"after {i}\n{{}}".encode(), "PNG", {}) for i in range(3)]
    frames = list(iter_day_file(path))
    assert [record["id"] for record, _ in frames] == [before, *after]
    assert [data for _, data in frames] == [b"whole", *(f"after {i}\n{{}}".encode() for i in range(3))]
    assert restarted.read_image(after[0])[0] == b"after 0\n{}"


def test_a_torn_header_line_is_skipped_too(tmp_path):
    store = UploadStore(tmp_path)
    store.save(b"one", "PNG", {})
    store.close()
    path = next(tmp_path.glob("*.uploads"))
    with open(path, "ab") as handle:
        handle.write(b'{"id": "20261125-')
    restarted = UploadStore(tmp_path)
    two = restarted.save(b"two", "PNG", {})
    assert [data for _, data in iter_day_file(path)] == [b"one", b"two"]
    assert restarted.read_record(two)["bytes"] == 3


def test_export_command_writes_one_image_and_record_per_upload(tmp_path):
    store = UploadStore(tmp_path / "uploads")
    ids = [store.save(b"\x89PNG fake", "PNG", {"n": 1}), store.save(b"???", None, {"n": 2})]
    store.close()
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "keras_serve.storage.uploads", "export", "--uploads",
                             str(tmp_path / "uploads"), "--out", str(out)], capture_output=True, text=True, check=True)
    assert "exported 2 uploads" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{ids[0]}.png", f"{ids[0]}.json", f"{ids[1]}.bin", f"{ids[1]}.json"])
    assert (out / f"{ids[0]}.png").read_bytes() == b"\x89PNG fake"
    assert json.loads((out / f"{ids[1]}.json").read_text())["n"] == 2
