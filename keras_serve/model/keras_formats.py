"""Open a Keras model file of any era and return a callable model, or say exactly why not.

This module owns the knowledge of file formats (Keras 3 .keras/.h5, tf.keras 2.x .h5,
standalone Keras 2.0-2.3 .h5, weights-only .h5). `model_loader` builds on it.

The file is sniffed with h5py/zipfile first (cheap, no TensorFlow) and inspected before anything
deserializes it (`file_safety`: no code in its config, weights within the memory budget), then
handed to the library that wrote its format:

* Keras 3 files (.keras zip, or .h5 whose `keras_version` is 3.x) -> `keras.saving.load_model`.
* Keras 2-era .h5 (standalone Keras 2.0-2.3, tf.keras 2.x) -> `tf_keras`, the maintained
  Keras 2. Keras 3 cannot rebuild these reliably: a 2.2-era Sequential whose first layer
  carries `batch_input_shape` fails with "Kernel shape must have the same length as input".
  If tf_keras rejects the config itself, the JSON is patched in memory (keys the layer no
  longer accepts and inference-irrelevant initializers/regularizers/constraints dropped)
  and rebuilt, with the weights read from the same file.
* Weights-only files need an architecture from `architectures.ARCHITECTURES` (`arch`).

TensorFlow and Keras are imported inside functions: the web app imports this module.
"""
from __future__ import annotations

import inspect
import json
import re
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from keras_serve.errors import ModelLoadError
from keras_serve.model.file_safety import DEFAULT_MAX_WEIGHT_BYTES, check_model_file

ARCH_INPUT_SHAPE = (150, 150, 3)

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_SAVE_HINT = "Re-save the model with model.save('model.keras') (or 'model.h5') and point the server at that file."


@dataclass
class LoadedKeras:
    model: Any                 # a Keras 3 or tf_keras Model; called as model(x, training=False)
    keras_version: str | None  # the Keras version recorded in the file, if any
    loader: str                # which library rebuilt it: "keras" (3) or "tf_keras" (2)


@dataclass
class _H5Info:
    kind: str                  # "model", "weights_keras2" or "weights_keras3"
    keras_version: str | None
    backend: str | None


def load_keras_model(path: Path, arch: str | None = None, max_weight_bytes: int | None = None,
                     trust_model_code: bool = False) -> LoadedKeras:
    """Load a model file of any supported format.

    `arch` names an `architectures.ARCHITECTURES` entry; it is needed (and only used) for
    weights-only files. Every failure is a `ModelLoadError` with a one-line message.

    Before any loader sees the file, `file_safety.check_model_file` refuses one whose config
    would run code (unless `trust_model_code`: the operator's own model, from the command line
    only) or whose weights declare more than `max_weight_bytes` (default
    file_safety.DEFAULT_MAX_WEIGHT_BYTES): a `ModelFileRefused`.
    """
    path = Path(path)
    try:
        kind = _sniff(path)
        check_model_file(path, kind, DEFAULT_MAX_WEIGHT_BYTES if max_weight_bytes is None else max_weight_bytes,
                         trust_code=trust_model_code)
        if kind == "zip":
            return _load_keras_zip(path)
        info = _inspect_h5(path)
        if info.kind == "model":
            if _major(info.keras_version) >= 3:
                return _load_keras3_h5(path, info)
            return _load_keras2_h5(path, info)
        return _load_weights_only(path, info, arch)
    except ModelLoadError:
        raise
    except Exception as exc:  # last line of defence: the operator gets one line, never a traceback
        raise ModelLoadError(f"cannot load {path}: {_one_line(exc)}", _SAVE_HINT) from None


