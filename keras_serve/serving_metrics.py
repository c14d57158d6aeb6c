"""What the serving core reports about its own work, without knowing who listens.

The batcher and the service call these methods; `keras_serve.web.metrics` implements them
with prometheus-client and `NO_METRICS` (the default) drops them. So the core imports
neither Flask nor prometheus_client, and a core test needs neither.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol


class ServingMetrics(Protocol):
    def batch_predicted(self, size: int, seconds: float) -> None:
        """One forward pass of the model over `size` inputs took `seconds`."""

    def upload_stored(self, size_bytes: int) -> None:
        """An upload of `size_bytes` is durable in the store."""

    def storage_failed(self, operation: str, kind: str) -> None:
        """The store raised a StorageError of `kind` (`errors.error_code` of its class) during `operation` (save, read)."""

    def predicted(self, model_sha256: str | None) -> None:
        """One image was answered by the model version `model_sha256`."""

    def model_output_invalid(self, model_sha256: str | None, problem: str) -> None:
        """The model version `model_sha256` answered an image with scores that are not
        probabilities; `problem` is one of served_model.OUTPUT_PROBLEMS."""

    def model_changed(self, result: str, info: Mapping[str, Any] | None) -> None:
        """`result`: "started" or "swapped" (info: the model now served), or "refused" (info None)."""


class NoMetrics:
    def batch_predicted(self, size: int, seconds: float) -> None:
        pass

    def upload_stored(self, size_bytes: int) -> None:
        pass

    def storage_failed(self, operation: str, kind: str) -> None:
        pass

    def predicted(self, model_sha256: str | None) -> None:
        pass

    def model_output_invalid(self, model_sha256: str | None, problem: str) -> None:
        pass

    def model_changed(self, result: str, info: Mapping[str, Any] | None) -> None:
        pass


NO_METRICS: ServingMetrics = NoMetrics()
