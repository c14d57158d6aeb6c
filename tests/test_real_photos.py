"""Real photos through the shipped default model, over HTTP, agreeing with evaluate.py's path."""
import io

import numpy as np
import pytest

from conftest import DEFAULT_MODEL, SHARED_DATA

VALIDATION = SHARED_DATA / "validation"
pytestmark = pytest.mark.skipif(not VALIDATION.is_dir(),
                                reason=f"real photos not available: {VALIDATION} is absent "
                                       "(clone the project beside its shared/ folder)")


@pytest.fixture(scope="module")
def default_app(tmp_path_factory):
    from keras_serve import create_app

    app = create_app({"MODEL_PATH": str(DEFAULT_MODEL), "UPLOAD_DIR": str(tmp_path_factory.mktemp("uploads"))})
    yield app
    app.extensions["classifier"].close()


def sample(per_class=40):
    files = []
    for label, folder in (("CAT", "cats"), ("DOG", "dogs")):
        names = sorted((VALIDATION / folder).glob("*.jpg"))
        files += [(label, p) for p in names[:: max(1, len(names) // per_class)][:per_class]]
    return files


def test_default_model_classifies_real_photos_over_http(default_app):
    client = default_app.test_client()
    model = default_app.extensions["classifier"].model
    assert model.labels == ["CAT", "DOG"] and model.spec.input_shape == (150, 150, 3)
    photos = sample()
    correct = 0
    for truth, path in photos:
        r = client.post("/file/", data={"file": (io.BytesIO(path.read_bytes()), path.name)})
        assert r.status_code == 200, r.get_data(as_text=True)
        correct += r.get_json()["class"] == truth
    accuracy = correct / len(photos)
    # The model card reports 0.973 on all 1,000; a sample of 80 stays well above 0.85.
    assert accuracy >= 0.85, accuracy


def test_server_answers_equal_the_evaluation_path(default_app):
    from keras_serve.training.dataset import decode_files
    from keras_serve.pipeline.preprocessing import to_model_input

    client = default_app.test_client()
    model = default_app.extensions["classifier"].model
    photos = [p for _, p in sample(per_class=5)]
    pixels, ok = decode_files(photos, model.spec, cache_dir=None, workers=1)
    assert ok.all()
    offline = model.predict_batch(to_model_input(pixels, model.spec))[:, 0]
    served = [client.post("/file/", data={"file": (io.BytesIO(p.read_bytes()), p.name)}).get_json()["scores"]["DOG"]
              for p in photos]
    assert np.allclose(served, offline, atol=1e-5)
