"""Model versions: publish, promote, roll back, and the swap without a restart (docs/model-versions.md).

The colour model answers DOG for red and CAT for blue; the inverted one the other way round,
so which model answered is visible in every answer, besides the version each answer names.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import pytest

from images import RED, image_bytes
from uploading import post_file

TOKEN = "model-admin-token-" + "x7" * 8
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cli(*args: str) -> int:
    from keras_serve.model.__main__ import main

    return main(list(args))


def classify(client, colour=RED) -> dict:
    r = post_file(client, image_bytes(colour, fmt="PNG"), filename="x.png")
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


@pytest.fixture()
def versioned_app(make_app, colour_model_path, tmp_path):
    """An app on the colour model that checks for promotions only when told (follower.check())."""
    return make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN, MODEL_CHECK_INTERVAL_S=0)


def store_args(app) -> list[str]:
    return ["--upload-dir", app.config["UPLOAD_DIR"], "--model", app.config["MODEL_PATH"]]


# --- the slot: requests in flight keep their model -------------------------------------------

class FakeBatcher:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeModel:
    def __init__(self, sha: str) -> None:
        self.info = {"sha256": sha, "file": f"{sha}.h5"}


def generation(sha: str):
    from keras_serve.pipeline.model_slot import Generation

    return Generation(FakeModel(sha), FakeBatcher(), heatmaps=None)


def test_a_request_in_flight_finishes_on_its_model_and_the_old_one_closes_after_it():
    from keras_serve.pipeline.model_slot import ModelSlot

    old, new = generation("a" * 64), generation("b" * 64)
    slot = ModelSlot(old)
    with slot.using() as during:
        slot.swap(new)
        assert during is old and not old.batcher.closed  # still answering the request in flight
        with slot.using() as after:
            assert after is new
    assert old.batcher.closed and not new.batcher.closed
    slot.swap(generation("c" * 64))  # nobody on `new`: closed at once
    assert new.batcher.closed


# --- the registry -----------------------------------------------------------------------------

def test_promotions_stack_and_roll_back_to_the_start_up_model(store, colour_model_path, inverted_colour_model_path):
    from keras_serve.errors import ModelVersionNotFound, NothingToRollBack
    from keras_serve.storage.model_registry import ModelRegistry

    registry = ModelRegistry(store.records, store.images)
    assert registry.served() is None
    with pytest.raises(NothingToRollBack):
        registry.rollback("ana")
    first = registry.publish(colour_model_path, ["CAT", "DOG"], "ana")
    assert registry.publish(colour_model_path, ["CAT", "DOG"], "bob") == first  # the same bytes: one version
    second = registry.publish(inverted_colour_model_path, ["CAT", "DOG"], "ana")
    assert first.sha256 == sha256_of(colour_model_path) and second.file == "inverted.h5"
    registry.promote(first.sha256, "ana")
    registry.promote(second.sha256, "ana")
    assert registry.served() == second
    assert registry.rollback("ana") == first
    assert registry.rollback("ana") is None  # past the first promotion: the start-up model
    assert [e["action"] for e in registry.history()] == ["rollback", "rollback", "promote", "promote"]
    for hostile in ("../../etc/passwd", "f" * 64, "A" * 64, ""):
        with pytest.raises(ModelVersionNotFound):
            registry.promote(hostile, "ana")
    # the files are in the shared image store, never listed as images (no sweep touches them)
    assert store.images.get_model_file(second.sha256 + ".h5") == inverted_colour_model_path.read_bytes()
    assert list(store.images.list(float("inf"))) == []


def test_a_fetched_file_is_checked_against_its_version(store, colour_model_path, tmp_path):
    from keras_serve.errors import StorageError
    from keras_serve.storage.model_registry import ModelRegistry

    registry = ModelRegistry(store.records, store.images)
    version = registry.publish(colour_model_path, ["CAT", "DOG"], "ana")
    fetched = registry.fetch(version, tmp_path / "cache")
    assert fetched.name == "colour.h5" and sha256_of(fetched) == version.sha256
    store.images.put_model_file(version.sha256 + ".h5", b"not the model")
    with pytest.raises(StorageError, match="damaged"):
        registry.fetch(version, tmp_path / "elsewhere")


# --- promote and roll back, through the CLI and the API ----------------------------------------

def test_a_promoted_model_answers_without_a_restart_and_a_rollback_brings_the_old_one_back(
        versioned_app, colour_model_path, inverted_colour_model_path, capsys):
    client = versioned_app.test_client()
    service = versioned_app.extensions["classifier"]
    old, new = sha256_of(colour_model_path), sha256_of(inverted_colour_model_path)
    before = classify(client)
    assert before["label"] == "DOG" and before["model_version"] == old

    assert cli(*store_args(versioned_app), "promote", str(inverted_colour_model_path)) == 0
    assert "promoted inverted.h5" in capsys.readouterr().err
    assert service.follower.check() == "swapped"
    after = classify(client)
    assert after["label"] == "CAT" and after["model_version"] == new  # red is CAT for the inverted model
    assert client.get(f"/uploads/{after['id']}/record").get_json()["model"] == "inverted.h5"
    model = client.get("/model").get_json()
    assert model["sha256"] == new and model["file"] == "inverted.h5" and model["versions"]["swaps"] == 1
    metrics = client.get("/metrics").get_data(as_text=True)
    assert f'keras_serve_predictions_total{{model_version="{old[:12]}"}} 1.0' in metrics
    assert f'keras_serve_predictions_total{{model_version="{new[:12]}"}} 1.0' in metrics
    assert f'keras_serve_model_info{{file="inverted.h5",model_version="{new[:12]}"}} 1.0' in metrics
    assert f'keras_serve_model_info{{file="colour.h5",model_version="{old[:12]}"}} 0.0' in metrics

    assert cli(*store_args(versioned_app), "rollback") == 0
    assert service.follower.check() == "swapped"
    assert classify(client)["model_version"] == old and client.get("/model").get_json()["sha256"] == old
    assert cli(*store_args(versioned_app), "rollback") == 2  # nothing left to roll back
    assert "No promotion is in effect" in capsys.readouterr().err


def test_a_new_process_starts_on_the_promoted_version(make_app, versioned_app, colour_model_path,
                                                      inverted_colour_model_path):
    assert cli(*store_args(versioned_app), "promote", str(inverted_colour_model_path)) == 0
    # Another process on the same store (a restart, a new worker): it serves the promoted
    # version from its first request, fetched from the store, not the --model file.
    other = make_app(MODEL_PATH=str(colour_model_path), UPLOAD_DIR=versioned_app.config["UPLOAD_DIR"])
    assert classify(other.test_client())["model_version"] == sha256_of(inverted_colour_model_path)


def test_the_cli_refuses_a_candidate_with_other_labels_or_that_does_not_load(
        versioned_app, colour_model_path, tmp_path, capsys):
    other_labels = tmp_path / "other_labels.h5"
    other_labels.write_bytes(colour_model_path.read_bytes())
    other_labels.with_suffix(".json").write_text(json.dumps({"labels": ["HOT", "COLD"]}))
    assert cli(*store_args(versioned_app), "promote", str(other_labels)) == 2
    assert "labels HOT,COLD" in capsys.readouterr().err
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    assert cli(*store_args(versioned_app), "promote", str(broken)) == 2
    assert "broken.h5 does not load" in capsys.readouterr().err
    assert cli(*store_args(versioned_app), "list") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["served"] is None and listed["versions"] == [] and listed["log"] == []


def test_a_version_the_server_refuses_keeps_the_old_model_and_the_api_rolls_it_back(
        versioned_app, inverted_colour_model_path, monkeypatch):
    from keras_serve.model.served_model import ServedModel
    from keras_serve.storage.model_registry import ModelRegistry

    client = versioned_app.test_client()
    service = versioned_app.extensions["classifier"]
    registry: ModelRegistry = versioned_app.extensions["model_registry"]
    version = registry.publish(inverted_colour_model_path, ["CAT", "DOG"], "ana")
    serving = service.model.info["sha256"]
    # This converted engine answers differently from TensorFlow (as a broken conversion would).
    monkeypatch.setattr(ServedModel, "_unfaithful", lambda self, candidate: "outputs differ by 0.3")
    r = client.post(f"/api/models/{version.sha256}/promote", headers=BEARER)
    assert r.status_code == 422, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == "candidate_refused" and "outputs differ by 0.3" in error["message"]
    assert registry.served() is None  # the promotion was rolled back: no other process tries it
    assert classify(client)["model_version"] == serving
    refused = client.get("/model").get_json()["versions"]["refused"]
    assert refused == [{"sha256": version.sha256, "reason": refused[0]["reason"]}]
    assert "differently from TensorFlow" in refused[0]["reason"]
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'keras_serve_model_changes_total{result="refused"} 1.0' in metrics


def test_the_api_promotes_and_rolls_back(versioned_app, inverted_colour_model_path):
    client = versioned_app.test_client()
    registry = versioned_app.extensions["model_registry"]
    version = registry.publish(inverted_colour_model_path, ["CAT", "DOG"], "cli")
    listed = client.get("/api/models", headers=BEARER).get_json()
    assert [v["sha256"] for v in listed["versions"]] == [version.sha256] and listed["promoted"] is None
    r = client.post(f"/api/models/{version.sha256}/promote", headers=BEARER)
    assert r.status_code == 200 and r.get_json()["serving"]["sha256"] == version.sha256
    assert classify(client)["model_version"] == version.sha256
    r = client.post("/api/models/rollback", headers=BEARER)
    assert r.status_code == 200 and r.get_json()["promoted"] is None
    assert r.get_json()["serving"]["sha256"] != version.sha256
    assert client.post("/api/models/rollback", headers=BEARER).status_code == 409
    assert client.post(f"/api/models/{'0' * 64}/promote", headers=BEARER).status_code == 404
    log = client.get("/api/models", headers=BEARER).get_json()["log"]
    assert [(e["action"], e["by"]) for e in log] == [("rollback", "api"), ("promote", "api")]  # a Bearer caller is "api"


def test_publishing_over_http_checks_the_file_and_never_uses_its_name_as_a_path(
        versioned_app, colour_model_path, inverted_colour_model_path):
    client = versioned_app.test_client()

    def publish(data: bytes, filename: str, card: bytes | None = None):
        fields = {"model": (io.BytesIO(data), filename)}
        if card is not None:
            fields["card"] = (io.BytesIO(card), "card.json")
        return client.post("/api/models", headers=BEARER, content_type="multipart/form-data", data=fields)

    r = publish(inverted_colour_model_path.read_bytes(), "../../etc/evil name.h5")
    assert r.status_code == 201, r.get_data(as_text=True)
    assert r.get_json()["published"]["file"] == "evil_name.h5"
    assert r.get_json()["published"]["sha256"] == sha256_of(inverted_colour_model_path)
    assert publish(b"weights", "model.pkl").status_code == 400
    r = client.post("/api/models", headers=BEARER, content_type="multipart/form-data", data={})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "model_request"
    r = publish(colour_model_path.read_bytes(), "relabelled.h5", json.dumps({"labels": ["HOT", "COLD"]}).encode())
    assert r.status_code == 422 and "labels HOT,COLD" in r.get_json()["error"]["message"]
    r = publish(b"\x89HDF\r\n\x1a\n" + b"\0" * 64, "broken.h5")
    assert r.status_code == 422 and "does not load" in r.get_json()["error"]["message"]
    versions = client.get("/api/models", headers=BEARER).get_json()["versions"]
    assert [v["file"] for v in versions] == ["evil_name.h5"]  # only the good one was published


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic eDp5"}])
def test_model_routes_refuse_without_the_admin_credential(versioned_app, inverted_colour_model_path, headers):
    client = versioned_app.test_client()
    sha = versioned_app.extensions["model_registry"].publish(inverted_colour_model_path, ["CAT", "DOG"], "x").sha256
    assert client.get("/api/models", headers=headers).status_code == 401
    assert client.post(f"/api/models/{sha}/promote", headers=headers).status_code == 401
    assert client.post("/api/models/rollback", headers=headers).status_code == 401
    r = client.post("/api/models", headers=headers, content_type="multipart/form-data",
                    data={"model": (io.BytesIO(b"x"), "m.h5")})
    assert r.status_code == 401
    assert versioned_app.extensions["model_registry"].served() is None


def test_model_routes_do_not_exist_without_an_admin_token(make_app, colour_model_path):
    client = make_app(MODEL_PATH=str(colour_model_path)).test_client()
    assert client.get("/api/models", headers=BEARER).status_code == 404
    assert client.post("/api/models/rollback", headers=BEARER).status_code == 404


def test_a_browser_session_needs_the_csrf_token_to_promote(versioned_app, inverted_colour_model_path):
    client = versioned_app.test_client()
    sha = versioned_app.extensions["model_registry"].publish(inverted_colour_model_path, ["CAT", "DOG"], "x").sha256
    page = client.get("/review/login", headers={"Accept": "text/html"})
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True)).group(1)
    assert client.post("/review/login", data={"csrf_token": csrf, "token": TOKEN, "name": "ana"}).status_code == 303
    assert client.get("/api/models").status_code == 200  # the session cookie works for reading
    assert client.post(f"/api/models/{sha}/promote").status_code == 400  # but a change needs the token
    assert versioned_app.extensions["model_registry"].served() is None


def test_a_version_that_fails_its_warm_up_is_refused_once(versioned_app, inverted_colour_model_path, monkeypatch):
    from keras_serve.model.served_model import ServedModel

    service = versioned_app.extensions["classifier"]
    registry = versioned_app.extensions["model_registry"]
    registry.promote(registry.publish(inverted_colour_model_path, ["CAT", "DOG"], "ana").sha256, "ana")
    calls = []

    def broken(self, batch):
        calls.append(len(batch))
        raise RuntimeError("out of memory in the engine")

    monkeypatch.setattr(ServedModel, "predict_batch", broken)
    assert service.follower.check() == "refused"
    assert "fails its warm-up: RuntimeError" in service.follower.refused[sha256_of(inverted_colour_model_path)]
    tried = len(calls)
    assert service.follower.check() == "same" and len(calls) == tried  # not loaded again every round
