"""The engines behind ServedModel: every Keras era converts and answers as the Keras model does,
conversions are cached by the model file's hash, and a converted engine that cannot load or
answers differently gives way to TensorFlow with one log line."""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest

from keras_serve.model import engines
from keras_serve.model.served_model import FAITHFUL_MAX_ABS_DIFFERENCE, ServedModel
from legacy_fixtures import write_keras2_h5, write_keras3_model, write_tf_keras_h5

SHAPE = (32, 32, 3)  # write_keras3_model's input
FIXTURES = {
    "keras-2.0.8 .h5": lambda d: write_keras2_h5(d / "k208.h5", "2.0.8"),
    "keras-2.2.4 .h5": lambda d: write_keras2_h5(d / "k224.h5", "2.2.4"),
    "tf.keras .h5": lambda d: write_tf_keras_h5(d / "tfk.h5"),
    "keras 3 .keras": lambda d: write_keras3_model(d / "k3.keras"),
}


@pytest.mark.parametrize("engine", ["onnxruntime", "litert"])
@pytest.mark.parametrize("era", sorted(FIXTURES))
def test_converted_engine_serves_every_keras_era_with_the_same_answers(tmp_path, era, engine):
    fixture = FIXTURES[era](tmp_path)
    served = ServedModel.load(fixture.path, engine=engine)
    assert served.engine_name == engine, served.engine_fallback_reason
    got = served.predict_batch(fixture.inputs)
    assert np.abs(got - fixture.expected).max() <= FAITHFUL_MAX_ABS_DIFFERENCE
    assert served.describe()["engine"]["name"] == engine
    assert f"engine {engine}" in served.summary_line()


def test_auto_picks_onnxruntime_and_caches_the_conversion_by_file_hash(tmp_path):
    fixture = write_keras3_model(tmp_path / "m.keras")
    served = ServedModel.load(fixture.path)
    assert served.engine_name == "onnxruntime"
    cached = engines.cache_path(fixture.path, "onnxruntime", SHAPE)
    assert cached.parent == tmp_path / ".cache" and cached.name == engines.file_sha256(fixture.path) + ".32x32x3.onnx"
    assert cached.is_file()
    # A copy of the model under another name shares the conversion: the key is the content.
    copy = tmp_path / "copy.keras"
    shutil.copy(fixture.path, copy)
    assert engines.cache_path(copy, "onnxruntime", SHAPE) == cached
    mtime = cached.stat().st_mtime_ns
    again = ServedModel.load(copy)
    assert again.engine_name == "onnxruntime" and cached.stat().st_mtime_ns == mtime  # read, not redone
    assert np.allclose(again.predict_batch(fixture.inputs), fixture.expected, atol=FAITHFUL_MAX_ABS_DIFFERENCE)


@pytest.mark.parametrize("engine", ["onnxruntime", "litert"])
def test_a_worker_engine_runs_a_lone_input_on_every_core_and_batches_on_its_share(tmp_path, monkeypatch, engine):
    monkeypatch.setattr(engines, "usable_cores", lambda: 4)
    fixture = write_keras3_model(tmp_path / "m.keras")
    served = ServedModel.load(fixture.path, engine=engine, engine_threads=2)  # as one of 2 workers
    split = served.engine
    assert isinstance(split, engines.LoneInputSplit) and served.engine_name == engine
    calls = []
    for name in ("lone", "batched"):
        instance = getattr(split, name)
        monkeypatch.setattr(split, name, lambda batch, run=instance, name=name: calls.append(name) or run(batch))
    together = served.predict_batch(fixture.inputs)
    alone = np.concatenate([served.predict_batch(fixture.inputs[i:i + 1]) for i in range(len(fixture.inputs))])
    assert calls == ["batched"] + ["lone"] * len(fixture.inputs)
    assert np.abs(together - fixture.expected).max() <= FAITHFUL_MAX_ABS_DIFFERENCE
    assert np.abs(alone - fixture.expected).max() <= FAITHFUL_MAX_ABS_DIFFERENCE
    # With every core already its own (one process), there is nothing to split.
    assert not isinstance(ServedModel.load(fixture.path, engine=engine, engine_threads=4).engine,
                          engines.LoneInputSplit)


def test_a_lone_input_keeps_to_its_share_while_its_process_has_other_requests(tmp_path, monkeypatch):
    from keras_serve.pipeline.decode_budget import DecodeBudget
    from keras_serve.pipeline.model_slot import Generation, ModelSlot

    monkeypatch.setattr(engines, "usable_cores", lambda: 4)
    fixture = write_keras3_model(tmp_path / "m.keras")
    served = ServedModel.load(fixture.path, engine="onnxruntime", engine_threads=2)  # as one of 2 workers
    split = served.engine
    calls = []
    for name in ("lone", "batched"):
        instance = getattr(split, name)
        monkeypatch.setattr(split, name, lambda batch, run=instance, name=name: calls.append(name) or run(batch))
    generation = Generation.build(served, {"BATCHING": "off"}, DecodeBudget(1 << 30))
    slot = ModelSlot(generation)
    one = fixture.inputs[:1]
    calls.clear()
    with slot.using() as serving:
        serving.batcher.predict(one)  # the only request in this process: every core
        with slot.using():  # a second request arrives: the lone input keeps to the process's share
            serving.batcher.predict(one)
        serving.batcher.predict(one)
    assert calls == ["lone", "batched", "lone"]
    slot.close()


