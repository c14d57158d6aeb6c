"""The model card: a JSON file beside the model (`x.h5` -> `x.json`) saying how to serve it.

One schema, written by training and read by serving, so the two cannot drift. Serving reads
the contract fields (input, scaling, labels, threshold, architecture); every other section
(training, validation, evaluation, command, ...) is carried through untouched in `extra`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from keras_serve.errors import ModelLoadError

PREPROCESSING_FUNCTION = "keras_serve.pipeline.preprocessing.preprocess"
CONTRACT_KEYS = ("model_file", "architecture", "parameters", "input", "preprocessing", "output", "labels",
                 "threshold")


def card_path(model_path: str | Path) -> Path:
    return Path(model_path).with_suffix(".json")


@dataclass
class ModelCard:
    model_file: str | None = None
    architecture: str | None = None
    parameters: int | None = None
    height: int | None = None
    width: int | None = None
    channels: int | None = None
    layout: str | None = None          # "channels_last" | "channels_first"; None: guess from the shape
    scaling: str | None = None         # a preprocessing.SCALINGS name
    output: str | None = None          # "sigmoid" | "softmax"
    labels: list[str] | None = None
    threshold: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)
    found: bool = True                 # False: no card beside the model; every field is a default

    # --- reading (serving) ------------------------------------------------------------
    @classmethod
    def read(cls, model_path: str | Path) -> "ModelCard":
        """The card beside `model_path`, validated; an empty card when there is none."""
        path = card_path(model_path)
        if not path.is_file():
            return cls(found=False)
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"model card {path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"model card {path} must hold a JSON object")
        return cls.from_json(raw, path.name)

    @classmethod
    def from_json(cls, raw: dict[str, Any], name: str = "model card") -> "ModelCard":
        card_input = _section(raw, "input")
        labels = raw.get("labels")
        if labels is not None and (not isinstance(labels, list) or not labels):
            raise ModelLoadError(f"model card {name}: \"labels\" must be a non-empty "
                                 f"list such as [\"cat\", \"dog\"], not {labels!r}")
        return cls(
            model_file=raw.get("model_file"), architecture=raw.get("architecture"),
            parameters=raw.get("parameters"),
            height=card_input.get("height"), width=card_input.get("width"),
            channels=card_input.get("channels"), layout=card_input.get("layout"),
            scaling=_section(raw, "preprocessing").get("scaling"), output=raw.get("output"),
            labels=[str(label) for label in labels] if labels else None,
            threshold=_threshold(raw.get("threshold", 0.5)),
            extra={k: v for k, v in raw.items() if k not in CONTRACT_KEYS},
        )

    # --- writing (training) -----------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        contract = {
            "model_file": self.model_file,
            "architecture": self.architecture,
            "parameters": self.parameters,
            "input": {"height": self.height, "width": self.width, "channels": self.channels,
                      "layout": self.layout or "channels_last"},
            "preprocessing": {"scaling": self.scaling, "color": "RGB" if self.channels != 1 else "L",
                              "resize": f"bilinear to {self.height}x{self.width}, aspect not kept",
                              "function": PREPROCESSING_FUNCTION},
            "output": self.output,
            "labels": self.labels,
            "threshold": self.threshold,
        }
        return {**contract, **self.extra}

    def write(self, model_path: str | Path) -> Path:
        path = card_path(model_path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    section = raw.get(key) or {}
    if not isinstance(section, dict):
        raise ModelLoadError(f"model card \"{key}\" must be a JSON object, not {section!r}")
    return section


def _threshold(value: Any) -> float:
    try:
        threshold = float(value)
    except (TypeError, ValueError):
        threshold = float("nan")
    if not 0.0 < threshold < 1.0:  # also rejects NaN
        raise ModelLoadError(f"model card \"threshold\" must be a number between 0 and 1, not {value!r}")
    return threshold
