"""keras_formats.load_keras_model: every file format loads and predicts what its weights say.

Reference outputs come from `legacy_fixtures` (a NumPy forward pass for the blog CNN), so a
load that builds the right shapes but scrambles or drops weights fails here.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py
import numpy as np
import pytest

import keras_serve.model.keras_formats as keras_formats
from keras_serve.errors import ModelLoadError
from keras_serve.model.keras_formats import LoadedKeras, load_keras_model, patch_legacy_config
from legacy_fixtures import (
    ATOL,
    KERAS2_VERSIONS,
    Fixture,
    write_keras2_h5,
    write_keras2_weights_h5,
    write_keras3_model,
    write_keras3_weights,
    write_tf_keras_h5,
)

REPO = Path(__file__).resolve().parent.parent


def predict(loaded: LoadedKeras, x: np.ndarray) -> np.ndarray:
    return np.asarray(loaded.model(x, training=False))


def assert_reproduces(loaded: LoadedKeras, fx: Fixture) -> None:
    assert np.ptp(fx.expected) > 1e-3, "fixture outputs must differ per input to be a real check"
    np.testing.assert_allclose(predict(loaded, fx.inputs), fx.expected, atol=ATOL, rtol=0)


def load_error(path: Path, arch: str | None = None) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load_keras_model(path, arch)
    err = info.value
    assert "\n" not in err.message, "the message must be one line"
    assert err.hint, "every failure says what to do"
    assert "Traceback" not in err.message
    return err


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("keras_files")


# --- full models of every era ---------------------------------------------------------------
@pytest.mark.parametrize("version", KERAS2_VERSIONS)
def test_standalone_keras2_sequential_h5_loads_with_its_weights(files, version):
    fx = write_keras2_h5(files / f"seq_{version}.h5", keras_version=version)
    loaded = load_keras_model(fx.path)
    assert loaded.loader == "tf_keras"
    assert loaded.keras_version == version
    assert_reproduces(loaded, fx)


@pytest.mark.parametrize("version", KERAS2_VERSIONS)
def test_standalone_keras2_functional_h5_loads_with_its_weights(files, version):
    fx = write_keras2_h5(files / f"fn_{version}.h5", keras_version=version, functional=True)
    loaded = load_keras_model(fx.path)
    assert (loaded.loader, loaded.keras_version) == ("tf_keras", version)
    assert_reproduces(loaded, fx)


def test_keras3_alone_still_fails_on_the_keras22_sequential_fixture(files):
    # Guards the routing decision: if Keras 3 ever loads these, tf_keras may be dropped.
    import keras

    fx = write_keras2_h5(files / "k3_direct_224.h5", keras_version="2.2.4")
    with pytest.raises(Exception, match="Kernel shape must have the same length as input"):
        keras.saving.load_model(fx.path, compile=False)


def test_real_size_keras2_sequential_150px(files):
    fx = write_keras2_h5(files / "seq_224_150.h5", keras_version="2.2.4", input_shape=(150, 150, 3), batch=2)
    assert_reproduces(load_keras_model(fx.path), fx)


def test_tf_keras_2x_h5_loads(files):
    fx = write_tf_keras_h5(files / "tf_keras.h5")
    loaded = load_keras_model(fx.path)
    import tf_keras

    assert (loaded.loader, loaded.keras_version) == ("tf_keras", tf_keras.__version__)
    assert_reproduces(loaded, fx)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_keras3_file_loads(files, suffix):
    import keras

    fx = write_keras3_model(files / f"k3{suffix}")
    loaded = load_keras_model(fx.path)
    assert (loaded.loader, loaded.keras_version) == ("keras", keras.__version__)
    assert_reproduces(loaded, fx)


def test_format_is_read_from_content_not_name(files, tmp_path):
    # People rename files: a .keras zip called .h5, an HDF5 model called .hdf5 or .model
    zipped = write_keras3_model(files / "renamed.keras")
    as_h5 = tmp_path / "really_a_zip.h5"
    shutil.copy(zipped.path, as_h5)
    assert_reproduces(load_keras_model(as_h5), zipped)

    old = write_keras2_h5(files / "renamed_224.h5")
    for name in ("old.hdf5", "old.model"):
        shutil.copy(old.path, tmp_path / name)
        loaded = load_keras_model(tmp_path / name)
        assert loaded.keras_version == "2.2.4"
        assert_reproduces(loaded, old)

    k3_h5 = write_keras3_model(files / "k3_renamed.h5")
    shutil.copy(k3_h5.path, tmp_path / "k3.hdf5")
    assert_reproduces(load_keras_model(tmp_path / "k3.hdf5"), k3_h5)


def test_arch_is_ignored_for_full_model_files(files):
    fx = write_keras2_h5(files / "with_arch.h5")
    assert_reproduces(load_keras_model(fx.path, arch="compact"), fx)


# --- configs today's tf_keras rejects: patched in memory -----------------------------------
def _add_era_oddities(config: dict) -> None:
    # Stand-ins for what old files carry: a key the layer class no longer takes and an
    # initializer class that no longer exists.
    first = config["config"]["layers"][0]["config"]
    first["legacy_flag"] = True
    first["kernel_initializer"] = {"class_name": "LongGoneInit", "config": {}}
    config["config"]["layers"][-2]["config"]["bias_constraint"] = {"class_name": "GoneConstraint", "config": {}}


def test_config_tf_keras_rejects_is_patched_and_rebuilt(files):
    import tf_keras

    fx = write_keras2_h5(files / "oddities_224.h5", keras_version="2.2.4", config_hook=_add_era_oddities)
    with pytest.raises(Exception):  # the fallback is really exercised
        tf_keras.models.load_model(str(fx.path), compile=False)
    loaded = load_keras_model(fx.path)
    assert (loaded.loader, loaded.keras_version) == ("tf_keras", "2.2.4")
    assert_reproduces(loaded, fx)


def test_keras2_0_list_config_with_oddities_is_patched(files):
    def hook(config: dict) -> None:
        config["config"][0]["config"]["legacy_flag"] = 1  # 2.0.x: config is a bare list

    fx = write_keras2_h5(files / "oddities_208.h5", keras_version="2.0.8", config_hook=hook)
    loaded = load_keras_model(fx.path)
    assert loaded.keras_version == "2.0.8"
    assert_reproduces(loaded, fx)


def test_patch_legacy_config_keeps_shape_keys_and_drops_the_rest():
    config = {"class_name": "Sequential", "config": [
        {"class_name": "Dense", "config": {
            "name": "dense_1", "units": 3, "batch_input_shape": [None, 4], "dtype": "float32",
            "kernel_initializer": {"class_name": "Gone", "config": {}}, "W_regularizer": None, "mystery": 1}},
        {"class_name": "Bidirectional", "config": {"name": "bi", "merge_mode": "concat", "layer": {
            "class_name": "LSTM", "config": {"name": "lstm_1", "units": 2, "recurrent_initializer": "orthogonal",
                                             "legacy_only": True}}}},
    ]}
    patched = patch_legacy_config(config)
    dense = patched["config"][0]["config"]
    assert dense == {"name": "dense_1", "units": 3, "batch_input_shape": [None, 4], "dtype": "float32"}
    inner = patched["config"][1]["config"]["layer"]["config"]
    assert inner == {"name": "lstm_1", "units": 2}
    assert patched["config"][1]["config"]["merge_mode"] == "concat"
    assert config["config"][0]["config"]["mystery"] == 1, "the caller's config is not modified"


def test_keras3_is_the_last_resort_for_keras2_files(files, monkeypatch):
    import tf_keras

    def refuse(*args, **kwargs):
        raise ValueError("simulated tf_keras failure")

    fx = write_keras2_h5(files / "last_resort.h5", keras_version="2.2.4", functional=True)
    monkeypatch.setattr(tf_keras.models, "load_model", refuse)
    monkeypatch.setattr(keras_formats, "_rebuild_patched", refuse)
    loaded = load_keras_model(fx.path)
    assert (loaded.loader, loaded.keras_version) == ("keras", "2.2.4")
    assert_reproduces(loaded, fx)


def test_unknown_custom_layer_is_one_line_naming_it_with_a_hint(files):
    def hook(config: dict) -> None:
        config["config"]["layers"][1] = {"class_name": "MyFancyActivation",
                                         "config": {"name": "activation_1", "trainable": True}}

    fx = write_keras2_h5(files / "custom_224.h5", config_hook=hook)
    err = load_error(fx.path)  # refused before any loader reads it (file_safety), naming the layer
    assert "layer 'activation_1' (MyFancyActivation)" in err.message and "not a class built into Keras" in err.message
    assert "custom classes" in err.hint and "--trust-model-code" in err.hint


def test_keras2_weights_that_do_not_fit_their_config(files, tmp_path):
    fx = write_keras2_h5(files / "bad_weights_224.h5")
    broken = tmp_path / "bad.h5"
    shutil.copy(fx.path, broken)
    with h5py.File(broken, "a") as f:
        del f["model_weights/dense_1/dense_1/kernel:0"]
        f["model_weights/dense_1"].create_dataset("dense_1/kernel:0", data=np.zeros((7, 64), "float32"))
    err = load_error(broken)
    assert str(broken) in err.message and "2.2.4" in err.message


# --- weights-only files ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def keras2_seed_weights(files) -> Fixture:
    return write_keras2_weights_h5(files / "seed_k2_weights.h5")


@pytest.fixture(scope="module")
def keras3_seed_weights(files) -> Fixture:
    return write_keras3_weights(files / "seed.weights.h5", arch="seed")


@pytest.fixture(scope="module")
def keras3_compact_weights(files) -> Fixture:
    return write_keras3_weights(files / "compact.weights.h5", arch="compact")


@pytest.mark.parametrize("which", ["keras2_seed_weights", "keras3_seed_weights", "keras3_compact_weights"])
def test_weights_only_without_arch_says_so(which, request):
    fx: Fixture = request.getfixturevalue(which)
    err = load_error(fx.path)
    assert err.message == f"{fx.path} holds weights but no architecture (written by save_weights)"
    assert err.hint == "save it with model.save(...) or pass --arch seed|compact|resnet"


def test_keras2_layout_weights_with_arch(keras2_seed_weights):
    loaded = load_keras_model(keras2_seed_weights.path, arch="seed")
    assert (loaded.loader, loaded.keras_version) == ("keras", "2.2.4")
    assert_reproduces(loaded, keras2_seed_weights)


@pytest.mark.parametrize("which,arch", [("keras3_seed_weights", "seed"), ("keras3_compact_weights", "compact")])
def test_keras3_layout_weights_with_arch(which, arch, request):
    fx: Fixture = request.getfixturevalue(which)
    loaded = load_keras_model(fx.path, arch=arch)
    assert (loaded.loader, loaded.keras_version) == ("keras", None)
    assert_reproduces(loaded, fx)


def test_keras3_layout_weights_under_a_plain_h5_name(keras3_seed_weights, tmp_path):
    plain = tmp_path / "seed_weights.h5"
    shutil.copy(keras3_seed_weights.path, plain)
    assert_reproduces(load_keras_model(plain, arch="seed"), keras3_seed_weights)


@pytest.mark.parametrize("which,arch", [
    ("keras2_seed_weights", "compact"),
    ("keras3_seed_weights", "compact"),
    ("keras3_compact_weights", "seed"),
])
def test_weights_for_another_arch_are_refused(which, arch, request):
    fx: Fixture = request.getfixturevalue(which)
    err = load_error(fx.path, arch=arch)
    assert err.message.startswith(f"weights in {fx.path} do not fit the '{arch}' architecture: ")
    assert "--arch" in err.hint


def test_seed_weights_of_another_input_size_are_refused(files):
    small = write_keras2_weights_h5(files / "seed_32px_weights.h5", input_shape=(32, 32, 3))
    err = load_error(small.path, arch="seed")
    assert "do not fit the 'seed' architecture" in err.message and "(256, 64)" in err.message


def test_unknown_arch_is_refused(keras2_seed_weights):
    err = load_error(keras2_seed_weights.path, arch="vgg16")
    assert err.message == f"unknown architecture 'vgg16' for weights file {keras2_seed_weights.path}"
    assert err.hint == "pass --arch seed|compact|resnet"


# --- everything that is not a loadable model file ---------------------------------------------
def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _plain_hdf5(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.zeros((2, 2)))
    return path


def _zip_without_config(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("README.txt", "hello")
    return path


def _savedmodel_dir(path: Path) -> Path:
    (path / "variables").mkdir(parents=True)
    (path / "saved_model.pb").write_bytes(b"\x08\x01\x12")
    return path


@pytest.mark.parametrize("make,expected_message", [
    (lambda p: p / "missing.h5", "model file not found: {p}"),
    (lambda p: p, "model path is a directory, not a model file: {p}"),
    (lambda p: _savedmodel_dir(p / "export"),
     "TensorFlow SavedModel directories are not supported, only .keras and .h5 files: {p}"),
    (lambda p: _savedmodel_dir(p / "export2") / "saved_model.pb",
     "TensorFlow SavedModel directories are not supported, only .keras and .h5 files: {p.parent}"),
    (lambda p: _write(p / "empty.h5", b""), "model file is empty (0 bytes): {p}"),
    (lambda p: _write(p / "notes.h5", b"these are my model notes\n"),
     "not a Keras model file (expected HDF5 .h5 or a .keras zip, found a text file): {p}"),
    (lambda p: _write(p / "cat.h5", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 4),
     "not a Keras model file (expected HDF5 .h5 or a .keras zip, found a JPEG image): {p}"),
    (lambda p: _write(p / "lfs.h5", b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n"),
     "not a Keras model file (expected HDF5 .h5 or a .keras zip, found a Git LFS pointer; "
     "run 'git lfs pull' to fetch the real file): {p}"),
    (lambda p: _plain_hdf5(p / "data.h5"),
     "HDF5 file is not a Keras model or weights file (no model_config, no weight layout): {p}"),
    (lambda p: _zip_without_config(p / "bundle.keras"),
     "zip archive is not a Keras .keras file (no config.json inside): {p}"),
])
def test_not_a_model_file(tmp_path, make, expected_message):
    p = make(tmp_path)
    err = load_error(p)
    assert err.message == expected_message.format(p=p)


def test_truncated_hdf5_model(files, tmp_path):
    fx = write_keras2_h5(files / "to_truncate.h5")
    cut = _write(tmp_path / "cut.h5", fx.path.read_bytes()[:4096])
    err = load_error(cut)
    assert err.message.startswith(f"cannot read HDF5 file (damaged or truncated?): {cut}")
    assert "fetch the file again" in err.hint


def test_truncated_keras_zip(files, tmp_path):
    fx = write_keras3_model(files / "to_truncate.keras")
    cut = _write(tmp_path / "cut.keras", fx.path.read_bytes()[:2000])
    err = load_error(cut)
    assert err.message == f"model file is a damaged or truncated zip archive: {cut}"


def test_keras_zip_with_a_broken_config(files, tmp_path):
    fx = write_keras3_model(files / "to_break.keras")

    def broken(name: str, change) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(fx.path) as src, zipfile.ZipFile(path, "w") as dst:
            for member in src.namelist():
                data = src.read(member)
                if member == "config.json":
                    config = json.loads(data)
                    change(config["config"]["layers"][1])
                    data = json.dumps(config).encode()
                dst.writestr(member, data)
        return path

    unknown = broken("unknown.keras", lambda layer: layer.update(class_name="NoSuchLayer"))
    err = load_error(unknown)  # refused before Keras reads it (file_safety): it would need custom code
    assert "(NoSuchLayer) is not a class built into Keras" in err.message
    unbuildable = broken("unbuildable.keras", lambda layer: layer["config"].update(filters="many"))
    err = load_error(unbuildable)
    assert err.message.startswith(f"Keras 3 could not rebuild {unbuildable} (saved by Keras ")


def test_keras1_file_gets_a_keras1_hint(files, tmp_path):
    def keras1_layer(config: dict) -> None:
        config["config"][0] = {"class_name": "Convolution2D", "config": {
            "name": "convolution2d_1", "nb_filter": 32, "nb_row": 3, "nb_col": 3,
            "batch_input_shape": [None, 32, 32, 3], "dim_ordering": "tf"}}

    fx = write_keras2_h5(files / "keras1.h5", keras_version="1.2.2", config_hook=keras1_layer)
    err = load_error(fx.path)
    assert "saved by Keras 1.2.2" in err.message
    assert err.hint.startswith("Keras 1 files are not supported")


def test_importing_and_early_failures_do_not_load_tensorflow(tmp_path):
    # The web app imports this module, and bad paths should fail instantly.
    text = _write(tmp_path / "notes.h5", b"plain text")
    code = (
        "import sys; import keras_serve.model.keras_formats as kf\n"
        "for p in ['/no/such/file.h5', sys.argv[1]]:\n"
        "    try: kf.load_keras_model(p)\n"
        "    except kf.ModelLoadError: pass\n"
        "print(sorted(m for m in ('tensorflow', 'keras', 'tf_keras') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(text)], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