def test_a_new_input_size_in_the_model_card_gets_its_own_conversion(tmp_path):
    import keras

    from keras_serve.model.card import ModelCard

    inputs = keras.Input((None, None, 3))  # free height and width: the card says what to resize to
    features = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(inputs))
    path = tmp_path / "free.keras"
    keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(features)).save(path)
    for size in (32, 48):
        ModelCard(height=size, width=size, channels=3).write(path)
        served = ServedModel.load(path, engine="onnxruntime")
        assert served.spec.input_shape == (size, size, 3)
        assert served.engine_name == "onnxruntime", served.engine_fallback_reason  # not a stale 32x32 conversion
        assert engines.cache_path(path, "onnxruntime", (size, size, 3)).is_file()
    assert len(list((tmp_path / ".cache").iterdir())) == 2


def test_forced_tensorflow_converts_nothing(tmp_path):
    fixture = write_keras3_model(tmp_path / "m.keras")
    served = ServedModel.load(fixture.path, engine="tensorflow")
    assert served.engine_name == "tensorflow" and served.engine_fallback_reason is None
    assert not (tmp_path / ".cache").exists()
    assert np.allclose(served.predict_batch(fixture.inputs), fixture.expected, atol=1e-5)


def test_a_conversion_that_answers_differently_falls_back_to_tensorflow(tmp_path, caplog):
    # Another model's (valid) conversion where this model's should be: the start-up check
    # on generated inputs must notice the answers differ.
    fixture = write_keras3_model(tmp_path / "m.keras", seed=0)
    other = write_keras3_model(tmp_path / "other.keras", seed=1)
    ServedModel.load(other.path, engine="onnxruntime")
    shutil.copy(engines.cache_path(other.path, "onnxruntime", SHAPE),
                engines.cache_path(fixture.path, "onnxruntime", SHAPE))
    with caplog.at_level(logging.WARNING, logger="keras_serve.model.served_model"):
        served = ServedModel.load(fixture.path, engine="onnxruntime")
    assert served.engine_name == "tensorflow"
    assert "outputs differ from TensorFlow's" in served.engine_fallback_reason
    lines = [r.getMessage() for r in caplog.records if "serving with tensorflow" in r.getMessage()]
    assert len(lines) == 1 and "onnxruntime" in lines[0] and "\n" not in lines[0]
    assert np.allclose(served.predict_batch(fixture.inputs), fixture.expected, atol=1e-5)


def test_an_engine_that_overflows_where_tensorflow_does_is_faithful(tmp_path):
    """Infinity where TensorFlow also says Infinity is the same answer (the output check refuses
    it per request). Before, inf - inf made the difference NaN, and the engine was refused as
    "differing by nan"."""
    import keras

    inputs = keras.Input((8, 8, 3))
    outputs = keras.layers.Dense(1, activation="exponential")(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, outputs)
    model.layers[-1].set_weights([np.full((3, 1), 1000.0, np.float32), np.zeros(1, np.float32)])
    model.save(tmp_path / "overflows.h5")  # exp(1000 * mean colour): infinite for any but a black image
    served = ServedModel.load(tmp_path / "overflows.h5", engine="onnxruntime")
    assert served.engine_name == "onnxruntime", served.engine_fallback_reason


def test_auto_falls_through_a_broken_engine_to_the_next(tmp_path, caplog):
    fixture = write_keras3_model(tmp_path / "m.keras")
    cached = engines.cache_path(fixture.path, "onnxruntime", SHAPE)
    cached.parent.mkdir()
    cached.write_bytes(b"not an onnx model")  # a damaged cache file: ONNX Runtime refuses it
    with caplog.at_level(logging.WARNING, logger="keras_serve.model.served_model"):
        served = ServedModel.load(fixture.path, engine="auto")
    assert served.engine_name == "litert"
    assert served.engine_fallback_reason.startswith("onnxruntime: ")
    assert any("serving with litert" in r.getMessage() for r in caplog.records)


def test_unknown_engine_is_a_load_error(tmp_path):
    from keras_serve.errors import ModelLoadError

    fixture = write_keras3_model(tmp_path / "m.keras")
    with pytest.raises(ModelLoadError, match="unknown engine 'cuda'"):
        ServedModel.load(fixture.path, engine="cuda")


def test_read_only_model_folder_still_serves_converted(tmp_path):
    fixture = write_keras3_model(tmp_path / "m.keras")
    (tmp_path / ".cache").write_text("a file where the cache folder would go")
    served = ServedModel.load(fixture.path, engine="onnxruntime")
    assert served.engine_name == "onnxruntime"
    assert np.allclose(served.predict_batch(fixture.inputs), fixture.expected, atol=FAITHFUL_MAX_ABS_DIFFERENCE)
