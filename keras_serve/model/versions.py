"""Loading a model the way the server serves it, and the checks a candidate must pass to replace it.

`load_for_serving(path, config)` is the one place a server process turns a file into a
`ServedModel` with the settings it runs under (start-up and every hot swap alike).
`load_candidate` adds what a swap needs on top of a clean load:

- the converted engine the settings ask for must be faithful to TensorFlow on the probe
  inputs (`ServedModel._unfaithful`); at start-up an unfaithful engine only falls back to
  TensorFlow with a warning, but a candidate that answers differently is refused;
- the labels must be the served model's: records, reviews and exported datasets are keyed by
  label, so a model with other labels is a new deployment (a restart with --model), not a swap.

Anything wrong raises `CandidateRefused` with the reason in one line; the old model keeps serving.

`publish_candidate` and `promote_version` never load the file in the calling process: the checks
run in a child process within a memory and time budget (keras_serve/model/candidate_check.py),
which also answers real-looking probe images and compares speed and memory with the served model.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

from keras_serve.errors import CandidateRefused, ModelFileDamaged, ModelLoadError, ServiceError
from keras_serve.model.card import ModelCard
from keras_serve.model.engines import usable_cores
from keras_serve.model.served_model import ServedModel, parse_labels
from keras_serve.storage.model_registry import SHOWN_NAME, ModelRegistry, ModelVersion
from keras_serve.worker_count import processes_in

log = logging.getLogger(__name__)


def load_for_serving(path: str | Path, config: Mapping[str, Any], max_decode_bytes: int | None = None) -> ServedModel:
    """The model at `path` with the server's options; raises ModelLoadError."""
    return ServedModel.load(
        path, labels=config.get("LABELS"), scaling=config.get("SCALING"), arch=config.get("ARCH"),
        max_pixels=int(config["MAX_PIXELS"]), max_decode_bytes=max_decode_bytes,
        engine=config.get("ENGINE", "auto"),
        # Worker processes share the cores rather than each starting one thread per core.
        engine_threads=max(1, usable_cores() // processes_in(config)),
        **file_limits(config))


def file_limits(config: Mapping[str, Any]) -> dict[str, Any]:
    """What keras_formats refuses before loading a file, as the settings say (file_safety)."""
    budget = config.get("MODEL_MAX_WEIGHT_BYTES")
    return {"max_weight_bytes": None if budget is None else int(budget),
            "trust_model_code": bool(config.get("TRUST_MODEL_CODE"))}


def load_candidate(path: str | Path, config: Mapping[str, Any], served_labels: Sequence[str] | None,
                   max_decode_bytes: int | None = None) -> ServedModel:
    """Load `path` as a replacement for a model answering with `served_labels` (None: no
    constraint); raises CandidateRefused with the reason."""
    name = Path(path).name
    try:
        model = load_for_serving(path, config, max_decode_bytes)
    except ModelLoadError as exc:
        raise CandidateRefused(f"{name} does not load: {exc.message}") from None
    except MemoryError:  # over the check's memory budget: the caller says so, not "does not load"
        raise
    except Exception as exc:  # a file that crashes the loader is refused, never served
        raise CandidateRefused(f"{name} does not load: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    if model.engine_fallback_reason and config.get("ENGINE", "auto") != "tensorflow":
        raise CandidateRefused(f"{name} answers differently from TensorFlow once converted: "
                               f"{model.engine_fallback_reason}")
    if served_labels is not None and list(model.labels) != list(served_labels):
        raise CandidateRefused(f"{name} answers with labels {','.join(model.labels)}, the served model with "
                               f"{','.join(served_labels)}; a model with other labels needs a restart with --model")
    return model


def expected_labels(registry: ModelRegistry, config: Mapping[str, Any]) -> list[str] | None:
    """The labels a candidate must answer with: the promoted version's, else the start-up model's
    (--labels, its card, or what loading it settles); None if the start-up model cannot be read
    here (each server still checks for itself)."""
    served = registry.served()
    if served is not None:
        return list(served.labels)
    given = parse_labels(config.get("LABELS"))
    if given:
        return given
    path = Path(config["MODEL_PATH"])
    card_labels = ModelCard.read(path).labels
    if card_labels:
        return [str(label) for label in card_labels]
    try:
        return ServedModel.load(path, scaling=config.get("SCALING"), arch=config.get("ARCH"), engine="tensorflow",
                                **file_limits(config)).labels
    except ModelLoadError:
        return None


def publish_candidate(registry: ModelRegistry, path: Path, config: Mapping[str, Any], by: str,
                      name: str | None = None, force: bool = False) -> ModelVersion:
    """Check `path` as every server will, in a child process (CandidateRefused if it must not
    serve), then publish it. `name`: what it is shown as; `force`: skip the speed and memory
    comparison with the served model (the CLI's --force), never the other checks."""
    from keras_serve.model.candidate_check import check_candidate

    shown = SHOWN_NAME.sub("_", Path(name or path.name).name)[-128:]
    with tempfile.TemporaryDirectory(prefix="keras-serve-served-") as folder:
        checked = check_candidate(path, config, expected_labels(registry, config), name=shown,
                                  baseline=None if force else served_file(registry, config, Path(folder)),
                                  guard_ratios=not force)
    version = registry.publish(path, checked.labels, by, name)
    _record_check(registry, version, config, checked)
    return version


def promote_version(registry: ModelRegistry, sha256: str, config: Mapping[str, Any], by: str,
                    force: bool = False) -> ModelVersion:
    """Check a published version as a new file is (its stored file must still match its sha256),
    then promote it; raises CandidateRefused, ModelVersionNotFound or StorageError."""
    from keras_serve.model.candidate_check import check_candidate

    version = registry.version(sha256)
    with tempfile.TemporaryDirectory(prefix="keras-serve-promote-") as folder:
        try:
            path = registry.fetch(version, Path(folder) / "candidate")
        except ModelFileDamaged as exc:
            raise CandidateRefused(f"{exc.message} It changed after it was published, so it is not promoted; "
                                   "publishing the original file again restores it") from None
        refuse_unpromotable(path, version.file, force)
        checked = check_candidate(path, config, expected_labels(registry, config), name=version.file,
                                  baseline=None if force else served_file(registry, config, Path(folder) / "served"),
                                  guard_ratios=not force)
    _record_check(registry, version, config, checked)
    return registry.promote(version.sha256, by)


def _record_check(registry: ModelRegistry, version: ModelVersion, config: Mapping[str, Any], checked: Any) -> None:
    from keras_serve.model.candidate_check import settings_digest

    try:
        registry.record_check(version.sha256, settings_digest(config), {
            "file": version.file, "latency_ms": checked.latency_ms, "memory_mb": checked.memory_mb})
    except ServiceError as exc:  # the servers then check it themselves: slower, never less safe
        log.warning("the check of %s could not be noted in the store: %s", version.file, exc.message)


def refuse_unpromotable(path: Path, name: str, force: bool) -> None:
    """A variant whose card says it loses too much accuracy against its float model (`"promotable":
    false`, written by `python -m keras_serve.model optimize`) is promoted only with --force."""
    if force:
        return
    try:
        card = ModelCard.read(path)
    except ModelLoadError as exc:
        raise CandidateRefused(f"{name}: {exc.message}") from None
    if card.extra.get("promotable") is False:
        reason = " ".join(str(card.extra.get("not_promotable_because") or "its card says so").split())[:300]
        raise CandidateRefused(f"{name} is not promotable: {reason}; --force promotes it anyway")


def served_file(registry: ModelRegistry, config: Mapping[str, Any], folder: Path) -> Path | None:
    """The file of the model the servers answer with (fetched into `folder` when promoted), to
    compare a candidate with; None when it cannot be read here."""
    try:
        served = registry.served()
        if served is not None:
            return registry.fetch(served, folder)
    except ServiceError as exc:
        log.warning("the served model version cannot be fetched to compare candidates with: %s", exc.message)
        return None
    path = Path(config.get("MODEL_PATH") or "")
    return path if path.is_file() else None
