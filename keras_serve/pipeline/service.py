"""ClassifierService: the request pipeline from uploaded bytes to a stored, answered prediction.

    preprocess (validates; bad input raises before anything is stored)
    -> dynamic batch through the model
    -> store the image, then its record (both durable before the client hears back)
    -> return it

A failed prediction still stores the image, with the error, so the client can quote its id.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

from keras_serve.pipeline.batcher import DynamicBatcher
from keras_serve.errors import PredictionError, StorageError, error_code
from keras_serve.model.engines import usable_cores
from keras_serve.model.served_model import Prediction, ServedModel
from keras_serve.pipeline.decode_budget import UNLIMITED, DecodeBudget, limit_malloc_arenas
from keras_serve.pipeline.preprocessing import image_format, preprocess
from keras_serve.serving_metrics import NO_METRICS, ServingMetrics
from keras_serve.storage.uploads import UploadStore


@dataclass(frozen=True)
class ClassifiedUpload:
    upload_id: str
    prediction: Prediction
    milliseconds: float


class ClassifierService:
    def __init__(self, model: ServedModel, batcher: DynamicBatcher, store: UploadStore,
                 decode_budget: DecodeBudget = UNLIMITED, metrics: ServingMetrics = NO_METRICS) -> None:
        self.model = model
        self.batcher = batcher
        self.store = store
        self.decode_budget = decode_budget  # bounds the pixels decoded at once across requests
        self.metrics = metrics
        self.ready = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any], metrics: ServingMetrics = NO_METRICS) -> "ClassifierService":
        """Load (or take) the model, warm it for every batch size, open the store."""
        # No single image may need more than the whole budget, or it would never get its turn.
        budget = DecodeBudget(int(config["DECODE_BUDGET_BYTES"]), float(config["DECODE_WAIT_SECONDS"]))
        limit_malloc_arenas()  # so what large decodes free goes back to the kernel (see there)
        max_decode_bytes = min(int(config["MAX_DECODE_BYTES"]), budget.capacity_bytes)
        model = config.get("MODEL") or ServedModel.load(
            config["MODEL_PATH"], labels=config["LABELS"], scaling=config["SCALING"],
            arch=config["ARCH"], max_pixels=int(config["MAX_PIXELS"]), max_decode_bytes=max_decode_bytes,
            engine=config["ENGINE"],
            # Worker processes share the cores rather than each starting one thread per core.
            engine_threads=max(1, usable_cores() // max(1, int(config["WORKERS"]))))
        max_batch = int(config["MAX_BATCH"])
        model.warm_up(tuple(range(1, max_batch + 1)))  # every batch size the batcher can form
        batcher = DynamicBatcher(model.predict_batch, max_batch, float(config["MAX_WAIT_MS"]), metrics=metrics)
        try:
            store = UploadStore.from_config(config)
            store.start_maintenance()  # retention and orphan sweep now, then hourly, in the background
        except BaseException:
            batcher.close()
            raise
        return cls(model, batcher, store, budget, metrics)

    def classify(self, data: bytes, client_filename: str | None = None) -> ClassifiedUpload:
        started = time.perf_counter()
        audit = {
            "client_filename": (client_filename or "")[:255],  # audit only; never used as a path
            "model": self.model.info.get("file"),
            "model_sha256": self.model.info.get("sha256"),  # the version that answered
        }
        try:
            # Decoding runs while a forming batch knows this input is on its way. A decode that
            # raises (an ImageError: bad input) stores nothing; a failed prediction stores the
            # image with its error so the client can quote the id.
            output = self.batcher.predict_prepared(lambda: preprocess(data, self.model.spec, self.decode_budget))
            prediction = self.model.interpret(output)
        except PredictionError as exc:
            exc.upload_id = self._save(data, {**audit, "prediction": None, "error": exc.message})
            raise
        elapsed_ms = (time.perf_counter() - started) * 1000
        upload_id = self._save(data, {
            **audit, "prediction": prediction.as_json(), "milliseconds": round(elapsed_ms, 2)})
        return ClassifiedUpload(upload_id, prediction, elapsed_ms)

    def _save(self, data: bytes, record: dict[str, Any]) -> str:
        with self._storage("save"):
            upload_id = self.store.save(data, image_format(data), record)
        self.metrics.upload_stored(len(data))
        return upload_id

    def read_image(self, upload_id: str) -> tuple[bytes, str]:
        """(bytes, mimetype) of a stored upload; raises UploadNotFound or StorageError."""
        with self._storage("read"):
            return self.store.read_image(upload_id)

    def read_record(self, upload_id: str) -> dict[str, Any]:
        with self._storage("read"):
            return self.store.read_record(upload_id)

    @contextmanager
    def _storage(self, operation: str) -> Iterator[None]:
        """Counts the store's failures for the operator; the error still reaches the client as a 503."""
        try:
            yield
        except StorageError as exc:
            self.metrics.storage_failed(operation, error_code(type(exc).__name__))
            raise

    def close(self) -> None:
        """Stop the batcher and release the store; the one call the CLI and tests make."""
        self.ready = False
        self.batcher.close()
        self.store.close()

    def __enter__(self) -> "ClassifierService":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> dict[str, Any]:
        # pid: with --workers N each process answers for itself; tools tell them apart by it.
        return {"ready": self.ready and self.batcher.alive, "batches": self.batcher.batches,
                "images": self.batcher.items, "pid": os.getpid()}
