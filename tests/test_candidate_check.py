"""A candidate model is checked in a child process, within a memory and a time budget, on
real-looking probe images, and against the served model's speed and memory
(keras_serve/model/candidate_check.py, docs/security.md).

Each model here is tiny on disk and built to fail one check: one needs gigabytes for its
activations, one declares a gigabyte-sized layer, one is slow, one never finishes in time, one
answers Infinity or 5.0 for a white photo. The server process must keep answering throughout.
"""
from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from images import BLUE, RED
from test_model_versions import BEARER, TOKEN, classify, cli, store_args

# Small budgets keep each check to seconds; the models below need far more, or far longer.
# BATCHING off: a swap to the slow model would otherwise warm it for every batch size up to 32.
SMALL_BUDGET = {"CANDIDATE_MEMORY_MB": 400.0, "ENGINE": "tensorflow", "MODEL_CHECK_INTERVAL_S": 0, "BATCHING": "off"}


@pytest.fixture()
def checked_app(make_app, colour_model_path):
    return make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN, **SMALL_BUDGET)


def save(model, path: Path) -> Path:
    model.save(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> path of each misbehaving model (built once for the module)."""
    import h5py
    import keras

    folder = tmp_path_factory.mktemp("candidates")
    made = {}

    def head(x, activation="sigmoid"):
        x = keras.layers.GlobalAveragePooling2D()(x)
        return keras.layers.Dense(1, activation=activation)(x)

    # 32x32 in, upsampled 64 times: a 2048x2048x16 activation, 256 MB per image, 2 GB for a batch of 8.
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.UpSampling2D(64)(inputs)
    x = keras.layers.Conv2D(16, 3, padding="same")(x)
    made["activation_bomb"] = save(keras.Model(inputs, head(x)), folder / "activation_bomb.h5")

    # Saved with a 10-unit layer, then declared as 50,000 units: 600 MB allocated while the model is built.
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Dense(10, name="wide")(keras.layers.Flatten()(inputs))
    path = save(keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x)), folder / "declared_wide.h5")
    with h5py.File(path, "r+") as f:
        config = f.attrs["model_config"]
        config = config.decode() if isinstance(config, bytes) else config
        assert '"units": 10,' in config
        f.attrs["model_config"] = config.replace('"units": 10,', '"units": 50000,')
    made["declared_wide"] = path

    # Convolutions over a 128x128 input: about 20 GFLOP an image, some 60 ms on two fast cores,
    # against under a millisecond for the colour model: far past both MIN_SLOWER_MS and 3 times:
    # a busy machine would have to hold the colour model's fastest of 7 passes over 20 ms to undo
    # it. With 3 layers of 64 (9 ms on an idle machine) it came under MIN_SLOWER_MS and was published.
    inputs = keras.Input((128, 128, 3))
    x = inputs
    for _ in range(5):
        x = keras.layers.Conv2D(128, 3, padding="same")(x)
    made["slow"] = save(keras.Model(inputs, head(x)), folder / "slow.h5")

    # A 512x512 input: about 300 MB of activations for a batch of 8, against tens for the colour model.
    inputs = keras.Input((512, 512, 3))
    made["big_input"] = save(keras.Model(inputs, head(keras.layers.Conv2D(32, 3, padding="same")(inputs))),
                             folder / "big_input.h5")

    # Wider and bigger still: seconds for the probe images alone.
    inputs = keras.Input((256, 256, 3))
    x = inputs
    for _ in range(3):
        x = keras.layers.Conv2D(96, 3, padding="same")(x)
    made["very_slow"] = save(keras.Model(inputs, head(x)), folder / "very_slow.h5")

    def mean_model(activation: str, weight: float, bias: float) -> keras.Model:
        """activation(weight * mean pixel + bias), pixels scaled to [0, 1]."""
        inputs = keras.Input((32, 32, 3))
        model = keras.Model(inputs, head(inputs, activation))
        model.layers[-1].set_weights([np.full((3, 1), weight / 3, np.float32), np.array([bias], np.float32)])
        return model

    # exp(200 * mean - 110): noise (mean 0.5) gives exp(-10), about 0; white gives exp(90), Infinity in float32.
    made["exponential"] = save(mean_model("exponential", 200, -110), folder / "exponential.h5")
    made["relu"] = save(mean_model("relu", 5, 0), folder / "relu.h5")  # white answers 5.0
    return made


# --- the decisions on a child's answers, without a child ---------------------------------------
# The tests further down run the real child process (suite_kinds marks them `processes`); these
# give check_candidate the answers a child would have given, so `make check` proves the decisions.

class FakeChildren:
    """Stands in for candidate_check._run_child: the answer for each file, by its name."""

    def __init__(self, answers: dict[str, dict]) -> None:
        self.answers = answers
        self.asked: list[str] = []

    def __call__(self, request: dict, budget, name: str) -> dict:
        self.asked.append(Path(request["path"]).name)
        return self.answers[Path(request["path"]).name]


def measured(latency_ms: float, memory_mb: float) -> dict:
    return {"ok": True, "labels": ["CAT", "DOG"], "latency_ms": latency_ms, "peak_mb": memory_mb,
            "engine": "tensorflow"}


@pytest.fixture()
def fake_children(monkeypatch, tmp_path):
    """(install, candidate file, served file): install(answers) puts FakeChildren in place of
    the child process; results are kept apart from the real checks' so none leaks either way."""
    from collections import OrderedDict

    from keras_serve.model import candidate_check

    monkeypatch.setattr(candidate_check, "_results", OrderedDict())
    candidate, served = tmp_path / "candidate.h5", tmp_path / "served.h5"
    candidate.write_bytes(b"the candidate")
    served.write_bytes(b"the served model")

    def install(answers: dict[str, dict]) -> FakeChildren:
        children = FakeChildren(answers)
        monkeypatch.setattr(candidate_check, "_run_child", children)
        return children

    return install, candidate, served


def test_a_candidate_past_the_slowdown_or_memory_ratio_is_refused_with_both_numbers_unless_forced(fake_children):
    from keras_serve.errors import CandidateRefused
    from keras_serve.model.candidate_check import check_candidate

    install, candidate, served = fake_children
    install({"candidate.h5": measured(60.0, 2400.0), "served.h5": measured(3.0, 600.0)})
    with pytest.raises(CandidateRefused) as refused:
        check_candidate(candidate, SMALL_BUDGET, ["CAT", "DOG"], name="new.h5", baseline=served)
    message = refused.value.message
    assert message.startswith("new.h5 would make every server worse: it answers one image in 60 ms, "
                              "20.0 times the served model's 3 ms (CANDIDATE_MAX_SLOWDOWN: 3); ")
    assert ("a process serving it takes 2400 MB to load it and answer 8 images, 4.0 times the served "
            "model's 600 MB (CANDIDATE_MAX_MEMORY_GROWTH: 3)") in message
    assert "python -m keras_serve.model publish --force" in message
    # --force (guard_ratios=False) publishes it: the served model is not even measured.
    children = install({"candidate.h5": measured(60.0, 2400.0)})
    assert check_candidate(candidate, SMALL_BUDGET, ["CAT", "DOG"], baseline=served,
                           guard_ratios=False).latency_ms == 60.0
    assert children.asked == []  # the candidate's result was kept from the first check


@pytest.mark.parametrize("candidate_answer, served_answer", [
    pytest.param(measured(9.0, 700.0), measured(0.3, 600.0), id="30-times-slower-by-under-MIN_SLOWER_MS"),
    pytest.param(measured(3.0, 80.0), measured(3.0, 20.0), id="4-times-the-memory-by-under-MIN_MORE_MB"),
    pytest.param(measured(8.9, 1790.0), measured(3.0, 600.0), id="just-under-both-ratios"),
])
def test_a_candidate_within_the_ratios_or_the_noise_floors_is_not_refused(fake_children, candidate_answer,
                                                                           served_answer):
    from keras_serve.model.candidate_check import check_candidate

    install, candidate, served = fake_children
    children = install({"candidate.h5": candidate_answer, "served.h5": served_answer})
    checked = check_candidate(candidate, SMALL_BUDGET, ["CAT", "DOG"], baseline=served)
    assert (checked.latency_ms, checked.memory_mb) == (candidate_answer["latency_ms"], candidate_answer["peak_mb"])
    assert children.asked == ["candidate.h5", "served.h5"]


def test_a_served_model_that_cannot_be_measured_is_not_compared_with(fake_children, caplog):
    from keras_serve.model.candidate_check import check_candidate

    install, candidate, served = fake_children
    install({"candidate.h5": measured(60.0, 2400.0), "served.h5": {"refused": "served.h5 does not load"}})
    with caplog.at_level(logging.WARNING):
        assert check_candidate(candidate, SMALL_BUDGET, None, name="new.h5", baseline=served).latency_ms == 60.0
    assert "candidate new.h5 is not compared with it: served.h5 does not load" in caplog.text


def test_a_childs_refusal_names_the_file_as_published_never_where_it_was_checked(fake_children):
    import tempfile

    from keras_serve.errors import CandidateRefused
    from keras_serve.model.candidate_check import check_candidate

    install, candidate, _ = fake_children
    where = f"{tempfile.gettempdir()}/keras-serve-promote-x1/candidate"
    install({"candidate.h5": {"refused": f"{candidate} does not load: {where}/candidate.h5 is truncated"}})
    with pytest.raises(CandidateRefused) as refused:
        check_candidate(candidate, SMALL_BUDGET, None, name="my_model.h5")
    assert refused.value.message == "my_model.h5 does not load: my_model.h5 is truncated"


class EndedChild:
    """A child process that has already ended with `code` (negative: killed by that signal)."""

    def __init__(self, code: int) -> None:
        self.code, self.killed = code, False

    def kill(self) -> None:
        self.killed = True

    def wait(self) -> int:
        return self.code


def follow(lines: list[dict | None], child: EndedChild, timeout_s: float = 60.0) -> str:
    """The refusal candidate_check._follow makes of a child's lines."""
    import queue

    from keras_serve.errors import CandidateRefused
    from keras_serve.model.candidate_check import Budget, _follow

    said: queue.Queue = queue.Queue()
    for line in lines:
        said.put(line)
    with pytest.raises(CandidateRefused) as refused:
        _follow(child, said, Budget(400.0, timeout_s, 3.0, 3.0, None), "big.h5")
    return refused.value.message


def test_a_child_killed_over_its_budget_or_out_of_memory_or_out_of_time_is_a_refusal_saying_so():
    assert follow([{"ready": True}, {"stage": "answering a batch of 8"}, None], EndedChild(-9)) == (
        "big.h5 ended its check process (signal SIGKILL) while answering a batch of 8, under a memory budget "
        "of 400 MB (CANDIDATE_MEMORY_MB): a model that needs more memory than its budget ends this way")
    assert follow([{"ready": True}, {"memory": "needs at least 2048 MB"}], EndedChild(0)) == (
        "big.h5 needs more memory than CANDIDATE_MEMORY_MB (400 MB) allows: needs at least 2048 MB (while loading)")
    # Nothing more said within CANDIDATE_TIMEOUT_S of the child's start (0 s here: no waiting).
    stuck = EndedChild(-9)
    assert follow([{"ready": True}, {"stage": "timing one image"}], stuck, timeout_s=0.0) == (
        "big.h5 took longer than CANDIDATE_TIMEOUT_S (0 s) to check; it was stopped while timing one image")
    assert stuck.killed


def publish_over_http(client, path: Path, filename: str | None = None):
    return client.post("/api/models", headers=BEARER, content_type="multipart/form-data",
                       data={"model": (io.BytesIO(path.read_bytes()), filename or path.name)})


def test_a_model_needing_gigabytes_is_refused_by_its_budget_while_the_server_keeps_answering(checked_app, models):
    client = checked_app.test_client()
    answers: dict = {}

    def publish() -> None:
        answers["publish"] = publish_over_http(client, models["activation_bomb"], "bomb.h5")

    publishing = threading.Thread(target=publish)
    publishing.start()
    during = []
    while publishing.is_alive():  # the check runs in a child process: this one answers meanwhile
        during.append(client.get("/healthz").status_code)
        during.append(classify(client, RED)["label"])
    publishing.join()
    assert during and set(during) <= {200, "DOG"}
    r = answers["publish"]
    assert r.status_code == 422, r.get_data(as_text=True)
    message = r.get_json()["error"]["message"]
    assert r.get_json()["error"]["code"] == "candidate_refused"
    assert "bomb.h5 needs more memory than CANDIDATE_MEMORY_MB (400 MB)" in message
    assert "candidate.h5" not in message and "/tmp" not in message  # the published name, never the temporary file
    assert client.get("/api/models", headers=BEARER).get_json()["versions"] == []
    assert classify(client, BLUE)["label"] == "CAT"


def use_the_apps_budget_on_the_cli(monkeypatch) -> None:
    for name, value in SMALL_BUDGET.items():
        monkeypatch.setenv(f"KERAS_SERVE_{name}", str(value))


def test_a_layer_declared_gigabyte_sized_is_refused_by_the_memory_budget_on_the_cli(checked_app, models, capsys,
                                                                                     monkeypatch):
    use_the_apps_budget_on_the_cli(monkeypatch)
    assert cli(*store_args(checked_app), "publish", str(models["declared_wide"])) == 2
    err = capsys.readouterr().err
    assert "declared_wide.h5 needs more memory than CANDIDATE_MEMORY_MB (400 MB)" in err
    assert "[3072,50000]" in err  # what it tried to allocate


def test_a_slow_model_is_refused_with_both_numbers_and_published_with_force_on_the_cli(checked_app, models, capsys,
                                                                                        monkeypatch):
    use_the_apps_budget_on_the_cli(monkeypatch)
    client = checked_app.test_client()
    r = publish_over_http(client, models["slow"])
    assert r.status_code == 422, r.get_data(as_text=True)
    message = r.get_json()["error"]["message"]
    assert "slow.h5 would make every server worse: it answers one image in" in message
    served_ms, slower = message.split(" ms, ")[0].split()[-1], message.split(" ms, ")[1].split(" times")[0]
    assert float(slower) > 3 and float(served_ms) > 0
    assert "times the served model's" in message and "CANDIDATE_MAX_SLOWDOWN: 3" in message
    assert client.get("/api/models", headers=BEARER).get_json()["versions"] == []

    assert cli(*store_args(checked_app), "publish", str(models["slow"])) == 2
    assert "slow.h5 would make every server worse" in capsys.readouterr().err
    assert cli(*store_args(checked_app), "publish", "--force", str(models["slow"])) == 0
    assert "published slow.h5" in capsys.readouterr().err
    # --force exists on the command line only: over HTTP the same file is still refused.
    version = client.get("/api/models", headers=BEARER).get_json()["versions"][0]
    r = client.post(f"/api/models/{version['sha256']}/promote", headers=BEARER)
    assert r.status_code == 422 and "would make every server worse" in r.get_json()["error"]["message"]
    assert checked_app.extensions["model_registry"].served() is None
    # Promoted with --force, the servers follow it: the comparison is not theirs to make.
    assert cli(*store_args(checked_app), "promote", "--force", version["sha256"]) == 0
    assert checked_app.extensions["classifier"].follower.check() == "swapped"


def test_a_model_taking_more_memory_than_the_ratio_allows_is_refused_with_both_numbers(make_app, colour_model_path,
                                                                                       models):
    # The ratio is of whole processes (TensorFlow alone takes hundreds of MB): 1.2 keeps the model small.
    app = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN,
                   **{**SMALL_BUDGET, "CANDIDATE_MEMORY_MB": 2048.0, "CANDIDATE_MAX_MEMORY_GROWTH": 1.2})
    r = publish_over_http(app.test_client(), models["big_input"])
    assert r.status_code == 422, r.get_data(as_text=True)
    message = r.get_json()["error"]["message"]
    assert "big_input.h5 would make every server worse" in message
    candidate_mb = float(message.split("a process serving it takes ")[1].split(" MB")[0])
    served_mb = float(message.split("times the served model's ")[-1].split(" MB")[0])
    assert candidate_mb > 1.2 * served_mb and "(CANDIDATE_MAX_MEMORY_GROWTH: 1.2)" in message


