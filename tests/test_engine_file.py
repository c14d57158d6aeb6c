"""An int8 engine file (`optimize`'s .onnx and its card) served as a model version."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from images import BLUE, RED, image_bytes
from test_quantize import build_conv_colour_model, write_photos
from uploading import post_file

TOKEN = "engine-file-admin-" + "k3" * 8


def cli(*args: str) -> int:
    from keras_serve.model.__main__ import main

    return main(list(args))


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def variant(tmp_path_factory):
    """conv_colour.h5 (red DOG, blue CAT, as the colour model) and its int8 variant with card."""
    root = tmp_path_factory.mktemp("variant")
    float_path = root / "conv_colour.h5"
    build_conv_colour_model().save(float_path)
    write_photos(root / "calibration", 6, seed=3)
    write_photos(root / "validation", 6, seed=4)
    assert cli("optimize", str(float_path), "--calibrate", str(root / "calibration"),
               "--validate", str(root / "validation")) == 0
    return float_path, root / "conv_colour.int8.onnx"


def copy_variant(variant, folder, name="copy.int8.onnx"):
    _, onnx_path = variant
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    shutil.copy(onnx_path, target)
    shutil.copy(onnx_path.with_suffix(".json"), target.with_suffix(".json"))
    return target


def test_an_engine_file_serves_with_its_cards_contract(variant):
    from keras_serve.model.served_model import ServedModel
    from keras_serve.pipeline.preprocessing import preprocess

    float_path, onnx_path = variant
    model = ServedModel.load(onnx_path)
    assert model.model is None and model.engine_name == "onnxruntime"
    assert model.labels == ["CAT", "DOG"] and model.spec.input_shape == (32, 32, 3) and model.spec.scaling == "1/255"
    assert model.file_sha256 == model.info["sha256"] == sha256_of(onnx_path)
    described = model.describe()
    assert described["variant"] == "int8"
    assert described["variant_of"] == {"file": "conv_colour.h5", "sha256": sha256_of(float_path)}
    assert "int8 variant of conv_colour.h5" in model.summary_line()
    red, blue = (preprocess(image_bytes(c, fmt="PNG"), model.spec) for c in (RED, BLUE))
    answers = model.predict_batch(np.concatenate([red, blue]))
    assert [model.interpret(row).label for row in answers] == ["DOG", "CAT"]


def test_an_engine_file_needs_its_own_card_and_valid_bytes(variant, tmp_path):
    from keras_serve.errors import ModelLoadError
    from keras_serve.model.served_model import ServedModel

    copy = copy_variant(variant, tmp_path / "a")
    copy.with_suffix(".json").unlink()
    with pytest.raises(ModelLoadError, match="without its card copy.int8.json"):
        ServedModel.load(copy)

    other = copy_variant(variant, tmp_path / "b")
    other.write_bytes(other.read_bytes() + b"\0")  # no longer the file its card names
    with pytest.raises(ModelLoadError, match="describes another file"):
        ServedModel.load(other)

    garbage = copy_variant(variant, tmp_path / "c")
    garbage.write_bytes(b"not an onnx model at all")
    card = json.loads(garbage.with_suffix(".json").read_text())
    card["engine"]["sha256"] = sha256_of(garbage)
    garbage.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="not an ONNX model"):
        ServedModel.load(garbage)

    with pytest.raises(ModelLoadError, match="runs with --engine onnxruntime"):
        ServedModel.load(copy_variant(variant, tmp_path / "d"), engine="tensorflow")
    with pytest.raises(ModelLoadError, match="MODEL_MAX_WEIGHT_BYTES"):
        ServedModel.load(copy_variant(variant, tmp_path / "f"), max_weight_bytes=1000)


def test_an_engine_file_with_external_weights_is_refused(variant, tmp_path):
    import onnx

    from keras_serve.errors import ModelLoadError
    from keras_serve.model.served_model import ServedModel

    path = copy_variant(variant, tmp_path / "e")
    model = onnx.load(str(path))
    weight = model.graph.initializer[0]
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="/etc/hostname")
    path.write_bytes(model.SerializeToString())
    card = json.loads(path.with_suffix(".json").read_text())
    card["engine"]["sha256"] = sha256_of(path)
    path.with_suffix(".json").write_text(json.dumps(card))
    with pytest.raises(ModelLoadError, match="keeps weights in other files"):
        ServedModel.load(path)


def test_the_server_starts_on_an_engine_file_and_names_it_in_every_answer(make_app, variant):
    float_path, onnx_path = variant
    client = make_app(MODEL_PATH=str(onnx_path)).test_client()
    r = post_file(client, image_bytes(RED, fmt="PNG"), filename="red.png")
    assert r.status_code == 200, r.get_data(as_text=True)
    assert r.get_json()["label"] == "DOG" and r.get_json()["model_version"] == sha256_of(onnx_path)
    model = client.get("/model").get_json()
    assert model["file"] == "conv_colour.int8.onnx" and model["variant"] == "int8"
    assert model["variant_of"] == {"file": "conv_colour.h5", "sha256": sha256_of(float_path)}
    heatmap = client.get(f"/uploads/{r.get_json()['id']}/heatmap.png")  # Grad-CAM needs the Keras model
    assert heatmap.status_code == 422 and "not a Keras model" in heatmap.get_json()["error"]["message"]


def test_an_int8_variant_is_published_promoted_and_rolled_back_like_any_version(
        make_app, colour_model_path, variant, capsys):
    float_path, onnx_path = variant
    app = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN, MODEL_CHECK_INTERVAL_S=0)
    store = ["--upload-dir", app.config["UPLOAD_DIR"], "--model", app.config["MODEL_PATH"]]
    client, service = app.test_client(), app.extensions["classifier"]
    assert cli(*store, "promote", str(onnx_path)) == 0, capsys.readouterr().err
    assert "promoted conv_colour.int8.onnx" in capsys.readouterr().err
    assert service.follower.check() == "swapped"
    answer = post_file(client, image_bytes(RED, fmt="PNG"), filename="red.png").get_json()
    assert answer["label"] == "DOG" and answer["model_version"] == sha256_of(onnx_path)
    model = client.get("/model").get_json()
    assert model["variant"] == "int8" and model["variant_of"]["sha256"] == sha256_of(float_path)
    assert cli(*store, "list") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["served"]["file"] == "conv_colour.int8.onnx"
    assert cli(*store, "rollback") == 0 and service.follower.check() == "swapped"
    assert client.get("/model").get_json()["sha256"] == sha256_of(colour_model_path)


def test_a_variant_its_card_marks_not_promotable_is_promoted_only_with_force(
        make_app, colour_model_path, variant, tmp_path, capsys):
    path = copy_variant(variant, tmp_path / "worse", "worse.int8.onnx")
    card = json.loads(path.with_suffix(".json").read_text())
    card.update(promotable=False, not_promotable_because="validation accuracy drops 1.2 points")
    path.with_suffix(".json").write_text(json.dumps(card))
    app = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN, MODEL_CHECK_INTERVAL_S=0)
    store = ["--upload-dir", app.config["UPLOAD_DIR"], "--model", app.config["MODEL_PATH"]]

    assert cli(*store, "promote", str(path)) == 2
    err = capsys.readouterr().err
    assert "worse.int8.onnx is not promotable: validation accuracy drops 1.2 points; --force promotes it anyway" in err
    assert cli(*store, "list") == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["served"] is None and [v["file"] for v in listed["versions"]] == ["worse.int8.onnx"]

    sha = sha256_of(path)
    r = app.test_client().post(f"/api/models/{sha}/promote", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422 and "not promotable" in r.get_json()["error"]["message"]

    assert cli(*store, "promote", sha, "--force") == 0
    assert app.extensions["classifier"].follower.check() == "swapped"
    assert app.test_client().get("/model").get_json()["sha256"] == sha
