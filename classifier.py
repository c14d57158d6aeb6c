"""ClassifierService: the request pipeline from uploaded bytes to a stored, answered prediction.

    preprocess (validates; bad input raises before anything is stored)
    -> dynamic batch through the model
    -> store the bytes and the answer in one append (on disk before the client hears back)
    -> return it

A failed prediction still stores the image, with the error, so the client can quote its id.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from batcher import DynamicBatcher
from errors import PredictionError
from model_loader import Prediction, ServedModel
from preprocessing import image_format, preprocess
from uploads import UploadStore


@dataclass(frozen=True)
class ClassifiedUpload:
    upload_id: str
    prediction: Prediction
    milliseconds: float


class ClassifierService:
    def __init__(self, model: ServedModel, batcher: DynamicBatcher, store: UploadStore) -> None:
        self.model = model
        self.batcher = batcher
        self.store = store
        self.ready = False

    def classify(self, data: bytes, client_filename: str | None = None) -> ClassifiedUpload:
        started = time.perf_counter()
        self.batcher.expect()  # tells a forming batch that this input is on its way
        try:
            pixels = preprocess(data, self.model.spec)
        except BaseException:
            self.batcher.cancel_expect()
            raise
        detected = image_format(data)
        audit = {
            "client_filename": (client_filename or "")[:255],  # audit only; never used as a path
            "model": self.model.info.get("file"),
        }
        try:
            prediction = self.model.interpret(self.batcher.predict(pixels, expected=True))
        except PredictionError as exc:
            exc.upload_id = self.store.save(data, detected, {**audit, "prediction": None, "error": exc.message})
            raise
        elapsed_ms = (time.perf_counter() - started) * 1000
        upload_id = self.store.save(data, detected, {
            **audit, "prediction": prediction.as_json(), "milliseconds": round(elapsed_ms, 2)})
        return ClassifiedUpload(upload_id, prediction, elapsed_ms)

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready and self.batcher.alive, "batches": self.batcher.batches,
                "images": self.batcher.items}
