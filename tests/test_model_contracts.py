"""The serving contract comes from the model: input size/layout/channels, output kind,
labels, threshold and pixel scaling; the startup summary says what was settled.

Every model here is built so its right answer is known (a global average pool followed by
a Dense layer with hand-set weights), so a wrong layout, channel order, scaling, label
order or activation changes the served answer, not just the metadata.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests

from keras_serve.errors import ModelLoadError
from images import BLUE, RED, image_bytes
from uploading import post_file
from server_process import ROOT, ServerProcess

GREEN = (20, 220, 20)
WHITE, BLACK = (255, 255, 255), (0, 0, 0)


# --- models whose answers are known --------------------------------------------------------
def build_pooled_model(input_shape, kernel, bias=None, activation="sigmoid",
                       data_format="channels_last", name="pooled"):
    """GlobalAveragePooling2D + Dense(kernel, bias): output = activation(mean pixel per channel @ kernel)."""
    import keras

    kernel = np.asarray(kernel, np.float32)
    units = kernel.shape[1]
    inputs = keras.Input(input_shape)
    x = keras.layers.GlobalAveragePooling2D(data_format=data_format)(inputs)
    outputs = keras.layers.Dense(units, activation=activation)(x)
    model = keras.Model(inputs, outputs, name=name)
    bias = np.zeros(units, np.float32) if bias is None else np.asarray(bias, np.float32)
    model.layers[-1].set_weights([kernel, bias])
    return model


def save(model, path: Path, card: dict | None = None) -> Path:
    model.save(path)
    if card is not None:
        path.with_suffix(".json").write_text(json.dumps(card))
    return path


def red_minus_blue(channels=3):
    """Sigmoid kernel: red images -> ~1 (second label), blue -> ~0 (first label); grey: bright -> 1."""
    if channels == 1:
        return [[10.0]], [-5.0]
    return [[10.0], [0.0], [-10.0]], [0.0]


def softmax_rgb(scale=20.0):
    """Softmax kernel: the brightest channel (red, green, blue) wins."""
    return np.eye(3, dtype=np.float32) * scale


def png(colour, size=(64, 48)) -> bytes:
    return image_bytes(colour, size, fmt="PNG")  # lossless: the model sees exact pixel values


def post(client, data: bytes) -> dict:
    r = post_file(client, data, "x.png")
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def load(path, **kwargs):
    from keras_serve.model.served_model import ServedModel

    return ServedModel.load(path, **kwargs)


def load_error(path, **kwargs) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load(path, **kwargs)
    assert "\n" not in info.value.message
    return info.value


# --- 1. input size, layout and channels come from the model ------------------------------
@pytest.mark.parametrize("input_shape,layout,channels", [
    ((24, 40, 3), "channels_last", 3),
    ((24, 40, 1), "channels_last", 1),
    ((3, 24, 40), "channels_first", 3),
    ((1, 24, 40), "channels_first", 1),
])
def test_input_size_layout_and_channels_come_from_the_model(make_app, tmp_path, input_shape, layout, channels):
    kernel, bias = red_minus_blue(channels)
    path = save(build_pooled_model(input_shape, kernel, bias, data_format=layout), tmp_path / "m.h5")
    app = make_app(MAX_BATCH=4, MODEL_PATH=str(path))
    model = app.extensions["classifier"].model
    assert model.describe()["input"] == {"height": 24, "width": 40, "channels": channels, "layout": layout}
    assert model.spec.input_shape == input_shape
    client = app.test_client()
    assert client.get("/model").get_json()["input"]["layout"] == layout
    # 3 channels: red vs blue proves the channel order survives the layout change;
    # 1 channel: the server converts to grey, bright vs dark decides.
    high, low = (RED, BLUE) if channels == 3 else (WHITE, BLACK)
    for colour, expected in ((high, "DOG"), (low, "CAT")):
        body = post(client, png(colour, (100, 30)))
        assert body["class"] == expected, (colour, body)
        assert body["confidence"] > 0.95


def test_card_layout_settles_shapes_the_guess_gets_wrong(tmp_path):
    # A grey channels_first model for 24x3 strips: (None, 1, 24, 3) looks like channels_last 1x24 RGB.
    model = build_pooled_model((1, 24, 3), [[10.0]], [-5.0], data_format="channels_first")
    guessed = load(save(model, tmp_path / "guess.h5"))
    assert guessed.describe()["input"]["layout"] == "channels_last"
    carded = load(save(model, tmp_path / "strip.h5", {"input": {"layout": "channels_first"}}))
    assert carded.describe()["input"] == {"height": 24, "width": 3, "channels": 1, "layout": "channels_first"}
    from keras_serve.pipeline.preprocessing import preprocess

    for colour, expected in ((WHITE, "DOG"), (BLACK, "CAT")):
        row = carded.predict_batch(preprocess(png(colour), carded.spec))[0]
        assert carded.interpret(row).label == expected


def test_unsupported_channel_count_is_refused(tmp_path):
    path = save(build_pooled_model((24, 40, 4), [[1.0]] * 4), tmp_path / "rgba.h5")
    assert "4-channel" in load_error(path).message


# --- 2. output kinds ---------------------------------------------------------------------
def constant_sigmoid(p: float):
    """A sigmoid model that answers p for every image."""
    logit = math.log(p / (1 - p))
    return build_pooled_model((16, 16, 3), np.zeros((3, 1)), [logit])


def test_one_sigmoid_gets_cat_dog_and_the_threshold_from_the_card(tmp_path):
    plain = load(save(constant_sigmoid(0.7), tmp_path / "plain.h5"))
    carded = load(save(constant_sigmoid(0.7), tmp_path / "carded.h5", {"threshold": 0.8}))
    for model in (plain, carded):
        assert model.labels == ["CAT", "DOG"] and model.output_kind == "sigmoid"
    assert plain.describe()["threshold"] == 0.5 and carded.describe()["threshold"] == 0.8
    row = np.array([0.7])
    assert plain.interpret(row).label == "DOG"      # 0.7 >= 0.5
    assert carded.interpret(row).label == "CAT"     # 0.7 <  0.8
    scores = carded.interpret(row).scores
    assert scores == pytest.approx({"CAT": 0.3, "DOG": 0.7})
    assert "CAT < 0.8 <= DOG" in carded.summary_line()


def test_card_threshold_is_applied_to_served_answers(make_app, tmp_path):
    path = save(constant_sigmoid(0.7), tmp_path / "m.h5", {"threshold": 0.8, "labels": ["no", "yes"]})
    app = make_app(MAX_BATCH=4, MODEL_PATH=str(path))
    body = post(app.test_client(), png(RED))
    assert body["class"] == "no" and body["scores"]["yes"] == pytest.approx(0.7, abs=1e-5)


def test_softmax_over_n_classes_is_ranked_and_sums_to_one(make_app, tmp_path):
    kernel = np.zeros((3, 5), np.float32)
    kernel[:, :3] = softmax_rgb()  # 5 classes; the last two never win
    path = save(build_pooled_model((20, 30, 3), kernel, activation="softmax"), tmp_path / "five.h5")
    app = make_app(MAX_BATCH=4, MODEL_PATH=str(path), LABELS="r,g,b,x,y")
    client = app.test_client()
    assert app.extensions["classifier"].model.describe()["output"] == "softmax"
    for colour, expected in ((RED, "r"), (GREEN, "g"), (BLUE, "b")):
        body = post(client, png(colour))
        assert body["class"] == expected
        assert set(body["scores"]) == {"r", "g", "b", "x", "y"}
        assert sum(body["scores"].values()) == pytest.approx(1.0, abs=1e-5)
        top = [t["score"] for t in body["top"]]
        assert body["top"][0]["label"] == expected and top == sorted(top, reverse=True)
        assert len(body["top"]) == 5


def test_linear_last_layer_is_treated_as_logits(tmp_path):
    sig = load(save(build_pooled_model((8, 8, 3), [[1.0], [0.0], [0.0]], activation="linear"), tmp_path / "s.h5"))
    soft = load(save(build_pooled_model((8, 8, 3), softmax_rgb(1.0), activation="linear"), tmp_path / "m.h5"),
                labels="r,g,b")
    x = np.zeros((1, 8, 8, 3), np.float32)
    x[..., 0] = 2.0
    assert sig.predict_batch(x)[0, 0] == pytest.approx(1 / (1 + math.exp(-2.0)), abs=1e-6)
    p = soft.predict_batch(x)[0]
    assert p.sum() == pytest.approx(1.0) and p == pytest.approx(np.exp([2, 0, 0]) / np.exp([2, 0, 0]).sum(), abs=1e-6)


@pytest.mark.parametrize("units", [2, 3])
def test_softmax_without_labels_says_pass_labels(tmp_path, units):
    kernel = np.ones((3, units), np.float32)
    path = save(build_pooled_model((8, 8, 3), kernel, activation="softmax"), tmp_path / "m.h5")
    err = load_error(path)
    assert "--labels" in err.message and f"{units} outputs" in err.message


@pytest.mark.parametrize("units,labels", [(3, "a,b"), (3, "a,b,c,d"), (1, "a,b,c"), (1, "only")])
def test_label_count_must_match_the_output(tmp_path, units, labels):
    kernel = np.ones((3, units), np.float32)
    path = save(build_pooled_model((8, 8, 3), kernel, activation="softmax" if units > 1 else "sigmoid"),
                tmp_path / "m.h5")
    err = load_error(path, labels=labels)
    assert f"needs {2 if units == 1 else units} labels" in err.message


def test_duplicate_labels_are_refused(tmp_path):
    path = save(build_pooled_model((8, 8, 3), softmax_rgb(), activation="softmax"), tmp_path / "m.h5")
    err = load_error(path, labels="a,a,b")
    assert "a" in err.message and "more than once" in err.message


@pytest.mark.parametrize("card,key", [
    ({"threshold": "high"}, "threshold"),
    ({"threshold": 1.5}, "threshold"),
    ({"labels": "no,yes"}, "labels"),
    ({"preprocessing": "-1..1"}, "preprocessing"),
    ({"input": [150, 150]}, "input"),
])
def test_malformed_model_card_is_a_one_line_load_error(tmp_path, card, key):
    path = save(constant_sigmoid(0.7), tmp_path / "m.h5", card)
    assert f'"{key}"' in load_error(path).message


def test_card_labels_that_are_not_strings_are_served_as_text(tmp_path):
    path = save(constant_sigmoid(0.7), tmp_path / "m.h5", {"labels": [0, 1]})
    model = load(path)
    assert model.labels == ["0", "1"] and model.interpret(np.array([0.7])).label == "1"


def test_label_mismatch_stops_python_app_with_one_line(tmp_path):
    path = save(build_pooled_model((8, 8, 3), softmax_rgb(), activation="softmax"), tmp_path / "three.h5")
    result = subprocess.run([sys.executable, "app.py", "--model", str(path), "--labels", "a,b", "--port", "0",
                             "--upload-dir", str(tmp_path / "uploads")],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:") and "needs 3 labels" in lines[0] and "three.h5" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout and "serving on" not in result.stdout


# --- 3. labels: model card, comma list, file; the argument wins ---------------------------
@pytest.fixture()
def rgb_softmax(tmp_path) -> Path:
    return save(build_pooled_model((12, 12, 3), softmax_rgb(), activation="softmax"), tmp_path / "rgb.h5",
                {"labels": ["rouge", "vert", "bleu"]})


def test_labels_come_from_the_card_beside_the_file(rgb_softmax):
    model = load(rgb_softmax)
    assert model.labels == ["rouge", "vert", "bleu"] and model.describe()["card"] == "rgb.json"


def test_labels_argument_as_comma_list_or_file_overrides_the_card(rgb_softmax, tmp_path):
    assert load(rgb_softmax, labels=" red, green ,blue").labels == ["red", "green", "blue"]
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("Red\n\n Green \nBlue\n")
    assert load(rgb_softmax, labels=str(labels_file)).labels == ["Red", "Green", "Blue"]


def test_labels_file_is_served(make_app, rgb_softmax, tmp_path):
    labels_file = tmp_path / "names.txt"
    labels_file.write_text("crimson\nemerald\nnavy\n")
    app = make_app(MAX_BATCH=4, MODEL_PATH=str(rgb_softmax), LABELS=str(labels_file))
    client = app.test_client()
    assert post(client, png(GREEN))["class"] == "emerald"
    assert post(client, png(BLUE))["class"] == "navy"


def test_card_labels_are_used_when_served(make_app, rgb_softmax, tmp_path):
    app = make_app(MAX_BATCH=4, MODEL_PATH=str(rgb_softmax))
    assert post(app.test_client(), png(RED))["class"] == "rouge"


# --- 4. preprocessing contract ----------------------------------------------------------
def red_probe(tmp_path, card=None) -> Path:
    """Sigmoid(0.01 * mean red input): the served DOG score reveals the value the model received."""
    model = build_pooled_model((10, 10, 3), [[0.01], [0.0], [0.0]], activation="linear")
    return save(model, tmp_path / "probe.h5", card)


def received_red(client, red: int) -> float:
    """The model-space value of a red channel equal to `red`, read back from the served score."""
    p = post(client, png((red, 77, 200)))["scores"]["DOG"]
    return math.log(p / (1 - p)) / 0.01


EXPECTED_RANGE = {"1/255": (0.0, 1.0), "none": (0.0, 255.0), "-1..1": (-1.0, 1.0)}


@pytest.mark.parametrize("card_scaling,arg_scaling,effective", [
    (None, None, "1/255"),      # default
    ("none", None, "none"),     # from the card
    ("-1..1", None, "-1..1"),   # from the card
    (None, "-1..1", "-1..1"),   # from the argument
    ("none", "-1..1", "-1..1"), # the argument wins over the card
    ("-1..1", "none", "none"),
])
def test_model_receives_pixels_in_its_scaling(make_app, tmp_path, card_scaling, arg_scaling, effective):
    card = {"preprocessing": {"scaling": card_scaling}} if card_scaling else None
    app = make_app(MAX_BATCH=4, MODEL_PATH=str(red_probe(tmp_path, card)), SCALING=arg_scaling)
    model = app.extensions["classifier"].model
    assert model.describe()["preprocessing"]["scaling"] == effective
    assert f"scaling {effective}" in model.summary_line()
    client = app.test_client()
    low, high = EXPECTED_RANGE[effective]
    assert received_red(client, 0) == pytest.approx(low, abs=0.02)
    assert received_red(client, 255) == pytest.approx(high, abs=0.02)
    assert received_red(client, 51) == pytest.approx(low + (high - low) * 51 / 255, abs=0.02)


def test_invalid_scaling_is_refused(tmp_path):
    path = red_probe(tmp_path, {"preprocessing": {"scaling": "0..1"}})
    assert "0..1" in load_error(path).message and "1/255" in load_error(path).message
    assert "unknown scaling" in load_error(path, scaling="imagenet").message
    assert load(path, scaling="none").spec.scaling == "none"  # a valid argument overrides a bad card


# --- 5. startup summary --------------------------------------------------------------------
def test_summary_line_names_everything_settled(tmp_path):
    import keras

    model = build_pooled_model((3, 24, 40), softmax_rgb(), activation="softmax", data_format="channels_first")
    path = save(model, tmp_path / "flowers.h5", {"labels": ["a", "b", "c"], "preprocessing": {"scaling": "-1..1"}})
    served = load(path)
    line = served.summary_line()
    assert "\n" not in line
    for part in ("flowers.h5", f"saved by Keras {keras.__version__}", "input 24x40x3 channels_first",
                 "softmax over 3 labels", "labels a,b,c", f"{model.count_params():,} parameters",
                 "scaling -1..1"):
        assert part in line, (part, line)
    d = served.describe()
    assert d["parameters"] == 12 and d["saved_by_keras"] == keras.__version__


def test_keras_2_2_4_file_is_served_end_to_end_by_python_app(tmp_path):
    from legacy_fixtures import blog_forward, blog_weights, write_keras2_h5
    from keras_serve.pipeline.preprocessing import PreprocessSpec, preprocess

    shape = (150, 150, 3)
    write_keras2_h5(tmp_path / "blog2017.h5", keras_version="2.2.4", input_shape=shape, seed=3)
    images = [png(RED, (200, 120)), png(BLUE, (90, 160)), image_bytes((120, 200, 40), (150, 150))]
    spec = PreprocessSpec(150, 150, 3, "1/255")
    weights = blog_weights(shape, 3)
    expected = [float(blog_forward(weights, preprocess(data, spec))[0, 0]) for data in images]

    srv = ServerProcess("--model", str(tmp_path / "blog2017.h5"), "--upload-dir", str(tmp_path / "uploads"))
    try:
        answers = [requests.post(srv.url + "/file/", files={"file": ("x.png", data)}, timeout=60).json()
                   for data in images]
    finally:
        output = srv.stop()
    # The two plain start-up lines, in order, among the JSON log lines (stderr is merged in).
    lines = [l for l in output.splitlines() if l.strip() and not l.startswith("{")]
    summary = lines[0]
    assert summary.startswith("model ") and lines[1].startswith("serving on"), output
    for part in ("blog2017.h5", "saved by Keras 2.2.4", "input 150x150x3 channels_last", "scaling 1/255",
                 "output sigmoid", "labels CAT,DOG", "1,212,513 parameters"):
        assert part in summary, (part, summary)
    for body, p in zip(answers, expected):
        assert body["scores"]["DOG"] == pytest.approx(p, abs=1e-4), (body, p)
        assert body["class"] == ("DOG" if p >= 0.5 else "CAT")


# --- 6. softmax with three labels over real HTTP ----------------------------------------
def test_softmax_with_three_labels_over_real_http(tmp_path):
    path = save(build_pooled_model((28, 36, 3), softmax_rgb(), activation="softmax"), tmp_path / "rgb.h5")
    srv = ServerProcess("--model", str(path), "--labels", "a,b,c", "--upload-dir", str(tmp_path / "uploads"))
    try:
        for colour, expected in ((RED, "a"), (GREEN, "b"), (BLUE, "c")):
            r = requests.post(srv.url + "/file/", files={"file": ("x.png", png(colour), "image/png")}, timeout=60)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["class"] == expected and body["confidence"] > 0.9
            assert set(body["scores"]) == {"a", "b", "c"}
            assert sum(body["scores"].values()) == pytest.approx(1.0, abs=1e-5)
            assert [t["label"] for t in body["top"]][0] == expected
            scores = [t["score"] for t in body["top"]]
            assert len(scores) == 3 and scores == sorted(scores, reverse=True)
        described = requests.get(srv.url + "/model", timeout=10).json()
        assert described["labels"] == ["a", "b", "c"] and described["output"] == "softmax"
    finally:
        output = srv.stop()
    assert "softmax over 3 labels" in output and "labels a,b,c" in output


# --- 7. weights-only files ---------------------------------------------------------------
def test_weights_only_h5_is_served_with_arch_seed(make_app, tmp_path):
    from legacy_fixtures import blog_forward, blog_weights, write_keras2_weights_h5
    from keras_serve.pipeline.preprocessing import PreprocessSpec, preprocess

    write_keras2_weights_h5(tmp_path / "weights.h5", seed=5)
    app = make_app(MAX_BATCH=4, MODEL_PATH=str(tmp_path / "weights.h5"), ARCH="seed")
    client = app.test_client()
    assert "weights.h5" in app.extensions["classifier"].model.summary_line()
    weights = blog_weights((150, 150, 3), 5)
    spec = PreprocessSpec()
    for data in (png(RED, (300, 200)), png((30, 180, 90), (150, 150))):
        p = float(blog_forward(weights, preprocess(data, spec))[0, 0])
        body = post(client, data)
        assert body["scores"]["DOG"] == pytest.approx(p, abs=1e-4)
        assert set(body["scores"]) == {"CAT", "DOG"}


def test_weights_only_h5_without_arch_is_a_one_line_startup_error(tmp_path, capsys):
    from keras_serve import cli
    from legacy_fixtures import write_keras2_weights_h5

    write_keras2_weights_h5(tmp_path / "weights.h5")
    code = cli.main(["--model", str(tmp_path / "weights.h5"), "--upload-dir", str(tmp_path / "up")])
    out, err = capsys.readouterr()
    assert code != 0
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "--arch" in lines[0] and "weights" in lines[0]
    assert "serving on" not in out
