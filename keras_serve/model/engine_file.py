"""Serving an ONNX engine file directly: the int8 variant that `optimize` writes.

`ServedModel.load("x.int8.onnx")` comes here. There is no Keras model to read the contract
from, so the card beside the file (`x.int8.json`, written by keras_serve.model.quantize) is
required and is the contract: input size, layout, scaling, output kind, labels, threshold.
The card must name this very file (its `engine.sha256`), so a card copied beside another file
is refused instead of describing it. The engine is ONNX Runtime, loaded from the bytes that
were hashed; a file whose weights live in other files (ONNX external data) is refused.

Not checked against TensorFlow (an int8 variant differs from its float model by design); the
checks are the card's own: the comparison `optimize` made, and `promotable`.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from keras_serve.errors import ModelLoadError
from keras_serve.model.card import ModelCard, card_path
from keras_serve.model.engines import EngineUnavailable, LoneInputSplit, OnnxRuntimeEngine, usable_cores
from keras_serve.pipeline.preprocessing import SCALINGS, PreprocessSpec

ENGINES_FOR_FILE = ("auto", "onnxruntime")
LOADED_WITH = "onnxruntime (engine file)"
SHA256 = re.compile(r"[0-9a-f]{64}")
SHOWN_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def load_engine_file(cls: type, path: Path, labels: list[str] | None = None, scaling: str | None = None,
                     max_pixels: int | None = None, max_decode_bytes: int | None = None, engine: str = "auto",
                     engine_threads: int | None = None, max_weight_bytes: int | None = None) -> Any:
    """A `cls` (ServedModel) answering through the ONNX file at `path`, with its card's contract;
    raises ModelLoadError with a one-line reason."""
    path = Path(path)
    if engine not in ENGINES_FOR_FILE:
        raise ModelLoadError(f"{path.name} is an ONNX engine file: it runs with --engine onnxruntime "
                             f"(or auto), not {engine}")
    if not path.is_file():
        raise ModelLoadError(f"no such model file: {path.name}")
    size = path.stat().st_size
    if max_weight_bytes is not None and size > max_weight_bytes:
        raise ModelLoadError(f"{path.name} is {size / 2**20:,.0f} MB; the limit for model weights is "
                             f"{max_weight_bytes / 2**20:,.0f} MB (MODEL_MAX_WEIGHT_BYTES)")
    card = ModelCard.read(path)
    if not card.found:
        raise ModelLoadError(f"{path.name} is an ONNX engine file without its card {card_path(path).name}; "
                             "`python -m keras_serve.model optimize` writes both")
    data = path.read_bytes()
    if max_weight_bytes is not None and len(data) > max_weight_bytes:  # grown since the look above
        raise ModelLoadError(f"{path.name} is larger than the limit for model weights (MODEL_MAX_WEIGHT_BYTES)")
    sha256 = hashlib.sha256(data).hexdigest()  # of the very bytes that will run
    named = (card.extra.get("engine") or {}).get("sha256") if isinstance(card.extra.get("engine"), dict) else None
    if named != sha256:
        raise ModelLoadError(f"the card {card_path(path).name} describes another file "
                             f"(engine sha256 {str(named)[:12]}, this file {sha256[:12]})")
    spec = _spec(card, path, scaling, max_pixels, max_decode_bytes)
    given = labels or card.labels
    if not given or card.output not in ("sigmoid", "softmax"):
        raise ModelLoadError(f"the card {card_path(path).name} must give \"labels\" and \"output\" "
                             "(sigmoid or softmax)")
    labels = [str(label) for label in given]
    expected = 2 if card.output == "sigmoid" else len(labels)
    if len(labels) != expected or len(set(labels)) != len(labels):
        raise ModelLoadError(f"{path.name}: {card.output} output needs {expected} different labels, "
                             f"not {','.join(labels)}")
    _refuse_external_data(data, path.name)
    threads = engine_threads or usable_cores()
    try:
        batched = OnnxRuntimeEngine(data, threads)
        cores = usable_cores()
        runner = LoneInputSplit(OnnxRuntimeEngine(data, cores), batched) if cores > threads else batched
    except EngineUnavailable as exc:
        raise ModelLoadError(f"{path.name} cannot run: {exc}") from None
    except Exception as exc:  # a damaged or foreign file fails in ONNX Runtime's words
        raise ModelLoadError(f"{path.name} is not an ONNX model ONNX Runtime can run: "
                             f"{' '.join(str(exc).split())[:200]}") from None
    _check_shapes(batched, spec, card.output, len(labels), path.name)
    activation = (card.extra.get("engine") or {}).get("output_activation_added")
    info = {
        "file": path.name,
        "sha256": sha256,
        "saved_by_keras": None,
        "loaded_with": LOADED_WITH,
        "architecture": card.architecture,
        "parameters": card.parameters,
        "card": card_path(path).name,
        "output_activation_added": activation if activation in ("sigmoid", "softmax") else None,
        "variant": str(card.extra.get("variant") or "")[:32] or None,
        "variant_of": _variant_of(card.extra.get("variant_of")),
        "promotable": card.extra.get("promotable") is True,
    }
    served = cls(None, spec, labels, card.output, card.threshold, info,
                 apply_activation=info["output_activation_added"], engine=runner)
    served.file_sha256 = sha256
    return served


def _refuse_external_data(data: bytes, name: str) -> None:
    """Every weight must be inside the file: an ONNX tensor may instead name a file to read its
    bytes from, and a published file must not make the server read anything else."""
    import onnx

    try:
        model = onnx.load_model_from_string(data)  # reads no external data itself
    except Exception as exc:  # protobuf's own errors on bytes that are not an ONNX model
        raise ModelLoadError(f"{name} is not an ONNX model ({type(exc).__name__})") from None

    def tensors(graph: Any):
        yield from graph.initializer
        yield from (sparse.values for sparse in graph.sparse_initializer)
        for node in graph.node:
            for attribute in node.attribute:
                if attribute.HasField("t"):
                    yield attribute.t
                yield from attribute.tensors
                if attribute.HasField("g"):
                    yield from tensors(attribute.g)
                for subgraph in attribute.graphs:
                    yield from tensors(subgraph)

    if any(tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.external_data
           for tensor in tensors(model.graph)):
        raise ModelLoadError(f"{name} keeps weights in other files (ONNX external data); "
                             "an engine file must hold all of its weights")


def _variant_of(value: Any) -> dict[str, str] | None:
    """The card's float model (file name and sha256), only if it is well formed: it is shown
    in GET /model and the start-up line."""
    if not isinstance(value, dict):
        return None
    name, sha256 = value.get("file"), value.get("sha256")
    if not isinstance(name, str) or not isinstance(sha256, str) or not SHA256.fullmatch(sha256):
        return None
    return {"file": SHOWN_NAME.sub("_", name)[-128:], "sha256": sha256}


def _spec(card: ModelCard, path: Path, scaling: str | None, max_pixels: int | None,
          max_decode_bytes: int | None) -> PreprocessSpec:
    if not card.height or not card.width or card.channels not in (1, 3):
        raise ModelLoadError(f"the card {card_path(path).name} must give \"input\": height, width and "
                             "channels (1 or 3)")
    scaling = scaling or card.scaling or "1/255"
    if scaling not in SCALINGS:
        raise ModelLoadError(f"unknown scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")
    limits = {"max_pixels": max_pixels} if max_pixels else {}
    if max_decode_bytes:
        limits["max_decode_bytes"] = max_decode_bytes
    return PreprocessSpec(int(card.height), int(card.width), int(card.channels), scaling,
                          card.layout == "channels_first", **limits)


def _check_shapes(engine: OnnxRuntimeEngine, spec: PreprocessSpec, output: str, labels: int, name: str) -> None:
    """The file must take the card's input and give one score per label (one for sigmoid)."""
    session = engine._session
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelLoadError(f"{name} has {len(inputs)} inputs and {len(outputs)} outputs; one of each is served")
    want = spec.input_shape
    got = tuple(inputs[0].shape[1:])
    if len(got) != len(want) or any(isinstance(g, int) and g != w for g, w in zip(got, want)):
        raise ModelLoadError(f"{name} takes input {tuple(inputs[0].shape)}; its card says "
                             f"(N, {', '.join(map(str, want))})")
    units = outputs[0].shape[-1] if outputs[0].shape else None
    if isinstance(units, int) and units != (1 if output == "sigmoid" else labels):
        raise ModelLoadError(f"{name} gives {units} scores per image; its card's {output} output "
                             f"with {labels} labels needs {1 if output == 'sigmoid' else labels}")
