"""The loaded model behind one small object: load once, describe, predict a batch.

`ServedModel.load(path, ...)` opens the file (any format `keras_formats` knows), reads the
model card beside it (`<model>.json`), and settles the serving contract: input size and
layout, pixel scaling, output kind (one sigmoid or a softmax), labels and threshold.
The web layer only calls `spec`, `predict_batch`, `interpret` and `describe`; tests can
pass any object with those members instead.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from keras_serve.settings import DEFAULT_MODEL_PATH
from typing import Any, Callable

import numpy as np

from keras_serve.errors import ModelLoadError, ModelOutputInvalidError
from keras_serve.model.card import ModelCard, card_path
from keras_serve.model.engines import file_sha256
from keras_serve.pipeline.preprocessing import SCALINGS, PreprocessSpec

SIGMOID_DEFAULT_LABELS = ["CAT", "DOG"]
# A converted engine serves only if, on generated inputs, every served probability stays this
# close to TensorFlow's and no label changes (issue 14: measured <= 1e-6 on real photos).
FAITHFUL_MAX_ABS_DIFFERENCE = 1e-5
PROBE_IMAGES = 4
# Every served answer must be a probability. float32 arithmetic may step this far past 0 or 1
# (such values are clipped); a softmax row may miss a sum of 1 by this much (float32 over a
# thousand labels misses by about 1e-6).
OUTPUT_RANGE_TOLERANCE = 1e-6
SOFTMAX_SUM_TOLERANCE = 1e-3
# Why an output row is refused; closed set, so each is a metric label.
OUTPUT_PROBLEMS = ("not_finite", "out_of_range", "not_summing_to_one")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the winning label, its confidence, and the score of each label."""

    label: str
    confidence: float
    scores: dict[str, float]
    top: list[tuple[str, float]] = field(default_factory=list)
    # The winning score is under the server's UNSURE_BELOW: the model is not sure (docs/unsure.md).
    unsure: bool = False

    def as_json(self) -> dict[str, Any]:
        return {
            "class": self.label,  # the key the 2017 server printed; clients grep for it
            "label": self.label,
            "confidence": round(self.confidence, 6),
            "scores": {k: round(v, 6) for k, v in self.scores.items()},
            "top": [{"label": k, "score": round(v, 6)} for k, v in self.top],
            "unsure": self.unsure,
        }


def parse_labels(value: str | list[str] | None) -> list[str] | None:
    """`--labels` value: a comma list, or a path to a file with one label per line."""
    if value is None or isinstance(value, list):
        return value
    candidate = Path(value)
    if "," not in value and candidate.is_file():
        labels = [line.strip() for line in candidate.read_text().splitlines() if line.strip()]
    else:
        labels = [part.strip() for part in value.split(",") if part.strip()]
    if not labels:
        raise ModelLoadError(f"--labels {value!r} names no labels")
    return labels


