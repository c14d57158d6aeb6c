"""The int8 variant of a model: ONNX Runtime static quantization, checked like any candidate.

    python -m keras_serve.model optimize models/cats_vs_dogs.h5 --calibrate ../shared/data/cats_vs_dogs/train

The float model is converted to ONNX as the server converts it (engines.OnnxRuntimeEngine,
cached by the file's sha256), calibrated on photos decoded by the server's own preprocessing,
and quantized to QDQ int8: weights per output channel (signed), activations per tensor
(unsigned), the layout ONNX Runtime's x86 kernels run fastest. The result is written as an
engine file (`<model>.int8.onnx`) with a card beside it (`<model>.int8.json`) that says what it
is the variant of, how it was calibrated, how fast it runs against the float model, and how
it answers the validation photos against the float model (evaluate --compare's statistics,
training/comparison.py). It is never served on its own: a variant that loses more than
MAX_ACCURACY_DROP of validation accuracy says `"promotable": false` in its card.

Why these choices, measured on the default model (docs/performance.md, "The int8 variant";
tests/measure_int8.py): with per-channel weights every calibration method and size kept the
float model's validation accuracy within 0.1 points and changed 0-2 answers of 1,000, with the
same speed; per-tensor weights lost up to 0.3 points. MinMax is the default: as good as the
others here, the simplest to explain, and several times quicker to calibrate than the
histogram methods (entropy, percentile), which stay available with --method.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from keras_serve.errors import DatasetError
from keras_serve.model.card import ModelCard
from keras_serve.model.engines import OnnxRuntimeEngine, converted_bytes, file_sha256
from keras_serve.model.served_model import ServedModel
from keras_serve.pipeline.preprocessing import PreprocessSpec, to_model_input
from keras_serve.training.comparison import paired_accuracy_difference, verdict
from keras_serve.training.dataset import IMAGE_SUFFIXES, decode_files, list_labelled_images
from keras_serve.training.evaluate import model_outputs, predicted_classes, report_on

METHODS = ("minmax", "entropy", "percentile")
DEFAULT_METHOD = "minmax"
DEFAULT_CALIBRATION_IMAGES = 300
# A variant may cost at most this much validation accuracy (0.3 points) to be promotable.
MAX_ACCURACY_DROP = 0.003
# Images per calibration pass: ONNX Runtime keeps every activation of a pass in memory
# (about 30 MB per 150x150 image for the default model), so passes stay small.
CALIBRATION_BATCH = 10
TIMING_REPEATS = 7
TIMING_CALLS = 40

log = logging.getLogger(__name__)


# --- calibration photos --------------------------------------------------------------------
@dataclass(frozen=True)
class CalibrationSet:
    """The photos chosen to calibrate on, and where they came from (label folder names only)."""

    paths: list[Path]
    sha256s: list[str]          # of each chosen file, same order as paths
    folders: dict[str, int]     # label folder -> images chosen from it
    available: int              # images the folder held

    @property
    def sha256(self) -> str:
        """Of the set, whatever its paths: sha256 over the sorted file hashes, one per line."""
        return hashlib.sha256("\n".join(sorted(self.sha256s)).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"images": len(self.paths), "available": self.available, "per_folder": dict(self.folders),
                "chosen": "the images with the lowest file sha256 (a fixed sample, the same on every machine)",
                "sha256": self.sha256, "sha256_of": "the sorted sha256 of each image file, one per line"}


def choose_calibration_images(folder: Path, count: int = DEFAULT_CALIBRATION_IMAGES) -> CalibrationSet:
    """`count` images from `folder`'s label folders (`<folder>/<label>/<image>`: the training
    photos, or a set written by `storage export-dataset`), the same ones on every machine: those
    with the lowest content hash, an unbiased sample that no file name or order can steer."""
    folder = Path(folder)
    if count < 1:
        raise DatasetError(f"--calibration-images must be at least 1, not {count}")
    if not folder.is_dir():
        raise DatasetError(f"calibration folder {folder} does not exist",
                           hint="pass --calibrate a folder of label folders, e.g. ../shared/data/cats_vs_dogs/train")
    files = [(f, sub.name) for sub in sorted(folder.iterdir()) if sub.is_dir() and not sub.name.startswith(".")
             for f in sorted(sub.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DatasetError(f"calibration folder {folder} holds no images in label folders",
                           hint="it should look like <folder>/<label>/<image>.jpg, as training data or "
                                "`python -m keras_serve.storage export-dataset` writes it")
    hashed = sorted((file_sha256(f), f, label) for f, label in files)[:count]
    folders: dict[str, int] = {}
    for _, _, label in hashed:
        folders[label] = folders.get(label, 0) + 1
    return CalibrationSet([f for _, f, _ in hashed], [h for h, _, _ in hashed], folders, len(files))


def calibration_inputs(chosen: CalibrationSet, spec: PreprocessSpec,
                       cache_dir: Path | None = None) -> tuple[np.ndarray, CalibrationSet]:
    """The chosen photos as model inputs (the server's decoding and scaling), and the set
    restricted to the photos that decoded: the card's hash names what was used."""
    pixels, ok = decode_files(chosen.paths, spec, cache_dir)
    if not ok.any():
        raise DatasetError("none of the calibration images could be decoded")
    if not ok.all():
        folders: dict[str, int] = {}
        for path, used in zip(chosen.paths, ok):
            if used:
                folders[path.parent.name] = folders.get(path.parent.name, 0) + 1
        chosen = CalibrationSet([p for p, u in zip(chosen.paths, ok) if u],
                                [h for h, u in zip(chosen.sha256s, ok) if u], folders, chosen.available)
    return to_model_input(pixels[ok], spec), chosen


# --- quantization --------------------------------------------------------------------------
def _reader(input_name: str, inputs: np.ndarray, batch: int):
    from onnxruntime.quantization import CalibrationDataReader

    class BatchReader(CalibrationDataReader):
        """Batches of the calibration inputs; `set_range` lets the calibrator take a few at a
        time (CalibStridedMinMax) so its memory stays one pass's worth."""

        def __init__(self) -> None:
            self.batches = [inputs[i:i + batch] for i in range(0, len(inputs), batch)]
            self.set_range(0, len(self.batches))

        def __len__(self) -> int:
            return len(self.batches)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._pending = iter(self.batches[start_index:end_index])

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch_inputs = next(self._pending, None)
            return None if batch_inputs is None else {input_name: batch_inputs}

    return BatchReader()


def quantize(float_onnx: bytes, inputs: np.ndarray, method: str = DEFAULT_METHOD, per_channel: bool = True) -> bytes:
    """The float ONNX model as static QDQ int8, calibrated on `inputs` (float32, model layout)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    calibrate_method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                        "percentile": CalibrationMethod.Percentile}[method]
    quiet = [logging.getLogger(name) for name in ("root", "onnxruntime")]
    levels = [logger.level for logger in quiet]
    with tempfile.TemporaryDirectory(prefix="keras-serve-int8-") as tmp:
        float_path, prepared, out = Path(tmp) / "float.onnx", Path(tmp) / "prepared.onnx", Path(tmp) / "int8.onnx"
        float_path.write_bytes(float_onnx)
        input_name = onnx.load_model_from_string(float_onnx).graph.input[0].name
        try:
            for logger in quiet:  # the quantizer logs advice at WARNING to the root logger
                logger.setLevel(logging.ERROR)
            # ONNX shape inference and graph fusions first, as ONNX Runtime's quantizer recommends
            # (symbolic shape inference is for models with symbolic sizes other than the batch):
            # fused Conv+activation nodes take one QDQ pair instead of two.
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
            reader = _reader(input_name, inputs, CALIBRATION_BATCH)
            with contextlib.redirect_stdout(io.StringIO()):  # histogram calibration print()s its progress
                quantize_static(
                    str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    # uint8 activations, int8 weights: what ONNX Runtime's x86 int8 kernels are built for.
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=calibrate_method,
                    extra_options={"CalibStridedMinMax": 1})  # one pass at a time: memory stays flat
        finally:
            for logger, level in zip(quiet, levels):
                logger.setLevel(level)
        return out.read_bytes()


def quantized_op_types(onnx_bytes: bytes) -> dict[str, int]:
    """How many nodes of each op type the model has: QuantizeLinear/DequantizeLinear (QDQ) or
    QLinear* nodes say it is quantized."""
    import onnx

    counts: dict[str, int] = {}
    for node in onnx.load_model_from_string(onnx_bytes).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# --- measuring -----------------------------------------------------------------------------
def cpu_ms_per_image(engine: Callable[[np.ndarray], Any], image: np.ndarray,
                     repeats: int = TIMING_REPEATS, calls: int = TIMING_CALLS) -> float:
    """CPU milliseconds per call on one image, the least over `repeats` runs of `calls` calls:
    the least is the run that other work on the machine disturbed least."""
    for _ in range(5):
        engine(image)
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            engine(image)
        best = min(best, (time.process_time() - start) / calls)
    return round(best * 1000, 3)


def variant_model(float_model: ServedModel, engine: Any, info: dict[str, Any]) -> ServedModel:
    """A ServedModel answering through `engine` with `float_model`'s contract."""
    return ServedModel(float_model.model, float_model.spec, float_model.labels, float_model.output_kind,
                       float_model.threshold, info, top_k=float_model.top_k,
                       apply_activation=float_model.info.get("output_activation_added"), engine=engine)


def compare_on_validation(float_model: ServedModel, int8_model: ServedModel, data: Path,
                          cache_dir: Path | None = None) -> dict[str, Any]:
    """Both models on the labelled photos of `data` (`<data>/<class>/<image>`, classes sorted
    as evaluate.py maps them): each one's report, the paired difference in accuracy with its
    95% interval and McNemar's test, how often they agree, and how far a score moved."""
    try:
        paths, labels, class_names = list_labelled_images(Path(data))
    except FileNotFoundError as exc:
        raise DatasetError(f"validation photos: {exc}") from None
    expected = 2 if float_model.output_kind == "sigmoid" else len(float_model.labels)
    if len(class_names) != expected:
        raise DatasetError(f"the validation folder has {len(class_names)} classes {class_names}, "
                           f"the model {expected} labels")
    decoded: dict = {}
    float_out, ok = model_outputs(float_model, paths, cache_dir=cache_dir, decoded=decoded)
    int8_out, _ = model_outputs(int8_model, paths, cache_dir=cache_dir, decoded=decoded)
    if not ok.any():
        raise DatasetError(f"none of the {len(paths)} validation images could be decoded")
    truth, float_out, int8_out = labels[ok], float_out[ok], int8_out[ok]
    float_pred, int8_pred = predicted_classes(float_model, float_out), predicted_classes(int8_model, int8_out)
    paired = paired_accuracy_difference(float_pred == truth, int8_pred == truth)
    change = np.abs(float_out - int8_out)
    return {
        "images": int(ok.sum()), "unreadable_files": int((~ok).sum()), "class_folders": class_names,
        "float": report_on(float_model, truth, float_out), "int8": report_on(int8_model, truth, int8_out),
        "paired": paired, "paired_roles": {"current": "float", "candidate": "int8"},
        "verdict": verdict(paired).replace("candidate", "int8"),
        "agreement": float((float_pred == int8_pred).mean()),
        "answers_changed": int((float_pred != int8_pred).sum()),
        "largest_score_change": float(change.max()), "mean_score_change": float(change.mean()),
    }


def accuracy_drop(comparison: dict[str, Any]) -> float:
    """Float accuracy minus int8 accuracy, as a fraction (0.003 = 0.3 points)."""
    return comparison["float"]["accuracy"] - comparison["int8"]["accuracy"]


# --- the whole job -------------------------------------------------------------------------
def default_output(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".int8.onnx")


def optimize(model_path: Path, calibrate: Path, validate: Path, out: Path | None = None,
             method: str = DEFAULT_METHOD, calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
             labels: str | None = None, command: str | None = None,
             cache_dir: Path | None = None) -> tuple[Path, dict[str, Any]]:
    """Quantize `model_path`, measure and compare it, write the engine file and its card.
    Returns the engine file's path and the card."""
    model_path = Path(model_path)
    out = Path(out) if out else default_output(model_path)
    if out.suffix != ".onnx":
        raise DatasetError(f"--out {out} must end in .onnx: the file is an ONNX Runtime engine")
    chosen = choose_calibration_images(calibrate, calibration_images)
    _refuse_overlap(chosen, Path(validate))
    float_model = ServedModel.load(model_path, labels=labels, engine="onnxruntime", engine_threads=1)
    if float_model.engine_name != "onnxruntime":
        raise DatasetError(f"{model_path.name} does not convert to ONNX: {float_model.engine_fallback_reason}")
    shape = float_model.spec.input_shape
    float_onnx = converted_bytes(model_path, "onnxruntime",
                                 lambda: OnnxRuntimeEngine.convert(float_model.model, shape), shape)
    inputs, chosen = calibration_inputs(chosen, float_model.spec, cache_dir)
    int8_onnx = quantize(float_onnx, inputs, method)
    int8_sha256 = hashlib.sha256(int8_onnx).hexdigest()
    int8_engine = OnnxRuntimeEngine(int8_onnx, threads=1)
    int8_model = variant_model(float_model, int8_engine, {**float_model.info, "file": out.name, "sha256": int8_sha256})
    comparison = compare_on_validation(float_model, int8_model, Path(validate), cache_dir)
    one_image = inputs[:1]
    float_ms = cpu_ms_per_image(OnnxRuntimeEngine(float_onnx, threads=1), one_image)
    int8_ms = cpu_ms_per_image(int8_engine, one_image)
    drop = accuracy_drop(comparison)
    promotable = drop <= MAX_ACCURACY_DROP + 1e-12
    ops = quantized_op_types(int8_onnx)
    card = _card(float_model, model_path, out, int8_sha256, len(int8_onnx), method, chosen, float_ms, int8_ms,
                 comparison, promotable, drop, ops, command)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(int8_onnx)
    ModelCard.from_json(card, out.name).write(out)
    return out, card


def _refuse_overlap(chosen: CalibrationSet, validate: Path) -> None:
    """Calibrating on validation photos would grade the variant on what tuned it."""
    if not validate.is_dir():
        return  # compare_on_validation says what is missing
    try:
        paths, _, _ = list_labelled_images(validate)
    except FileNotFoundError:
        return
    shared = set(chosen.sha256s) & {file_sha256(p) for p in paths}
    if shared:
        raise DatasetError(f"{len(shared)} calibration image(s) are also validation photos",
                           hint="calibrate on training photos, not on the photos the variant is checked on")


def _card(float_model: ServedModel, model_path: Path, out: Path, sha256: str, size: int, method: str,
          chosen: CalibrationSet, float_ms: float, int8_ms: float, comparison: dict[str, Any], promotable: bool,
          drop: float, ops: dict[str, int], command: str | None) -> dict[str, Any]:
    import onnxruntime

    contract = ModelCard.read(model_path)
    spec = float_model.spec
    contract.model_file = out.name
    contract.architecture = float_model.info.get("architecture")
    contract.parameters = float_model.info.get("parameters")
    contract.height, contract.width, contract.channels = spec.height, spec.width, spec.channels
    contract.layout = "channels_first" if spec.channels_first else "channels_last"
    contract.scaling, contract.output, contract.labels = spec.scaling, float_model.output_kind, float_model.labels
    contract.threshold = float_model.threshold
    points = round(100 * drop, 2)
    contract.extra = {
        "variant": "int8",
        "variant_of": {"file": model_path.name, "sha256": float_model.info.get("sha256")},
        "engine": {"runtime": "onnxruntime", "built_with": onnxruntime.__version__, "sha256": sha256, "bytes": size,
                   "format": "ONNX, QuantizeLinear/DequantizeLinear (QDQ) int8",
                   "output_activation_added": float_model.info.get("output_activation_added"),
                   "quantize_nodes": ops.get("QuantizeLinear", 0), "dequantize_nodes": ops.get("DequantizeLinear", 0)},
        "quantization": {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
                         "weights": "int8, symmetric, per output channel", "activations": "uint8, per tensor",
                         "calibration_method": method, "pre_processing": "onnxruntime quant_pre_process"},
        "calibration": {**chosen.describe(),
                        "preprocessing": "keras_serve.pipeline.preprocessing (decode_image, to_model_input)"},
        "speed": {"float_cpu_ms_per_image": float_ms, "int8_cpu_ms_per_image": int8_ms,
                  "speed_up": round(float_ms / int8_ms, 2) if int8_ms else None,
                  "measured": f"ONNX Runtime, 1 thread, batch 1, CPU time, least of {TIMING_REPEATS} runs of "
                              f"{TIMING_CALLS} calls on one calibration image"},
        "comparison": {"scored_by": "keras_serve.model.quantize (training/comparison.py statistics)",
                       "data": "validation photos", **comparison},
        "accuracy_drop_points": points,
        "promotable": promotable,
        "promotable_rule": f"validation accuracy at most {100 * MAX_ACCURACY_DROP:g} points below the float model's",
    }
    if not promotable:
        contract.extra["not_promotable_because"] = (
            f"validation accuracy drops {points:g} points (float {comparison['float']['accuracy']:.4f}, "
            f"int8 {comparison['int8']['accuracy']:.4f}); at most {100 * MAX_ACCURACY_DROP:g} is allowed")
    if command:
        contract.extra["command"] = command
    return contract.to_json()
