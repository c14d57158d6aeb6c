"""Score a model file on a labelled folder through the server's own loading and preprocessing.

    python -m keras_serve.training.evaluate models/cats_vs_dogs.h5 --data ../shared/data/cats_vs_dogs --split validation

Class folders, sorted by name, map to the model's outputs in order (cats -> CAT, dogs -> DOG).
Prints accuracy, the confusion matrix, ROC AUC (binary models) and calibration (ECE, Brier).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from keras_serve.training.dataset import decode_files, list_labelled_images
from keras_serve.errors import ModelLoadError
from keras_serve.training.metrics import binary_report, multiclass_report
from keras_serve.model.served_model import ServedModel
from keras_serve.pipeline.preprocessing import to_model_input


def evaluate(model: ServedModel, data: Path, split: str | None = "validation", batch_size: int = 64,
             cache_dir: Path | None = None) -> dict:
    paths, labels, class_names = list_labelled_images(data, [split] if split else None)
    expected = 2 if model.output_kind == "sigmoid" else len(model.labels)
    if len(class_names) != expected:
        raise SystemExit(f"the folder has {len(class_names)} classes {class_names}, the model {expected} labels")
    pixels, ok = decode_files(paths, model.spec, cache_dir)
    pixels, labels = pixels[ok], labels[ok]
    outputs = np.concatenate([model.predict_batch(to_model_input(pixels[i:i + batch_size], model.spec))
                              for i in range(0, len(pixels), batch_size)]) if len(pixels) else np.zeros((0, 1))
    if model.output_kind == "sigmoid":
        report = binary_report(labels, outputs[:, 0], model.labels, model.threshold)
    else:
        report = multiclass_report(labels, outputs, model.labels)
    return {"model": model.info.get("file"), "data": str(data), "split": split,
            "class_folders": class_names, "unreadable_files": int((~ok).sum()), **report}


def format_report(report: dict) -> str:
    matrix = report["confusion_matrix"]
    labels = matrix["labels"]
    width = max(8, *(len(l) + 2 for l in labels))
    lines = [f"model {report['model']} on {report['data']} ({report['split']}): {report['images']} images",
             f"accuracy {report['accuracy']:.4f}"]
    if "roc_auc" in report:
        lines.append(f"ROC AUC  {report['roc_auc']:.4f}")
    lines.append(f"calibration: ECE {report['ece']:.4f}, Brier {report['brier']:.4f}")
    lines.append("confusion matrix (rows = true, columns = predicted):")
    lines.append(" " * width + "".join(l.rjust(width) for l in labels))
    for label, row in zip(labels, matrix["rows_true_columns_predicted"]):
        lines.append(label.rjust(width) + "".join(str(v).rjust(width) for v in row))
    lines.append("reliability (confidence bin: mean confidence / accuracy, count):")
    for b in report["calibration_bins"]:
        lines.append(f"  {b['bin'][0]:.2f}-{b['bin'][1]:.2f}: {b['mean_confidence']:.3f} / {b['accuracy']:.3f}, {b['count']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", type=Path)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="validation", help="sub-folder to score ('' for the folder itself)")
    p.add_argument("--labels", help="labels if the model has no card")
    p.add_argument("--scaling", help="pixel scaling if the model has no card")
    p.add_argument("--json", type=Path, help="also write the full report here")
    p.add_argument("--update-card", action="store_true",
                   help="write the report into the model card (model.json) as its 'validation'; the one "
                        "training wrote (e.g. on packed images) is kept as 'validation_at_training'")
    args = p.parse_args(argv)
    try:
        model = ServedModel.load(args.model, labels=args.labels, scaling=args.scaling)
    except ModelLoadError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    report = evaluate(model, args.data, args.split or None)
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.update_card:
        update_card(args.model.with_suffix(".json"), report, args.split)
    return 0


def update_card(card_path: Path, report: dict, split: str) -> None:
    card = json.loads(card_path.read_text())
    previous = card.get("validation")
    if previous and previous.get("scored_by") != "evaluate.py":
        card["validation_at_training"] = previous
    card["validation"] = {"scored_by": "evaluate.py", "split": split, "data": report["data"],
                          **{k: v for k, v in report.items() if k not in ("model", "data", "split")}}
    card_path.write_text(json.dumps(card, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