def test_a_model_that_takes_too_long_is_stopped_and_refused(make_app, colour_model_path, models):
    app = make_app(MODEL_PATH=str(colour_model_path), ADMIN_TOKEN=TOKEN, CANDIDATE_TIMEOUT_S=1.0, **SMALL_BUDGET)
    client = app.test_client()
    r = publish_over_http(client, models["very_slow"])
    assert r.status_code == 422, r.get_data(as_text=True)
    assert "very_slow.h5 took longer than CANDIDATE_TIMEOUT_S (1 s) to check; it was stopped while" in \
        r.get_json()["error"]["message"]
    assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("name, answer", [("exponential", "not finite"), ("relu", "out of range")])
def test_a_model_answering_a_white_photo_with_no_probability_is_refused_naming_the_probe(
        checked_app, models, name, answer):
    client = checked_app.test_client()
    r = publish_over_http(client, models[name])
    assert r.status_code == 422, r.get_data(as_text=True)
    message = r.get_json()["error"]["message"]
    assert f"{name}.h5 answers the probe image 'white' with [" in message and answer in message
    # Put in the store without any check (an older server, a hand-edited database) and promoted:
    # a server process following it checks it before loading it, and refuses it.
    registry = checked_app.extensions["model_registry"]
    registry.promote(registry.publish(models[name], ["CAT", "DOG"], "ana").sha256, "ana")
    follower = checked_app.extensions["classifier"].follower
    assert follower.check() == "refused"
    assert "answers the probe image 'white'" in next(iter(follower.refused.values()))
    assert classify(client, RED)["label"] == "DOG"  # still the start-up model


