"""Score a model file on a labelled folder through the server's own loading and preprocessing.

    python -m keras_serve.training.evaluate models/cats_vs_dogs.h5 --data ../shared/data/cats_vs_dogs --split validation

Class folders, sorted by name, map to the model's outputs in order (cats -> CAT, dogs -> DOG).
Prints accuracy, the confusion matrix, ROC AUC (binary models) and calibration (ECE, Brier).

A candidate beside the current model, on the same photos (docs/retraining.md):

    python -m keras_serve.training.evaluate --compare models/cats_vs_dogs.h5 models/candidate.h5 \
        --reviewed reviewed/ --data ../shared/data/cats_vs_dogs --split validation [--json report.json]

scores both on the held-out part of each exported set (exported_sets.is_held_out: the images
training never used) and on the base split, side by side, with the difference in accuracy,
its paired 95% confidence interval and McNemar's exact test (comparison.py), and a verdict.
The exit status is 0 for a completed comparison, whatever the verdict.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np

from keras_serve.training.comparison import RESAMPLES, SEED, overall_verdict, paired_accuracy_difference, verdict
from keras_serve.training.dataset import decode_files, list_labelled_images
from keras_serve.errors import DatasetError, ModelLoadError
from keras_serve.training.exported_sets import held_out_description, held_out_images, read_exported_set
from keras_serve.training.metrics import binary_report, multiclass_report
from keras_serve.model.served_model import ServedModel
from keras_serve.pipeline.preprocessing import to_model_input


def evaluate(model: ServedModel, data: Path, split: str | None = "validation", batch_size: int = 64,
             cache_dir: Path | None = None) -> dict:
    paths, labels, class_names = _class_folders(model, data, split)
    outputs, ok = model_outputs(model, paths, batch_size, cache_dir)
    report = report_on(model, labels[ok], outputs[ok])
    return {"model": model.info.get("file"), "data": str(data), "split": split,
            "class_folders": class_names, "unreadable_files": int((~ok).sum()), **report}


def _class_folders(model: ServedModel, data: Path, split: str | None) -> tuple[list[Path], np.ndarray, list[str]]:
    paths, labels, class_names = list_labelled_images(data, [split] if split else None)
    expected = 2 if model.output_kind == "sigmoid" else len(model.labels)
    if len(class_names) != expected:
        raise DatasetError(f"the folder has {len(class_names)} classes {class_names}, the model {expected} labels")
    return paths, labels, class_names


def model_outputs(model: ServedModel, paths: list[Path], batch_size: int = 64, cache_dir: Path | None = None,
                  decoded: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The model's raw outputs for every file (zeros where it did not decode) and the mask of
    files that decoded. `decoded`: a dict to share decoding between models with one input spec."""
    width = 1 if model.output_kind == "sigmoid" else len(model.labels)
    if not paths:
        return np.zeros((0, width)), np.zeros(0, bool)
    key = (model.spec, tuple(paths))
    if decoded is not None and key in decoded:
        pixels, ok = decoded[key]
    else:
        pixels, ok = decode_files(paths, model.spec, cache_dir)
        if decoded is not None:
            decoded[key] = pixels, ok
    outputs = np.concatenate([model.predict_batch(to_model_input(pixels[i:i + batch_size], model.spec))
                              for i in range(0, len(pixels), batch_size)])
    return outputs, ok


def report_on(model: ServedModel, labels: np.ndarray, outputs: np.ndarray) -> dict:
    if model.output_kind == "sigmoid":
        return binary_report(labels, outputs[:, 0], model.labels, model.threshold)
    return multiclass_report(labels, outputs, model.labels)


def predicted_classes(model: ServedModel, outputs: np.ndarray) -> np.ndarray:
    if model.output_kind == "sigmoid":
        return (outputs[:, 0] >= model.threshold).astype(int)
    return outputs.argmax(axis=1)


def compare(current: ServedModel, candidate: ServedModel, reviewed: list[Path], data: Path | None,
            split: str | None = "validation", skip_labels: list[str] = (), seed: int = SEED,
            resamples: int = RESAMPLES, cache_dir: Path | None = None) -> dict:
    """Both models on the held-out part of the reviewed sets and on the base split: each one's
    report, the paired difference in accuracy and a verdict per data set, and overall."""
    if current.labels != candidate.labels or current.output_kind != candidate.output_kind:
        raise DatasetError(f"the models answer differently: {current.output_kind} {current.labels} / "
                           f"{candidate.output_kind} {candidate.labels}; a candidate must have the current labels")
    datasets: list[tuple[str, dict, list[Path], np.ndarray]] = []
    class_names = None
    if data is not None:
        paths, labels, class_names = _class_folders(current, data, split)
        base = ("base", {"name": f"base photos ({split or 'the folder itself'})", "data": str(data), "split": split,
                         "class_folders": class_names}, paths, labels)
    if reviewed:
        sets = [read_exported_set(folder, current.labels, class_names, skip_labels) for folder in reviewed]
        images = held_out_images(sets)
        datasets.append(("reviewed_held_out", {
            "name": "reviewed uploads, held-out part", "held_out": held_out_description(),
            "sets": [s.describe() for s in sets]},
            [i.path for i in images], np.asarray([i.label for i in images], np.int32)))
    if data is not None:
        datasets.append(base)
    decoded: dict = {}
    results = {}
    for key, about, paths, labels in datasets:
        current_out, current_ok = model_outputs(current, paths, cache_dir=cache_dir, decoded=decoded)
        candidate_out, candidate_ok = model_outputs(candidate, paths, cache_dir=cache_dir, decoded=decoded)
        ok = current_ok & candidate_ok  # the same images for both, or the pairing is lost
        truth = labels[ok]
        paired = paired_accuracy_difference(predicted_classes(current, current_out[ok]) == truth,
                                            predicted_classes(candidate, candidate_out[ok]) == truth,
                                            seed, resamples)
        scored = bool(ok.any())  # with no images, no report: NaNs help nobody
        results[key] = {**about, "images": int(ok.sum()), "unreadable_files": int((~ok).sum()),
                        "current": report_on(current, truth, current_out[ok]) if scored else None,
                        "candidate": report_on(candidate, truth, candidate_out[ok]) if scored else None,
                        "paired": paired, "verdict": verdict(paired)}
    return {"current": _model_id(current), "candidate": _model_id(candidate), "datasets": results,
            "verdict": overall_verdict([(r["name"], r["paired"]) for r in results.values()])}


