"""Each server process follows the promotion log and swaps models without a restart.

Every MODEL_CHECK_INTERVAL_S a background thread reads which version the log ends on
(keras_serve/storage/model_registry.py). When it is not the one served, the thread fetches the
file from the shared image store, checks it in a child process within the candidate's memory
and time budget (keras_serve/model/candidate_check.py: it loads, answers the probe images with
probabilities), so a file that would exhaust memory or never load costs that child, not this
serving process (skipped when the store notes that the version passed that check with the
same settings where it was published or promoted); then loads it beside the old model with every check a candidate must pass
(keras_serve/model/versions.py: loads, converted engine faithful to TensorFlow, same
labels), measures and warms it (`Generation.build`), and only then swaps it in between
batches (`ModelSlot.swap`); requests in flight finish on the model they started with.

A version that fails its checks, or whose stored file no longer matches its sha256, is refused:
logged once with the reason, shown by /model, counted in the metrics, and not tried again by
this process; the old model keeps serving. The speed and memory comparison with the served
model is made where a version is published or promoted, not here: a rollback, or a version
promoted with --force, must not be refused by the servers.
Every process and replica sharing the database does the same on its own, so they all switch
within an interval plus a load.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from keras_serve.errors import CandidateRefused, ModelFileDamaged, ServiceError
from keras_serve.model.candidate_check import check_candidate, settings_digest
from keras_serve.model.versions import load_candidate
from keras_serve.pipeline.model_slot import Generation, ModelSlot
from keras_serve.storage.model_registry import ModelRegistry, ModelVersion

log = logging.getLogger(__name__)


class ModelFollower:
    """Keeps `slot` serving the version the registry's log ends on; see the module docstring."""

    def __init__(self, slot: ModelSlot, registry: ModelRegistry, startup_path: Path | None,
                 build: Callable[[Any], Generation], config: Mapping[str, Any],
                 max_decode_bytes: int | None = None, on_swap: Callable[[str, Generation | None], None] | None = None) -> None:
        self.slot = slot
        self.registry = registry
        self.startup_path = startup_path
        self.startup_version = slot.current.version
        self._build = build
        self._config = config
        self._max_decode_bytes = max_decode_bytes
        self._on_swap = on_swap or (lambda result, generation: None)
        self._cache: Path | None = None  # this process's copies of fetched versions, made on the first
        self.refused: dict[str, str] = {}  # sha256 -> why; not tried again by this process
        self.swaps = 0
        self.last_swap: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._checking = threading.Lock()

    def start(self, interval_s: float) -> None:
        if interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, args=(interval_s,), name="model-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)  # a load in progress finishes first
        if self._cache is not None:
            shutil.rmtree(self._cache, ignore_errors=True)

    def _run(self, interval_s: float) -> None:
        while not self._stop.wait(interval_s):
            try:
                self.check()
            except Exception:  # the thread must outlive anything; the next round tries again
                log.exception("model follower: check failed")

    def check(self) -> str:
        """One round: "same", "swapped", "refused" or "unavailable" (the store could not be read)."""
        with self._checking:
            try:
                wanted = self.registry.served()
            except ServiceError as exc:
                log.warning("model follower: cannot read the served version (%s); still serving %s",
                            exc.message, self._name(self.slot.current))
                return "unavailable"
            wanted_sha = wanted.sha256 if wanted else self.startup_version
            if wanted_sha == self.slot.current.version or wanted_sha in self.refused:
                return "same"
            return self._swap_to(wanted)

    def _swap_to(self, wanted: ModelVersion | None) -> str:
        current = self.slot.current
        started = time.perf_counter()
        sha = wanted.sha256 if wanted else self.startup_version
        try:
            if wanted is None:
                if self.startup_path is None:
                    raise CandidateRefused("the start-up model was given as an object, not a file")
                path = self.startup_path
            else:
                if self._cache is None:
                    self._cache = Path(tempfile.mkdtemp(prefix="keras-serve-models-"))
                try:
                    path = self.registry.fetch(wanted, self._cache)
                except ModelFileDamaged as exc:  # fetching again cannot help: refused, logged once
                    raise CandidateRefused(exc.message) from None
                self._check_in_a_child(wanted, path, current.model.labels)
            model = load_candidate(path, self._config, current.model.labels, self._max_decode_bytes)
            try:
                generation = self._build(model)
            except Exception as exc:  # it loaded but cannot run (warm-up failed): never retried every round
                raise CandidateRefused(f"{path.name} fails its warm-up: {type(exc).__name__}: "
                                       f"{' '.join(str(exc).split())[:200]}") from None
        except CandidateRefused as exc:
            self.refused[str(sha)] = exc.message
            log.error("model version %s refused, still serving %s: %s", str(sha)[:12], self._name(current), exc.message)
            self._on_swap("refused", None)
            return "refused"
        except ServiceError as exc:  # the file could not be fetched: try again next round
            log.warning("model version %s not fetched (%s); still serving %s", str(sha)[:12], exc.message,
                        self._name(current))
            return "unavailable"
        self.slot.swap(generation)
        seconds = time.perf_counter() - started
        self.swaps += 1
        self.last_swap = {"from": current.version, "to": generation.version, "seconds": round(seconds, 2),
                          "at": time.time()}
        log.info("model swapped: %s -> %s in %.1f s (loaded, checked against TensorFlow, warmed)",
                 self._name(current), self._name(generation), seconds)
        self._on_swap("swapped", generation)
        return "swapped"

    def _check_in_a_child(self, wanted: ModelVersion, path: Path, labels: list[str]) -> None:
        """The candidate check (CandidateRefused), unless the version passed it already under
        these settings where it was published or promoted (candidate_check.settings_digest)."""
        digest = settings_digest(self._config)
        if self.registry.was_checked(wanted.sha256, digest):
            return
        # TensorFlow only: the converted engine is built, and compared with it, by the load that
        # follows; converting twice would double the time every process takes to follow a promotion.
        checked = check_candidate(path, {**self._config, "ENGINE": "tensorflow"}, labels, name=wanted.file,
                                  guard_ratios=False)
        self.registry.record_check(wanted.sha256, digest, {"file": wanted.file, "latency_ms": checked.latency_ms,
                                                           "memory_mb": checked.memory_mb})

    @staticmethod
    def _name(generation: Generation) -> str:
        return f"{generation.model.info.get('file')} ({str(generation.version)[:12]})"

    def describe(self) -> dict[str, Any]:
        """For /model: how this process follows the promotion log."""
        return {"pid": os.getpid(), "swaps": self.swaps, "last_swap": self.last_swap,
                "refused": [{"sha256": sha, "reason": why} for sha, why in self.refused.items()]}
