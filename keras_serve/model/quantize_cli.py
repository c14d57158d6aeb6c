"""`python -m keras_serve.model optimize`: the command line of keras_serve.model.quantize.

Kept apart so that `python -m keras_serve.model --help` and the other subcommands import no
quantizer, TensorFlow or ONNX code.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

METHOD_CHOICES = ("minmax", "entropy", "percentile")  # quantize.METHODS, without importing it


def add_optimize_parser(sub: Any) -> argparse.ArgumentParser:
    optimize = sub.add_parser(
        "optimize", help="write a model's int8 variant (ONNX Runtime engine file) and its card",
        description="Quantize MODEL to int8 (ONNX Runtime static QDQ, per-channel weights), calibrated on "
                    "photos from --calibrate, and write the engine file and its card (<out>.json): "
                    "calibration set and sha256, method, CPU ms per image before and after, and the "
                    "comparison with the float model on the validation photos. A variant losing more "
                    "than 0.3 points of validation accuracy is marked \"promotable\": false.")
    optimize.add_argument("model", type=Path, help="the float model file (.h5, .keras)")
    optimize.add_argument("--calibrate", type=Path, required=True, metavar="DIR",
                          help="label folders of photos to calibrate on (<DIR>/<label>/<image>): the training "
                               "photos, or a set written by `python -m keras_serve.storage export-dataset`")
    optimize.add_argument("--calibration-images", type=int, default=300, metavar="N",
                          help="how many of them (default 300)")
    optimize.add_argument("--method", choices=METHOD_CHOICES, default="minmax",
                          help="activation range calibration (default minmax: the most accurate, measured)")
    optimize.add_argument("--validate", type=Path, metavar="DIR",
                          help="labelled photos (<DIR>/<class>/<image>) to compare float and int8 on "
                               "(default: the validation photos named in the model's card)")
    optimize.add_argument("--out", type=Path, metavar="FILE", help="the engine file (default MODEL.int8.onnx)")
    return optimize


def optimize_main(args: argparse.Namespace) -> int:
    from keras_serve.errors import DatasetError, ModelLoadError

    if not args.model.is_file():
        print(f"error: no such model file: {args.model}", file=sys.stderr)
        return 2
    validate = args.validate or _validation_from_card(args.model)
    if validate is None:
        print(f"error: {args.model.name}'s card names no validation photos; pass --validate DIR", file=sys.stderr)
        return 2
    if not validate.is_dir():
        print(f"error: validation folder {validate} does not exist", file=sys.stderr)
        return 2
    command = "python -m keras_serve.model optimize " + shlex.join(_given(args, validate))
    print(f"quantizing {args.model.name}: calibration on {args.calibration_images} images from {args.calibrate}, "
          f"{args.method}; validation on {validate}", file=sys.stderr)
    try:
        from keras_serve.model.quantize import optimize

        out, card = optimize(args.model, args.calibrate, validate, args.out, args.method,
                             args.calibration_images, labels=getattr(args, "LABELS", None), command=command)
    except (DatasetError, ModelLoadError) as exc:
        print(f"error: {exc.message}" + (f"\n{exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 2
    print(summary(out, card))
    return 0


def summary(out: Path, card: dict) -> str:
    speed, comparison, paired = card["speed"], card["comparison"], card["comparison"]["paired"]
    lines = [
        f"wrote {out} and {out.with_suffix('.json').name}: int8 variant of {card['variant_of']['file']} "
        f"({card['variant_of']['sha256'][:12]})",
        f"CPU ms per image (1 thread, batch 1): float {speed['float_cpu_ms_per_image']:.2f}, "
        f"int8 {speed['int8_cpu_ms_per_image']:.2f} ({speed['speed_up']:.2f}x)",
        f"validation, {comparison['images']} images: accuracy float {comparison['float']['accuracy']:.4f}, "
        f"int8 {comparison['int8']['accuracy']:.4f}; {comparison['verdict']}",
        f"agreement {comparison['agreement']:.4f} ({comparison['answers_changed']} answers changed), "
        f"largest score change {comparison['largest_score_change']:.3f}; McNemar p = {paired['mcnemar_p']:.3g}",
    ]
    lines.append("promotable" if card["promotable"] else f"NOT promotable: {card['not_promotable_because']}")
    return "\n".join(lines)


def _validation_from_card(model: Path) -> Path | None:
    """The photos the float model was scored on (its card's "validation": data and split)."""
    try:
        validation = json.loads(model.with_suffix(".json").read_text()).get("validation") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(validation, dict) or not isinstance(validation.get("data"), str):
        return None
    split = validation.get("split")
    return Path(validation["data"]) / split if isinstance(split, str) and split else Path(validation["data"])


def _given(args: argparse.Namespace, validate: Path) -> list[str]:
    """The arguments that decide the result, spelled out, for the card."""
    given = [str(args.model), "--calibrate", str(args.calibrate),
             "--calibration-images", str(args.calibration_images), "--method", args.method,
             "--validate", str(validate)]
    return given + (["--out", str(args.out)] if args.out else [])
