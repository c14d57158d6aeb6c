"""The forward pass in the request's own thread, and the start-up choice between that and batching.

`InlinePredictor` has the `DynamicBatcher`'s surface (`predict_prepared`, `predict`, counters,
`close`) but no queue and no worker thread: the request thread decodes, runs the model (one
forward pass at a time per process, `ServedModel`'s lock) and goes on to store the answer.
That saves two thread hand-offs per request (queue in, future out: a wake-up of another
thread each, and the GIL changing hands twice), which on a small CPU model cost more than
batching saves.

`batching_pays(model)` decides at start-up, from the loaded model on this machine: batching
is kept only when one forward pass over `PROBE_BATCH` images costs clearly less per image than
`PROBE_BATCH` passes over one (GPUs, bigger models). Measured for the default cat/dog model
with ONNX Runtime on the 2-core VM (docs/performance-design.md): batch 8 saves 11% per image,
about 0.1 ms, less than the hand-offs cost, so it serves inline.
"""
from __future__ import annotations

import logging
import statistics
import threading
import time
from typing import Any, Callable

import numpy as np

from keras_serve.errors import PredictionError
from keras_serve.serving_metrics import NO_METRICS, ServingMetrics

log = logging.getLogger(__name__)

PROBE_BATCH = 8
# Batching must save at least this share of the forward time per image...
MIN_SAVED_SHARE = 0.25
# ...and at least this much time per image: what the two hand-offs and the wait for a batch
# to form cost a request (docs/performance-design.md, "per-layer profile").
MIN_SAVED_MS = 0.5


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

    def close(self) -> None:
        self._stopped.set()


def forward_ms_per_image(predict_batch: Callable[[np.ndarray], Any], input_shape: tuple[int, ...],
                         batch: int, budget_s: float = 0.3, most: int = 50) -> float:
    """Median wall time per image of `predict_batch` on `batch` zero images (after one warm-up call)."""
    x = np.zeros((batch, *input_shape), np.float32)
    predict_batch(x)
    times: list[float] = []
    deadline = time.perf_counter() + budget_s
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < most):
        started = time.perf_counter()
        predict_batch(x)
        times.append((time.perf_counter() - started) * 1000 / batch)
    return statistics.median(times)


def batching_pays(one_ms: float, batched_ms: float) -> bool:
    """Whether a batched forward pass (`batched_ms` per image) saves enough over one image at a
    time (`one_ms`) to pay for handing every request to a batching thread and back."""
    saved = one_ms - batched_ms
    return saved >= MIN_SAVED_MS and saved >= MIN_SAVED_SHARE * one_ms


def choose_batching(setting: str, predict_batch: Callable[[np.ndarray], Any],
                    input_shape: tuple[int, ...]) -> tuple[bool, str]:
    """(batch?, the reason in words) for the BATCHING setting: "on", "off", or "auto" (measure)."""
    if setting == "on":
        return True, "batching on (--batching on)"
    if setting == "off":
        return False, "forward pass in the request thread (--batching off)"
    if setting != "auto":
        raise ValueError(f"--batching must be auto, on or off, not {setting!r}")
    one = forward_ms_per_image(predict_batch, input_shape, 1)
    batched = forward_ms_per_image(predict_batch, input_shape, PROBE_BATCH)
    pays = batching_pays(one, batched)
    measured = f"forward {one:.2f} ms per image alone, {batched:.2f} at batch {PROBE_BATCH}"
    return pays, (f"batching ({measured})" if pays else f"forward pass in the request thread ({measured}: "
                  f"batching would save less than {MIN_SAVED_MS} ms and {MIN_SAVED_SHARE:.0%} per image)")
