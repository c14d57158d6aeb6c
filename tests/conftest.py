"""Shared fixtures: tiny models the tests build themselves, apps configured around them."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent

import numpy as np
import pytest

SHARED_DATA = ROOT.parent / "shared" / "data" / "cats_vs_dogs"
DEFAULT_MODEL = ROOT / "models" / "cats_vs_dogs.h5"


def build_colour_model(size: int = 32, channels: int = 3, units: int = 1):
    """A model whose answer is known: sigmoid(10 * (mean red - mean blue)).

    Red images score near 1 (the second label, DOG), blue near 0 (CAT). With units=3 it is
    a softmax over (red, green, blue) means, so the brightest channel wins.
    """
    import keras

    inputs = keras.Input((size, size, channels))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(units, activation="sigmoid" if units == 1 else "softmax")(x)
    model = keras.Model(inputs, outputs, name="colour")
    if units == 1:
        kernel = np.zeros((channels, 1), np.float32)
        kernel[0, 0], kernel[-1, 0] = 10.0, -10.0
    else:
        kernel = np.eye(channels, units, dtype=np.float32) * 20.0
    model.layers[-1].set_weights([kernel, np.zeros(units, np.float32)])
    return model


@pytest.fixture(scope="session")
def colour_model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "colour.h5"
    build_colour_model().save(path)
    return path


@pytest.fixture()
def make_app(tmp_path):
    """create_app with a private upload folder; every app made is closed after the test."""
    from keras_serve import create_app

    apps = []

    def make(**config):
        app = create_app({"UPLOAD_DIR": str(tmp_path / "uploads"), "TESTING": True, **config})
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.extensions["classifier"].close()


@pytest.fixture()
def app(make_app, colour_model_path):
    return make_app(MODEL_PATH=str(colour_model_path), MAX_CONTENT_LENGTH=2 * 1024 * 1024, MAX_PIXELS=4_000_000)


@pytest.fixture()
def client(app):
    return app.test_client()