# --- what kind of file is it? (no TensorFlow needed) ------------------------------------
def _sniff(path: Path) -> str:
    """Return "hdf5" or "zip", or raise a ModelLoadError describing what the path is instead."""
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}",
                             "Check the path; relative paths are resolved from the current directory.")
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            raise _savedmodel_error(path)
        raise ModelLoadError(f"model path is a directory, not a model file: {path}",
                             "Point at the .keras or .h5 file inside it.")
    if path.name in ("saved_model.pb", "saved_model.pbtxt"):
        raise _savedmodel_error(path.parent)
    try:
        with open(path, "rb") as fh:
            head = fh.read(512)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file: {path}: {_one_line(exc)}",
                             "Check that the server's user may read the file.") from None
    if not head:
        raise ModelLoadError(f"model file is empty (0 bytes): {path}", "The copy or download was interrupted; fetch the file again.")
    import h5py

    # h5py also finds the signature behind a user block (offsets 512, 1024, ...)
    if head.startswith(_HDF5_MAGIC) or h5py.is_hdf5(str(path)):
        return "hdf5"
    if zipfile.is_zipfile(path):
        return "zip"
    if head.startswith(b"PK\x03\x04"):
        raise ModelLoadError(f"model file is a damaged or truncated zip archive: {path}",
                             "The copy or download was interrupted; fetch the file again.")
    raise ModelLoadError(f"not a Keras model file (expected HDF5 .h5 or a .keras zip, found {_describe(head)}): {path}",
                         _SAVE_HINT)


def _describe(head: bytes) -> str:
    """Name what a non-model file most likely is, from its first bytes."""
    signatures = [
        (b"\xff\xd8\xff", "a JPEG image"), (b"\x89PNG", "a PNG image"), (b"GIF8", "a GIF image"),
        (b"%PDF", "a PDF document"), (b"\x80\x04", "a Python pickle"), (b"\x80\x03", "a Python pickle"),
        (b"\x93NUMPY", "a NumPy .npy array"), (b"\x1f\x8b", "a gzip archive"),
    ]
    for magic, what in signatures:
        if head.startswith(magic):
            return what
    if head[4:8] == b"TFL3":
        return "a TensorFlow Lite model"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer; run 'git lfs pull' to fetch the real file"
    text = head.lstrip()
    if text[:1] in (b"<",) and b"html" in text[:100].lower():
        return "an HTML page (a download link that returned a web page?)"
    try:
        head.decode("utf-8")
        return "a text file"
    except UnicodeDecodeError:
        return "unrecognised binary data"


def _savedmodel_error(directory: Path) -> ModelLoadError:
    return ModelLoadError(
        f"TensorFlow SavedModel directories are not supported, only .keras and .h5 files: {directory}",
        "Load it with the TensorFlow/Keras version that wrote it and re-save it with "
        "model.save('model.keras') or model.save('model.h5').")


def _attr_str(attrs: Any, key: str) -> str | None:
    value = attrs.get(key)
    if value is None:
        return None
    if hasattr(value, "decode"):
        value = value.decode("utf-8")
    return str(value)


def _inspect_h5(path: Path) -> _H5Info:
    """Classify a Keras HDF5 file from its attributes and top-level groups."""
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise ModelLoadError(f"cannot read HDF5 file (damaged or truncated?): {path}: {_one_line(exc)}",
                             "The copy or download was interrupted; fetch the file again.") from None
    with f:
        attrs = f.attrs
        version, backend = _attr_str(attrs, "keras_version"), _attr_str(attrs, "backend")
        if "model_config" in attrs:
            if "model_weights" not in f:
                raise ModelLoadError(f"Keras file has a model config but no weights: {path}", _SAVE_HINT)
            return _H5Info("model", version, backend)
        if "layer_names" in attrs:
            return _H5Info("weights_keras2", version, backend)
        if "layers" in f or "vars" in f:  # Keras 3 save_weights: layers/<name>/vars/<i>
            return _H5Info("weights_keras3", version, backend)
    raise ModelLoadError(f"HDF5 file is not a Keras model or weights file (no model_config, no weight layout): {path}",
                         _SAVE_HINT)


def _major(version: str | None) -> int:
    match = re.match(r"\s*(\d+)", version or "")
    return int(match.group(1)) if match else 0