class ServedModel:
    """A Keras image classifier with its serving contract. Create with `ServedModel.load`."""

    def __init__(self, model: Any, spec: PreprocessSpec, labels: list[str], output_kind: str,
                 threshold: float = 0.5, info: dict[str, Any] | None = None, top_k: int = 5,
                 apply_activation: str | None = None, engine: Any = None) -> None:
        from keras_serve.model.engines import TensorFlowEngine

        self.model = model
        self.spec = spec
        self.labels = labels
        self.output_kind = output_kind  # "sigmoid" (one unit) or "softmax" (one unit per label)
        self.threshold = threshold
        self.top_k = top_k
        self.info = info or {}
        # "sigmoid"/"softmax" when the model ends in logits and the server must finish the job.
        self._apply_activation = apply_activation
        # What runs the forward pass (keras_serve.model.engines); `load` may pick a faster one.
        self.engine = engine or TensorFlowEngine(model, spec.input_shape)
        self.engine_fallback_reason: str | None = None  # why a requested engine is not serving
        self.file_sha256: str | None = None  # of the model file; keys what is derived from it (heatmaps)
        self._lock = threading.Lock()

    @property
    def engine_name(self) -> str:
        return self.engine.name

    # --- construction -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path = DEFAULT_MODEL_PATH, labels: str | list[str] | None = None,
             scaling: str | None = None, arch: str | None = None,
             max_pixels: int | None = None, max_decode_bytes: int | None = None, engine: str = "auto",
             engine_threads: int | None = None, max_weight_bytes: int | None = None,
             trust_model_code: bool = False) -> "ServedModel":
        """Open a model file and settle its contract; raises ModelLoadError with a one-line reason.

        `engine` (keras_serve.model.engines.ENGINE_CHOICES) names what runs the forward pass:
        "auto" tries the converted engines fastest first; any converted engine that fails to
        convert or answers differently from TensorFlow is logged (one line) and TensorFlow
        serves instead. `engine_threads`: threads for a converted engine to run a batch on
        (default: every usable core; a lone input always gets every usable core).
        `max_weight_bytes`, `trust_model_code`: what `keras_formats.load_keras_model` refuses
        before loading (MODEL_MAX_WEIGHT_BYTES, --trust-model-code).
        """
        from keras_serve.model.keras_formats import load_keras_model
        from keras_serve.model.tf_runtime import import_tensorflow_quietly

        path = Path(path)
        if path.suffix.lower() == ".onnx":  # an int8 variant from `optimize`: its card is the contract
            from keras_serve.model.engine_file import load_engine_file

            return load_engine_file(cls, path, parse_labels(labels), scaling, max_pixels, max_decode_bytes,
                                    engine, engine_threads, max_weight_bytes)
        card = ModelCard.read(path)
        if path.is_file():
            import_tensorflow_quietly()
        loaded = load_keras_model(path, arch=arch, max_weight_bytes=max_weight_bytes,
                                  trust_model_code=trust_model_code)
        model = loaded.model
        spec = _input_spec(model, card, scaling, max_pixels, max_decode_bytes)
        output_units, output_kind, applies_activation = _output_contract(model)
        labels = parse_labels(labels) or card.labels
        if labels is None:
            if output_units != 1:
                raise ModelLoadError(
                    f"{path.name} has {output_units} outputs but no labels: pass --labels a,b,c "
                    f"or add \"labels\" to {path.with_suffix('.json').name}")
            labels = list(SIGMOID_DEFAULT_LABELS)
        labels = [str(l) for l in labels]
        expected = 2 if output_units == 1 else output_units
        if len(labels) != expected:
            raise ModelLoadError(
                f"{path.name} has {output_units} output unit(s), so it needs {expected} labels, "
                f"but {len(labels)} were given: {','.join(labels)}")
        repeated = sorted({l for l in labels if labels.count(l) > 1})
        if repeated:  # scores are keyed by label: a repeated one would hide a class
            raise ModelLoadError(f"label(s) {','.join(repeated)} given more than once: {','.join(labels)}")
        info = {
            "file": path.name,  # where the server keeps its files is nobody else's business
            "sha256": file_sha256(path) if path.is_file() else None,  # the version: every upload's record names it
            "saved_by_keras": loaded.keras_version,
            "loaded_with": loaded.loader,
            "architecture": card.architecture or getattr(model, "name", None),
            "parameters": int(model.count_params()),
            "card": card_path(path).name if card.found else None,
            "output_activation_added": applies_activation,
        }
        served = cls(model, spec, labels, output_kind, card.threshold, info,
                     apply_activation=applies_activation)
        served.file_sha256 = info["sha256"]  # computed once, above
        if engine != "tensorflow":
            served._switch_engine(engine, path, arch, engine_threads)
        return served

    def _switch_engine(self, requested: str, path: Path, arch: str | None, threads: int | None) -> None:
        """Serve through the first faithful converted engine; TensorFlow (already built) stays
        when none is, with one log line saying why."""
        from keras_serve.model import engines

        if requested not in engines.ENGINE_CHOICES:
            raise ModelLoadError(f"unknown engine {requested!r}; choose one of {', '.join(engines.ENGINE_CHOICES)}")
        candidates = engines.AUTO_ORDER if requested == "auto" else (requested,)
        reasons = []
        for name in candidates:
            try:
                candidate = engines.build_converted(name, self.model, self.spec.input_shape, path,
                                                    threads or engines.usable_cores(), variant=arch)
                problem = self._unfaithful(candidate)
            except engines.EngineUnavailable as exc:
                problem = str(exc)
            except Exception as exc:  # the converted engine failed on the probe inputs: it cannot serve
                problem = f"{type(exc).__name__} on the probe inputs: {' '.join(str(exc).split())[:200]}"
            if problem is None:
                self.engine = candidate
                break
            reasons.append(f"{name}: {problem}")
        if reasons:
            self.engine_fallback_reason = "; ".join(reasons)
            log.warning("engine %s requested, serving with %s (%s)", requested, self.engine.name,
                        self.engine_fallback_reason)

    def _unfaithful(self, candidate: Any) -> str | None:
        """Why `candidate` must not serve (its answers differ from TensorFlow's), or None."""
        from keras_serve.pipeline.preprocessing import to_model_input

        rng = np.random.default_rng(0)
        s = self.spec
        pixels = rng.integers(0, 256, (PROBE_IMAGES, s.height, s.width, s.channels), dtype=np.uint8)
        probes = to_model_input(pixels, s)
        for batch in (probes[:1], probes):  # a lone request and a batch
            want = self._finish(self.engine(batch), len(batch))
            got = self._finish(candidate(batch), len(batch))
            if got.shape != want.shape:
                return f"output shape {got.shape} instead of {want.shape}"
            difference = _largest_difference(got, want)
            if not difference <= FAITHFUL_MAX_ABS_DIFFERENCE:  # also catches NaN
                return (f"outputs differ from TensorFlow's by {difference:.2g} on generated inputs "
                        f"(allowed {FAITHFUL_MAX_ABS_DIFFERENCE:g})")
            if any(self.interpret(a).label != self.interpret(b).label for a, b in zip(got, want)):
                return "changes a label on generated inputs"
        return None

    def share_cores_when(self, crowded: Callable[[], bool]) -> None:
        """A lone input gets every core only while `crowded()` is false (engines.LoneInputSplit)."""
        from keras_serve.model.engines import LoneInputSplit

        if isinstance(self.engine, LoneInputSplit):
            self.engine.crowded = crowded

    # --- the calls the web layer makes -------------------------------------------------
    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """float32 (N, *input_shape) -> probabilities (N, units). Thread-safe."""
        with self._lock:
            out = self.engine(batch)
        return self._finish(out, len(batch))

    def _finish(self, out: Any, rows: int) -> np.ndarray:
        out = np.asarray(out, dtype=np.float64).reshape(rows, -1)
        if self._apply_activation == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-out))
        elif self._apply_activation == "softmax":
            out = np.exp(out - out.max(axis=1, keepdims=True))
            out /= out.sum(axis=1, keepdims=True)
        return out

    def checked_output(self, rows: np.ndarray) -> np.ndarray:
        """Output rows of `predict_batch` (one row, or a batch) as served probabilities; raises
        ModelOutputInvalidError if any is not one: a score infinite or NaN, outside [0, 1], or
        a softmax row not summing to 1.

        A model may end in any activation (an exponential, a ReLU): the load and the candidate
        check only see some inputs, so every answer is checked before it is served or stored.
        """
        rows = np.asarray(rows, dtype=np.float64)
        matrix = rows.reshape(1, -1) if rows.ndim == 1 else rows
        problem = output_problem(matrix, self.output_kind)
        if problem is not None:
            raise ModelOutputInvalidError(OUTPUT_PROBLEM_MESSAGES[problem], problem)
        return np.clip(rows, 0.0, 1.0)  # only float32 rounding, within OUTPUT_RANGE_TOLERANCE

    def interpret(self, row: np.ndarray) -> Prediction:
        """One row of `predict_batch` -> the label, its confidence and every label's score."""
        if self.output_kind == "sigmoid":
            p = float(row[0])
            scores = {self.labels[0]: 1.0 - p, self.labels[1]: p}
            label = self.labels[1] if p >= self.threshold else self.labels[0]
        else:
            scores = {label: float(p) for label, p in zip(self.labels, row)}
            label = max(scores, key=scores.get)
        ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)[: self.top_k]
        return Prediction(label=label, confidence=scores[label], scores=scores, top=ranked)

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run the forward pass once per batch size so the first users do not pay for tracing."""
        for n in batch_sizes:
            self.predict_batch(np.zeros((n, *self.spec.input_shape), np.float32))

    def describe(self) -> dict[str, Any]:
        s = self.spec
        return {
            **self.info,
            "input": {"height": s.height, "width": s.width, "channels": s.channels,
                      "layout": "channels_first" if s.channels_first else "channels_last"},
            "preprocessing": {"scaling": s.scaling, "max_pixels": s.max_pixels,
                              "max_decode_bytes": s.max_decode_bytes},
            "output": self.output_kind,
            "labels": self.labels,
            "threshold": self.threshold if self.output_kind == "sigmoid" else None,
            "engine": {"name": self.engine.name, "version": self.engine.version,
                       "fallback_reason": self.engine_fallback_reason},
        }

    def summary_line(self) -> str:
        d = self.describe()
        i = d["input"]
        decision = (f"sigmoid: {self.labels[0]} < {self.threshold} <= {self.labels[1]}"
                    if self.output_kind == "sigmoid" else f"softmax over {len(self.labels)} labels")
        variant_of = d.get("variant_of")  # an engine file from `optimize` (engine_file.py)
        origin = (f"{d.get('variant')} variant of {variant_of['file']} ({variant_of['sha256'][:12]})" if variant_of
                  else f"saved by Keras {d['saved_by_keras'] or 'unknown'}")
        parameters = f"{d['parameters']:,}" if isinstance(d.get("parameters"), int) else "unknown"
        return (f"model {d['file']} ({origin}, "
                f"loaded with {d['loaded_with']}, {parameters} parameters): "
                f"input {i['height']}x{i['width']}x{i['channels']} {i['layout']}, scaling {d['preprocessing']['scaling']}; "
                f"output {decision}; labels {','.join(self.labels)}; "
                f"engine {self.engine.name} {self.engine.version}")


OUTPUT_PROBLEM_MESSAGES = {
    "not_finite": "The model's answer for this image is not a finite number.",
    "out_of_range": "The model's answer for this image is not a probability (a score is below 0 or above 1).",
    "not_summing_to_one": "The model's answer for this image is not a probability (its scores do not sum to 1).",
}


def output_problem(rows: np.ndarray, output_kind: str) -> str | None:
    """The first of OUTPUT_PROBLEMS that any row of the 2-D `rows` has, or None (vectorised:
    a few array operations whatever the batch size)."""
    if not np.isfinite(rows).all():
        return "not_finite"
    if rows.min(initial=0.0) < -OUTPUT_RANGE_TOLERANCE or rows.max(initial=0.0) > 1.0 + OUTPUT_RANGE_TOLERANCE:
        return "out_of_range"
    if output_kind == "softmax" and rows.size and \
            np.abs(rows.sum(axis=1) - 1.0).max() > SOFTMAX_SUM_TOLERANCE:
        return "not_summing_to_one"
    return None


def _input_spec(model: Any, card: ModelCard, scaling: str | None, max_pixels: int | None,
                max_decode_bytes: int | None = None) -> PreprocessSpec:
    shape = _single_shape(model.input_shape, "input")
    if len(shape) != 4:
        raise ModelLoadError(f"the model takes input of shape {shape}; image models take (batch, H, W, C)")
    layout = card.layout
    if layout is None:
        # Channel counts are 1 or 3; spatial sizes of image models almost never are.
        layout = "channels_first" if shape[1] in (1, 3) and shape[3] not in (1, 3) else "channels_last"
    if layout == "channels_first":
        channels, height, width = shape[1], shape[2], shape[3]
    else:
        height, width, channels = shape[1], shape[2], shape[3]
    height = height or card.height
    width = width or card.width
    if not height or not width:
        raise ModelLoadError("the model accepts any image size; set \"input\": {\"height\", \"width\"} "
                             "in its model card so the server knows what to resize to")
    scaling = scaling or card.scaling or "1/255"
    if scaling not in SCALINGS:
        raise ModelLoadError(f"unknown scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")
    if channels not in (1, 3):
        raise ModelLoadError(f"the model takes {channels}-channel images; only 1 (grey) or 3 (RGB) are supported")
    kwargs = {"max_pixels": max_pixels} if max_pixels else {}
    if max_decode_bytes:
        kwargs["max_decode_bytes"] = max_decode_bytes
    return PreprocessSpec(int(height), int(width), int(channels), scaling, layout == "channels_first", **kwargs)


def _output_contract(model: Any) -> tuple[int, str, str | None]:
    """(units, "sigmoid"|"softmax", activation the server must apply itself or None)."""
    shape = _single_shape(model.output_shape, "output")
    if len(shape) != 2 or not shape[1]:
        raise ModelLoadError(f"the model's output has shape {shape}; a classifier outputs (batch, classes)")
    units = int(shape[1])
    activation = _last_activation(model)
    kind = "sigmoid" if units == 1 else "softmax"
    # Only an explicitly linear last layer means logits; anything else is trusted as probabilities.
    return units, kind, kind if activation == "linear" else None


def _last_activation(model: Any) -> str | None:
    """The last layer's activation name ("linear", "sigmoid", ...), or None if it has none."""
    try:
        layer = model.layers[-1]
        config = layer.get_config()
    except Exception:
        return None
    activation = config.get("activation")
    if isinstance(activation, dict):  # serialised as {"class_name": ..., "config": ...}
        activation = activation.get("config", {}).get("name") or activation.get("class_name")
    return str(activation).lower() if activation else None


def _single_shape(shape: Any, what: str) -> tuple:
    if isinstance(shape, list):
        if len(shape) != 1:
            raise ModelLoadError(f"the model has {len(shape)} {what}s; the server serves single-{what} models")
        shape = shape[0]
    return tuple(shape)


def _largest_difference(got: np.ndarray, want: np.ndarray) -> float:
    """The largest |got - want|, where the same value in both (an overflow to the same infinity,
    NaN in both) differs by 0: inf - inf is NaN, which would refuse an engine that answers exactly
    as TensorFlow does. NaN against a number is NaN still, and so refused."""
    with np.errstate(invalid="ignore"):
        gaps = np.abs(got.astype(np.float64) - want.astype(np.float64))
    gaps[(got == want) | (np.isnan(got) & np.isnan(want))] = 0.0
    return float(gaps.max())
