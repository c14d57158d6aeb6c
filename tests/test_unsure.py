""""unsure": the winning score under UNSURE_BELOW, with the colour model whose score is known."""
import numpy as np
import pytest

from images import BLUE, RED, image_bytes
from uploading import post_file, post_files

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
# The colour model answers sigmoid(10 * (mean red - mean blue)): (150, 100, 100) scores
# sigmoid(10 * 50 / 255) = 0.877 for DOG; grey scores 0.5.
REDDISH = (150, 100, 100)
GREY = (128, 128, 128)


@pytest.mark.parametrize("unsure_below,reddish_unsure", [(0.9, True), (0.85, False), (0.0, False)])
def test_unsure_when_the_winning_score_is_under_the_setting(make_app, colour_model_path, unsure_below,
                                                            reddish_unsure):
    client = make_app(MODEL_PATH=str(colour_model_path), UNSURE_BELOW=unsure_below).test_client()
    body = post_file(client, image_bytes(REDDISH, fmt="PNG")).get_json()
    assert body["label"] == "DOG" and 0.87 < body["confidence"] < 0.885
    assert body["unsure"] is reddish_unsure
    assert post_file(client, image_bytes(RED, fmt="PNG")).get_json()["unsure"] is False
    assert post_file(client, image_bytes(GREY, fmt="PNG")).get_json()["unsure"] is (unsure_below > 0.5)
    assert client.get(f"/uploads/{body['id']}/record").get_json()["prediction"]["unsure"] is reddish_unsure
    assert client.get("/model").get_json()["unsure_below"] == unsure_below


def test_default_threshold_and_flag(client, app):
    from keras_serve.cli import parse_args
    from keras_serve.settings import BY_NAME, from_arguments

    assert app.config["UNSURE_BELOW"] == BY_NAME["UNSURE_BELOW"].default == 0.85  # docs/unsure.md
    assert from_arguments(parse_args(["--unsure-below", "0.7"]))["UNSURE_BELOW"] == 0.7
    assert post_file(client, image_bytes(GREY, fmt="PNG")).get_json()["unsure"] is True


def test_each_result_of_several_says_whether_it_is_sure(client):
    r = post_files(client, [("grey.png", image_bytes(GREY, fmt="PNG")), ("blue.png", image_bytes(BLUE, fmt="PNG"))])
    assert [item["unsure"] for item in r.get_json()["results"]] == [True, False]
    page = post_files(client, [("grey.png", image_bytes(GREY, fmt="PNG")),
                               ("blue.png", image_bytes(BLUE, fmt="PNG"))], headers=HTML).get_data(as_text=True)
    assert page.count("not sure") == 1


def test_calibration_table_counts_the_band_and_the_rest():
    from keras_serve.tools.unsure_calibration import band_table

    confidence = np.array([0.55, 0.65, 0.8, 0.95, 0.99])
    correct = np.array([False, True, False, True, True])
    low, high = band_table(confidence, correct, [0.5, 0.9])
    assert low["unsure_count"] == 0 and low["accuracy_rest"] == pytest.approx(0.6) and low["errors_rest"] == 2
    assert high["unsure_count"] == 3 and high["unsure_share"] == pytest.approx(0.6)
    assert high["accuracy_unsure"] == pytest.approx(1 / 3) and high["accuracy_rest"] == 1.0
