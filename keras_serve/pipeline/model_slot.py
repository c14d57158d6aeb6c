"""The model being served, swappable while requests run.

A `Generation` is one loaded model with what serves it: its batcher (or inline predictor) and
its heatmap maker. `ModelSlot` holds the current one. A request takes the current generation
for its whole life (`with slot.using() as generation:`), so it decodes with that model's
input size, predicts with it and records its version, even if a swap happens meanwhile.
`swap(new)` makes new requests use the new generation at once; the old one finishes the
batches already queued on it and is closed by whichever of its requests ends last.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

from keras_serve.model.served_model import ServedModel
from keras_serve.pipeline.batcher import DynamicBatcher
from keras_serve.pipeline.decode_budget import DecodeBudget
from keras_serve.pipeline.heatmaps import HeatmapMaker
from keras_serve.pipeline.inline import InlinePredictor, choose_batching
from keras_serve.serving_metrics import NO_METRICS, ServingMetrics

log = logging.getLogger(__name__)


class Generation:
    """One served model and its batcher; `users` counts the requests still on it."""

    def __init__(self, model: ServedModel, batcher: DynamicBatcher | InlinePredictor,
                 heatmaps: HeatmapMaker) -> None:
        self.model = model
        self.batcher = batcher
        self.heatmaps = heatmaps
        self.users = 0
        self.retired = False

    @property
    def version(self) -> str | None:
        """The model file's sha256 (None for a model object without a file, as tests pass)."""
        return self.model.info.get("sha256")

    @classmethod
    def build(cls, model: Any, config: Mapping[str, Any], budget: DecodeBudget,
              metrics: ServingMetrics = NO_METRICS) -> "Generation":
        """Decide batching for this model on this machine (a measurement, keras_serve.pipeline.inline),
        warm it for every batch size it will see, and start its batcher."""
        batching, reason = choose_batching(str(config.get("BATCHING", "auto")), model.predict_batch,
                                           model.spec.input_shape)
        log.info("%s", reason)
        batcher: DynamicBatcher | InlinePredictor
        if batching:
            max_batch = int(config["MAX_BATCH"])
            model.warm_up(tuple(range(1, max_batch + 1)))  # every batch size the batcher can form
            batcher = DynamicBatcher(model.predict_batch, max_batch, float(config["MAX_WAIT_MS"]), metrics=metrics)
        else:
            batcher = InlinePredictor(model.predict_batch, metrics=metrics)
        heatmaps = HeatmapMaker(model, budget, float(config.get("HEATMAP_WAIT_SECONDS", 10.0)))
        generation = cls(model, batcher, heatmaps)
        model.share_cores_when(lambda: generation.users > 1)
        return generation

    def close(self) -> None:
        self.batcher.close()


class ModelSlot:
    def __init__(self, generation: Generation) -> None:
        self._current = generation
        self._lock = threading.Lock()

    @property
    def current(self) -> Generation:
        return self._current

    @contextmanager
    def using(self) -> Iterator[Generation]:
        """The current generation, kept open until the block ends (its requests finish on it)."""
        with self._lock:
            generation = self._current
            generation.users += 1
        try:
            yield generation
        finally:
            with self._lock:
                generation.users -= 1
                last = generation.retired and generation.users == 0
            if last:
                generation.close()

    def swap(self, new: Generation) -> Generation:
        """Serve `new` from now on; the old generation closes once its last request is done."""
        with self._lock:
            old, self._current = self._current, new
            old.retired = True
            idle = old.users == 0
        if idle:
            old.close()
        return old

    def close(self) -> None:
        """Stop serving (shutdown): the current generation refuses new predictions at once."""
        with self._lock:
            generation = self._current
            generation.retired = True
        generation.close()
