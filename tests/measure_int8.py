"""Which int8 quantization to ship: calibration methods, sizes and per-channel weights side by side.

    nice .venv/bin/python tests/measure_int8.py [--model models/cats_vs_dogs.h5] [--sizes 100,300]
        [--methods minmax,entropy,percentile] [--per-tensor]

Not a test (timings do not belong in tests). For each setting it quantizes the model as
`python -m keras_serve.model optimize` does (keras_serve/model/quantize.py), calibrated on the
training photos, and prints the CPU ms per image (1 thread, batch 1, least of several runs),
validation accuracy, the answers that changed against the float model, and the mean and largest
score change. The float model is loaded, and every photo decoded, once.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keras_serve.model import quantize  # noqa: E402
from keras_serve.model.engines import OnnxRuntimeEngine, converted_bytes  # noqa: E402
from keras_serve.model.served_model import ServedModel  # noqa: E402
from keras_serve.training.dataset import DEFAULT_CACHE_DIR  # noqa: E402

DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cats_vs_dogs"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/cats_vs_dogs.h5"))
    parser.add_argument("--calibrate", type=Path, default=DATA / "train")
    parser.add_argument("--validate", type=Path, default=DATA / "validation")
    parser.add_argument("--sizes", default="100,300")
    parser.add_argument("--methods", default=",".join(quantize.METHODS))
    parser.add_argument("--per-tensor", action="store_true", help="also per-tensor weights (minmax only)")
    parser.add_argument("--openvino", action="store_true",
                        help="also OpenVINO float and NNCF int8 (pip install openvino nncf; not a project dependency)")
    args = parser.parse_args()

    float_model = ServedModel.load(args.model, engine="onnxruntime", engine_threads=1)
    shape = float_model.spec.input_shape
    float_onnx = converted_bytes(args.model, "onnxruntime", lambda: OnnxRuntimeEngine.convert(float_model.model, shape),
                                 shape)
    sizes = [int(s) for s in args.sizes.split(",")]
    chosen = quantize.choose_calibration_images(args.calibrate, max(sizes))
    inputs, chosen = quantize.calibration_inputs(chosen, float_model.spec, DEFAULT_CACHE_DIR)
    one_image = inputs[:1]
    float_ms = quantize.cpu_ms_per_image(OnnxRuntimeEngine(float_onnx, threads=1), one_image)
    settings = [(m, n, True) for m in args.methods.split(",") for n in sizes]
    if args.per_tensor:
        settings += [("minmax", n, False) for n in sizes]
    print(f"float: {float_ms:.2f} CPU ms/image", flush=True)
    print("| calibration | images | weights | CPU ms/image | accuracy float | accuracy int8 | answers changed "
          "| mean score change | largest score change | McNemar p |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method, size, per_channel in settings:
        # The lowest-hash images of the whole set are the lowest-hash images of any larger sample.
        int8_onnx = quantize.quantize(float_onnx, inputs[:size], method, per_channel)
        engine = OnnxRuntimeEngine(int8_onnx, threads=1)
        int8_model = quantize.variant_model(float_model, engine, {**float_model.info, "file": "int8"})
        c = quantize.compare_on_validation(float_model, int8_model, args.validate, DEFAULT_CACHE_DIR)
        ms = quantize.cpu_ms_per_image(engine, one_image)
        print(row(method, size, "per channel" if per_channel else "per tensor", ms, c), flush=True)
    if args.openvino:
        for name, engine in openvino_engines(float_onnx, inputs[:max(sizes)]):
            model = quantize.variant_model(float_model, engine, {**float_model.info, "file": name})
            c = quantize.compare_on_validation(float_model, model, args.validate, DEFAULT_CACHE_DIR)
            ms = quantize.cpu_ms_per_image(engine, one_image)
            print(row(name, max(sizes), "-", ms, c), flush=True)
    return 0


def row(calibration: str, images: int, weights: str, ms: float, c: dict) -> str:
    return (f"| {calibration} | {images} | {weights} | {ms:.2f} | {c['float']['accuracy']:.4f} "
            f"| {c['int8']['accuracy']:.4f} | {c['answers_changed']} | {c['mean_score_change']:.4f} "
            f"| {c['largest_score_change']:.3f} | {c['paired']['mcnemar_p']:.3g} |")


def openvino_engines(float_onnx: bytes, calibration: Any):
    """OpenVINO on the same ONNX file, each compiled for one thread: float at f32, float at its
    CPU default (bf16 where the CPU has bf16 instructions), and NNCF post-training int8 (its
    default preset, f32 elsewhere): (name, callable) pairs."""
    import tempfile

    import nncf
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY"}
    default_precision = core.get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()  # "bf16", "f32"
    with tempfile.TemporaryDirectory() as tmp:  # kept while the models live: weights may be read lazily
        path = Path(tmp) / "float.onnx"
        path.write_bytes(float_onnx)
        float_ov = ov.convert_model(str(path))
        int8_ov = nncf.quantize(float_ov, nncf.Dataset([image[None] for image in calibration]),
                                subset_size=len(calibration))
        version = ov.__version__.split("-")[0]
        for name, model, precision in ((f"OpenVINO {version} float, f32", float_ov, "f32"),
                                       (f"OpenVINO {version} float, {default_precision}", float_ov, None),
                                       (f"OpenVINO + NNCF {nncf.__version__} int8", int8_ov, "f32")):
            hint = {"INFERENCE_PRECISION_HINT": precision} if precision else {}
            compiled = core.compile_model(model, "CPU", {**config, **hint})
            yield name, (lambda batch, compiled=compiled: compiled(batch)[0])


if __name__ == "__main__":
    sys.exit(main())
