"""ClassifierService: the request pipeline from uploaded bytes to a stored, answered prediction.

    preprocess (validates; bad input raises before anything is stored)
    -> the model: in the request thread, or batched with concurrent requests where that pays
       (decided at start-up by measuring the loaded model: keras_serve.pipeline.inline); the
       model is swappable while serving (keras_serve.pipeline.model_slot, model_swap)
    -> store the image, then its record (both durable before the client hears back)
    -> return it

A failed prediction still stores the image, with the error, so the client can quote its id.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from keras_serve.errors import ModelOutputInvalidError, PredictionError, ServiceError, StorageError, error_code
from keras_serve.model.served_model import Prediction, ServedModel
from keras_serve.model.versions import load_for_serving
from keras_serve.pipeline.batcher import DynamicBatcher
from keras_serve.pipeline.decode_budget import UNLIMITED, DecodeBudget, limit_malloc_arenas
from keras_serve.pipeline.heatmaps import HeatmapMaker
from keras_serve.pipeline.inline import InlinePredictor
from keras_serve.pipeline.model_slot import Generation, ModelSlot
from keras_serve.pipeline.model_swap import ModelFollower
from keras_serve.pipeline.preprocessing import image_format, preprocess
from keras_serve.storage.model_registry import ModelRegistry
from keras_serve.serving_metrics import NO_METRICS, ServingMetrics
from keras_serve.storage.uploads import UploadStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassifiedUpload:
    upload_id: str
    prediction: Prediction
    milliseconds: float
    model_sha256: str | None = None  # the version that answered


class UnexpectedItemError(ServiceError):
    """A server bug met while answering one image of several; the others are still answered."""

    hint = "This is a server problem; try again later."


class ClassifierService:
    def __init__(self, slot: ModelSlot, store: UploadStore, decode_budget: DecodeBudget = UNLIMITED,
                 metrics: ServingMetrics = NO_METRICS, unsure_below: float = 0.0,
                 follower: ModelFollower | None = None) -> None:
        self.slot = slot  # the served model and its batcher; swappable (keras_serve.pipeline.model_slot)
        self.store = store
        self.decode_budget = decode_budget  # bounds the pixels decoded at once across requests
        self.metrics = metrics
        self.unsure_below = unsure_below  # a winning score under this is "unsure"; 0: never
        self.follower = follower  # follows promotions (keras_serve.pipeline.model_swap); None: off
        self.ready = False

    @property
    def model(self) -> ServedModel:
        """The model new requests are answered with."""
        return self.slot.current.model

    @property
    def batcher(self) -> DynamicBatcher | InlinePredictor:
        return self.slot.current.batcher

    @property
    def heatmaps(self) -> HeatmapMaker:
        return self.slot.current.heatmaps

    @classmethod
    def from_config(cls, config: Mapping[str, Any], metrics: ServingMetrics = NO_METRICS) -> "ClassifierService":
        """Load (or take) the model, warm it for every batch size, open the store, and serve the
        promoted version if the database names one."""
        # No single image may need more than the whole budget, or it would never get its turn.
        budget = DecodeBudget(int(config["DECODE_BUDGET_BYTES"]), float(config["DECODE_WAIT_SECONDS"]))
        limit_malloc_arenas()  # so what large decodes free goes back to the kernel (see there)
        max_decode_bytes = min(int(config["MAX_DECODE_BYTES"]), budget.capacity_bytes)
        model = config.get("MODEL") or load_for_serving(config["MODEL_PATH"], config, max_decode_bytes)

        def build(model: Any) -> Generation:
            return Generation.build(model, config, budget, metrics)

        slot = ModelSlot(build(model))
        try:
            store = UploadStore.from_config(config)
        except BaseException:
            slot.close()
            raise
        follower = ModelFollower(slot, ModelRegistry(store.records, store.images),
                                 None if config.get("MODEL") else Path(config["MODEL_PATH"]), build, config,
                                 max_decode_bytes, on_swap=lambda result, generation: metrics.model_changed(
                                     result, generation.model.info if generation else None))
        service = cls(slot, store, budget, metrics, unsure_below=float(config.get("UNSURE_BELOW") or 0.0),
                      follower=follower)
        try:
            metrics.model_changed("started", model.info)
            interval = float(config.get("MODEL_CHECK_INTERVAL_S") or 0.0)
            if interval > 0:
                follower.check()  # a promoted version serves from the first request, not seconds later
                follower.start(interval)
            # /readyz and the uploads' circuit breaker read what these checks find (storage/faults.py)
            store.start_health_checks(float(config.get("STORE_CHECK_INTERVAL_S") or 2.0))
            store.start_maintenance()  # retention and orphan sweep now, then hourly, in the background
        except BaseException:
            service.close()
            raise
        return service

    def classify(self, data: bytes, client_filename: str | None = None) -> ClassifiedUpload:
        started = time.perf_counter()
        # Decoding runs while a forming batch knows this input is on its way. A decode that
        # raises (an ImageError: bad input) stores nothing; a failed prediction stores the
        # image with its error so the client can quote the id. The whole request stays on the
        # model it started with, whatever a swap does meanwhile.
        with self.slot.using() as generation:
            return self._answer(generation.model, data, client_filename, started,
                                lambda: generation.batcher.predict_prepared(lambda: self._prepare(generation, data)))

    def classify_many(self, uploads: Sequence[tuple[bytes, str | None]]) -> list[ClassifiedUpload | ServiceError]:
        """Several images of one request, answered in order: each a ClassifiedUpload or the
        ServiceError that image met (one bad image never fails the others).

        They go through the shared batcher like everyone's: decoded one after another in this
        thread, each queued as soon as it is decoded, so they share forward passes with each
        other and with other requests. Each is stored as a single upload is.
        """
        started = time.perf_counter()
        with self.slot.using() as generation:
            batcher = generation.batcher
            futures = batcher.submit_prepared([lambda data=data: self._prepare(generation, data) for data, _ in uploads])
            results: list[ClassifiedUpload | ServiceError] = []
            for (data, filename), future in zip(uploads, futures):
                try:
                    results.append(self._answer(generation.model, data, filename, started,
                                                lambda f=future: batcher.result(f)))
                except ServiceError as exc:
                    results.append(exc)
                except Exception:
                    log.exception("unexpected error on one image of a multi-image request")
                    results.append(UnexpectedItemError("Something went wrong on the server with this image."))
            return results

    def _prepare(self, generation: Generation, data: bytes) -> Any:
        return preprocess(data, generation.model.spec, self.decode_budget)

    def _answer(self, model: ServedModel, data: bytes, client_filename: str | None, started: float,
                predict: Any) -> ClassifiedUpload:
        """Predict (the callable returns the model's output row), interpret, store; as `classify`."""
        audit = {
            "client_filename": (client_filename or "")[:255],  # audit only; never used as a path
            "model": model.info.get("file"),
            "model_sha256": model.info.get("sha256"),  # the version that answered
        }
        try:
            # Checked on every answer (a few array operations): a model's outputs are only
            # probabilities on the inputs someone tried, and nothing else may be served or stored.
            prediction = model.interpret(model.checked_output(predict()))
        except PredictionError as exc:
            if isinstance(exc, ModelOutputInvalidError):
                self.metrics.model_output_invalid(audit["model_sha256"], exc.problem)
                log.warning("model %s answered an image with an invalid output (%s); answered 503",
                            audit["model_sha256"], exc.problem)
            exc.upload_id = self._save(data, {**audit, "prediction": None, "error": exc.message})
            raise
        prediction = dataclasses.replace(prediction, unsure=prediction.confidence < self.unsure_below)
        elapsed_ms = (time.perf_counter() - started) * 1000
        upload_id = self._save(data, {
            **audit, "prediction": prediction.as_json(), "milliseconds": round(elapsed_ms, 2)})
        self.metrics.predicted(audit["model_sha256"])
        return ClassifiedUpload(upload_id, prediction, elapsed_ms, audit["model_sha256"])

    def heatmap_etag(self, upload_id: str) -> str:
        """The entity tag of an upload's heatmap; raises UploadNotFound for an unknown id."""
        self.read_record(upload_id)  # the id is checked and looked up here: 404 before anything else
        with self.slot.using() as generation:
            return generation.heatmaps.etag(upload_id)

    def heatmap(self, upload_id: str) -> bytes:
        """The Grad-CAM PNG of a stored upload (keras_serve.pipeline.heatmaps). Raises
        UploadNotFound, NoConvolutionLayerError, HeatmapBusyError, StorageError."""
        self.read_record(upload_id)
        with self.slot.using() as generation:
            return generation.heatmaps.png(upload_id, lambda: self.read_image(upload_id)[0])

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
        """Stop following promotions, stop the batcher, release the store; the one call the CLI and tests make."""
        self.ready = False
        if self.follower is not None:
            self.follower.stop()
        self.slot.close()
        self.store.close()

    def __enter__(self) -> "ClassifierService":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> dict[str, Any]:
        # pid: with --workers N each process answers for itself; tools tell them apart by it.
        return {"ready": self.ready and self.batcher.alive, "batches": self.batcher.batches,
                "images": self.batcher.items, "pid": os.getpid()}
