"""`python -m keras_serve.model optimize`: the int8 variant of a model, its card, and its refusals."""
from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import DEFAULT_MODEL, SHARED_DATA
from keras_serve.model.__main__ import main as model_cli

SIZE = 32
SHIPPED_INT8 = DEFAULT_MODEL.with_suffix(".int8.onnx")


def build_conv_colour_model():
    """Convolutions with a known answer: a 3x3 identity convolution, then sigmoid(10 * (mean red
    - mean blue)), so red photos are DOG and blue ones CAT, far from the threshold."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 3))
    conv = keras.layers.Conv2D(3, 3, padding="same", activation="relu")
    dense = keras.layers.Dense(1, activation="sigmoid")
    outputs = dense(keras.layers.GlobalAveragePooling2D()(conv(inputs)))
    model = keras.Model(inputs, outputs, name="conv_colour")
    kernel = np.zeros((3, 3, 3, 3), np.float32)
    kernel[1, 1] = np.eye(3)
    conv.set_weights([kernel, np.zeros(3, np.float32)])
    dense.set_weights([np.array([[10.0], [0.0], [-10.0]], np.float32), np.zeros(1, np.float32)])
    return model


def write_photos(folder, per_label: int, seed: int) -> None:
    """Noisy blue photos in cats/, noisy red ones in dogs/ (PNG, larger than the model's input)."""
    rng = np.random.default_rng(seed)
    for label, colour in (("cats", (40, 70, 190)), ("dogs", (190, 70, 40))):
        (folder / label).mkdir(parents=True)
        for i in range(per_label):
            pixels = np.clip(np.array(colour) + rng.normal(0, 35, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / label / f"{label}-{i}.png")


def model_inputs(folder):
    from keras_serve.pipeline.preprocessing import PreprocessSpec, preprocess

    spec = PreprocessSpec(SIZE, SIZE)
    paths = sorted(folder.glob("*/*.png"))
    return np.concatenate([preprocess(p.read_bytes(), spec) for p in paths]), paths


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("int8")
    model_path = root / "colour.h5"
    build_conv_colour_model().save(model_path)
    write_photos(root / "calibration", 8, seed=1)
    write_photos(root / "validation", 10, seed=2)
    return root, model_path


@pytest.fixture(scope="module")
def optimized(work):
    root, model_path = work
    status = model_cli(["optimize", str(model_path), "--calibrate", str(root / "calibration"),
                        "--calibration-images", "12", "--validate", str(root / "validation")])
    assert status == 0
    out = root / "colour.int8.onnx"
    return out, json.loads(out.with_suffix(".json").read_text())


def test_optimize_writes_a_quantized_onnx_file(optimized):
    import onnx

    out, _ = optimized
    graph = onnx.load(str(out)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops or any(op.startswith("QLinear") for op in ops)
    assert "Conv" in ops or "QLinearConv" in ops
    int8_weights = [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8_weights, "the convolution and dense weights are stored as int8"


def test_the_card_says_what_the_variant_is(optimized, work):
    root, model_path = work
    out, card = optimized
    assert card["model_file"] == "colour.int8.onnx" and card["variant"] == "int8"
    assert card["variant_of"] == {"file": "colour.h5", "sha256": hashlib.sha256(model_path.read_bytes()).hexdigest()}
    assert card["engine"]["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert card["input"] == {"height": SIZE, "width": SIZE, "channels": 3, "layout": "channels_last"}
    assert card["labels"] == ["CAT", "DOG"] and card["output"] == "sigmoid" and card["threshold"] == 0.5
    assert card["quantization"]["calibration_method"] == "minmax"
    assert "per output channel" in card["quantization"]["weights"]

    calibration = card["calibration"]
    files = sorted((root / "calibration").glob("*/*.png"), key=lambda p: hashlib.sha256(p.read_bytes()).hexdigest())
    hashes = sorted(hashlib.sha256(p.read_bytes()).hexdigest() for p in files[:12])
    assert calibration["images"] == 12 and calibration["available"] == 16
    assert sum(calibration["per_folder"].values()) == 12 and set(calibration["per_folder"]) <= {"cats", "dogs"}
    assert calibration["sha256"] == hashlib.sha256("\n".join(hashes).encode()).hexdigest()
    assert str(root) not in json.dumps(calibration), "the calibration set is described without paths"

    speed = card["speed"]
    assert speed["float_cpu_ms_per_image"] > 0 and speed["int8_cpu_ms_per_image"] > 0
    ratio = speed["float_cpu_ms_per_image"] / speed["int8_cpu_ms_per_image"]
    assert speed["speed_up"] == pytest.approx(ratio, rel=0.02)

    comparison = card["comparison"]
    assert comparison["images"] == 20
    assert comparison["float"]["accuracy"] == 1.0 and comparison["int8"]["accuracy"] == 1.0
    paired = comparison["paired"]
    assert paired["difference"] == 0.0 and paired["ci_low"] <= 0.0 <= paired["ci_high"] and paired["mcnemar_p"] == 1.0
    assert comparison["agreement"] == 1.0 and comparison["answers_changed"] == 0
    assert 0.0 <= comparison["largest_score_change"] < 0.05
    assert card["accuracy_drop_points"] == 0.0 and card["promotable"] is True
    assert "not_promotable_because" not in card
    assert card["command"].startswith("python -m keras_serve.model optimize ")
    assert "--calibrate" in card["command"] and "--method minmax" in card["command"]


def test_the_card_reads_as_a_model_card(optimized):
    from keras_serve.model.card import ModelCard

    out, _ = optimized
    card = ModelCard.read(out)
    assert card.found and card.height == SIZE and card.scaling == "1/255" and card.labels == ["CAT", "DOG"]
    assert card.extra["variant_of"]["file"] == "colour.h5"


def test_int8_answers_stay_close_to_the_float_model(optimized, work):
    import onnxruntime as ort

    root, model_path = work
    out, _ = optimized
    inputs, _ = model_inputs(root / "validation")
    float_scores = build_conv_colour_model()(inputs).numpy()[:, 0]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    int8_scores = session.run(None, {session.get_inputs()[0].name: inputs})[0][:, 0]
    assert np.abs(int8_scores - float_scores).max() < 0.05
    assert ((int8_scores >= 0.5) == (float_scores >= 0.5)).all()


def test_the_calibration_hash_ignores_names_and_places(work, tmp_path):
    from keras_serve.model.quantize import choose_calibration_images

    root, _ = work
    copy = tmp_path / "elsewhere"
    for i, path in enumerate(sorted((root / "calibration").glob("*/*.png"))):
        (copy / path.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, copy / path.parent.name / f"renamed-{i}.png")
    assert choose_calibration_images(copy, 5).sha256 == choose_calibration_images(root / "calibration", 5).sha256
    assert choose_calibration_images(copy, 5).sha256 != choose_calibration_images(copy, 6).sha256


@pytest.mark.parametrize("make, message", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "holds no images"),
    (lambda d: (d / "cats").mkdir(parents=True) or (d / "cats" / "notes.txt").write_text("x"), "holds no images"),
])
def test_an_unusable_calibration_folder_is_a_clear_error(work, tmp_path, capsys, make, message):
    root, model_path = work
    calibration = tmp_path / "calibration"
    make(calibration)
    status = model_cli(["optimize", str(model_path), "--calibrate", str(calibration),
                        "--validate", str(root / "validation"), "--out", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err
    assert status == 2
    assert f"error: calibration folder {calibration} {message}" in err and "Traceback" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_calibrating_on_the_validation_photos_is_refused(work, tmp_path, capsys):
    root, model_path = work
    status = model_cli(["optimize", str(model_path), "--calibrate", str(root / "validation"),
                        "--validate", str(root / "validation"), "--out", str(tmp_path / "x.onnx")])
    assert status == 2
    assert "calibration image(s) are also validation photos" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()


def test_a_missing_model_or_validation_folder_is_a_clear_error(work, tmp_path, capsys):
    root, model_path = work
    assert model_cli(["optimize", str(tmp_path / "none.h5"), "--calibrate", str(root / "calibration"),
                      "--validate", str(root / "validation")]) == 2
    assert "no such model file" in capsys.readouterr().err
    assert model_cli(["optimize", str(model_path), "--calibrate", str(root / "calibration")]) == 2
    assert "names no validation photos; pass --validate DIR" in capsys.readouterr().err
    assert model_cli(["optimize", str(model_path), "--calibrate", str(root / "calibration"),
                      "--validate", str(tmp_path / "nowhere")]) == 2
    assert "validation folder" in capsys.readouterr().err


def test_a_variant_that_loses_accuracy_is_not_promotable(work, tmp_path, monkeypatch, capsys):
    """Whatever the quantizer did, the card is decided by the comparison: here the 'int8' file
    answers the other way round, so it loses every validation photo."""
    from keras_serve.model import quantize
    from keras_serve.model.engines import OnnxRuntimeEngine

    root, model_path = work
    inverted = build_conv_colour_model()
    dense = inverted.layers[-1]
    kernel, bias = dense.get_weights()
    dense.set_weights([-kernel, bias])
    wrong_onnx = OnnxRuntimeEngine.convert(inverted, (SIZE, SIZE, 3))
    monkeypatch.setattr(quantize, "quantize", lambda *args, **kwargs: wrong_onnx)
    out = tmp_path / "worse.onnx"
    assert model_cli(["optimize", str(model_path), "--calibrate", str(root / "calibration"),
                      "--validate", str(root / "validation"), "--out", str(out)]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["promotable"] is False and card["accuracy_drop_points"] == 100.0
    assert "drops 100 points" in card["not_promotable_because"]
    assert card["comparison"]["int8"]["accuracy"] == 0.0 and card["comparison"]["agreement"] == 0.0
    assert "NOT promotable" in capsys.readouterr().out


def test_the_shipped_int8_model_is_the_variant_its_card_names():
    card = json.loads(SHIPPED_INT8.with_suffix(".json").read_text())
    assert card["variant_of"] == {"file": DEFAULT_MODEL.name,
                                  "sha256": hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest()}
    assert card["engine"]["sha256"] == hashlib.sha256(SHIPPED_INT8.read_bytes()).hexdigest()
    assert card["calibration"]["images"] == 300 and card["promotable"] is True
    assert card["command"].startswith("python -m keras_serve.model optimize models/cats_vs_dogs.h5 ")


@pytest.mark.photos  # 1,000 photos on one thread, 7-11 s: make test, not make check
@pytest.mark.skipif(not (SHARED_DATA / "validation").is_dir(),
                    reason=f"real photos not available: {SHARED_DATA / 'validation'} is absent "
                           "(clone the project beside its shared/ folder)")
def test_the_shipped_int8_model_scores_the_validation_photos_as_its_card_says():
    from keras_serve.model import quantize
    from keras_serve.model.engines import OnnxRuntimeEngine
    from keras_serve.model.served_model import ServedModel

    card = json.loads(SHIPPED_INT8.with_suffix(".json").read_text())
    # One thread, as optimize ran: the same sums in the same order, so the very same scores.
    float_model = ServedModel.load(DEFAULT_MODEL, engine="onnxruntime", engine_threads=1)
    int8_model = quantize.variant_model(float_model, OnnxRuntimeEngine(SHIPPED_INT8.read_bytes(), threads=1),
                                        {**float_model.info, "file": SHIPPED_INT8.name})
    comparison = quantize.compare_on_validation(float_model, int8_model, SHARED_DATA / "validation")
    assert comparison["images"] == card["comparison"]["images"] == 1000
    assert comparison["int8"]["accuracy"] == card["comparison"]["int8"]["accuracy"]
    assert comparison["float"]["accuracy"] == card["comparison"]["float"]["accuracy"]
    assert comparison["float"]["accuracy"] - comparison["int8"]["accuracy"] <= quantize.MAX_ACCURACY_DROP
    assert comparison["answers_changed"] == card["comparison"]["answers_changed"]
