import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from uploads import UploadNotFound, UploadStore


def test_save_find_and_record(tmp_path):
    store = UploadStore(tmp_path)
    upload_id = store.save(b"\xff\xd8jpeg bytes", "JPEG")
    path, mimetype = store.find(upload_id)
    assert path.read_bytes() == b"\xff\xd8jpeg bytes"
    assert path.name == f"{upload_id}.jpg" and mimetype == "image/jpeg"
    store.record(upload_id, {"prediction": {"class": "CAT"}})
    assert store.read_record(upload_id) == {"prediction": {"class": "CAT"}}
    assert json.loads((tmp_path / f"{upload_id}.json").read_text())["prediction"]["class"] == "CAT"


def test_ids_are_unique_random_and_nothing_is_overwritten(tmp_path):
    store = UploadStore(tmp_path)
    with ThreadPoolExecutor(16) as pool:
        ids = list(pool.map(lambda i: store.save(f"image {i}".encode(), "PNG"), range(200)))
    assert len(set(ids)) == 200
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    contents = {store.find(i)[0].read_bytes() for i in ids}
    assert contents == {f"image {i}".encode() for i in range(200)}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]  # no half-written leftovers


def test_records_are_written_once(tmp_path):
    store = UploadStore(tmp_path)
    upload_id = store.save(b"x", "PNG")
    store.record(upload_id, {"n": 1})
    store.record(upload_id, {"n": 2})  # a second write must not replace the audit record
    assert store.read_record(upload_id) == {"n": 1}


@pytest.mark.parametrize("bad", ["../etc/passwd", "..", "", "ABCDEF0123456789ABCDEF0123456789",
                                 "0123456789abcdef0123456789abcde/", "*", "0123456789abcdef0123456789abcdef.jpg"])
def test_only_well_formed_ids_reach_the_filesystem(tmp_path, bad):
    store = UploadStore(tmp_path)
    with pytest.raises(UploadNotFound):
        store.find(bad)


def test_unknown_id_is_not_found(tmp_path):
    with pytest.raises(UploadNotFound):
        UploadStore(tmp_path).find("0" * 32)


def test_prune_removes_only_expired_uploads(tmp_path):
    store = UploadStore(tmp_path, retention_days=1)
    old, new = store.save(b"old", "PNG"), store.save(b"new", "PNG")
    store.record(old, {})
    two_days_ago = time.time() - 2 * 86400
    for path in tmp_path.glob(f"{old}.*"):
        os.utime(path, (two_days_ago, two_days_ago))
    assert store.prune() == 2
    with pytest.raises(UploadNotFound):
        store.find(old)
    assert store.find(new)[0].read_bytes() == b"new"


def test_unknown_formats_are_stored_without_a_trusted_suffix(tmp_path):
    store = UploadStore(tmp_path)
    path, mimetype = store.find(store.save(b"???", None))
    assert path.suffix == ".bin" and mimetype == "application/octet-stream"
