"""GET /uploads/<id>/heatmap.png: Grad-CAM of a stored upload, for a tiny CNN the tests build."""
import io
import threading

import numpy as np
import pytest
from PIL import Image

from images import BLUE, RED, image_bytes
from uploading import post_file

MAP_RED = (220, 20, 20)


def build_red_detector_cnn(size: int = 32, nested: bool = False, strength: float = 40.0):
    """Conv2D whose first filter fires on red minus blue (ReLU), pooled into one sigmoid:
    a red area drives the answer to DOG, so Grad-CAM must light up where the red is.
    `nested`: the convolution sits inside a nested functional model. `strength`: the Dense
    weight; thousands saturate the sigmoid to exactly 1.0 in float32."""
    import keras

    conv = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="red_minus_blue")
    if nested:
        inner_in = keras.Input((size, size, 3))
        base = keras.Model(inner_in, conv(inner_in), name="base")
        model = keras.Sequential([keras.Input((size, size, 3)), base, keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(1, activation="sigmoid")], name="nested_cnn")
    else:
        inputs = keras.Input((size, size, 3))
        x = keras.layers.GlobalAveragePooling2D()(conv(inputs))
        model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x), name="tiny_cnn")
    kernel = np.zeros((3, 3, 3, 2), np.float32)
    kernel[1, 1, 0, 0], kernel[1, 1, 2, 0] = 1.0, -1.0   # filter 0: red - blue
    kernel[1, 1, 2, 1], kernel[1, 1, 0, 1] = 1.0, -1.0   # filter 1: blue - red
    conv.set_weights([kernel, np.zeros(2, np.float32)])
    model.layers[-1].set_weights([np.array([[strength], [-strength]], np.float32), np.zeros(1, np.float32)])
    return model


@pytest.fixture(scope="module")
def cnn_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "tiny_cnn.keras"
    build_red_detector_cnn().save(path)
    return path


@pytest.fixture(scope="module")
def nested_cnn_model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "nested_cnn.keras"
    build_red_detector_cnn(nested=True).save(path)
    return path


@pytest.fixture()
def cnn_app(make_app, cnn_model_path):
    return make_app(MODEL_PATH=str(cnn_model_path))


def red_left_blue_right(size=(96, 64), red_share=0.6, fmt="PNG") -> bytes:
    """Red on the left, blue on the right: DOG when red takes more than half, else CAT."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    edge = round(size[0] * red_share)
    pixels[:, :edge] = MAP_RED
    pixels[:, edge:] = BLUE
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def heatmap_of(client, data: bytes):
    body = post_file(client, data).get_json()
    return body, client.get(f"/uploads/{body['id']}/heatmap.png")


def alpha_sides(png: bytes) -> tuple[float, float]:
    """Mean opacity of the heatmap's left and right quarters."""
    alpha = np.asarray(Image.open(io.BytesIO(png)))[..., 3].astype(float)
    quarter = alpha.shape[1] // 4
    return alpha[:, :quarter].mean(), alpha[:, -quarter:].mean()


def test_heatmap_lights_up_what_decided_the_answer(cnn_app):
    client = cnn_app.test_client()
    body, r = heatmap_of(client, red_left_blue_right())
    assert body["label"] == "DOG"  # the red half wins
    assert r.status_code == 200 and r.mimetype == "image/png"
    image = Image.open(io.BytesIO(r.data))
    image.verify()
    image = Image.open(io.BytesIO(r.data))
    assert image.mode == "RGBA" and image.size == (96, 64)  # the stored image's shape, to lay over it
    red_side, blue_side = alpha_sides(r.data)
    assert red_side > 100 and blue_side < 5, (red_side, blue_side)
    # The answer CAT is explained by the blue side (the model's logit, negated).
    body, r = heatmap_of(client, red_left_blue_right(red_share=0.4))
    assert body["label"] == "CAT"
    red_side, blue_side = alpha_sides(r.data)
    assert blue_side > 100 and red_side < 5, (red_side, blue_side)