# --- loaders ---------------------------------------------------------------------------
@contextmanager
def _with_suffix(path: Path, suffix: str) -> Iterator[Path]:
    """Yield a path to the same file ending in `suffix`: Keras picks its reader by file name."""
    if path.name.endswith(suffix):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="keras_formats_") as tmp:
        alias = Path(tmp) / f"model{suffix}"
        try:
            alias.symlink_to(path.resolve())
        except OSError:  # filesystems without symlinks
            shutil.copyfile(path, alias)
        yield alias


def _load_keras_zip(path: Path) -> LoadedKeras:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        if "config.json" not in names:
            raise ModelLoadError(f"zip archive is not a Keras .keras file (no config.json inside): {path}", _SAVE_HINT)
        version = None
        if "metadata.json" in names:
            try:
                version = json.loads(zf.read("metadata.json")).get("keras_version")
            except (ValueError, AttributeError):
                pass  # the version is informative only
    import keras

    try:
        with _with_suffix(path, ".keras") as alias:
            model = keras.saving.load_model(alias, compile=False)
    except Exception as exc:  # Keras raises many types; the message is what the operator needs
        raise _rebuild_error(path, "Keras 3", version, exc) from None
    return LoadedKeras(model=model, keras_version=version, loader="keras")


def _load_keras3_h5(path: Path, info: _H5Info) -> LoadedKeras:
    import keras

    try:
        with _with_suffix(path, ".h5") as alias:
            model = keras.saving.load_model(alias, compile=False)
    except Exception as exc:
        raise _rebuild_error(path, "Keras 3", info.keras_version, exc) from None
    return LoadedKeras(model=model, keras_version=info.keras_version, loader="keras")


def _load_keras2_h5(path: Path, info: _H5Info) -> LoadedKeras:
    """tf_keras as written; then tf_keras on a patched config; then Keras 3 as a last resort."""
    import tf_keras

    try:
        model = tf_keras.models.load_model(str(path), compile=False)
        return LoadedKeras(model=model, keras_version=info.keras_version, loader="tf_keras")
    except Exception as exc:
        first_error = exc

    try:
        return LoadedKeras(model=_rebuild_patched(path), keras_version=info.keras_version, loader="tf_keras")
    except Exception:
        pass

    import keras

    try:
        with _with_suffix(path, ".h5") as alias:
            model = keras.saving.load_model(alias, compile=False)
        return LoadedKeras(model=model, keras_version=info.keras_version, loader="keras")
    except Exception:
        pass
    # tf_keras's own complaint about the unpatched file is the most faithful description
    raise _rebuild_error(path, "tf_keras", info.keras_version, first_error)


def _rebuild_patched(path: Path) -> Any:
    import h5py
    import tf_keras

    with h5py.File(path, "r") as f:
        config = json.loads(_attr_str(f.attrs, "model_config"))
    model = tf_keras.models.model_from_config(patch_legacy_config(config))
    with _with_suffix(path, ".h5") as alias:
        model.load_weights(str(alias))  # reads model_weights/ of a full-model file, by topology
    return model


def _rebuild_error(path: Path, library: str, version: str | None, exc: BaseException) -> ModelLoadError:
    written_by = f"saved by Keras {version}" if version else "Keras version not recorded"
    detail = _one_line(exc)
    if _major(version) == 1:
        hint = "Keras 1 files are not supported: load it with Keras 2.x and re-save it with model.save('model.h5')."
    elif re.search(r"Unknown (layer|object|activation)|custom|Lambda|marshal|bytecode", detail, re.I):
        hint = ("The model uses a custom layer, function or Lambda that cannot be rebuilt here; save the weights "
                "and pass --arch, or re-save it as .keras from the code that defined it.")
    else:
        hint = _SAVE_HINT
    return ModelLoadError(f"{library} could not rebuild {path} ({written_by}): {detail}", hint)


