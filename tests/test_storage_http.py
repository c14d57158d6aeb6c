"""The storage through HTTP, on each back end: the attacks on the old day-file store, storage
failures (503, then recovery), and kill -9 of a real server process during uploads."""
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
import requests

from images import BLUE, RED, image_bytes
from server_process import ServerProcess
from test_uploads import ODD_IDS
from uploading import post_file, post_over_http


@pytest.fixture()
def storage_client(make_app, colour_model_path, storage_config):
    app = make_app(MODEL_PATH=str(colour_model_path), **storage_config)
    return app.test_client()


def test_a_record_planted_in_uploaded_bytes_is_never_served(storage_client):
    # What read other people's uploads from the day files: an accepted image whose bytes go on
    # with a line that looks like a record, under an id of the attacker's choosing.
    planted_id = "20261125-" + "1" * 8 + "-" + "ab" * 16
    data = image_bytes(RED, fmt="PNG") + b"\n" + b" " * 300 + json.dumps(
        {"id": planted_id, "bytes": 12000}).encode() + b"\n"
    mine = post_file(storage_client, data, filename="planted.png").get_json()
    someone_elses = post_file(storage_client, image_bytes(BLUE, fmt="JPEG")).get_json()
    for path in (f"/uploads/{planted_id}", f"/uploads/{planted_id}/record"):
        r = storage_client.get(path)
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "upload_not_found"
    mine_back = storage_client.get(mine["image_url"])
    assert mine_back.data == data and mine_back.mimetype == "image/png"  # exactly what was accepted
    assert storage_client.get(someone_elses["image_url"]).data == image_bytes(BLUE, fmt="JPEG")


def test_every_id_shape_is_404_or_200_never_500(storage_client):
    good = post_file(storage_client, image_bytes(RED)).get_json()["id"]
    for bad in [*filter(None, ODD_IDS), "..%2F..%2Fapp.py", "%00", "f" * 4096, good.upper(), good + ".jpg", good[:-1]]:
        if "/" in bad or "\n" in bad or "\x00" in bad:
            bad = requests.utils.quote(bad, safe="")
        for suffix in ("", "/record"):
            r = storage_client.get(f"/uploads/{bad}{suffix}", follow_redirects=True)  # "//" is merged
            assert r.status_code == 404, (bad[:40], suffix, r.status_code)
    assert storage_client.get(f"/uploads/{good}").status_code == 200
    assert storage_client.get(f"/uploads/{good}/record").status_code == 200


def test_an_unusable_upload_folder_is_503_storage_then_recovers(make_app, colour_model_path, local_storage_config,
                                                               no_retention_thread):
    # The folder is swapped for a file under a running app: a test of the request path. The
    # retention pass at start writes the owner marker into the folder, which raced rmtree (a
    # file gone mid-walk); a periodic health check, or the model follower's database read (a new
    # SQLite connection), makes the folder again. Without them, /readyz reports what the
    # requests found.
    app = make_app(MODEL_PATH=str(colour_model_path), STORE_CHECK_INTERVAL_S=3600, MODEL_CHECK_INTERVAL_S=0,
                   **local_storage_config)
    client = app.test_client()
    root = Path(local_storage_config["UPLOAD_DIR"])
    before = post_file(client, image_bytes(RED)).get_json()
    shutil.rmtree(root)
    root.write_text("a file where the upload folder was")
    r = post_file(client, image_bytes(RED))
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "storage"
    assert "Traceback" not in r.get_data(as_text=True)
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json()["storage"]["ok"] is False
    # an upload stored before cannot be looked up while its database is unreadable: that is the
    # store failing (503 storage), never "no such upload" (404)
    earlier = client.get(f"/uploads/{before['id']}")
    assert earlier.status_code == 503 and earlier.get_json()["error"]["code"] == "storage"
    root.unlink()
    after = post_file(client, image_bytes(BLUE))
    assert after.status_code == 200 and client.get(after.get_json()["image_url"]).data == image_bytes(BLUE)
    assert client.get("/readyz").status_code == 200


def test_a_database_outage_is_503_then_recovers(make_app, colour_model_path, tmp_path):
    from services import running_postgres

    with running_postgres() as pg:
        app = make_app(MODEL_PATH=str(colour_model_path), DATABASE_URL=pg.url())
        client = app.test_client()
        first = post_file(client, image_bytes(RED)).get_json()
        pg.stop()
        r = post_file(client, image_bytes(RED))
        assert r.status_code == 503 and r.get_json()["error"]["code"] == "storage"
        assert "127.0.0.1" not in r.get_data(as_text=True)  # details go to the log, not the client
        assert client.get(f"/uploads/{first['id']}").status_code == 503
        assert client.get("/readyz").status_code == 503
        pg.start()
        assert client.get(first["image_url"]).data == image_bytes(RED)
        assert post_file(client, image_bytes(BLUE)).status_code == 200
        assert client.get("/readyz").status_code == 200
        app.extensions["classifier"].close()  # before the database goes away for good


def test_kill_9_during_concurrent_uploads_loses_no_answered_upload(colour_model_path, storage_config, tmp_path):
    args = ["--model", str(colour_model_path), "--upload-dir", storage_config["UPLOAD_DIR"]]
    if storage_config.get("DATABASE_URL"):
        args += ["--database-url", storage_config["DATABASE_URL"], "--image-store", storage_config["IMAGE_STORE"]]
    env = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    answered: dict[str, bytes] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def client(n: int) -> None:
        session = requests.Session()
        i = 0
        while not stop.is_set():
            data = image_bytes(RED if (n + i) % 2 else BLUE, (64 + n, 48 + i % 50), fmt="PNG") + bytes([n, i % 256])
            i += 1
            try:
                r = session.post(server.url + "/file/", files={"file": ("x.png", data)}, timeout=30)
            except requests.RequestException:
                continue  # the connection died with the server: never answered, nothing promised
            if r.status_code == 200:
                with lock:
                    answered[r.json()["id"]] = data

    server = ServerProcess(*args, env=env)
    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(answered) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(server.proc.pid, signal.SIGKILL)  # mid-flight: uploads are being written right now
    server.proc.wait(timeout=30)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert len(answered) >= 40, "too few uploads were answered before the kill to prove anything"

    restarted = ServerProcess(*args, env=env)
    try:
        session = requests.Session()
        for upload_id, data in answered.items():
            r = session.get(f"{restarted.url}/uploads/{upload_id}", timeout=10)
            assert r.status_code == 200 and r.content == data, upload_id
        assert post_over_http(restarted.url, image_bytes(RED)).status_code == 200
    finally:
        restarted.stop()


def test_the_server_starts_while_the_database_is_down_and_serves_once_it_is_up(make_app, colour_model_path):
    from services import running_postgres

    with running_postgres() as pg:
        pg.stop()
        app = make_app(MODEL_PATH=str(colour_model_path), DATABASE_URL=pg.url(), STORE_CHECK_INTERVAL_S=0.2)
        client = app.test_client()
        assert client.get("/readyz").status_code == 503
        assert post_file(client, image_bytes(RED)).status_code == 503
        pg.start()
        # /readyz says what the background check last found (it never waits on the database
        # itself): ready again within a check interval
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/readyz").status_code == 200
        body = post_file(client, image_bytes(RED)).get_json()  # the schema is made on the way
        assert client.get(body["image_url"]).data == image_bytes(RED)
        app.extensions["classifier"].close()
