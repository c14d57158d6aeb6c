"""A model file is hostile input: nothing in it runs, and its weights cannot take the memory.

Every hostile file here is built by the test. The Lambda payload writes a marker file when it
runs, so each route that must not run it (load_keras_model, ServedModel.load, the model CLI in
its own process, POST /api/models, python app.py) is checked by the marker's absence, besides
its answer naming the layer. --trust-model-code (the command line only) is the one way in.
"""
from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py
import numpy as np
import pytest

from keras_serve.errors import ModelCodeRefused, ModelFileRefused, ModelLoadError, ModelTooLarge
from keras_serve.model import file_safety
from keras_serve.model.config_safety import check_config
from keras_serve.model.file_safety import TRUST_WARNING, check_model_file
from keras_serve.model.keras_formats import load_keras_model

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "model-admin-token-" + "s4" * 8
BEARER = {"Authorization": f"Bearer {TOKEN}"}
SIZE = 32  # the colour model's input: the hostile models take the same images


def payload(marker: Path):
    """A lambda that leaves `marker` behind when it runs (its path is a constant in its bytecode)."""
    return eval(f"lambda x: (__import__('pathlib').Path({str(marker)!r}).write_text('ran'), x)[1]")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """tf_keras and Keras 3 models whose Lambda writes the marker, saved as .h5 and .keras."""
    import keras
    import tf_keras

    folder = tmp_path_factory.mktemp("hostile")
    marker = folder / "payload-ran"

    m2 = tf_keras.Sequential([tf_keras.layers.InputLayer(input_shape=(SIZE, SIZE, 3)),
                              tf_keras.layers.Lambda(payload(marker), name="lambda_1"),
                              tf_keras.layers.GlobalAveragePooling2D(),
                              tf_keras.layers.Dense(1, activation="sigmoid")])
    m2.save(str(folder / "lambda.h5"), save_format="h5")
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Lambda(payload(marker), name="sneaky")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    m3 = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
    m3.save(folder / "lambda3.keras")
    m3.save(folder / "lambda3.h5")
    marker.unlink(missing_ok=True)  # building them ran it; loading must not
    return {"marker": marker, "h5": folder / "lambda.h5", "keras": folder / "lambda3.keras",
            "keras_h5": folder / "lambda3.h5", "folder": folder}


@pytest.fixture(autouse=True)
def no_marker_before(request):
    if "hostile" in request.fixturenames:
        request.getfixturevalue("hostile")["marker"].unlink(missing_ok=True)


def edited_h5(source: Path, target: Path, change) -> Path:
    """A copy of an .h5 model whose model_config went through `change(config)`."""
    target.write_bytes(source.read_bytes())
    with h5py.File(target, "a") as f:
        config = json.loads(f.attrs["model_config"])
        change(config)
        f.attrs["model_config"] = json.dumps(config)
    return target


