"""Retraining on reviewed uploads and comparing the candidate (docs/retraining.md): exported sets
mapped by label name, the held-out rule, fine-tuning from a model, the card, evaluate --compare,
and the whole path export -> train -> evaluate through the real store. Generated images and
tiny models only."""
import csv
import hashlib
import io
import json
import uuid

import numpy as np
import pytest
from PIL import Image

from images import BLUE, RED
from uploading import post_file

from keras_serve.errors import DatasetError
from keras_serve.training.comparison import paired_accuracy_difference, verdict
from keras_serve.training.exported_sets import (LabelledImage, combine_for_training, is_held_out,
                                                match_label_folders, read_exported_set)

TOKEN = "retrain-token-" + "k3y" * 6
BEARER = {"Authorization": f"Bearer {TOKEN}"}


def noisy_png(colour, seed: int, size=(48, 40)) -> bytes:
    """A photo of one colour with its own noise: every seed gives different bytes (sha256)."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.integers(-25, 25, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def make_export(root, folders: dict[str, list[bytes]], source: str = "review"):
    """A folder as export-dataset writes it: <label>/<sha256>.png and manifest.csv."""
    rows = []
    for label, images in folders.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for data in images:
            sha = hashlib.sha256(data).hexdigest()
            (root / label / f"{sha}.png").write_bytes(data)
            rows.append({"id": uuid.uuid4().hex, "sha256": sha, "label": label, "source": source})
    with (root / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["id", "sha256", "label", "source"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(sorted(rows, key=lambda r: (r["label"], r["sha256"])))
    return root


def make_base(root, per_class: int = 4, val_per_class: int = 3, seed: int = 0):
    """Base data as the project's: <split>/cats|dogs/ (blue cats, red dogs)."""
    for split, n in (("train", per_class), ("validation", val_per_class)):
        for name, colour in (("cats", BLUE), ("dogs", RED)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{name}.{i}.png").write_bytes(noisy_png(colour, seed + 1000 * (split == "train") + i
                                                                   + 500 * (name == "dogs")))
    return root


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --- exported sets: label names, 'neither', the held-out rule ------------------------------

def test_label_folders_map_to_classes_by_name_not_by_sort_position(tmp_path):
    dogs = [noisy_png(RED, i) for i in range(3)]
    cats = [noisy_png(BLUE, 10 + i) for i in range(2)]
    # 'DOG' sorts before 'cat' (capitals first): by position DOG would become class 0, CAT.
    exported = read_exported_set(make_export(tmp_path / "a", {"DOG": dogs, "cat": cats}), ["CAT", "DOG"],
                                 aliases=["cats", "dogs"])
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if p.is_dir()) == ["DOG", "cat"]
    by_sha = {image.sha256: image.label for image in exported.images}
    assert [by_sha[sha(d)] for d in dogs] == [1, 1, 1] and [by_sha[sha(c)] for c in cats] == [0, 0]
    assert exported.folders == {"DOG": "DOG", "cat": "CAT"}
    assert exported.describe()["per_label"] == {"CAT": 2, "DOG": 3}
    # the base data's class folder names match too, in any case
    assert match_label_folders(["Dogs", "CATS"], ["CAT", "DOG"], ["cats", "dogs"]) == {"CATS": 0, "Dogs": 1}


