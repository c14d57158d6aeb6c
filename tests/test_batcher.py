import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from keras_serve.pipeline.batcher import DynamicBatcher
from keras_serve.errors import PredictionError


def sum_model(batch: np.ndarray) -> np.ndarray:
    return batch.reshape(len(batch), -1).sum(axis=1, keepdims=True)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer():
    calls = []

    def model(batch):
        calls.append(len(batch))
        time.sleep(0.01)  # a forward pass takes time, so requests pile up
        return sum_model(batch)

    batcher = DynamicBatcher(model, max_batch=16, max_wait_ms=5)
    try:
        with ThreadPoolExecutor(32) as pool:
            results = list(pool.map(lambda i: batcher.predict(np.full((1, 2, 2), i, np.float32)), range(200)))
    finally:
        batcher.close()
    assert [float(r[0]) for r in results] == [4.0 * i for i in range(200)]
    assert max(calls) > 1, "concurrent requests were never grouped"
    assert max(calls) <= 16
    assert sum(calls) == 200


def test_a_failing_item_fails_only_its_own_request():
    def model(batch):
        if np.isnan(batch).any():
            raise ValueError("poisoned input")
        time.sleep(0.005)
        return sum_model(batch)

    batcher = DynamicBatcher(model, max_batch=8, max_wait_ms=20)
    barrier = threading.Barrier(8)

    def request(i):
        barrier.wait()
        x = np.full((1, 3), np.nan if i == 3 else i, np.float32)
        try:
            return float(batcher.predict(x)[0])
        except PredictionError as exc:
            return exc

    try:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(request, range(8)))
    finally:
        batcher.close()
    assert isinstance(results[3], PredictionError)
    assert [r for i, r in enumerate(results) if i != 3] == [3.0 * i for i in range(8) if i != 3]


# A bound on waiting for a future: it only turns a hang into a failure, it is not a speed.
HANG_S = 30.0
# A max_wait no test could sit out: an answer before it proves the batch did not wait for it.
FOREVER_MS = 3_600_000


def test_single_request_is_not_held_longer_than_max_wait():
    calls = []

    def model(batch):
        calls.append(len(batch))
        return sum_model(batch)

    batcher = DynamicBatcher(model, max_batch=32, max_wait_ms=50)
    decoding, release = threading.Event(), threading.Event()

    def stuck_decode():
        decoding.set()
        release.wait(HANG_S)  # announced, but does not arrive until the first is answered
        return np.full((1, 1), 2, np.float32)

    try:
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(batcher.predict_prepared, stuck_decode)
            assert decoding.wait(HANG_S)
            first = batcher.submit(np.ones((1, 1), np.float32))
            # answered while the announced input is still decoding: max_wait ended the wait
            assert float(first.result(HANG_S)[0]) == 1.0
            assert not release.is_set() and batcher.announced == 1
            release.set()
            assert float(stuck.result(HANG_S)[0]) == 2.0
        assert calls == [1, 1]
    finally:
        release.set()
        batcher.close()


def test_closed_batcher_refuses_new_work():
    batcher = DynamicBatcher(sum_model)
    batcher.close()
    assert not batcher.alive
    with pytest.raises(PredictionError):
        batcher.predict(np.ones((1, 1), np.float32))


def test_batch_waits_for_an_announced_input_but_not_for_nobody():
    calls = []

    def model(batch):
        calls.append(len(batch))
        return sum_model(batch)

    batcher = DynamicBatcher(model, max_batch=8, max_wait_ms=FOREVER_MS)
    decoding, first_queued = threading.Event(), threading.Event()

    def slow_decode():
        decoding.set()
        first_queued.wait(HANG_S)  # a second request is still decoding when the first is queued
        return np.full((1, 1), 2, np.float32)

    try:
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(batcher.predict_prepared, slow_decode)
            assert decoding.wait(HANG_S)
            first = batcher.submit(np.ones((1, 1), np.float32))
            first_queued.set()
            assert float(first.result(HANG_S)[0]) == 1.0 and float(second.result(HANG_S)[0]) == 2.0
        assert calls == [2], "the announced input should have joined the forming batch"

        # nobody else coming: answered at once, not after max_wait (an hour)
        assert float(batcher.submit(np.ones((1, 1), np.float32)).result(HANG_S)[0]) == 1.0
        assert calls == [2, 1]
    finally:
        first_queued.set()
        batcher.close()


def test_a_failed_decode_leaves_no_announcement_behind():
    batcher = DynamicBatcher(sum_model, max_batch=8, max_wait_ms=FOREVER_MS)

    def broken_decode():
        raise ValueError("not an image")

    try:
        with pytest.raises(ValueError):
            batcher.predict_prepared(broken_decode)
        assert batcher.announced == 0
        # a leaked count would hold this lone request for max_wait (an hour)
        assert float(batcher.submit(np.ones((1, 1), np.float32)).result(HANG_S)[0]) == 1.0
    finally:
        batcher.close()


def test_inputs_of_one_request_share_a_batch_and_a_bad_one_fails_alone():
    calls = []

    def model(batch):
        calls.append(len(batch))
        return sum_model(batch)

    batcher = DynamicBatcher(model, max_batch=8, max_wait_ms=FOREVER_MS)

    def decode(i):
        def prepare():
            if i == 2:
                raise ValueError("not an image")
            time.sleep(0.02)  # decoding takes time; the batch waits for the announced rest, however long
            return np.full((1, 2), i, np.float32)
        return prepare

    try:
        futures = batcher.submit_prepared([decode(i) for i in range(5)])
        assert batcher.announced == 0
        assert [float(batcher.result(f)[0]) for i, f in enumerate(futures) if i != 2] == [0.0, 2.0, 6.0, 8.0]
        with pytest.raises(ValueError):
            batcher.result(futures[2])
        assert calls == [4], "the request's images were not batched together"
    finally:
        batcher.close()
