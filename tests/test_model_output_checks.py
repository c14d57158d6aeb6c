"""Every served answer is a probability: a model whose output is not one gets a 503, a metric,
and no stored prediction, whatever its last activation and however the forward pass ran."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest

from images import BLUE, RED, image_bytes

WHITE, BLACK = (255, 255, 255), (0, 0, 0)
INVALID = "keras_serve_model_outputs_invalid_total"


def build_pooled(tmp_path, name: str, kernel: list[list[float]], activation: str):
    """mean colour (0..1 per channel) -> Dense(activation), saved as .h5; a white image's mean is (1, 1, 1)."""
    import keras

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(len(kernel[0]), activation=activation)(x)
    model = keras.Model(inputs, outputs)
    model.layers[-1].set_weights([np.array(kernel, np.float32), np.zeros(len(kernel[0]), np.float32)])
    path = tmp_path / f"{name}.h5"
    model.save(path)
    return path


def post(client, *images: bytes):
    files = [(io.BytesIO(data), f"{i}.png") for i, data in enumerate(images)]
    return client.post("/file/", data={"file": files}, content_type="multipart/form-data",
                       headers={"Accept": "application/json"})


def invalid_count(app, problem: str) -> float:
    version = app.extensions["classifier"].model.info["sha256"][:12]
    registry = app.extensions["metrics"].registry
    return registry.get_sample_value(INVALID, {"model_version": version, "problem": problem}) or 0.0


def strict_json(text: str) -> dict:
    """JSON as RFC 8259 has it: Python's parser would take Infinity and NaN, which no other does."""
    def refuse(constant: str):
        raise AssertionError(f"{constant} in {text[:200]}")
    return json.loads(text, parse_constant=refuse)


def stored_record(client, upload_id: str) -> tuple[dict, str]:
    response = client.get(f"/uploads/{upload_id}/record", headers={"Accept": "application/json"})
    assert response.status_code == 200
    return response.get_json(), response.get_data(as_text=True)


@pytest.mark.parametrize("batching", ["on", "off"])  # through the batcher's thread and inline
def test_an_infinite_score_is_a_503_with_its_code_a_metric_and_no_stored_prediction(make_app, tmp_path, batching):
    # exp(1000) overflows: the white photo of the finding, answered Infinity before.
    path = build_pooled(tmp_path, "exponential", [[1000.0], [0.0], [0.0]], "exponential")
    app = make_app(MODEL_PATH=str(path), BATCHING=batching)
    client = app.test_client()
    assert invalid_count(app, "not_finite") == 0.0

    response = post(client, image_bytes(WHITE, fmt="PNG"))

    assert response.status_code == 503
    error = strict_json(response.get_data(as_text=True))["error"]
    assert error["code"] == "model_output_invalid"
    assert "operator must check the model" in error["hint"]
    assert invalid_count(app, "not_finite") == 1.0
    record, raw = stored_record(client, error["id"])  # the upload is kept, with the error
    assert record["prediction"] is None and record["error"] == error["message"]
    strict_json(raw)


def test_a_score_above_one_is_a_503(make_app, tmp_path):
    path = build_pooled(tmp_path, "relu", [[5.0], [0.0], [0.0]], "relu")  # white -> 5.0
    app = make_app(MODEL_PATH=str(path))

    response = post(app.test_client(), image_bytes(WHITE, fmt="PNG"))

    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "model_output_invalid"
    assert invalid_count(app, "out_of_range") == 1.0


def test_softmax_scores_that_do_not_sum_to_one_are_a_503(make_app, tmp_path):
    # Three sigmoid units are served as a softmax over three labels: white -> (1, 1, 1), sum 3.
    path = build_pooled(tmp_path, "three_sigmoids", (np.eye(3) * 20).tolist(), "sigmoid")
    app = make_app(MODEL_PATH=str(path), LABELS="r,g,b")

    response = post(app.test_client(), image_bytes(WHITE, fmt="PNG"))

    assert response.status_code == 503
    assert response.get_json()["error"]["code"] == "model_output_invalid"
    assert invalid_count(app, "not_summing_to_one") == 1.0


def test_other_images_of_the_request_keep_their_answers(make_app, tmp_path):
    path = build_pooled(tmp_path, "relu", [[5.0], [0.0], [0.0]], "relu")  # white -> 5.0, black -> 0.0
    app = make_app(MODEL_PATH=str(path), BATCHING="on")
    client = app.test_client()

    response = post(client, image_bytes(WHITE, fmt="PNG"), image_bytes(BLACK, fmt="PNG"))

    assert response.status_code == 200
    bad, good = response.get_json()["results"]
    assert bad["error"]["code"] == "model_output_invalid" and bad["error"]["status"] == 503
    assert good["class"] == "CAT" and good["confidence"] == 1.0
    assert stored_record(client, bad["error"]["id"])[0]["prediction"] is None
    assert stored_record(client, good["id"])[0]["prediction"]["class"] == "CAT"
    assert invalid_count(app, "out_of_range") == 1.0


def test_every_image_invalid_is_a_503_for_the_request(make_app, tmp_path):
    path = build_pooled(tmp_path, "relu", [[5.0], [0.0], [0.0]], "relu")
    app = make_app(MODEL_PATH=str(path))

    response = post(app.test_client(), image_bytes(WHITE, fmt="PNG"), image_bytes(WHITE, fmt="PNG"))

    assert response.status_code == 503
    assert [r["error"]["code"] for r in response.get_json()["results"]] == ["model_output_invalid"] * 2


def test_a_normal_model_is_unaffected(app, client):
    responses = [post(client, image_bytes(colour)) for colour in (RED, BLUE)]

    assert [r.status_code for r in responses] == [200, 200]
    assert [r.get_json()["class"] for r in responses] == ["DOG", "CAT"]
    for problem in ("not_finite", "out_of_range", "not_summing_to_one"):
        assert app.extensions["metrics"].registry.get_sample_value(
            INVALID, {"model_version": app.extensions["classifier"].model.info["sha256"][:12],
                      "problem": problem}) is None  # no series at all: never counted


# --- the check itself ---------------------------------------------------------------------

@pytest.mark.parametrize("rows, kind, problem", [
    ([[0.2, 0.8]], "softmax", None),
    ([[0.0], [1.0]], "sigmoid", None),
    ([[1.0 + 5e-7]], "sigmoid", None),  # float32 rounding past 1: clipped, not refused
    ([[np.nan]], "sigmoid", "not_finite"),
    ([[0.5], [-np.inf]], "sigmoid", "not_finite"),
    ([[-0.01]], "sigmoid", "out_of_range"),
    ([[1.01]], "sigmoid", "out_of_range"),
    ([[0.5, 0.4]], "softmax", "not_summing_to_one"),
    ([[0.5, 0.5], [0.7, 0.7]], "softmax", "not_summing_to_one"),  # one bad row in a batch
])
def test_output_problem(rows, kind, problem):
    from keras_serve.model.served_model import output_problem

    assert output_problem(np.array(rows, np.float64), kind) == problem


def test_checked_output_clips_rounding_and_raises_with_the_problem(colour_model_path):
    from keras_serve.errors import ModelOutputInvalidError
    from keras_serve.model.served_model import ServedModel

    model = ServedModel.load(colour_model_path, engine="tensorflow")
    assert model.checked_output(np.array([1.0 + 5e-7])).tolist() == [1.0]
    with pytest.raises(ModelOutputInvalidError) as caught:
        model.checked_output(np.array([np.inf]))
    assert caught.value.problem == "not_finite"
    assert json.dumps(caught.value.message)  # plain text, nothing of the value in it