def edited_keras(source: Path, target: Path, change=None, extra: dict[str, bytes] | None = None,
                 compression: int = zipfile.ZIP_STORED) -> Path:
    """A copy of a .keras zip whose config.json went through `change(config)`, with `extra` members."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w", compression) as dst:
        for name in src.namelist():
            data = src.read(name)
            if name == "config.json" and change is not None:
                config = json.loads(data)
                change(config)
                data = json.dumps(config).encode()
            dst.writestr(name, data)
        for name, data in (extra or {}).items():
            dst.writestr(name, data)
    return target


def dense_layer(config: dict) -> dict:
    return next(layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense")


# --- Lambda bytecode: refused by every route, the layer named ---------------------------------

@pytest.mark.parametrize("which,layer", [("h5", "lambda_1"), ("keras", "sneaky"), ("keras_h5", "sneaky")])
def test_a_lambda_holding_bytecode_is_refused_before_it_runs(hostile, which, layer):
    with pytest.raises(ModelCodeRefused) as info:
        load_keras_model(hostile[which])
    assert info.value.message == f"layer '{layer}' (Lambda) holds Python bytecode, which would run when the model " \
                                 f"is loaded"
    assert "--trust-model-code" in info.value.hint
    assert not hostile["marker"].exists()


def test_served_model_load_refuses_it_and_the_trust_flag_loads_it(hostile):
    from keras_serve.model.served_model import ServedModel
    from keras_serve.model.versions import load_for_serving
    from keras_serve.settings import resolve

    with pytest.raises(ModelCodeRefused, match="lambda_1"):
        ServedModel.load(hostile["h5"], engine="tensorflow")
    assert not hostile["marker"].exists()
    config = resolve({"ENGINE": "tensorflow"})
    with pytest.raises(ModelCodeRefused):
        load_for_serving(hostile["h5"], config)  # the server's own path, with its default settings
    assert not hostile["marker"].exists()
    served = load_for_serving(hostile["h5"], {**config, "TRUST_MODEL_CODE": True})
    assert hostile["marker"].read_text() == "ran"  # the operator's choice: their own code runs
    assert served.labels == ["CAT", "DOG"]


def run_model_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERAS_SERVE_")}
    return subprocess.run([sys.executable, "-m", "keras_serve.model", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_the_model_cli_refuses_it_and_takes_it_with_its_trust_flag(hostile, colour_model_path, tmp_path):
    from keras_serve.settings import resolve
    from keras_serve.storage.uploads import UploadStore

    uploads = tmp_path / "uploads"
    UploadStore.from_config(resolve({"UPLOAD_DIR": str(uploads)})).close()  # the store a server made
    store = ["--upload-dir", str(uploads), "--model", str(colour_model_path)]
    done = run_model_cli(*store, "publish", str(hostile["h5"]), cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "layer 'lambda_1' (Lambda) holds Python bytecode" in done.stderr
    assert not hostile["marker"].exists()
    trusted = run_model_cli(*store, "publish", "--trust-model-code", "--force", str(hostile["h5"]), cwd=ROOT)
    assert trusted.returncode == 0, trusted.stderr
    assert f"WARNING: {TRUST_WARNING}" in trusted.stderr and "published lambda.h5" in trusted.stderr
    assert hostile["marker"].exists()


def test_http_publish_answers_422_naming_the_layer_even_on_a_trusting_server(hostile, make_app, colour_model_path):
    app = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN, MODEL_CHECK_INTERVAL_S=0,
                   TRUST_MODEL_CODE=True)  # the operator trusts their own --model, never an upload
    client = app.test_client()
    r = client.post("/api/models", headers=BEARER, content_type="multipart/form-data",
                    data={"model": (io.BytesIO(hostile["h5"].read_bytes()), "innocent.h5")})
    assert r.status_code == 422, r.get_data(as_text=True)
    error = r.get_json()["error"]
    assert error["code"] == "candidate_refused"
    assert "layer 'lambda_1' (Lambda) holds Python bytecode" in error["message"]
    assert "/tmp" not in error["message"] and "keras-serve-candidate" not in error["message"]
    assert not hostile["marker"].exists()
    assert client.get("/api/models", headers=BEARER).get_json()["versions"] == []


def test_app_py_refuses_it_whatever_the_environment_and_warns_loudly_with_the_flag(hostile):
    from server_process import ServerProcess

    env = {**os.environ, "KERAS_SERVE_TRUST_MODEL_CODE": "true"}  # not a way in: a flag only
    done = subprocess.run([sys.executable, "app.py", "--model", str(hostile["h5"]), "--port", "0",
                           "--upload-dir", str(hostile["folder"] / "uploads")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert "error: layer 'lambda_1' (Lambda) holds Python bytecode" in done.stderr
    assert not hostile["marker"].exists()
    with ServerProcess("--model", str(hostile["h5"]), "--trust-model-code", "--engine", "tensorflow",
                       "--log-format", "text", "--upload-dir", str(hostile["folder"] / "uploads")) as srv:
        output = srv.output()
    assert "WARNING" in output and TRUST_WARNING in output
    assert hostile["marker"].exists()


# --- classes, modules and functions outside Keras ---------------------------------------------

@pytest.fixture(scope="module")
def keras3_files(tmp_path_factory):
    from conftest import build_colour_model

    folder = tmp_path_factory.mktemp("keras3")
    model = build_colour_model()
    model.save(folder / "colour.keras")
    model.save(folder / "colour.h5")
    return folder


def test_a_custom_class_a_module_outside_keras_and_a_custom_registered_name_are_refused(keras3_files, tmp_path):
    source = keras3_files / "colour.keras"
    dense = r"layer 'dense(_\d+)?'"  # Keras numbers layer names per process
    cases = {
        "custom class": (lambda c: dense_layer(c).update(class_name="MyDense"),
                         rf"{dense} \(MyDense\) is not a class built into Keras"),
        "module": (lambda c: dense_layer(c).update(module="evil_package.layers"),
                   rf"{dense} \(Dense\) names the Python module 'evil_package.layers', outside Keras"),
        "registered": (lambda c: dense_layer(c).update(registered_name="Custom>Dense"),
                       rf"{dense} \(Dense\) is registered as 'Custom>Dense', a custom object outside Keras"),
        "initializer": (lambda c: dense_layer(c)["config"]["kernel_initializer"].update(module="os"),
                        rf"{dense} \(Dense\): its kernel_initializer is the class 'GlorotUniform', which names "
                        "the Python module 'os'"),
        "activation": (lambda c: dense_layer(c)["config"].update(activation="my_activation"),
                       rf"{dense} \(Dense\) uses the activation 'my_activation', which is not one of Keras's"),
    }
    for name, (change, message) in cases.items():
        path = edited_keras(source, tmp_path / f"{name.replace(' ', '_')}.keras", change)
        with pytest.raises(ModelCodeRefused) as info:
            load_keras_model(path)
        assert re.match(message, info.value.message), (name, info.value.message)
    h5 = edited_h5(keras3_files / "colour.h5", tmp_path / "custom.h5",
                   lambda c: dense_layer(c).update(class_name="MyDense"))
    with pytest.raises(ModelCodeRefused, match=r"layer 'dense(_\d+)?' \(MyDense\)"):
        load_keras_model(h5)


def lambda_layer(function, function_type="lambda", name="inner"):
    return {"class_name": "Lambda", "config": {"name": name, "function": function, "function_type": function_type,
                                               "module": "__main__", "output_shape_type": "raw", "arguments": {}}}


BYTECODE = ["4wEAAAAAAAAAAAAAAAIAAAADAAAA8w==", None, None]


@pytest.mark.parametrize("config,message", [
    # Lambdas anywhere: inside wrappers, nested models, Bidirectional's backward layer
    ({"class_name": "Sequential", "config": {"name": "outer", "layers": [
        {"class_name": "TimeDistributed", "config": {"name": "td", "layer": lambda_layer(BYTECODE)}}]}},
     "layer 'inner' (Lambda) holds Python bytecode"),
    ({"class_name": "Functional", "config": {"name": "outer", "layers": [
        {"class_name": "Sequential", "config": {"name": "nested", "layers": [lambda_layer(BYTECODE, name="deep")]}}]}},
     "layer 'deep' (Lambda) holds Python bytecode"),
    ({"class_name": "Sequential", "config": {"name": "outer", "layers": [
        {"class_name": "Bidirectional", "config": {"name": "bi", "layer": {"class_name": "LSTM", "config": {
            "name": "fw", "units": 2}}, "backward_layer": lambda_layer(BYTECODE, name="bw")}}]}},
     "layer 'bw' (Lambda) holds Python bytecode"),
    # a named function that is not a Keras built-in, or a function type other than a name
    ({"class_name": "Sequential", "config": {"name": "m", "layers": [lambda_layer("system", "function")]}},
     "layer 'inner' (Lambda) calls the Python function '__main__.system'"),
    ({"class_name": "Sequential", "config": {"name": "m", "layers": [lambda_layer("x", "raw")]}},
     "layer 'inner' (Lambda) has a function of type 'raw'"),
    ({"class_name": "Sequential", "config": {"name": "m", "layers": [
        {"class_name": "Lambda", "config": {"name": "k3", "function": {
            "module": "os", "class_name": "function", "config": "system", "registered_name": "function"}}}]}},
     "layer 'k3' (Lambda) calls the Python function 'os.system' as its function"),
    ({"class_name": "Sequential", "config": {"name": "m", "layers": [
        {"class_name": "Lambda", "config": {"name": "k3", "function": {
            "class_name": "__lambda__", "config": {"code": "4wEAAA==", "defaults": None, "closure": None}}}}]}},
     "layer 'k3' (Lambda) holds Python bytecode"),
    # Keras built-ins that load other models or files, and TensorFlow calls outside math
    ({"class_name": "Functional", "config": {"name": "m", "layers": [
        {"class_name": "TFSMLayer", "config": {"name": "sm", "filepath": "/etc"}}]}},
     "layer 'sm' (TFSMLayer) loads a TensorFlow SavedModel from a path"),
    ({"class_name": "Functional", "config": {"name": "m", "layers": [
        {"class_name": "TFOpLambda", "config": {"name": "w", "function": "io.write_file"}}]}},
     "layer 'w' (TFOpLambda) calls the TensorFlow function 'tf.io.write_file'"),
    ({"class_name": "Functional", "config": {"name": "m", "layers": [
        {"class_name": "StringLookup", "config": {"name": "vocab", "vocabulary": "/etc/passwd"}}]}},
     "layer 'vocab' (StringLookup) reads its vocabulary from a file path"),
    ({"class_name": "MyModel", "config": {"name": "mine", "layers": []}},
     "model 'mine' (MyModel) is not a class built into Keras"),
])
def test_the_config_walk_finds_code_wherever_it_hides(config, message):
    with pytest.raises(ModelCodeRefused) as info:
        check_config(config, with_tf_keras=True)
    assert info.value.message.startswith(message), info.value.message


def test_built_in_layers_activations_and_tensorflow_math_pass(tmp_path):
    import tensorflow as tf
    import tf_keras

    inputs = tf_keras.Input((SIZE, SIZE, 3))
    x = tf_keras.layers.Conv2D(2, 3, activation="relu", kernel_regularizer="l2")(inputs)
    x = tf.nn.relu(x * 2.0 + 1)[:, :, :, :1]  # recorded as TFOpLambda / SlicingOpLambda layers
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf_keras.layers.Dense(1, activation="sigmoid", kernel_constraint="max_norm")(x)
    tf_keras.Model(inputs, outputs).save(str(tmp_path / "ops.h5"), save_format="h5")
    loaded = load_keras_model(tmp_path / "ops.h5")
    assert loaded.loader == "tf_keras"
    assert np.asarray(loaded.model(np.zeros((1, SIZE, SIZE, 3), "float32"))).shape == (1, 1)


def test_a_bfloat16_model_passes_its_weights_are_opaque_two_byte_numbers(tmp_path):
    import keras

    keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, dtype="bfloat16")]).save(tmp_path / "bf16.keras")
    assert load_keras_model(tmp_path / "bf16.keras").loader == "keras"


@pytest.mark.parametrize("path", sorted((ROOT / "models").rglob("*.h5")), ids=lambda p: p.name)
def test_the_shipped_models_pass_the_inspection(path):
    check_model_file(path, "hdf5")  # (tests elsewhere load and serve them)


# --- declared sizes: refused before anything is allocated ------------------------------------

def declare_huge_kernel(source: Path, target: Path, shape=(16384, 16384)) -> Path:
    """The colour model with its Dense kernel declared 1 GiB of float32 and never written: HDF5
    would hand back fill values, so the file stays small."""
    target.write_bytes(source.read_bytes())
    with h5py.File(target, "a") as f:
        names = []
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim == 2 else None)
        parent, leaf = names[0].rsplit("/", 1)
        del f[names[0]]
        f[parent].create_dataset(leaf, shape=shape, dtype="float32", fillvalue=0.5)
    return target


def test_a_1_gib_declared_kernel_is_refused_quickly_with_the_sizes_in_the_message(keras3_files, tmp_path):
    bomb = declare_huge_kernel(keras3_files / "colour.h5", tmp_path / "bomb.h5")
    assert bomb.stat().st_size < 1024 * 1024
    with pytest.raises(ModelTooLarge) as info:
        load_keras_model(bomb, max_weight_bytes=64 * 1024 * 1024)
    assert info.value.message == ("its weights declare 1,024.0 MB, over the budget of 64.0 MB "
                                  "(MODEL_MAX_WEIGHT_BYTES)")
    assert "MODEL_MAX_WEIGHT_BYTES" in info.value.hint


def test_at_the_default_budget_a_1_gib_declared_kernel_is_refused(keras3_files, tmp_path):
    """The attack as found: a small file declaring a 1 GiB kernel, checked with no budget given."""
    bomb = declare_huge_kernel(keras3_files / "colour.h5", tmp_path / "bomb.h5")
    with pytest.raises(ModelTooLarge) as info:
        load_keras_model(bomb)
    assert "over the budget of 768.0 MB" in info.value.message


def test_the_weight_budget_setting_reaches_the_server_and_the_http_check(keras3_files, make_app, colour_model_path,
                                                                          tmp_path):
    from keras_serve.model.versions import load_for_serving
    from keras_serve.settings import resolve

    bomb = declare_huge_kernel(keras3_files / "colour.h5", tmp_path / "bomb.h5", shape=(4096, 4096))  # 64 MB
    config = resolve({"ENGINE": "tensorflow", "MODEL_MAX_WEIGHT_BYTES": 16 * 1024 * 1024})
    with pytest.raises(ModelTooLarge, match="declare 64.0 MB, over the budget of 16.0 MB"):
        load_for_serving(bomb, config)
    app = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN, MODEL_CHECK_INTERVAL_S=0,
                   MODEL_MAX_WEIGHT_BYTES=16 * 1024 * 1024)
    r = app.test_client().post("/api/models", headers=BEARER, content_type="multipart/form-data",
                               data={"model": (io.BytesIO(bomb.read_bytes()), "bomb.h5")})
    assert r.status_code == 422, r.get_data(as_text=True)
    assert "declare 64.0 MB, over the budget of 16.0 MB" in r.get_json()["error"]["message"]


def test_a_keras_zip_declaring_a_huge_kernel_in_its_weights_is_refused(keras3_files, tmp_path):
    source = keras3_files / "colour.keras"
    with zipfile.ZipFile(source) as zf:
        (tmp_path / "w.h5").write_bytes(zf.read("model.weights.h5"))
    declare_huge_kernel(tmp_path / "w.h5", tmp_path / "huge.h5")
    target = tmp_path / "huge.keras"
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for name in src.namelist():
            dst.writestr(name, (tmp_path / "huge.h5").read_bytes() if name == "model.weights.h5" else src.read(name))
    with pytest.raises(ModelTooLarge, match="declare 1,024.0 MB"):
        load_keras_model(target, max_weight_bytes=64 * 1024 * 1024)


def test_storage_outside_the_file_is_refused(keras3_files, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 64)

    def variant(name: str, make) -> Path:
        path = tmp_path / f"{name}.h5"
        path.write_bytes((keras3_files / "colour.h5").read_bytes())
        with h5py.File(path, "a") as f:
            make(f)
        return path

    external = variant("external", lambda f: f.create_dataset("model_weights/x", shape=(16,), dtype="float32",
                                                              external=[(str(secret), 0, 64)]))
    linked = variant("linked", lambda f: f.__setitem__("model_weights/y", h5py.ExternalLink(str(secret), "/data")))
    soft = variant("soft", lambda f: f.__setitem__("model_weights/z", h5py.SoftLink("/model_weights")))

    def make_virtual(f):
        layout = h5py.VirtualLayout(shape=(4,), dtype="float32")
        layout[:] = h5py.VirtualSource(str(secret), "data", shape=(4,))
        f.create_virtual_dataset("model_weights/v", layout)

    virtual = variant("virtual", make_virtual)
    strings = variant("strings", lambda f: f.create_dataset("model_weights/s", data=np.array([b"x"], dtype=object),
                                                           dtype=h5py.string_dtype()))
    for path, message in [(external, "keeps its data in an external file"), (linked, "ExternalLink"),
                          (soft, "SoftLink"), (virtual, "is virtual"), (strings, "not numbers")]:
        with pytest.raises(ModelFileRefused, match=message):
            load_keras_model(path)


def test_zip_bombs_are_refused_from_the_archive_directory(keras3_files, tmp_path, monkeypatch):
    source = keras3_files / "colour.keras"
    deflated = edited_keras(source, tmp_path / "deflated.keras", extra={"assets/zeros": b"\0" * (4 * 1024 * 1024)},
                            compression=zipfile.ZIP_DEFLATED)
    with pytest.raises(ModelFileRefused, match="expands .* times .*: a zip bomb"):
        load_keras_model(deflated)
    crowded = edited_keras(source, tmp_path / "crowded.keras", extra={f"assets/{i}": b"" for i in range(1001)})
    with pytest.raises(ModelFileRefused, match="1,004 members, over 1,000"):
        load_keras_model(crowded)
    big = edited_keras(source, tmp_path / "big.keras", extra={"assets/big": b"\1" * (3 * 1024 * 1024)})
    monkeypatch.setattr(file_safety, "ARCHIVE_EXTRA_BYTES", 1024 * 1024)  # (128 MB: too slow to write here)
    with pytest.raises(ModelTooLarge, match=r"archive unpacks to 3\.\d MB, over the weight budget of 1\.0 MB"):
        check_model_file(big, "zip", max_weight_bytes=1024 * 1024)


# --- the flag is the command line's only ------------------------------------------------------

def test_trust_is_a_flag_and_never_an_environment_variable():
    from keras_serve import settings
    from keras_serve.cli import parse_args
    from keras_serve.model.__main__ import build_parser

    assert "TRUST_MODEL_CODE" not in settings.from_environment({"KERAS_SERVE_TRUST_MODEL_CODE": "true"})
    assert settings.resolve()["TRUST_MODEL_CODE"] is False
    assert settings.from_arguments(parse_args(["--trust-model-code"]))["TRUST_MODEL_CODE"] is True
    assert build_parser().parse_args(["publish", "--trust-model-code", "m.h5"]).trust_model_code is True
    assert "KERAS_SERVE_TRUST_MODEL_CODE" not in settings.markdown_table()


def test_refusals_are_model_load_errors_so_every_route_reports_them_as_it_does_a_broken_file():
    assert issubclass(ModelCodeRefused, ModelFileRefused) and issubclass(ModelTooLarge, ModelFileRefused)
    assert issubclass(ModelFileRefused, ModelLoadError)
