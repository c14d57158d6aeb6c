"""Shared fixtures: tiny models the tests build themselves, apps configured around them."""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

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
def app(colour_model_path, tmp_path):
    from app import create_app

    app = create_app({"MODEL_PATH": str(colour_model_path), "UPLOAD_DIR": str(tmp_path / "uploads"),
                      "MAX_CONTENT_LENGTH": 2 * 1024 * 1024, "MAX_PIXELS": 4_000_000, "TESTING": True})
    yield app
    app.extensions["classifier"].batcher.close()


@pytest.fixture()
def client(app):
    return app.test_client()