def _model_id(model: ServedModel) -> dict:
    return {"file": model.info.get("file"), "sha256": model.info.get("sha256"),
            "architecture": model.info.get("architecture")}


def format_comparison(result: dict) -> str:
    cur, can = result["current"], result["candidate"]
    lines = [f"current   {cur['file']} (sha256 {str(cur['sha256'])[:12]})",
             f"candidate {can['file']} (sha256 {str(can['sha256'])[:12]})"]
    for data in result["datasets"].values():
        a, b, paired = data["current"], data["candidate"], data["paired"]
        lines += ["", f"{data['name']}: {data['images']} images"
                  + (f" ({data['unreadable_files']} unreadable, left out)" if data["unreadable_files"] else "")]
        if "held_out" in data:
            lines.append(f"  held out: {data['held_out']['rule']}, from "
                         + ", ".join(f"{s['path']} ({s['held_out']} of {s['images']})" for s in data["sets"]))
        if not data["images"]:
            lines.append(f"  verdict: {data['verdict']}")
            continue
        rows = [("accuracy", a["accuracy"], b["accuracy"])]
        rows += [(f"{label} recall ({a['per_class'][label]['images']})", a["per_class"][label]["recall"],
                  b["per_class"][label]["recall"]) for label in a["per_class"]]
        if "roc_auc" in a:
            rows.append(("ROC AUC", a["roc_auc"], b["roc_auc"]))
        rows += [("ECE", a["ece"], b["ece"]), ("Brier", a["brier"], b["brier"])]
        lines.append(f"  {'':22}{'current':>10}{'candidate':>11}")
        lines += [f"  {name:22}{_number(x):>10}{_number(y):>11}" for name, x, y in rows]
        labels = a["confusion_matrix"]["labels"]
        lines.append("  confusion (rows = true " + "/".join(labels) + ", columns = predicted): current "
                     f"{a['confusion_matrix']['rows_true_columns_predicted']}, "
                     f"candidate {b['confusion_matrix']['rows_true_columns_predicted']}")
        lines.append(f"  right by one only: current {paired['only_current_right']}, candidate "
                     f"{paired['only_candidate_right']}; McNemar exact p = {paired['mcnemar_p']:.3g}")
        lines.append(f"  verdict: {data['verdict']}")
    lines += ["", f"overall: {result['verdict']}"]
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.4f}"


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
    p.add_argument("model", type=Path, nargs="?", help="the model to score (not with --compare)")
    p.add_argument("--compare", type=Path, nargs=2, metavar=("CURRENT", "CANDIDATE"),
                   help="score two models side by side on the same images")
    p.add_argument("--reviewed", type=Path, action="append", default=[], metavar="EXPORT_DIR",
                   help="with --compare: an export-dataset folder whose held-out part to score on (repeatable)")
    p.add_argument("--skip-label", action="append", default=[], metavar="NAME",
                   help="with --reviewed: leave out a label folder that names no class, e.g. neither")
    p.add_argument("--seed", type=int, default=SEED, help="of the paired bootstrap (--compare)")
    p.add_argument("--resamples", type=int, default=RESAMPLES, help="of the paired bootstrap (--compare)")
    p.add_argument("--data", type=Path, help="folder of <split>/<class>/ images (with --compare: optional)")
    p.add_argument("--split", default="validation", help="sub-folder to score ('' for the folder itself)")
    p.add_argument("--labels", help="labels if the model has no card")
    p.add_argument("--scaling", help="pixel scaling if the model has no card")
    p.add_argument("--json", type=Path, help="also write the full report here")
    p.add_argument("--update-card", action="store_true",
                   help="write the report into the model card (model.json) as its 'validation'; the one "
                        "training wrote (e.g. on packed images) is kept as 'validation_at_training'")
    args = p.parse_args(argv)
    if args.compare:
        if args.model or args.update_card:
            p.error("--compare takes the two models itself, and updates no card")
        if not args.reviewed and args.data is None:
            p.error("--compare needs --reviewed EXPORT_DIR and/or --data")
    elif args.model is None or args.data is None:
        p.error("give a model and --data, or --compare CURRENT CANDIDATE")
    elif args.reviewed:
        p.error("--reviewed goes with --compare")
    try:
        if args.compare:
            return _compare_main(args)
        model = ServedModel.load(args.model, labels=args.labels, scaling=args.scaling)
        report = evaluate(model, args.data, args.split or None)
    except (ModelLoadError, DatasetError) as exc:
        print(f"error: {exc.message}" + (f"\n{exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 2
    except FileNotFoundError as exc:  # a data folder that is not there: one line, not a traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.update_card:
        update_card(args.model.with_suffix(".json"), report, args.split)
    return 0


def _compare_main(args: argparse.Namespace) -> int:
    current, candidate = (ServedModel.load(path, labels=args.labels, scaling=args.scaling) for path in args.compare)
    result = compare(current, candidate, args.reviewed, args.data, args.split or None, args.skip_label,
                     args.seed, args.resamples)
    print(format_comparison(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
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