def test_a_folder_that_names_no_class_is_refused_unless_skipped(tmp_path, capsys):
    root = make_export(tmp_path / "x", {"CAT": [noisy_png(BLUE, 1)], "neither": [noisy_png((20, 200, 20), 2)]})
    with pytest.raises(DatasetError) as refused:
        read_exported_set(root, ["CAT", "DOG"])
    assert "'neither'" in refused.value.message and "--skip-label neither" in refused.value.hint
    exported = read_exported_set(root, ["CAT", "DOG"], skip=["Neither"])
    assert [image.label for image in exported.images] == [0] and exported.skipped == {"neither": 1}

    # train says so too, as one line and exit status 2, before any training
    import keras_serve.training.train as train
    base = make_base(tmp_path / "base", 2, 1)
    assert train.main(["--data", str(base), "--train-splits", "train", "--extra", str(root), "--out",
                       str(tmp_path / "m.h5"), "--labels", "CAT,DOG", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "error: label folder(s) 'neither' name no class" in capsys.readouterr().err
    assert not (tmp_path / "m.h5").exists()


def test_a_folder_that_disagrees_with_its_manifest_is_refused(tmp_path):
    root = make_export(tmp_path / "x", {"CAT": [noisy_png(BLUE, 1)]})
    (root / "CAT" / "dropped-in-by-hand.png").write_bytes(noisy_png(BLUE, 2))
    with pytest.raises(DatasetError, match="disagree"):
        read_exported_set(root, ["CAT", "DOG"])
    (root / "CAT" / "dropped-in-by-hand.png").unlink()
    next((root / "CAT").glob("*.png")).unlink()
    with pytest.raises(DatasetError, match="missing"):
        read_exported_set(root, ["CAT", "DOG"])
    (tmp_path / "by_hand" / "CAT").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no manifest.csv"):
        read_exported_set(tmp_path / "by_hand", ["CAT", "DOG"])


def test_held_out_rule_is_deterministic_disjoint_and_a_fifth():
    digests = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5000)]
    held = [d for d in digests if is_held_out(d)]
    assert 0.18 < len(held) / len(digests) < 0.22
    assert held == [d for d in digests if is_held_out(d)]  # no state: the same answer every time
    assert all(int(d, 16) % 5 == 0 for d in held)


def test_training_set_never_holds_a_held_out_or_validation_image_and_counts_duplicates_once(tmp_path):
    images = [noisy_png(RED, i) for i in range(40)]
    held = [d for d in images if is_held_out(sha(d))]
    kept = [d for d in images if not is_held_out(sha(d))]
    assert held and kept
    one = read_exported_set(make_export(tmp_path / "one", {"DOG": images}), ["CAT", "DOG"])
    again = read_exported_set(make_export(tmp_path / "two", {"CAT": kept[:2], "DOG": kept[2:4]}), ["CAT", "DOG"])
    assert {i.sha256 for i in one.held_out()} | {i.sha256 for i in one.trainable()} == {sha(d) for d in images}
    assert not {i.sha256 for i in one.held_out()} & {i.sha256 for i in one.trainable()}
    assert [i.sha256 for i in one.held_out()] == [i.sha256 for i in read_exported_set(tmp_path / "one", ["CAT", "DOG"]
                                                                                      ).held_out()]
    # the base data holds a held-out photo and a photo of the second set; one photo is also in validation
    base = [LabelledImage(tmp_path / "b0", sha(held[0]), 1, "base"), LabelledImage(tmp_path / "b1", sha(kept[0]), 1, "base"),
            LabelledImage(tmp_path / "b2", sha(kept[5]), 1, "base"), LabelledImage(tmp_path / "b3", "f" * 64, 0, "base")]
    combined = combine_for_training(base, [one, again], never_train={sha(kept[5])})
    trained = {i.sha256: i for i in combined.train}
    assert len(trained) == len(combined.train)  # each image once
    assert not set(trained) & {sha(d) for d in held}, "a held-out image was trained on"
    assert sha(kept[5]) not in trained and "f" * 64 in trained
    assert trained[sha(kept[0])].label == 0 and trained[sha(kept[0])].source == "review"  # the later set's label
    # repeats: held[0] and kept[5] once each, kept[0] twice (base, both sets), kept[1:4] once each
    assert combined.duplicates == 1 + 1 + 2 + 3
    assert combined.label_conflicts == 2  # kept[0] and kept[1]: DOG in the first set, CAT in the second
    assert len(combined.train) == len(kept)  # 40 + 1 distinct, less the held-out and the validation photo


# --- fine-tuning and the card -------------------------------------------------------------

def save_model_with_card(model, path, recipe="seed", labels=("CAT", "DOG")):
    from keras_serve.model.card import ModelCard

    model.save(path)
    ModelCard(model_file=path.name, architecture=model.name, parameters=model.count_params(), height=150,
              width=150, channels=3, layout="channels_last", scaling="1/255", output="sigmoid",
              labels=list(labels), extra={"recipe": recipe}).write(path)
    return path


