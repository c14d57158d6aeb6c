"""train.py and evaluate.py on datasets the tests generate, where the right answers are known."""
import json

import numpy as np
import pytest
from PIL import Image

from images import BLUE, RED, image_bytes
from uploading import post_file

from keras_serve.model.card import ModelCard
from keras_serve.training.metrics import binary_report, roc_auc


def make_folder(root, split, per_class=6, size=(60, 80)):
    rng = np.random.default_rng(len(split))
    for name, colour in (("cats", BLUE), ("dogs", RED)):
        folder = root / split / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.integers(-25, 25, (size[1], size[0], 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{name}.{i}.jpg")


def test_quick_training_run_produces_a_model_the_server_serves(make_app, tmp_path):
    import keras_serve.training.train as train

    make_folder(tmp_path / "data", "train")
    make_folder(tmp_path / "data", "validation", per_class=3)
    out = tmp_path / "models" / "tiny.h5"
    assert train.main(["--data", str(tmp_path / "data"), "--train-splits", "train", "--out", str(out),
                       "--epochs", "1", "--batch-size", "4", "--labels", "CAT,DOG", "--quiet",
                       "--cache-dir", str(tmp_path / "cache")]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["labels"] == ["CAT", "DOG"] and card["input"]["height"] == 150
    assert card["preprocessing"]["scaling"] == "1/255" and card["training"]["images"] == 12
    assert card["validation"]["images"] == 6 and "--epochs 1" in card["command"]
    served = ModelCard.read(out)  # the one schema: what training wrote is what serving reads
    assert served.to_json() == card and (served.height, served.width, served.scaling) == (150, 150, "1/255")
    assert out.stat().st_size < 20_000_000

    app = make_app(MODEL_PATH=str(out))
    r = post_file(app.test_client(), image_bytes(RED), "r.jpg")
    assert r.status_code == 200
    # the known answer: the served model's own output on the image prepared as the card says
    # (whichever class a one-epoch model leans to, the server must report exactly that).
    # Not keras' Model.predict here: its worker threads left in this process have deadlocked
    # the forked pool of pack_data in a later test.
    from keras_serve.pipeline.preprocessing import PreprocessSpec, preprocess

    spec = PreprocessSpec(served.height, served.width, 3, served.scaling)
    model = app.extensions["classifier"].model
    dog = float(model.predict_batch(preprocess(image_bytes(RED), spec))[0, 0])
    answer = r.get_json()
    assert answer["scores"] == {"CAT": pytest.approx(1 - dog, abs=1e-4), "DOG": pytest.approx(dog, abs=1e-4)}
    assert answer["class"] == max(answer["scores"], key=answer["scores"].get)
    assert app.extensions["classifier"].model.describe()["architecture"] == "compact"


def test_training_resumes_from_its_last_epoch(tmp_path):
    import keras_serve.training.train as train
    make_folder(tmp_path / "data", "train", per_class=4)
    make_folder(tmp_path / "data", "validation", per_class=2)
    args = ["--data", str(tmp_path / "data"), "--train-splits", "train", "--out", str(tmp_path / "m.h5"),
            "--arch", "seed", "--batch-size", "4", "--quiet", "--cache-dir", str(tmp_path / "cache")]
    history_file = tmp_path / "m.work" / "history.json"
    assert train.main(args + ["--epochs", "1"]) == 0
    first = json.loads(history_file.read_text())
    # a mark no training writes: an epoch 1 trained again would replace its row, mark and all
    first[0]["finished"] = "marked by the test"
    history_file.write_text(json.dumps(first))
    assert train.main(args + ["--epochs", "2"]) == 0  # continues: runs epoch 2 only
    history = json.loads(history_file.read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == first[0], "epoch 1 was trained again instead of resumed"


def test_metrics_on_known_answers():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])) == pytest.approx(0.75)
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == pytest.approx(0.5)
    report = binary_report(np.array([0, 0, 1, 1, 1]), np.array([0.2, 0.7, 0.9, 0.6, 0.1]), ["CAT", "DOG"])
    assert report["accuracy"] == pytest.approx(0.6)
    assert report["confusion_matrix"]["rows_true_columns_predicted"] == [[1, 1], [1, 2]]
    # confidences 0.8, 0.7, 0.9, 0.6, 0.9 with correctness 1, 0, 1, 1, 0
    assert report["brier"] == pytest.approx((0.04 + 0.49 + 0.01 + 0.16 + 0.81) / 5)
    perfect = binary_report(np.array([0, 1]), np.array([0.0, 1.0]), ["CAT", "DOG"])
    assert perfect["ece"] == pytest.approx(0.0) and perfect["roc_auc"] == 1.0


def test_evaluate_command_on_a_folder_with_a_known_answer(colour_model_path, tmp_path, capsys):
    import keras_serve.training.evaluate as evaluate
    make_folder(tmp_path, "validation", per_class=5)
    (tmp_path / "validation" / "dogs" / "broken.jpg").write_bytes(b"not an image")
    report_path = tmp_path / "report.json"
    assert evaluate.main([str(colour_model_path), "--data", str(tmp_path), "--json", str(report_path)]) == 0
    report = json.loads(report_path.read_text())
    assert report["images"] == 10 and report["unreadable_files"] == 1
    assert report["accuracy"] == 1.0 and report["roc_auc"] == 1.0
    assert report["confusion_matrix"]["rows_true_columns_predicted"] == [[5, 0], [0, 5]]
    printed = capsys.readouterr().out
    assert "accuracy 1.0000" in printed and "ROC AUC  1.0000" in printed


def test_multiclass_metrics_on_known_answers():
    from keras_serve.training.metrics import multiclass_report

    probabilities = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    report = multiclass_report(np.array([0, 1, 2, 2]), probabilities, ["a", "b", "c"])
    assert report["accuracy"] == pytest.approx(0.75)
    assert report["confusion_matrix"]["rows_true_columns_predicted"] == [[1, 0, 0], [0, 1, 0], [1, 0, 1]]
    # bins: 0.5 wrong, 0.7 right, 0.8 right twice -> |0.5-0| + |0.7-1| + 2 * |0.8-1|, over 4
    assert report["ece"] == pytest.approx((0.5 + 0.3 + 0.4) / 4)
    assert report["brier"] == pytest.approx((0.06 + 0.14 + 0.98 + 0.06) / 4)


def test_resnet_recipe_trains_from_a_packed_file_and_the_server_loads_it(tmp_path):
    import keras_serve.training.evaluate as evaluate
    import keras
    import keras_serve.training.pack_data as pack_data
    import keras_serve.training.train as train
    from keras_serve.model.served_model import ServedModel

    make_folder(tmp_path / "data", "train", per_class=4)
    make_folder(tmp_path / "data", "validation", per_class=2)
    packed = tmp_path / "packed.npz"
    assert pack_data.main(["--data", str(tmp_path / "data"), "--out", str(packed), "--train-splits", "train"]) == 0
    pixels, labels, meta = pack_data.load_packed(packed, "train", workers=1)
    assert pixels.shape == (8, 150, 150, 3) and labels.tolist() == [0] * 4 + [1] * 4
    assert meta["parts"]["validation"]["images"] == 4 and meta["class_names"] == ["cats", "dogs"]

    out = tmp_path / "m.h5"
    assert train.main(["--packed", str(packed), "--arch", "resnet", "--out", str(out), "--epochs", "1",
                       "--batch-size", "4", "--labels", "CAT,DOG", "--quiet", "--workers", "1",
                       "--set", "mix_off_epochs=0", "--set", "mix_prob=1.0"]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["architecture"] == "resnet" and card["training"]["packed"]["parts"]["train"]["images"] == 8
    assert card["training"]["recipe"]["mix_prob"] == 1.0 and card["training"]["backend"] == keras.backend.backend()
    assert "--packed" in card["command"] and card["parameters"] == 662_089

    served = ServedModel.load(out)  # a plain Keras model: no augmentation layers travel with it
    assert [layer.name for layer in served.model.layers if "augment" in layer.name or "random" in layer.name] == []
    x = np.random.default_rng(0).random((3, 150, 150, 3), dtype=np.float32)
    np.testing.assert_allclose(served.predict_batch(x), keras.saving.load_model(out, compile=False).predict(x, verbose=0),
                               atol=1e-6)

    assert evaluate.main([str(out), "--data", str(tmp_path / "data"), "--update-card"]) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["validation"]["scored_by"] == "evaluate.py" and card["validation"]["images"] == 4
    assert card["validation_at_training"]["images"] == 4


def test_mixed_batches_are_reproducible_and_mix_labels_like_images():
    from keras_serve.training.augmentation import MixedBatches, build_augmenter
    from keras_serve.pipeline.preprocessing import PreprocessSpec

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
    labels = np.arange(16) % 2
    data = MixedBatches(pixels, labels, np.ones(16), PreprocessSpec(8, 8, 3), 8, seed=1, mix_prob=1.0)
    assert len(data) == 2
    x, y, w = data[0]
    x2, y2, _ = data[0]
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x.dtype == np.float32 and x.shape == (8, 8, 8, 3) and y.shape == (8, 1) and 0.0 <= x.min() <= x.max() <= 1.0
    assert ((y > 0) & (y < 1)).any(), "mixing images of both classes must mix their labels"
    data.mix_until = 0  # the clean epochs at the end
    _, y_clean, _ = data[0]
    assert set(np.unique(y_clean)) <= {0.0, 1.0}
    data.epoch = 1
    assert not np.array_equal(data.order(), MixedBatches(pixels, labels, np.ones(16), PreprocessSpec(8, 8, 3),
                                                          8, seed=1).order())

    augment = build_augmenter({"flip": True, "zoom_in": 0.35, "zoom_out": 0.1, "translate": 0.1, "color": 0.2}, 1)
    images = rng.random((4, 20, 20, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(augment(images, training=False)), images)
    out = np.asarray(augment(images, training=True))
    assert out.shape == images.shape and 0.0 <= out.min() <= out.max() <= 1.0 and not np.allclose(out, images)
    still = build_augmenter({"flip": False}, 1)  # no crop, no shift, no jitter: the identity resampling
    np.testing.assert_allclose(np.asarray(still(images, training=True)), images, atol=1e-5)