# --- in-memory fixes for old model_config JSON ------------------------------------------
# Not needed to compute outputs, and a custom or renamed one breaks deserialization.
_INFERENCE_IRRELEVANT = re.compile(r".*_(initializer|regularizer|constraint)$")
# Layer.__init__ takes these through **kwargs (tf_keras base_layer.allowed_kwargs).
_BASE_LAYER_KWARGS = {"input_dim", "input_shape", "batch_input_shape", "batch_size", "weights",
                      "activity_regularizer", "autocast", "implementation", "name", "trainable", "dtype", "dynamic"}


def patch_legacy_config(config: Any) -> Any:
    """Return a copy of a Keras 2 model_config that today's tf_keras accepts.

    Every layer config loses the keys its tf_keras class no longer takes and its
    initializers, regularizers and constraints (irrelevant once the weights are loaded).
    Nested layers (wrappers, models inside models) are patched too.
    """
    import tf_keras

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        node = {key: walk(value) for key, value in node.items()}
        cls = getattr(tf_keras.layers, str(node.get("class_name")), None)
        if (isinstance(node.get("config"), dict) and inspect.isclass(cls)
                and issubclass(cls, tf_keras.layers.Layer) and not issubclass(cls, tf_keras.Model)):
            node["config"] = _patch_layer_config(cls, node["config"])
        return node

    return walk(config)


def _patch_layer_config(cls: type, config: dict) -> dict:
    accepted = _accepted_keys(cls)
    return {key: value for key, value in config.items()
            if key in accepted and not _INFERENCE_IRRELEVANT.match(key)}


def _accepted_keys(cls: type) -> set[str]:
    # Subclasses pass unknown kwargs up the chain, so any __init__ in the MRO may take a key.
    keys = set(_BASE_LAYER_KWARGS)
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        try:
            params = inspect.signature(init).parameters.values()
        except (TypeError, ValueError):
            continue
        keys.update(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    keys.discard("self")
    return keys


# --- weights-only files ------------------------------------------------------------------
def _load_weights_only(path: Path, info: _H5Info, arch: str | None) -> LoadedKeras:
    from keras_serve.model.architectures import ARCHITECTURES

    choices = "|".join(ARCHITECTURES)
    if arch is None:
        raise ModelLoadError(f"{path} holds weights but no architecture (written by save_weights)",
                             f"save it with model.save(...) or pass --arch {choices}")
    builder: Callable[..., Any] | None = ARCHITECTURES.get(arch)
    if builder is None:
        raise ModelLoadError(f"unknown architecture '{arch}' for weights file {path}", f"pass --arch {choices}")

    model = builder(input_shape=ARCH_INPUT_SHAPE)
    try:
        if info.kind == "weights_keras3":
            _check_keras3_variable_count(path, model)
            with _with_suffix(path, ".weights.h5") as alias:
                model.load_weights(alias)
        else:
            with _with_suffix(path, ".h5") as alias:
                model.load_weights(alias)  # Keras 2 layout: matched by layer order, shapes checked
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"weights in {path} do not fit the '{arch}' architecture: {_one_line(exc)}",
                             f"Pass the --arch the weights were trained with ({choices}), or load the full model file.") from None
    return LoadedKeras(model=model, keras_version=info.keras_version, loader="keras")


def _check_keras3_variable_count(path: Path, model: Any) -> None:
    # Keras 3 matches variables by layer class and order and silently ignores extras, so a
    # file for a bigger model would load "successfully"; every dataset is one variable.
    import h5py

    with h5py.File(path, "r") as f:
        stored: list[str] = []
        f.visititems(lambda name, obj: stored.append(name) if isinstance(obj, h5py.Dataset) else None)
    if len(stored) != len(model.weights):
        raise ValueError(f"the file stores {len(stored)} variables, the architecture has {len(model.weights)}")


def _one_line(exc: BaseException | str, limit: int = 300) -> str:
    """Keras errors span many lines; the operator needs one short line."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