def test_fine_tune_starts_from_the_model_and_the_card_says_what_went_in(tmp_path, capsys):
    import keras

    import keras_serve.training.train as train
    from keras_serve.model.architectures import build_seed
    from keras_serve.model.engines import file_sha256
    from keras_serve.pipeline.preprocessing import PreprocessSpec, decode_image, to_model_input

    keras.utils.set_random_seed(99)  # not the training seed: a fresh start would differ
    init = save_model_with_card(build_seed(), tmp_path / "current.h5")
    base = make_base(tmp_path / "base", 4, 2)
    extra = make_export(tmp_path / "reviewed", {"dog": [noisy_png(RED, 100 + i) for i in range(10)],
                                                "CAT": [noisy_png(BLUE, 200 + i) for i in range(10)],
                                                "neither": [noisy_png((20, 200, 20), 300)]})
    # the fine-tuning defaults, unless told otherwise
    args = train.parse_args(["--data", str(base), "--out", "x.h5", "--init-from", str(init)])
    assert args.arch == "seed" and train.recipe_for(args)["epochs"] == train.FINE_TUNE["epochs"]
    assert train.recipe_for(args)["lr"] == pytest.approx(train.RECIPES["seed"]["lr"] * train.FINE_TUNE["lr_factor"])

    common = ["--data", str(base), "--train-splits", "train", "--extra", str(extra), "--skip-label", "neither",
              "--epochs", "1", "--batch-size", "4", "--lr", "1e-12", "--quiet", "--cache-dir", str(tmp_path / "c")]
    out = tmp_path / "candidate.h5"
    assert train.main(common + ["--init-from", str(init), "--out", str(out)]) == 0
    fresh = tmp_path / "fresh.h5"
    # without a model to start from, the labels come from --labels (else the folders: cats, dogs)
    assert train.main(common + ["--arch", "seed", "--labels", "CAT,DOG", "--out", str(fresh)]) == 0

    spec = PreprocessSpec(150, 150, 3, "1/255")
    x = to_model_input(np.stack([decode_image(noisy_png(c, 900 + i), spec) for i, c in enumerate([RED, BLUE] * 3)]),
                       spec)
    predict = {name: keras.saving.load_model(path, compile=False).predict(x, verbose=0)
               for name, path in (("init", init), ("candidate", out), ("fresh", fresh))}
    np.testing.assert_allclose(predict["candidate"], predict["init"], atol=1e-4)  # one step at lr 1e-12
    assert np.abs(predict["fresh"] - predict["init"]).max() > 1e-2  # what starting over gives instead

    card = json.loads(out.with_suffix(".json").read_text())
    training = card["training"]
    assert card["labels"] == ["CAT", "DOG"] and card["architecture"] == "seed"
    assert training["init_from"]["sha256"] == file_sha256(init) and training["init_from"]["file"] == "current.h5"
    assert training["fine_tune_defaults"] == train.FINE_TUNE
    [described] = training["extra_sets"]
    assert described["manifest_sha256"] == sha((extra / "manifest.csv").read_bytes())
    assert described["images"] == 20 and described["per_label"] == {"CAT": 10, "DOG": 10}
    assert described["label_folders"] == {"CAT": "CAT", "dog": "DOG"} and described["skipped_folders"] == {"neither": 1}
    held = sum(is_held_out(sha((f).read_bytes())) for f in extra.glob("[cCdD]*/*.png"))
    assert described["held_out"] == held and training["held_out"]["rule"] == "int(sha256, 16) % 5 == 0"
    assert training["combined"]["images_from_sets"] == 20 - held and training["combined"]["base_images"] == 8
    assert training["images"] == 8 + 20 - held and training["skipped_labels"] == ["neither"]
    assert f"--init-from {init}" in card["command"] and f"--extra {extra}" in card["command"]
    assert "fine-tuning from" in capsys.readouterr().out


