"""The forward pass in the request thread, and the start-up choice between that and batching."""
from __future__ import annotations

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from images import RED, image_bytes
from keras_serve.errors import PredictionError
from keras_serve.pipeline.batcher import DynamicBatcher
from keras_serve.pipeline import inline
from keras_serve.pipeline.inline import InlinePredictor, batching_pays, choose_batching


class Recorder:
    def __init__(self) -> None:
        self.batches: list[tuple[int, float]] = []

    def batch_predicted(self, size: int, seconds: float) -> None:
        self.batches.append((size, seconds))


def sum_model(batch: np.ndarray) -> np.ndarray:
    return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)


def test_each_request_runs_its_own_forward_pass_in_its_own_thread():
    threads, metrics = [], Recorder()

    def model(batch):
        threads.append(threading.get_ident())
        return sum_model(batch)

    predictor = InlinePredictor(model, metrics=metrics)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda i: predictor.predict_prepared(lambda: np.full((1, 2, 2), i, np.float32)),
                                range(40)))
    assert [float(r[0]) for r in results] == [4.0 * i for i in range(40)]
    assert predictor.batches == predictor.items == 40 and len(metrics.batches) == 40
    assert all(size == 1 for size, _ in metrics.batches)
    assert threading.get_ident() not in threads and len(set(threads)) > 1  # the callers' threads, no worker
    assert predictor.predict(np.ones((2, 2), np.float32))[0] == 4.0  # an input without the batch axis


def test_a_failing_model_is_a_prediction_error_and_a_failing_decode_passes_through():
    def broken(batch):
        raise RuntimeError("kernel exploded")

    predictor = InlinePredictor(broken)
    with pytest.raises(PredictionError, match="RuntimeError"):
        predictor.predict(np.zeros((1, 2), np.float32))
    with pytest.raises(ValueError, match="bad image"):
        predictor.predict_prepared(lambda: (_ for _ in ()).throw(ValueError("bad image")))
    assert predictor.items == 0


def test_after_close_it_refuses_and_says_it_is_not_alive():
    predictor = InlinePredictor(sum_model)
    assert predictor.alive
    predictor.close()
    assert not predictor.alive
    with pytest.raises(PredictionError, match="shutting down"):
        predictor.predict(np.zeros((1, 2), np.float32))


@pytest.mark.parametrize("one_ms, batched_ms, pays", [
    (2.2, 1.98, True),    # the default model on 2 CPU cores: 0.22 ms (10%) saved, more than the hand-offs
    (0.05, 0.01, False),  # a tiny model: 80% saved, but 0.04 ms is less than the hand-offs cost
    (5.0, 0.8, True),     # a GPU or a bigger model: 84% and 4.2 ms saved
    (20.0, 19.5, False),  # a big model that does not batch better: 0.5 ms, only 2.5%
    (1.0, 0.95, False),   # 0.05 ms: less than a hand-off
])
def test_batching_pays_only_when_it_saves_enough_time_and_share(one_ms, batched_ms, pays):
    assert batching_pays(one_ms, batched_ms) is pays


def test_choose_batching_measures_the_model_on_auto_and_obeys_on_and_off(monkeypatch):
    calls = []

    def model(batch):
        calls.append(len(batch))
        return sum_model(batch)

    assert choose_batching("on", model, (2,))[0] is True and choose_batching("off", model, (2,))[0] is False
    assert calls == []  # forced: nothing measured
    timings = {1: (6.0, 6.0), inline.PROBE_BATCH: (1.0, 1.0)}
    monkeypatch.setattr(inline, "forward_ms_per_image", lambda predict, shape, batches: dict(timings))
    batching, reason = choose_batching("auto", model, (2,))
    assert batching and "6.00 ms CPU" in reason and "1.00" in reason
    timings[inline.PROBE_BATCH] = (5.95, 5.95)
    batching, reason = choose_batching("auto", model, (2,))
    assert not batching and "request thread" in reason
    timings[inline.PROBE_BATCH] = (5.95, 1.5)  # a GPU: little CPU saved, much waiting saved
    assert choose_batching("auto", model, (2,))[0] is True
    with pytest.raises(ValueError):
        choose_batching("sometimes", model, (2,))


class FakeClocks:
    """Stands in for the `time` module in inline: the model moves the clocks, the test knows by how much."""

    def __init__(self) -> None:
        self.wall_s = 100.0
        self.cpu_s = 50.0

    def perf_counter(self) -> float:
        return self.wall_s

    def process_time(self) -> float:
        return self.cpu_s


def test_forward_ms_per_image_runs_the_model_on_zero_inputs_of_the_batch_size(monkeypatch):
    shapes = []
    clocks = FakeClocks()
    monkeypatch.setattr(inline, "time", clocks)
    # (wall ms, CPU ms) of each whole call in order: two warm-ups, then three rounds of 1 and 4
    costs = iter([(900.0, 900.0), (900.0, 900.0),
                  (5.0, 3.0), (40.0, 16.0),
                  (4.0, 6.0), (24.0, 32.0),
                  (7.0, 2.0), (32.0, 24.0)])

    def model(batch):
        shapes.append(batch.shape)
        assert not batch.any()
        wall_ms, cpu_ms = next(costs)
        clocks.wall_s += wall_ms / 1000
        clocks.cpu_s += cpu_ms / 1000
        return sum_model(batch)

    timings = inline.forward_ms_per_image(model, (3, 2), (1, 4), budget_s=0.0)
    # per image, the least of each measure on its own (warm-ups left out): CPU and wall may
    # come from different rounds
    assert set(timings) == {1, 4}
    assert timings[1] == (pytest.approx(2.0), pytest.approx(4.0))
    assert timings[4] == (pytest.approx(4.0), pytest.approx(6.0))
    # one warm-up call each, then at least three rounds taking turns
    assert shapes[:2] == [(1, 3, 2), (4, 3, 2)] and shapes[2:8] == [(1, 3, 2), (4, 3, 2)] * 3


def test_the_service_serves_a_tiny_model_inline_and_batches_when_told(make_app, colour_model_path):
    auto = make_app(MODEL_PATH=str(colour_model_path))
    # A tiny model's batch saves microseconds, less than the hand-offs cost: inline.
    assert isinstance(auto.extensions["classifier"].batcher, InlinePredictor)
    answer = auto.test_client().post("/file/", data={"file": (io.BytesIO(image_bytes(RED)), "r.png")})
    assert answer.status_code == 200 and answer.get_json()["class"] == "DOG"
    assert auto.extensions["classifier"].status()["images"] == 1
    forced = make_app(MODEL_PATH=str(colour_model_path), BATCHING="on")
    assert isinstance(forced.extensions["classifier"].batcher, DynamicBatcher)