def test_the_probe_images_include_the_extremes_and_photos_from_the_probe_folder(tmp_path):
    from PIL import Image

    from keras_serve.model.probe_images import probes

    Image.new("RGB", (40, 30), (10, 200, 30)).save(tmp_path / "grass.jpg")
    (tmp_path / "notes.txt").write_text("not a photo")
    named = dict(probes(tmp_path))
    assert {"white", "black", "mid-grey", "gradient", "landscape", "noise", "grass.jpg"} <= set(named)
    assert "notes.txt" not in named
    white = np.asarray(Image.open(io.BytesIO(named["white"])))
    assert white.min() == 255


def test_a_stored_file_changed_after_publishing_is_refused_at_promote_and_logged_once(
        checked_app, inverted_colour_model_path, capsys, caplog):
    client = checked_app.test_client()
    registry = checked_app.extensions["model_registry"]
    store = checked_app.extensions["classifier"].store
    version = registry.publish(inverted_colour_model_path, ["CAT", "DOG"], "ana")
    store.images.put_model_file(version.sha256 + ".h5", b"\x89HDF\r\n\x1a\n" + b"tampered" * 100)

    r = client.post(f"/api/models/{version.sha256}/promote", headers=BEARER)
    assert r.status_code == 422, r.get_data(as_text=True)
    assert "inverted.h5" in r.get_json()["error"]["message"] and "damaged" in r.get_json()["error"]["message"]
    assert registry.served() is None
    assert cli(*store_args(checked_app), "promote", version.sha256) == 2
    assert "damaged in the image store" in capsys.readouterr().err
    assert registry.served() is None

    # Promoted anyway (an older server, a hand-edited database): each process refuses it once.
    registry.promote(version.sha256, "ana")
    follower = checked_app.extensions["classifier"].follower
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert [follower.check() for _ in range(3)] == ["refused", "same", "same"]
    assert sum("damaged" in record.getMessage() for record in caplog.records) == 1
    assert classify(client, RED)["label"] == "DOG"  # still the start-up model

    # Publishing the original file again repairs the store.
    registry.publish(inverted_colour_model_path, ["CAT", "DOG"], "ana")
    assert registry.fetch(version, Path(checked_app.config["UPLOAD_DIR"]) / "fetched").read_bytes() == \
        inverted_colour_model_path.read_bytes()


def test_a_refusal_names_the_published_file_never_the_folder_it_was_checked_in(checked_app):
    client = checked_app.test_client()
    r = client.post("/api/models", headers=BEARER, content_type="multipart/form-data",
                    data={"model": (io.BytesIO(b"\x89HDF\r\n\x1a\n" + b"\0" * 64), "../my model.h5")})
    assert r.status_code == 422, r.get_data(as_text=True)
    message = r.get_json()["error"]["message"]
    assert message.startswith("my_model.h5 does not load: ")
    assert "candidate" not in message and "/tmp" not in message and "keras-serve-" not in message