def test_a_fine_tune_resumes_from_its_last_epoch_not_from_the_model_again(tmp_path):
    import keras_serve.training.train as train
    from keras_serve.model.architectures import build_seed

    init = save_model_with_card(build_seed(), tmp_path / "current.h5")
    args = ["--data", str(make_base(tmp_path / "base", 2, 1)), "--train-splits", "train", "--init-from", str(init),
            "--out", str(tmp_path / "m.h5"), "--batch-size", "4", "--quiet", "--cache-dir", str(tmp_path / "c")]
    history_file = tmp_path / "m.work" / "history.json"
    assert train.main(args + ["--epochs", "1"]) == 0
    first = json.loads(history_file.read_text())
    assert train.main(args + ["--epochs", "2"]) == 0  # continues with epoch 2; epoch 1 is not trained again
    history = json.loads(history_file.read_text())
    assert [h["epoch"] for h in history] == [1, 2] and history[0] == first[0]
    assert json.loads((tmp_path / "m.json").read_text())["training"]["init_from"]["file"] == "current.h5"


def test_init_from_a_model_of_another_architecture_or_input_is_refused(tmp_path, colour_model_path, capsys):
    import keras_serve.training.train as train
    from keras_serve.model.architectures import build_seed

    base = make_base(tmp_path / "base", 2, 1)
    common = ["--data", str(base), "--train-splits", "train", "--epochs", "1", "--out", str(tmp_path / "m.h5"),
              "--cache-dir", str(tmp_path / "c")]
    assert train.main(common + ["--arch", "seed", "--init-from", str(colour_model_path)]) == 2
    assert "is a 'colour' network and this run builds 'seed'" in capsys.readouterr().err
    small = save_model_with_card(build_seed((64, 64, 3)), tmp_path / "small.h5")
    assert train.main(common + ["--init-from", str(small)]) == 2
    assert "takes (64, 64, 3)" in capsys.readouterr().err
    fits = save_model_with_card(build_seed(), tmp_path / "fits.h5")
    assert train.main(common + ["--init-from", str(fits), "--labels", "cat,dog"]) == 2
    assert "differ from the labels of fits.h5 (CAT,DOG)" in capsys.readouterr().err
    assert not (tmp_path / "m.h5").exists()


# --- evaluate --compare -------------------------------------------------------------------

def always_dog_model(path):
    """Says DOG (about 0.99) to every photo: right on half of a balanced set."""
    from conftest import build_colour_model

    model = build_colour_model()
    model.layers[-1].set_weights([np.zeros((3, 1), np.float32), np.full(1, 5.0, np.float32)])
    model.save(path)
    return path


def test_compare_says_which_model_is_better_with_a_paired_interval(tmp_path, colour_model_path, capsys):
    import keras_serve.training.evaluate as evaluate

    reviewed = make_export(tmp_path / "reviewed", {"DOG": [noisy_png(RED, i) for i in range(100)],
                                                   "cat": [noisy_png(BLUE, 500 + i) for i in range(100)]})
    held = sum(is_held_out(sha(f.read_bytes())) for f in reviewed.glob("*/*.png"))
    base = make_base(tmp_path / "base", 1, 25)
    weak = always_dog_model(tmp_path / "always_dog.h5")
    report = tmp_path / "report.json"
    args = ["--reviewed", str(reviewed), "--data", str(base), "--split", "validation", "--json", str(report)]

    assert evaluate.main(["--compare", str(weak), str(colour_model_path), *args]) == 0
    result = json.loads(report.read_text())
    uploads, photos = result["datasets"]["reviewed_held_out"], result["datasets"]["base"]
    assert uploads["images"] == held and photos["images"] == 50
    assert uploads["current"]["accuracy"] < 0.7 and uploads["candidate"]["accuracy"] == 1.0
    assert uploads["candidate"]["per_class"]["CAT"]["recall"] == 1.0 and uploads["current"]["per_class"]["CAT"]["recall"] == 0
    assert photos["current"]["confusion_matrix"]["rows_true_columns_predicted"] == [[0, 25], [0, 25]]
    for data in (uploads, photos):
        paired = data["paired"]
        assert 0 < paired["ci_low"] <= paired["difference"] <= paired["ci_high"]
        assert paired["only_current_right"] == 0 and paired["mcnemar_p"] < 0.001
        assert data["verdict"].startswith(f"candidate better by {100 * paired['difference']:.1f} points (95% CI +")
        assert "ece" in data["current"] and "brier" in data["candidate"]
    assert result["verdict"].startswith("candidate better on")
    printed = capsys.readouterr().out
    assert "verdict: candidate better by 50.0 points" in printed and "McNemar exact p" in printed

    assert evaluate.main(["--compare", str(colour_model_path), str(weak), *args]) == 0
    swapped = json.loads(report.read_text())["datasets"]["base"]
    assert swapped["paired"]["ci_high"] < 0 and swapped["verdict"].startswith("candidate worse by 50.0 points")

    assert evaluate.main(["--compare", str(colour_model_path), str(colour_model_path), *args]) == 0
    same = json.loads(report.read_text())
    for data in same["datasets"].values():
        assert data["paired"]["ci_low"] <= 0 <= data["paired"]["ci_high"]
        assert data["verdict"].startswith("no detectable difference")
    assert same["verdict"] == "no detectable difference"


