"""Write Keras model files of every era, offline, and know what they must predict.

Every writer returns a `Fixture(path, inputs, expected)`: `expected` is what a correct
loader's `model(inputs, training=False)` gives. For the "blog" model (the 2017 Keras-blog
cats-vs-dogs CNN, the same weight layout as `architectures.build_seed`) `expected` comes
from a NumPy forward pass, so it is independent of both Keras libraries.

The Keras 2.0-2.3 files are written byte-for-byte in that era's layout with h5py alone
(no TensorFlow import), because no installable Keras can write them any more:

    root attrs   keras_version, backend, model_config (JSON), training_config (JSON)
    model_weights/                      attrs layer_names, keras_version, backend
        conv2d_1/                       attrs weight_names = [b"conv2d_1/kernel:0", ...]
            conv2d_1/kernel:0           dataset
    optimizer_weights/                  (ignored by compile=False loaders)

Usage from any test:

    from legacy_fixtures import write_keras2_h5
    fx = write_keras2_h5(tmp_path / "old.h5", keras_version="2.2.4")
    np.testing.assert_allclose(model(fx.inputs, training=False), fx.expected, atol=1e-5)
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

import h5py
import numpy as np

ATOL = 1e-5  # float32 Keras vs float64 NumPy on this small net stays far below this
KERAS2_VERSIONS = ("2.0.8", "2.2.4", "2.3.1")

Shape = tuple[int, int, int]
# (layer name, [arrays in Keras order]) for each layer that has weights.
Weights = list[tuple[str, list[np.ndarray]]]


class Fixture(NamedTuple):
    path: Path
    inputs: np.ndarray    # float32 (N, H, W, C) in [0, 1]
    expected: np.ndarray  # float32 (N, 1): sigmoid outputs the stored weights produce


# --- the blog model: weights, a fixed batch and a NumPy forward pass ---------------------
_CONV_FILTERS = (32, 32, 64)
_DENSE_UNITS = 64


def blog_weights(input_shape: Shape = (32, 32, 3), seed: int = 0) -> Weights:
    """He-scaled random weights and small non-zero biases (so bias loading is checked too)."""
    rng = np.random.default_rng(seed)
    h, w, c = input_shape
    out: Weights = []
    for i, filters in enumerate(_CONV_FILTERS, start=1):
        kernel = rng.normal(0, np.sqrt(2 / (9 * c)), (3, 3, c, filters))
        bias = rng.normal(0, 0.05, filters)
        out.append((f"conv2d_{i}", [kernel.astype("float32"), bias.astype("float32")]))
        h, w, c = (h - 2) // 2, (w - 2) // 2, filters
    flat = h * w * c
    for i, (n_in, n_out) in enumerate([(flat, _DENSE_UNITS), (_DENSE_UNITS, 1)], start=1):
        kernel = rng.normal(0, np.sqrt(2 / n_in), (n_in, n_out))
        bias = rng.normal(0, 0.05, n_out)
        out.append((f"dense_{i}", [kernel.astype("float32"), bias.astype("float32")]))
    return out


def fixed_batch(input_shape: Shape = (32, 32, 3), n: int = 4, seed: int = 42) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *input_shape), dtype=np.float32)


def _conv3x3_valid(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    # windows: (N, H-2, W-2, C, 3, 3); tensordot goes through BLAS, einsum would not
    windows = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))
    return np.tensordot(windows, kernel, axes=([4, 5, 3], [0, 1, 2])) + bias


def _maxpool2(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]  # Keras "valid" pooling drops the odd edge
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def blog_forward(weights: Weights, x: np.ndarray) -> np.ndarray:
    """The blog model in float64 NumPy: 3x(conv3x3+relu+pool2), flatten, dense+relu, dense+sigmoid."""
    a = x.astype(np.float64)
    convs, (dense1, dense2) = weights[:3], weights[3:]
    for _, (kernel, bias) in convs:
        a = _maxpool2(np.maximum(_conv3x3_valid(a, kernel, bias), 0))
    a = a.reshape(len(a), -1)  # channels_last Flatten is a plain C-order reshape
    a = np.maximum(a @ dense1[1][0] + dense1[1][1], 0)
    logits = a @ dense2[1][0] + dense2[1][1]
    return (1 / (1 + np.exp(-logits))).astype(np.float32)


# --- Keras 2.0-2.3 model_config JSON, as those versions wrote it --------------------------
def _initializer(name: str) -> dict:
    if name == "glorot_uniform":
        return {"class_name": "VarianceScaling",
                "config": {"scale": 1.0, "mode": "fan_avg", "distribution": "uniform", "seed": None}}
    return {"class_name": "Zeros", "config": {}}


def _version(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


# Keys every Keras 2 Conv2D/Dense config carried after its own ones.
_WEIGHTED_EXTRAS = {
    "use_bias": True,
    "kernel_initializer": _initializer("glorot_uniform"),
    "bias_initializer": _initializer("zeros"),
    "kernel_regularizer": None, "bias_regularizer": None, "activity_regularizer": None,
    "kernel_constraint": None, "bias_constraint": None,
}


def _blog_layer_configs(version: str, input_shape: Shape) -> list[tuple[str, dict]]:
    """(class_name, config) per layer, the blog recipe with separate Activation layers."""
    counters: dict[str, int] = {}

    def name(base: str) -> str:
        counters[base] = counters.get(base, 0) + 1
        return f"{base}_{counters[base]}"

    layers: list[tuple[str, dict]] = []

    def activation(fn: str) -> None:
        layers.append(("Activation", {"name": name("activation"), "trainable": True, "activation": fn}))

    for filters in _CONV_FILTERS:
        layers.append(("Conv2D", {
            "name": name("conv2d"), "trainable": True, "filters": filters,
            "kernel_size": [3, 3], "strides": [1, 1], "padding": "valid",
            "data_format": "channels_last", "dilation_rate": [1, 1], "activation": "linear",
            **_WEIGHTED_EXTRAS}))
        activation("relu")
        layers.append(("MaxPooling2D", {
            "name": name("max_pooling2d"), "trainable": True, "pool_size": [2, 2],
            "padding": "valid", "strides": [2, 2], "data_format": "channels_last"}))
    flatten = {"name": name("flatten"), "trainable": True}
    if _version(version) >= (2, 1):  # Flatten learnt data_format in 2.1
        flatten["data_format"] = "channels_last"
    layers.append(("Flatten", flatten))
    for units, fn in [(_DENSE_UNITS, "relu"), (1, "sigmoid")]:
        layers.append(("Dense", {"name": name("dense"), "trainable": True, "units": units,
                                 "activation": "linear", **_WEIGHTED_EXTRAS}))
        activation(fn)
        if units == _DENSE_UNITS:
            layers.append(("Dropout", {"name": name("dropout"), "trainable": True,
                                       "rate": 0.5, "noise_shape": None, "seed": None}))

    # The first layer carries the input shape: Keras 2 Sequential had no InputLayer in its config.
    first = layers[0][1]
    layers[0] = (layers[0][0], {"name": first["name"], "trainable": True,
                                "batch_input_shape": [None, *input_shape], "dtype": "float32",
                                **{k: v for k, v in first.items() if k not in ("name", "trainable")}})
    if _version(version) >= (2, 3):  # 2.3 recorded the dtype of every layer
        layers = [(cls, {**cfg, "dtype": "float32"}) for cls, cfg in layers]
    return layers


def keras2_sequential_config(version: str, input_shape: Shape) -> dict:
    layers = [{"class_name": cls, "config": cfg} for cls, cfg in _blog_layer_configs(version, input_shape)]
    if _version(version) < (2, 1):  # Keras 2.0 stored a Sequential's config as a bare list of layers
        return {"class_name": "Sequential", "config": layers}
    return {"class_name": "Sequential", "config": {"name": "sequential_1", "layers": layers}}


def keras2_functional_config(version: str, input_shape: Shape) -> dict:
    """The same net as a 2.x functional `Model` with an explicit InputLayer."""
    layers = [{"name": "input_1", "class_name": "InputLayer", "inbound_nodes": [],
               "config": {"batch_input_shape": [None, *input_shape], "dtype": "float32",
                          "sparse": False, "name": "input_1"}}]
    for cls, cfg in _blog_layer_configs(version, input_shape):
        cfg = {k: v for k, v in cfg.items() if k != "batch_input_shape"}
        layers.append({"name": cfg["name"], "class_name": cls, "config": cfg,
                       "inbound_nodes": [[[layers[-1]["name"], 0, 0, {}]]]})
    return {"class_name": "Model", "config": {
        "name": "model_1", "layers": layers,
        "input_layers": [["input_1", 0, 0]], "output_layers": [[layers[-1]["name"], 0, 0]]}}


_TRAINING_CONFIG = {
    "optimizer_config": {"class_name": "RMSprop",
                         "config": {"lr": 0.0010000000474974513, "rho": 0.8999999761581421,
                                    "decay": 0.0, "epsilon": 1e-07}},
    "loss": "binary_crossentropy", "metrics": ["accuracy"],
    "sample_weight_mode": None, "loss_weights": None,
}


# --- HDF5 writing in the Keras 2 layout ----------------------------------------------------
def _str_attr(values: Sequence[str]) -> np.ndarray:
    # Keras 2 stored name lists as fixed-length byte strings, e.g. dtype |S17
    return np.array([v.encode("utf8") for v in values]) if values else np.array([], dtype="S1")


def write_keras2_weight_groups(group: h5py.Group, layer_names: Sequence[str], weights: Weights,
                               keras_version: str) -> None:
    """Keras 2 `save_weights_to_hdf5_group`: every layer gets a group, weightless ones too."""
    by_layer = dict(weights)
    group.attrs["layer_names"] = _str_attr(layer_names)
    group.attrs["backend"] = b"tensorflow"
    group.attrs["keras_version"] = keras_version.encode("utf8")
    for layer in layer_names:
        g = group.create_group(layer)
        arrays = by_layer.get(layer, [])
        names = [f"{layer}/{kind}:0" for kind in ("kernel", "bias")[: len(arrays)]]
        g.attrs["weight_names"] = _str_attr(names)
        for wname, value in zip(names, arrays):
            g.create_dataset(wname, data=value)  # "conv2d_1/kernel:0" nests a conv2d_1 subgroup


def write_keras2_h5(path: Path, keras_version: str = "2.2.4", input_shape: Shape = (32, 32, 3),
                    *, functional: bool = False, seed: int = 0, batch: int = 4,
                    config_hook=None) -> Fixture:
    """Write a full-model .h5 as standalone Keras `keras_version` (2.0.x-2.3.x) saved it.

    write_keras2_h5(path, keras_version="2.2.4", input_shape=(32, 32, 3), *,
                    functional=False, seed=0, batch=4, config_hook=None) -> Fixture

    The model is the blog CNN (Sequential, first layer carrying `batch_input_shape`;
    `functional=True` writes a `Model` with an InputLayer instead). `config_hook(config)`
    may edit the model_config dict in place before it is stored, to simulate odd files.
    Returns Fixture(path, inputs, expected) with `batch` inputs of `input_shape`.
    """
    path = Path(path)
    make_config = keras2_functional_config if functional else keras2_sequential_config
    config = make_config(keras_version, input_shape)
    if config_hook is not None:
        config_hook(config)
    weights = blog_weights(input_shape, seed)
    layer_cfgs = config["config"] if isinstance(config["config"], list) else config["config"]["layers"]
    layer_names = [layer.get("name") or layer["config"]["name"] for layer in layer_cfgs]

    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = keras_version.encode("utf8")
        f.attrs["backend"] = b"tensorflow"
        f.attrs["model_config"] = json.dumps(config).encode("utf8")
        f.attrs["training_config"] = json.dumps(_TRAINING_CONFIG).encode("utf8")
        write_keras2_weight_groups(f.create_group("model_weights"), layer_names, weights, keras_version)
        opt = f.create_group("optimizer_weights")
        opt.attrs["weight_names"] = _str_attr(["training/RMSprop/Variable:0"])
        opt.create_dataset("training/RMSprop/Variable:0", data=np.zeros((3, 3, input_shape[2], 32), "float32"))

    x = fixed_batch(input_shape, batch)
    return Fixture(path, x, blog_forward(weights, x))


def write_keras2_weights_h5(path: Path, input_shape: Shape = (150, 150, 3), keras_version: str = "2.2.4",
                            *, seed: int = 0, batch: int = 2) -> Fixture:
    """Weights only, as Keras 2 `model.save_weights("w.h5")` wrote them (no model_config).

    The layout fits `architectures.build_seed(input_shape)`: its 5 weighted layers in order.
    """
    path = Path(path)
    weights = blog_weights(input_shape, seed)
    names = [cfg["name"] for _, cfg in _blog_layer_configs(keras_version, input_shape)]
    with h5py.File(path, "w") as f:
        write_keras2_weight_groups(f, names, weights, keras_version)
    x = fixed_batch(input_shape, batch)
    return Fixture(path, x, blog_forward(weights, x))


# --- files written by the real libraries ----------------------------------------------------
def build_blog_model(lib, input_shape: Shape = (32, 32, 3), seed: int = 0):
    """The blog CNN in `lib` (the `keras` or `tf_keras` module), weights from `blog_weights`."""
    L = lib.layers
    model = lib.Sequential([
        L.Input(shape=input_shape),
        L.Conv2D(32, 3), L.Activation("relu"), L.MaxPooling2D(2),
        L.Conv2D(32, 3), L.Activation("relu"), L.MaxPooling2D(2),
        L.Conv2D(64, 3), L.Activation("relu"), L.MaxPooling2D(2),
        L.Flatten(),
        L.Dense(_DENSE_UNITS), L.Activation("relu"), L.Dropout(0.5),
        L.Dense(1), L.Activation("sigmoid"),
    ])
    model.set_weights([a for _, arrays in blog_weights(input_shape, seed) for a in arrays])
    return model


def write_tf_keras_h5(path: Path, input_shape: Shape = (32, 32, 3), *, seed: int = 0, batch: int = 4) -> Fixture:
    """A full model saved by tf.keras 2.x (`tf_keras`, the maintained Keras 2) as .h5."""
    import tf_keras

    path = Path(path)
    build_blog_model(tf_keras, input_shape, seed).save(str(path), save_format="h5")
    x = fixed_batch(input_shape, batch)
    return Fixture(path, x, blog_forward(blog_weights(input_shape, seed), x))


def write_keras3_model(path: Path, input_shape: Shape = (32, 32, 3), *, seed: int = 0, batch: int = 4) -> Fixture:
    """A full model saved by Keras 3; the format follows the suffix (.keras zip or legacy .h5)."""
    import keras

    path = Path(path)
    build_blog_model(keras, input_shape, seed).save(str(path))
    x = fixed_batch(input_shape, batch)
    return Fixture(path, x, blog_forward(blog_weights(input_shape, seed), x))


def _save_keras3_weights(model, path: Path) -> None:
    # Keras 3 insists on the .weights.h5 suffix; write there and move to any name asked for.
    if path.name.endswith(".weights.h5"):
        model.save_weights(str(path))
        return
    with tempfile.TemporaryDirectory() as tmp:
        tmp_file = Path(tmp) / "model.weights.h5"
        model.save_weights(str(tmp_file))
        shutil.move(tmp_file, path)


def write_keras3_weights(path: Path, arch: str = "seed", *, seed: int = 0, batch: int = 2) -> Fixture:
    """Keras 3 `save_weights` layout for `architectures.ARCHITECTURES[arch]` at 150x150x3.

    "seed" gets `blog_weights` (expected from NumPy); any other arch gets random values for
    every variable (BN variances kept positive) and `expected` from the model itself.
    """
    import keras

    from keras_serve.model.architectures import ARCHITECTURES

    path = Path(path)
    input_shape = (150, 150, 3)
    model = ARCHITECTURES[arch](input_shape=input_shape)
    x = fixed_batch(input_shape, batch)
    if arch == "seed":
        weights = blog_weights(input_shape, seed)
        model.set_weights([a for _, arrays in weights for a in arrays])
        expected = blog_forward(weights, x)
    else:
        rng = np.random.default_rng(seed)
        values = []
        for var in model.weights:
            shape = tuple(var.shape)
            if "variance" in var.path or "gamma" in var.path:
                values.append(rng.uniform(0.5, 1.5, shape))
            elif len(shape) == 1:  # biases, beta, moving_mean
                values.append(rng.normal(0, 0.1, shape))
            else:
                values.append(rng.normal(0, np.sqrt(2 / np.prod(shape[:-1])), shape))
        values = [v.astype("float32") for v in values]
        model.set_weights(values)
        expected = keras.ops.convert_to_numpy(model(x, training=False))
    _save_keras3_weights(model, path)
    return Fixture(path, x, expected)
