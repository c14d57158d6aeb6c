"""How many answers a "not sure" band catches, and how accurate the answers outside it are.

    python -m keras_serve.tools.unsure_calibration models/cats_vs_dogs.h5 \
        --data ../shared/data/cats_vs_dogs --split validation

Scores every labelled photo through the server's own loading and preprocessing (as
`keras_serve.training.evaluate` does), then for each threshold T prints: the share of answers
whose winning score is under T (the server would say "unsure"), the accuracy of those, and
the accuracy of the rest. docs/unsure.md explains how the default UNSURE_BELOW was chosen.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from keras_serve.model.served_model import ServedModel
from keras_serve.pipeline.preprocessing import to_model_input
from keras_serve.training.dataset import decode_files, list_labelled_images

DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.97, 0.99)


def winning_scores(model: ServedModel, data: Path, split: str | None, batch_size: int = 64
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(winning score, answer correct) per readable photo, as the server would answer it."""
    paths, labels, class_names = list_labelled_images(data, [split] if split else None)
    pixels, ok = decode_files(paths, model.spec, None)
    pixels, labels = pixels[ok], labels[ok]
    outputs = np.concatenate([model.predict_batch(to_model_input(pixels[i:i + batch_size], model.spec))
                              for i in range(0, len(pixels), batch_size)])
    predictions = [model.interpret(row) for row in outputs]
    confidence = np.array([p.confidence for p in predictions])
    correct = np.array([model.labels.index(p.label) == int(y) for p, y in zip(predictions, labels)])
    return confidence, correct


def band_table(confidence: np.ndarray, correct: np.ndarray, thresholds=DEFAULT_THRESHOLDS) -> list[dict]:
    rows = []
    for t in thresholds:
        unsure = confidence < t
        sure = ~unsure
        rows.append({
            "unsure_below": t,
            "unsure_share": float(unsure.mean()),
            "unsure_count": int(unsure.sum()),
            "accuracy_unsure": float(correct[unsure].mean()) if unsure.any() else None,
            "accuracy_rest": float(correct[sure].mean()) if sure.any() else None,
            "errors_rest": int((~correct[sure]).sum()),
        })
    return rows


def format_table(rows: list[dict], images: int) -> str:
    lines = [f"{images} images",
             "| UNSURE_BELOW | answers marked unsure | accuracy of those | accuracy of the rest | errors left |",
             "|---:|---:|---:|---:|---:|"]
    for r in rows:
        unsure_acc = "-" if r["accuracy_unsure"] is None else f"{r['accuracy_unsure']:.1%}"
        rest_acc = "-" if r["accuracy_rest"] is None else f"{r['accuracy_rest']:.2%}"
        lines.append(f"| {r['unsure_below']:g} | {r['unsure_share']:.1%} ({r['unsure_count']}) | {unsure_acc} "
                     f"| {rest_acc} | {r['errors_rest']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="validation", help="sub-folder to score ('' for the folder itself)")
    p.add_argument("--thresholds", default=",".join(f"{t:g}" for t in DEFAULT_THRESHOLDS))
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    model = ServedModel.load(args.model, engine="tensorflow")
    confidence, correct = winning_scores(model, args.data, args.split or None)
    rows = band_table(confidence, correct, [float(t) for t in args.thresholds.split(",")])
    print(f"model {model.info.get('file')}, accuracy {correct.mean():.4f}")
    print(format_table(rows, len(confidence)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