def test_compare_refuses_what_it_cannot_pair(tmp_path, colour_model_path, capsys):
    import keras_serve.training.evaluate as evaluate
    from conftest import build_colour_model

    three = tmp_path / "three.h5"
    build_colour_model(units=3).save(three)
    base = make_base(tmp_path / "base", 1, 2)
    assert evaluate.main(["--compare", str(colour_model_path), str(three), "--labels", "CAT,DOG",
                          "--data", str(base)]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["--compare", str(colour_model_path), str(colour_model_path)])  # on nothing
    none_held_out = [d for d in (noisy_png(RED, i) for i in range(10)) if not is_held_out(sha(d))][:3]
    report = tmp_path / "r.json"
    assert evaluate.main(["--compare", str(colour_model_path), str(colour_model_path), "--reviewed",
                          str(make_export(tmp_path / "few", {"DOG": none_held_out})), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["datasets"]["reviewed_held_out"]["images"] == 0 and result["verdict"] == "no images to compare on"
    assert result["datasets"]["reviewed_held_out"]["current"] is None  # no report of NaNs
    neither = make_export(tmp_path / "x", {"neither": [noisy_png((20, 200, 20), 1)]})
    assert evaluate.main(["--compare", str(colour_model_path), str(colour_model_path), "--reviewed", str(neither)]) == 2
    assert "--skip-label neither" in capsys.readouterr().err


def test_the_interval_narrows_with_more_images_and_is_reproducible():
    rng = np.random.default_rng(3)
    widths = []
    for n in (100, 400, 1600):
        current = rng.random(n) < 0.80
        candidate = np.where(rng.random(n) < 0.9, current, ~current)  # 10% of answers change
        paired = paired_accuracy_difference(current, candidate)
        assert paired == paired_accuracy_difference(current, candidate)  # fixed seed: the same report
        assert paired["ci_low"] <= paired["difference"] <= paired["ci_high"]
        widths.append(paired["ci_high"] - paired["ci_low"])
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] / widths[2] == pytest.approx(4, rel=0.35)  # 1 / sqrt(n)
    assert verdict(paired_accuracy_difference([], [])) == "no images to compare on"


def test_better_needs_the_interval_and_mcnemar_to_agree():
    # 200 photos, 20 wrong for both... the candidate fixes 12 and breaks 4: +4 points
    current, candidate = np.ones(200, bool), np.ones(200, bool)
    current[:20] = candidate[:20] = False
    candidate[:12] = True
    current[20:24], candidate[20:24] = True, False
    paired = paired_accuracy_difference(current, candidate)
    assert paired["difference"] == pytest.approx(0.04) and paired["ci_low"] > 0  # the bootstrap alone: better
    assert paired["mcnemar_p"] == pytest.approx(0.0768, abs=1e-3)  # 12 of 16 discordant: not significant
    assert verdict(paired).startswith("no detectable difference (+4.0 points, 95% CI +")
    twice = paired_accuracy_difference(np.tile(current, 2), np.tile(candidate, 2))
    assert twice["mcnemar_p"] < 0.05 and verdict(twice).startswith("candidate better by 4.0 points")


# --- the loop: the real store -> export-dataset -> train -> evaluate --compare --------------

def test_export_then_train_then_compare_then_promote_through_the_real_store(make_app, local_storage_config,
                                                                            tmp_path):
    import keras

    import keras_serve.training.evaluate as evaluate
    import keras_serve.training.train as train
    from keras_serve.model.architectures import build_seed
    from keras_serve.storage.dataset_export import export_dataset

    keras.utils.set_random_seed(5)
    current = save_model_with_card(build_seed(), tmp_path / "current.h5")
    app = make_app(MODEL_PATH=str(current), ADMIN_TOKEN=TOKEN, MODEL_CHECK_INTERVAL_S=0, **local_storage_config)
    client = app.test_client()
    truth = {}
    for i in range(30):
        colour, label = (RED, "DOG") if i % 2 else (BLUE, "CAT")
        r = post_file(client, noisy_png(colour, 7000 + i), filename=f"p{i}.png")
        assert r.status_code == 200
        truth[r.get_json()["id"]] = label
    r = client.post("/api/uploads/review", headers=BEARER,
                    json={"reviews": [{"id": upload_id, "label": label} for upload_id, label in truth.items()]})
    assert r.status_code == 200, r.get_data(as_text=True)
    exported = tmp_path / "reviewed"
    counts = export_dataset(app.extensions["classifier"].store, exported)
    assert counts.written == 30 and {p.name for p in exported.iterdir()} == {"CAT", "DOG", "manifest.csv"}
    held = {f.stem for f in exported.glob("*/*.png") if is_held_out(f.stem)}
    assert 0 < len(held) < 30

    base = make_base(tmp_path / "base", 4, 2)
    candidate = tmp_path / "candidate.h5"
    assert train.main(["--data", str(base), "--train-splits", "train", "--extra", str(exported), "--init-from",
                       str(current), "--out", str(candidate), "--epochs", "1", "--batch-size", "4", "--quiet",
                       "--cache-dir", str(tmp_path / "c")]) == 0
    card = json.loads(candidate.with_suffix(".json").read_text())
    assert card["architecture"] == "seed" and card["recipe"] == "seed"  # the recipe of the model it started from
    assert card["training"]["combined"]["images_from_sets"] == 30 - len(held)
    assert card["training"]["extra_sets"][0]["sources"] == {"review": 30}

    report = tmp_path / "compare.json"
    assert evaluate.main(["--compare", str(current), str(candidate), "--reviewed", str(exported),
                          "--data", str(base), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    assert result["candidate"]["file"] == "candidate.h5" and result["current"]["sha256"] == card["training"]["init_from"]["sha256"]
    uploads = result["datasets"]["reviewed_held_out"]
    assert uploads["images"] == len(held) and uploads["sets"][0]["manifest_sha256"] == card["training"]["extra_sets"][0]["manifest_sha256"]
    assert result["datasets"]["base"]["images"] == 4
    assert uploads["verdict"] and result["verdict"]

    # ... and into service: published over the admin API (checked as every server checks it), promoted
    with candidate.open("rb") as model, candidate.with_suffix(".json").open("rb") as model_card:
        r = client.post("/api/models", headers=BEARER, content_type="multipart/form-data",
                        data={"model": (model, "candidate.h5"), "card": (model_card, "candidate.json")})
    assert r.status_code == 201, r.get_data(as_text=True)
    version = r.get_json()["published"]
    assert version["sha256"] == hashlib.sha256(candidate.read_bytes()).hexdigest() and version["file"] == "candidate.h5"
    r = client.post(f"/api/models/{version['sha256']}/promote", headers=BEARER)
    assert r.status_code == 200, r.get_data(as_text=True)
    r = post_file(client, noisy_png(RED, 9999), filename="after.png")
    assert r.get_json()["model_version"] == version["sha256"]
    assert client.get("/model").get_json()["architecture"] == "seed"
