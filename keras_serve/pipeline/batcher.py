"""Dynamic batching: concurrent requests share one forward pass.

Request threads call `predict_prepared(prepare)`: the batcher counts the input as on its way
while `prepare()` decodes it, then queues it; one worker thread gathers whatever is queued (up to `max_batch`), waits at most
`max_wait_ms` for stragglers but only while other requests are still decoding, runs the
model once, and hands each caller its own row. A lone request therefore never waits.
On 2 CPU cores one batched call is several times cheaper per image than many small ones,
and decoding in the request threads overlaps with inference in the worker.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import numpy as np

from keras_serve.errors import PredictionError
from keras_serve.serving_metrics import NO_METRICS, ServingMetrics

log = logging.getLogger(__name__)


class DynamicBatcher:
    def __init__(self, predict_batch: Callable[[np.ndarray], np.ndarray], max_batch: int = 32,
                 max_wait_ms: float = 2.0, timeout_s: float = 30.0,
                 metrics: ServingMetrics = NO_METRICS) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._predict_batch = predict_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_ms / 1000.0
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._queue: queue.Queue[tuple[np.ndarray, Future] | None] = queue.Queue()
        self._stopped = threading.Event()
        self._expected = 0  # requests decoding now, whose inputs will arrive shortly
        self._expected_lock = threading.Lock()
        self.batches = 0
        self.items = 0
        self._worker = threading.Thread(target=self._run, name="dynamic-batcher", daemon=True)
        self._worker.start()

    @property
    def alive(self) -> bool:
        return self._worker.is_alive() and not self._stopped.is_set()

    def predict_prepared(self, prepare: Callable[[], np.ndarray]) -> np.ndarray:
        """Run `prepare()` (decoding) while a forming batch knows this input is on its way, then predict it.

        The announcement is settled however `prepare` ends, so a failed decode can never
        leave a count behind that would make later lone requests wait for nobody.
        """
        with self._announced():
            future = self.submit(prepare())  # queued before the count drops: a forming batch waits for it
        return self._result(future)

    def submit_prepared(self, prepares: Sequence[Callable[[], np.ndarray]]) -> list[Future]:
        """Several inputs of one request: all announced at once, then prepared and queued in turn.

        The caller's thread decodes them one after another (one request takes one thread's CPU,
        as a single upload does); each is queued as soon as it is ready, and a forming batch waits
        for the rest as it waits for other requests' decodes. A `prepare` that raises gives a
        future holding that exception, so one bad input never fails its neighbours.
        `result(future)` waits for one answer.
        """
        futures: list[Future] = []
        with self._expected_lock:
            self._expected += len(prepares)
        settled = 0
        try:
            for prepare in prepares:
                try:
                    futures.append(self.submit(prepare()))
                except Exception as exc:
                    failed: Future = Future()
                    failed.set_exception(exc)
                    futures.append(failed)
                finally:
                    with self._expected_lock:
                        self._expected -= 1
                    settled += 1
        finally:
            with self._expected_lock:  # an interruption must not leave a count behind
                self._expected -= len(prepares) - settled
        return futures

    def result(self, future: Future) -> np.ndarray:
        """The output row of a future from `submit`/`submit_prepared`; raises its error, or
        PredictionError after the batcher's timeout."""
        return self._result(future)

    @property
    def announced(self) -> int:
        """Inputs being prepared right now (for tests and status)."""
        return self._expected

    @contextmanager
    def _announced(self) -> Iterator[None]:
        with self._expected_lock:
            self._expected += 1
        try:
            yield
        finally:
            with self._expected_lock:
                self._expected -= 1

    def submit(self, x: np.ndarray) -> Future:
        """Queue one input of shape (1, ...) or (...); the future resolves to its output row."""
        if self._stopped.is_set():
            raise PredictionError("The server is shutting down.")
        future: Future = Future()
        self._queue.put((x if x.ndim and x.shape[0] == 1 else x[np.newaxis], future))
        return future

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Blocking form of `submit`."""
        return self._result(self.submit(x))

    def _result(self, future: Future) -> np.ndarray:
        try:
            return future.result(timeout=self.timeout_s)
        except FutureTimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise PredictionError(f"The model did not answer within {self.timeout_s:.0f} s.") from None

    def close(self) -> None:
        self._stopped.set()
        self._queue.put(None)
        self._worker.join(timeout=5)

    # --- worker -----------------------------------------------------------------------
    def _collect(self) -> list[tuple[np.ndarray, Future]] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                # Take everything already waiting for free; only then wait for stragglers.
                item = self._queue.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._expected == 0:
                    break
                try:
                    item = self._queue.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                self._queue.put(None)  # let the loop see the stop signal after this batch
                break
            batch.append(item)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            batch = [(x, f) for x, f in batch if f.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                started = time.perf_counter()
                outputs = self._predict_batch(np.concatenate([x for x, _ in batch]))
                self.metrics.batch_predicted(len(batch), time.perf_counter() - started)
                for (_, future), row in zip(batch, outputs):
                    future.set_result(row)
                self.batches += 1
                self.items += len(batch)
            except Exception:
                log.exception("batched prediction failed; retrying %d item(s) one by one", len(batch))
                self._predict_one_by_one(batch)

    def _predict_one_by_one(self, batch: list[tuple[np.ndarray, Future]]) -> None:
        # One bad input must not fail its neighbours: isolate it.
        for x, future in batch:
            try:
                started = time.perf_counter()
                row = self._predict_batch(x)[0]
                self.metrics.batch_predicted(1, time.perf_counter() - started)
                future.set_result(row)
            except Exception as exc:
                log.exception("prediction failed for one item")
                future.set_exception(PredictionError(f"The model failed on this image ({type(exc).__name__})."))
