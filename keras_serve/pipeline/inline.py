"""The forward pass in the request's own thread, and the start-up choice between that and batching.

`InlinePredictor` has the `DynamicBatcher`'s surface (`predict_prepared`, `predict`, counters,
`close`) but no queue and no worker thread: the request thread decodes, runs the model (one
forward pass at a time per process, `ServedModel`'s lock) and goes on to store the answer.
That saves two thread hand-offs per request (queue in, future out: a wake-up of another
thread each, and the GIL changing hands twice), which on a small CPU model cost more than
batching saves.

`choose_batching` decides at start-up, from the loaded model on this machine: batching is
kept when one forward pass over `PROBE_BATCH` images costs less per image than a pass over one
by more than the hand-offs cost (CPU, which decides throughput under load; or wall time, all
a GPU shows). Measured (docs/performance-design.md): the default cat/dog model with ONNX
Runtime on the 2-core VM saves 6-8% of CPU per image in this probe (1.3% at one thread each,
measured alone), and through the whole app the batcher spent 13.9 ms of CPU per request
against 14.3 (inline, 1 engine thread) and 14.9 (inline, 2): it keeps batching. A tiny model
saves microseconds per image and serves inline, with nothing handed between threads.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import numpy as np

from keras_serve.errors import PredictionError
from keras_serve.serving_metrics import NO_METRICS, ServingMetrics

log = logging.getLogger(__name__)

PROBE_BATCH = 8
# Batching must save at least this much per image: the CPU the two hand-offs cost a request
# (measured: 0.10-0.13 ms, docs/performance-design.md)...
MIN_SAVED_MS = 0.1
# ...and at least this share of it, so that timing noise alone never decides. (5% was tried:
# the default model saves 6-8% here, so a noisy start-up now and then served it inline;
# docs/performance-design.md.)
MIN_SAVED_SHARE = 0.03


class InlinePredictor:
    """Runs `predict_batch` in the calling thread; the same surface as `DynamicBatcher`."""

    max_batch = 1

    def __init__(self, predict_batch: Callable[[np.ndarray], np.ndarray],
                 metrics: ServingMetrics = NO_METRICS) -> None:
        self._predict_batch = predict_batch
        self.metrics = metrics
        self._stopped = threading.Event()
        self._count_lock = threading.Lock()
        self.batches = 0
        self.items = 0

    @property
    def alive(self) -> bool:
        return not self._stopped.is_set()

    @property
    def announced(self) -> int:
        return 0  # nothing ever waits for an input on its way

    def predict_prepared(self, prepare: Callable[[], np.ndarray]) -> np.ndarray:
        """Decode (`prepare()`), then predict; decode errors pass through unchanged."""
        return self.predict(prepare())

    def predict(self, x: np.ndarray) -> np.ndarray:
        """One input of shape (1, ...) or (...) -> its output row. Raises PredictionError."""
        if self._stopped.is_set():
            raise PredictionError("The server is shutting down.")
        batch = x if x.ndim and x.shape[0] == 1 else x[np.newaxis]
        started = time.perf_counter()
        try:
            row = self._predict_batch(batch)[0]
        except Exception as exc:
            log.exception("prediction failed for one item")
            raise PredictionError(f"The model failed on this image ({type(exc).__name__}).") from None
        self.metrics.batch_predicted(1, time.perf_counter() - started)
        with self._count_lock:
            self.batches += 1
            self.items += 1
        return row

    def submit_prepared(self, prepares: Sequence[Callable[[], np.ndarray]]) -> list[Future]:
        """Several inputs of one request, each decoded and predicted in turn in this thread; a
        `prepare` or forward pass that raises gives a future holding that error, so one bad input
        never fails its neighbours (the same contract as `DynamicBatcher.submit_prepared`)."""
        futures: list[Future] = []
        for prepare in prepares:
            future: Future = Future()
            try:
                future.set_result(self.predict_prepared(prepare))
            except Exception as exc:
                future.set_exception(exc)
            futures.append(future)
        return futures

    def result(self, future: Future) -> np.ndarray:
        """The output row of a future from `submit_prepared`, or its error (already settled)."""
        return future.result()

    def close(self) -> None:
        self._stopped.set()


def forward_ms_per_image(predict_batch: Callable[[np.ndarray], Any], input_shape: tuple[int, ...],
                         batches: tuple[int, ...], budget_s: float = 0.6, most: int = 60) -> dict[int, tuple[float, float]]:
    """{batch: (CPU ms, wall ms) per image} of `predict_batch` on zero images, the least of each
    (anything else running only ever adds time), the batch sizes taking turns call by call so
    that a busy machine weighs on all of them alike. CPU is the whole process's (the engine's
    own threads count): what throughput under load depends on; wall is what a lone request
    waits (and all a GPU shows)."""
    inputs = {n: np.zeros((n, *input_shape), np.float32) for n in batches}
    for x in inputs.values():
        predict_batch(x)  # warm-up
    samples: dict[int, tuple[list[float], list[float]]] = {n: ([], []) for n in batches}
    deadline = time.perf_counter() + budget_s
    rounds = 0
    while rounds < 3 or (time.perf_counter() < deadline and rounds < most):
        for n, x in inputs.items():
            cpu0, wall0 = time.process_time(), time.perf_counter()
            predict_batch(x)
            samples[n][1].append((time.perf_counter() - wall0) * 1000 / n)
            samples[n][0].append((time.process_time() - cpu0) * 1000 / n)
        rounds += 1
    return {n: (min(cpu), min(wall)) for n, (cpu, wall) in samples.items()}


def batching_pays(one_ms: float, batched_ms: float) -> bool:
    """Whether a batched forward pass (`batched_ms` per image) saves enough over one image at a
    time (`one_ms`) to pay for handing every request to the batching thread and back."""
    saved = one_ms - batched_ms
    return saved >= MIN_SAVED_MS and saved >= MIN_SAVED_SHARE * one_ms


def choose_batching(setting: str, predict_batch: Callable[[np.ndarray], Any],
                    input_shape: tuple[int, ...]) -> tuple[bool, str]:
    """(batch?, the reason in words) for the BATCHING setting: "on", "off", or "auto" (measure:
    batching pays if it saves enough CPU per image, or enough waiting per image)."""
    if setting == "on":
        return True, "batching on (--batching on)"
    if setting == "off":
        return False, "forward pass in the request thread (--batching off)"
    if setting != "auto":
        raise ValueError(f"--batching must be auto, on or off, not {setting!r}")
    timings = forward_ms_per_image(predict_batch, input_shape, (1, PROBE_BATCH))
    (one_cpu, one_wall), (batched_cpu, batched_wall) = timings[1], timings[PROBE_BATCH]
    pays = batching_pays(one_cpu, batched_cpu) or batching_pays(one_wall, batched_wall)
    measured = (f"forward per image alone {one_cpu:.2f} ms CPU / {one_wall:.2f} ms wall, at batch {PROBE_BATCH} "
                f"{batched_cpu:.2f} / {batched_wall:.2f}")
    return pays, (f"batching ({measured})" if pays else f"forward pass in the request thread ({measured}: "
                  f"batching would save less than {MIN_SAVED_MS} ms or {MIN_SAVED_SHARE:.0%} per image)")