def test_heatmap_follows_the_exif_orientation_and_caps_its_size(cnn_app):
    client = cnn_app.test_client()
    big = Image.new("RGB", (1200, 600), RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    out = io.BytesIO()
    big.save(out, "JPEG", exif=exif)
    _, r = heatmap_of(client, out.getvalue())
    assert Image.open(io.BytesIO(r.data)).size == (256, 512)


def test_second_request_is_served_from_the_cache_and_revalidates(cnn_app):
    client = cnn_app.test_client()
    body, first = heatmap_of(client, red_left_blue_right())
    maker = cnn_app.extensions["classifier"].heatmaps
    assert maker.computed == 1
    second = client.get(f"/uploads/{body['id']}/heatmap.png")
    assert second.data == first.data and maker.computed == 1
    assert "private" in first.headers["Cache-Control"] and first.headers["ETag"]
    again = client.get(f"/uploads/{body['id']}/heatmap.png", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304 and not again.data
    client.get(f"/uploads/{post_file(client, image_bytes(RED)).get_json()['id']}/heatmap.png")
    assert maker.computed == 2


def test_one_heatmap_at_a_time_others_wait_then_503(make_app, cnn_model_path, monkeypatch):
    app = make_app(MODEL_PATH=str(cnn_model_path), HEATMAP_WAIT_SECONDS=0.3)
    client = app.test_client()
    maker = app.extensions["classifier"].heatmaps
    ids = [post_file(client, red_left_blue_right()).get_json()["id"] for _ in range(2)]
    started, release = threading.Event(), threading.Event()
    make = maker._make

    def slow_make(data):
        started.set()
        assert release.wait(30)
        return make(data)

    monkeypatch.setattr(maker, "_make", slow_make)
    answers = {}
    worker = threading.Thread(target=lambda: answers.setdefault("first", app.test_client().get(
        f"/uploads/{ids[0]}/heatmap.png")))
    worker.start()
    assert started.wait(30)
    busy = client.get(f"/uploads/{ids[1]}/heatmap.png")
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "5"
    assert busy.get_json()["error"]["code"] == "heatmap_busy" and busy.get_json()["error"]["hint"]
    # Classification does not wait for the heatmap.
    assert post_file(client, image_bytes(RED)).status_code == 200
    release.set()
    worker.join(30)
    assert answers["first"].status_code == 200
    assert client.get(f"/uploads/{ids[1]}/heatmap.png").status_code == 200


def test_a_nested_convolution_is_found(make_app, nested_cnn_model_path):
    client = make_app(MODEL_PATH=str(nested_cnn_model_path)).test_client()
    body, r = heatmap_of(client, red_left_blue_right())
    assert body["label"] == "DOG" and r.status_code == 200
    red_side, blue_side = alpha_sides(r.data)
    assert red_side > 100 and blue_side < 5


def test_a_model_without_convolution_gets_a_clear_422(client):
    body = post_file(client, image_bytes(RED)).get_json()
    for _ in range(2):  # also once it is known
        r = client.get(f"/uploads/{body['id']}/heatmap.png")
        error = r.get_json()["error"]
        assert r.status_code == 422 and error["code"] == "no_convolution_layer"
        assert "convolution" in error["message"] and "CNN" in error["hint"]


def test_unknown_upload_ids_are_404(cnn_app):
    client = cnn_app.test_client()
    for bad in ("0" * 32, "nope", "%2E%2E", "20261125-0-" + "0" * 32):
        r = client.get(f"/uploads/{bad}/heatmap.png")
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "upload_not_found"
    assert client.get("/uploads/..%2F..%2Fapp.py/heatmap.png").status_code == 404
    assert cnn_app.extensions["classifier"].heatmaps.computed == 0


def test_softmax_models_explain_their_top_label():
    import keras

    from keras_serve.model.gradcam import GradCam

    inputs = keras.Input((16, 16, 3))
    conv = keras.layers.Conv2D(3, 1, activation="relu", name="channels")
    x = keras.layers.GlobalAveragePooling2D()(conv(inputs))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    conv.set_weights([np.eye(3, dtype=np.float32).reshape(1, 1, 3, 3), np.zeros(3, np.float32)])
    model.layers[-1].set_weights([np.eye(3, dtype=np.float32) * 20, np.zeros(3, np.float32)])
    image = np.zeros((1, 16, 16, 3), np.float32)
    image[0, :, :8, 1] = 1.0   # green on the left half: the top label
    image[0, 12:, 8:, 2] = 1.0  # a little blue bottom right
    cam, target = GradCam(model, (16, 16, 3), "softmax", ["r", "g", "b"], 0.5)(image)
    assert target == 1 and cam.shape == (16, 16)
    assert cam[:, :8].min() == pytest.approx(1.0) and cam[:, 8:].max() == 0.0


def test_a_saturated_sigmoid_still_gets_a_map(make_app, tmp_path):
    """p is exactly 1.0, so d p / d features is 0; Grad-CAM takes the logit before the sigmoid."""
    path = tmp_path / "saturated.keras"
    build_red_detector_cnn(strength=5000.0).save(path)
    client = make_app(MODEL_PATH=str(path)).test_client()
    body, r = heatmap_of(client, red_left_blue_right())
    assert body["label"] == "DOG" and body["confidence"] == 1.0
    red_side, blue_side = alpha_sides(r.data)
    assert red_side > 100 and blue_side < 5, (red_side, blue_side)
