"""ClassifierService: the request pipeline from uploaded bytes to a stored, answered prediction.

    preprocess (validates; bad input raises before anything is stored)
    -> store the bytes (every accepted image is on disk before it is answered)
    -> dynamic batch through the model
    -> record the answer beside the image -> return it
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
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
            detected = image_format(data)
            upload_id = self.store.save(data, detected)
        except BaseException:
            self.batcher.cancel_expect()
            raise
        try:
            prediction = self.model.interpret(self.batcher.predict(pixels, expected=True))
        except PredictionError as exc:
            exc.upload_id = upload_id  # the client can quote it; the image is kept
            raise
        elapsed_ms = (time.perf_counter() - started) * 1000
        self.store.record(upload_id, {
            "id": upload_id,
            "received": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "client_filename": (client_filename or "")[:255],  # audit only; never used as a path
            "bytes": len(data),
            "sha256": UploadStore.sha256(data),
            "format": detected,
            "model": self.model.info.get("file"),
            "prediction": prediction.as_json(),
            "milliseconds": round(elapsed_ms, 2),
        })
        return ClassifiedUpload(upload_id, prediction, elapsed_ms)

    def status(self) -> dict[str, Any]:
        return {"ready": self.ready and self.batcher.alive, "batches": self.batcher.batches,
                "images": self.batcher.items}
