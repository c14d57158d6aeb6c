"""train.py and evaluate.py on datasets the tests generate, where the right answers are known."""
import json
import time

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
    assert r.status_code == 200 and r.get_json()["class"] in ("CAT", "DOG")
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
    time.sleep(1.1)  # so a re-run epoch 1 would carry a different finishing time
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
