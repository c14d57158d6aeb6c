"""Train an image classifier on a labelled folder and write the .h5 model plus its model card.

    python -m keras_serve.training.train --data ../shared/data/cats_vs_dogs --out models/cats_vs_dogs.h5

Resumable: progress is backed up every epoch under --work-dir; rerunning the same command
continues from the last finished epoch. The best epoch by validation accuracy is the one saved.

Retraining on reviewed uploads (docs/retraining.md): --extra adds sets written by
`python -m keras_serve.storage export-dataset` (their label folders matched to the classes by
name; their held-out part, exported_sets.is_held_out, never trained on), and --init-from
fine-tunes the current model instead of starting over:

    python -m keras_serve.training.train --data ../shared/data/cats_vs_dogs --extra reviewed/ \
        --init-from models/cats_vs_dogs.h5 --out models/candidate.h5

The `resnet` recipe (the default model's) also trains from a file written by pack_data.py, under
any Keras backend, e.g. on a GPU machine with JAX and no TensorFlow:

    KERAS_BACKEND=jax python -m keras_serve.training.train --packed .gpu_data/cats_vs_dogs.npz --arch resnet --out m.h5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

from keras_serve.settings import PROJECT_ROOT

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from keras_serve.errors import DatasetError, ModelLoadError
from keras_serve.model.card import ModelCard
from keras_serve.training.dataset import decode_files, list_labelled_images
from keras_serve.training.exported_sets import (ExportedSet, LabelledImage, combine_for_training, file_sha256,
                                                held_out_description, read_exported_set)
from keras_serve.training.metrics import binary_report
from keras_serve.pipeline.preprocessing import PreprocessSpec, to_model_input

RECIPES = {
    # The 2017 Keras-blog recipe: RMSprop, batch 16, shear/zoom/flip augmentation.
    "seed": {"optimizer": "rmsprop", "lr": 1e-3, "batch_size": 16, "epochs": 50,
             "augment": {"flip": True, "shear": 0.2, "zoom": 0.2, "rotate": 0.0, "translate": 0.0}},
    # The default: AdamW with warm-up + cosine decay, a little more geometric augmentation.
    "compact": {"optimizer": "adamw", "lr": 3e-3, "batch_size": 32, "epochs": 16,
                "augment": {"flip": True, "shear": 0.1, "zoom": 0.2, "rotate": 0.05, "translate": 0.1}},
    # Issue 15 (the default since): compact's convs with residual adds, 100 epochs of warm-up +
    # cosine, batch 128, crops/flips/colour jitter in the graph, mixup/cutmix but not in the last
    # 15 epochs (which alone may be chosen as best: calibration), EMA of the weights. No tf.data
    # (augmentation.py), so it also trains under Keras's JAX backend on a GPU. Any key can be
    # changed for an experiment with --set KEY=JSON (recorded in the model card).
    "resnet": {"optimizer": "adamw", "lr": 3e-3, "batch_size": 128, "epochs": 100, "pipeline": "mixed",
               "architecture": "resnet",
               "weight_decay": 0.05, "warmup_epochs": 5, "ema": 0.999, "label_smoothing": 0.0,
               "mix_prob": 0.5, "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "mix_off_epochs": 15,
               "augment": {"flip": True, "zoom_in": 0.35, "zoom_out": 0.1, "translate": 0.1, "color": 0.2}},
}
DEFAULT_RECIPE = "compact"

# Fine-tuning (--init-from) starts from a trained optimum, not from random weights. A few epochs
# at a tenth of the recipe's peak learning rate adapt it to the new photos while keeping what
# the full run learned: a full-size step would throw the weights out of that optimum and the
# run would mostly relearn the base data (catastrophic forgetting), at the full run's cost.
# One warm-up epoch: the optimizer's moment estimates start empty, and its first steps at even
# the reduced rate would be its largest. The weights' moving average (recipes with `ema`) must
# average over what so short a run has: 0.999 spans ~1,000 steps, more than 5 epochs of all
# the base photos at batch 128 (~550), so the saved weights would be mostly the starting ones;
# 0.99 spans ~100 steps, about an epoch. --epochs, --lr and --set still override all of it.
FINE_TUNE = {"epochs": 5, "lr_factor": 0.1, "warmup_epochs": 1, "ema": 0.99}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder with <split>/<class>/<image> files")
    p.add_argument("--packed", type=Path, help="train from a file written by pack_data.py instead of --data")
    p.add_argument("--train-splits", default="train,train_extra", help="comma list of training sub-folders")
    p.add_argument("--val-split", default="validation")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.h5)")
    p.add_argument("--arch", choices=sorted(RECIPES),
                   help=f"recipe (default: the --init-from model's, else {DEFAULT_RECIPE})")
    p.add_argument("--extra", type=Path, action="append", default=[], metavar="EXPORT_DIR",
                   help="a folder written by `python -m keras_serve.storage export-dataset` to train on too "
                        "(repeatable); its label folders are matched to the classes by name, and its "
                        "held-out part (exported_sets.is_held_out) is never trained on")
    p.add_argument("--skip-label", action="append", default=[], metavar="NAME",
                   help="leave out an exported label folder that names no class, e.g. --skip-label neither")
    p.add_argument("--init-from", type=Path, metavar="MODEL.h5",
                   help="fine-tune: start from this model's weights (same architecture and input) with a "
                        f"fine-tuning schedule: {FINE_TUNE['epochs']} epochs at {FINE_TUNE['lr_factor']}x the "
                        "recipe's learning rate, unless --epochs/--lr say otherwise")
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--batch-size", type=int, help="default: the recipe's")
    p.add_argument("--lr", type=float, help="default: the recipe's")
    p.add_argument("--labels", help="comma list of output labels (default: the class folder names)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="override a recipe setting, e.g. --set mix_prob=0 --set augment.color=0")
    p.add_argument("--work-dir", type=Path, help="checkpoints for resuming (default: <out>.work/)")
    p.add_argument("--cache-dir", type=Path, default=PROJECT_ROOT / ".cache")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")
    p.add_argument("--workers", type=int, default=4, help="threads preparing batches (resnet recipe)")
    args = p.parse_args(argv)
    if (args.data is None) == (args.packed is None):
        p.error("give exactly one of --data and --packed")
    if args.extra and args.packed:
        p.error("--extra needs --data: duplicates and the validation photos are found by each file's sha256")
    if args.arch is None:
        args.arch = _recipe_of(args.init_from) if args.init_from else DEFAULT_RECIPE
    return args


def _recipe_of(model_path: Path) -> str:
    """The recipe the model to start from was trained with, from its card (else the default)."""
    try:
        card = ModelCard.read(model_path)
    except ModelLoadError:  # said with its reason when the run loads the model
        return DEFAULT_RECIPE
    recipe = card.extra.get("recipe")
    return recipe if recipe in RECIPES else DEFAULT_RECIPE


def recipe_for(args: argparse.Namespace) -> dict:
    recipe = json.loads(json.dumps(RECIPES[args.arch]))
    if getattr(args, "init_from", None):
        recipe["epochs"] = FINE_TUNE["epochs"]
        recipe["lr"] = recipe["lr"] * FINE_TUNE["lr_factor"]
        for key in ("warmup_epochs", "ema"):
            if recipe.get(key):
                recipe[key] = FINE_TUNE[key]
    for item in args.set:
        key, _, value = item.partition("=")
        *path, last = key.split(".")
        target = recipe
        for part in path:
            target = target[part]
        if last not in target:
            raise SystemExit(f"--set {item}: the {args.arch} recipe has no setting {key!r}")
        target[last] = json.loads(value)
    return recipe


def machine_description() -> tuple[str, dict]:
    """'x86_64, 16 CPU cores, GPU (NVIDIA H100 ...)' and the framework versions, any backend."""
    import keras

    backend = keras.backend.backend()
    versions = {"keras": keras.__version__, "backend": backend}
    gpu = None
    if backend == "tensorflow":
        import tensorflow as tf
        versions["tensorflow"] = tf.__version__
        gpu = "GPU" if tf.config.list_physical_devices("GPU") else None
    elif backend == "jax":
        import jax
        versions["jax"] = jax.__version__
        gpus = [d for d in jax.devices() if d.platform == "gpu"]
        gpu = f"GPU ({gpus[0].device_kind})" if gpus else None
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {gpu or 'no GPU'}", versions


def make_augmenter(cfg: dict, seed: int):
    import keras
    from keras import layers

    steps = []
    if cfg["flip"]:
        steps.append(layers.RandomFlip("horizontal", seed=seed))
    if cfg["rotate"]:
        steps.append(layers.RandomRotation(cfg["rotate"], fill_mode="reflect", seed=seed + 1))
    if cfg["shear"]:
        steps.append(layers.RandomShear(x_factor=cfg["shear"], y_factor=cfg["shear"], fill_mode="reflect", seed=seed + 2))
    if cfg["zoom"]:
        steps.append(layers.RandomZoom(cfg["zoom"], fill_mode="reflect", seed=seed + 3))
    if cfg["translate"]:
        steps.append(layers.RandomTranslation(cfg["translate"], cfg["translate"], fill_mode="reflect", seed=seed + 4))
    return keras.Sequential(steps, name="augment")


def make_datasets(pixels, labels, weights, val_pixels, val_labels, spec, batch_size, augment, seed):
    """tf.data over in-memory uint8 arrays; scaling goes through preprocessing.to_model_input."""
    import tensorflow as tf

    def gather_train(idx):
        return to_model_input(pixels[idx], spec), labels[idx].astype(np.float32)[:, None], weights[idx]

    def gather_val(idx):
        return to_model_input(val_pixels[idx], spec), val_labels[idx].astype(np.float32)[:, None]

    shape = (None, *spec.input_shape)
    train = (tf.data.Dataset.range(len(pixels))
             # The folders list class by class: shuffle over the whole set every epoch.
             .shuffle(len(pixels), seed=seed, reshuffle_each_iteration=True)
             .batch(batch_size, drop_remainder=True)
             .map(lambda i: tf.numpy_function(gather_train, [i], (tf.float32, tf.float32, tf.float32)),
                  num_parallel_calls=tf.data.AUTOTUNE)
             .map(lambda x, y, w: (tf.ensure_shape(augment(tf.ensure_shape(x, shape), training=True), shape),
                                   tf.ensure_shape(y, (None, 1)), tf.ensure_shape(w, (None,))),
                  num_parallel_calls=tf.data.AUTOTUNE)
             .prefetch(tf.data.AUTOTUNE))
    val = (tf.data.Dataset.range(len(val_pixels)).batch(64)
           .map(lambda i: tf.numpy_function(gather_val, [i], (tf.float32, tf.float32)))
           .map(lambda x, y: (tf.ensure_shape(x, shape), tf.ensure_shape(y, (None, 1))))
           .prefetch(tf.data.AUTOTUNE))
    return train, val


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _train(args, argv)
    except (DatasetError, ModelLoadError) as exc:
        print(f"error: {exc.message}" + (f"\n{exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 2


def _train(args: argparse.Namespace, argv: list[str] | None) -> int:
    started = time.time()
    import keras

    from keras_serve.model.architectures import ARCHITECTURES

    recipe = recipe_for(args)
    epochs = args.epochs or recipe["epochs"]
    batch_size = args.batch_size or recipe["batch_size"]
    lr = args.lr or recipe["lr"]
    keras.utils.set_random_seed(args.seed)
    spec = PreprocessSpec(150, 150, 3, "1/255")
    architecture = recipe.get("architecture", args.arch)
    model = ARCHITECTURES[architecture](spec.input_shape)
    retraining: dict = {}
    if args.init_from:  # checked before the data is read: a model that does not fit fails at once
        retraining["init_from"] = start_from(model, args.init_from, architecture, spec)
        retraining["fine_tune_defaults"] = FINE_TUNE

    if args.packed:
        from keras_serve.training.pack_data import load_packed

        pixels, labels, packed_meta = load_packed(args.packed, "train")
        val_pixels, val_labels, _ = load_packed(args.packed, "validation")
        splits, class_names = packed_meta["parts"]["train"]["splits"], packed_meta["class_names"]
        if packed_meta["size"] != spec.height:
            sys.exit(f"{args.packed} holds {packed_meta['size']}px images; the model takes {spec.height}px")
        print(f"loaded {len(pixels)} training and {len(val_pixels)} validation images from {args.packed}", flush=True)
        output_labels = run_labels(args.labels, class_names, args.init_from)
    else:
        packed_meta = None
        splits = [s for s in args.train_splits.split(",") if s]
        paths, labels, class_names = list_labelled_images(args.data, splits)
        val_paths, val_labels, val_classes = list_labelled_images(args.data, [args.val_split])
        if val_classes != class_names:
            sys.exit(f"training and validation classes differ: {class_names} / {val_classes}")
        output_labels = run_labels(args.labels, class_names, args.init_from)
        # Read (and so check) the exported sets before decoding: a refusal comes at once.
        sets = [read_exported_set(folder, output_labels, class_names, args.skip_label) for folder in args.extra]
        print(f"decoding {len(paths)} training and {len(val_paths)} validation images "
              f"(cached in {args.cache_dir})...", flush=True)
        pixels, ok = decode_files(paths, spec, args.cache_dir)
        val_pixels, val_ok = decode_files(val_paths, spec, args.cache_dir)
        val_pixels, val_labels = val_pixels[val_ok], val_labels[val_ok]
        if sets:
            pixels, labels, record = add_exported_sets(args, sets, paths, labels, pixels, ok, val_paths, spec)
            retraining.update(record)
        else:
            pixels, labels = pixels[ok], labels[ok]
    if len(class_names) != 2:
        sys.exit(f"train.py trains binary classifiers: found classes {class_names}")
    counts = np.bincount(labels, minlength=2)
    # Balanced class weights: each class contributes equally to the loss whatever its count.
    class_weight = len(labels) / (2.0 * counts)
    weights = class_weight[labels].astype(np.float32)
    print(f"training images per class: {dict(zip(class_names, counts.tolist()))}; "
          f"class weights {dict(zip(class_names, np.round(class_weight, 3).tolist()))}", flush=True)

    steps_per_epoch = len(pixels) // batch_size
    if args.init_from:
        print(f"fine-tuning from {args.init_from} (sha256 {retraining['init_from']['sha256'][:12]}...): "
              f"{epochs} epochs, peak learning rate {lr:g}", flush=True)
    extra_callbacks = []
    if recipe.get("pipeline") == "mixed":  # compiles its own training model
        train_ds, val_ds, model, extra_callbacks = _mixed_pipeline(
            model, recipe, pixels, labels, weights, val_pixels, val_labels, spec, batch_size, epochs, lr, args)
    else:
        train_ds, val_ds = make_datasets(pixels, labels, weights, val_pixels, val_labels, spec, batch_size,
                                         make_augmenter(recipe["augment"], args.seed), args.seed)
        if recipe["optimizer"] == "rmsprop":
            optimizer = keras.optimizers.RMSprop(lr)
        else:
            schedule = keras.optimizers.schedules.CosineDecay(
                0.0, decay_steps=max(1, steps_per_epoch * (epochs - 1)), warmup_target=lr,
                warmup_steps=steps_per_epoch)
            optimizer = keras.optimizers.AdamW(schedule, weight_decay=5e-4)
        model.compile(optimizer=optimizer, loss="binary_crossentropy", weighted_metrics=["accuracy"],
                      metrics=[keras.metrics.AUC(name="auc")])

    work_dir = args.work_dir or args.out.with_suffix(".work")
    work_dir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    history = _fit(model, train_ds, val_ds, epochs, work_dir, args, extra_callbacks)

    best = json.loads((work_dir / "best.json").read_text())
    best_model = keras.models.load_model(work_dir / "best.keras")
    best_model.save(args.out, include_optimizer=False)  # full model (architecture + weights) in HDF5, as the server expects
    val_scores = np.concatenate([np.asarray(best_model(to_model_input(val_pixels[i:i + 64], spec), training=False))
                                 for i in range(0, len(val_pixels), 64)])[:, 0]
    report = binary_report(val_labels, val_scores, output_labels)
    # Epoch time summed over every (possibly resumed) run: the cost of training this file.
    elapsed = best.get("train_seconds", 0.0)
    machine, versions = machine_description()
    card = ModelCard(
        model_file=args.out.name, architecture=architecture, parameters=int(best_model.count_params()),
        height=spec.height, width=spec.width, channels=spec.channels, layout="channels_last",
        scaling=spec.scaling, output="sigmoid", labels=output_labels, threshold=0.5,
        extra={
            "recipe": args.arch,
            "training": {
                "data": str(args.data or packed_meta["source"]), "splits": splits, "images": int(len(labels)),
                **({"packed": {"file": args.packed.name, **{k: v for k, v in packed_meta.items() if k != "source"}}}
                   if packed_meta else {}),
                "images_per_class": dict(zip(output_labels, counts.tolist())),
                "class_weight": dict(zip(output_labels, np.round(class_weight, 4).tolist())),
                "epochs": epochs, "best_epoch": best["epoch"], "batch_size": batch_size, "learning_rate": lr,
                "optimizer": recipe["optimizer"], "augmentation": recipe["augment"], "seed": args.seed,
                **({"recipe": recipe, "overrides": args.set} if recipe.get("pipeline") else {}),
                **retraining,
                "epoch_seconds_total": round(elapsed, 1),
                "wall_seconds_this_run": round(time.time() - started, 1),
                "machine": machine, **versions,
                "history": history,
            },
            "validation": {"split": args.val_split, **report},
            "command": "python -m keras_serve.training.train " + " ".join(
                shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        })
    card_path = card.write(args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) and {card_path}; best epoch "
          f"{best['epoch']}: validation accuracy {report['accuracy']:.4f}, ROC AUC {report['roc_auc']:.4f}, "
          f"ECE {report['ece']:.4f}; {elapsed / 60:.1f} min", flush=True)
    return 0


def run_labels(labels_arg: str | None, class_names: list[str], init_from: Path | None) -> list[str]:
    """The candidate's labels: --labels, else those of the model it starts from, else the class
    folders' names. A fine-tuned model must answer with the labels of the one it replaces."""
    labels = labels_arg.split(",") if labels_arg else None
    init_labels = ModelCard.read(init_from).labels if init_from and init_from.is_file() else None
    if labels and init_labels and labels != init_labels:
        raise DatasetError(f"--labels {','.join(labels)} differ from the labels of {init_from.name} "
                           f"({','.join(init_labels)}): the candidate must answer as the model it replaces",
                           "Leave out --labels when fine-tuning; they come from the model's card.")
    labels = labels or init_labels or class_names
    if len(labels) != len(class_names):
        raise DatasetError(f"{len(labels)} labels ({','.join(labels)}) for {len(class_names)} classes {class_names}")
    return labels


def add_exported_sets(args: argparse.Namespace, sets: list[ExportedSet], paths: list[Path], labels: np.ndarray,
                      pixels: np.ndarray, ok: np.ndarray, val_paths: list[Path],
                      spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray, dict]:
    """Base training images (all of `paths`, decoded: `pixels` where `ok`) plus the exported sets:
    one example per sha256, never an image of the validation split or of a set's held-out part.
    Returns pixels, labels and the card's record."""
    row_of = {p: i for i, p in enumerate(paths)}
    base = [LabelledImage(p, file_sha256(p), int(label), "base") for p, label, good in zip(paths, labels, ok) if good]
    combined = combine_for_training(base, sets, never_train={file_sha256(p) for p in val_paths})
    base_rows = [row_of[image.path] for image in combined.train if image.source == "base"]
    from_sets = [image for image in combined.train if image.source != "base"]
    set_pixels, set_ok = decode_files([image.path for image in from_sets], spec, args.cache_dir)
    set_rows = np.flatnonzero(set_ok)
    # One array, filled in place: the base images are most of the memory, so no second copy of them.
    out = np.empty((len(base_rows) + len(set_rows), *pixels.shape[1:]), pixels.dtype)
    np.take(pixels, base_rows, axis=0, out=out[:len(base_rows)])
    out[len(base_rows):] = set_pixels[set_rows]
    out_labels = np.concatenate([labels[base_rows], np.asarray([from_sets[i].label for i in set_rows], np.int32)])
    record = {
        "extra_sets": [s.describe() for s in sets],
        "held_out": held_out_description(),
        "combined": {"base_images": len(base_rows), "images_from_sets": int(len(set_rows)),
                     "unreadable_from_sets": int((~set_ok).sum()), **combined.describe()},
    }
    if args.skip_label:
        record["skipped_labels"] = args.skip_label
    print(f"exported sets: {len(set_rows)} images to train on from {len(sets)} set(s), "
          f"{sum(len(s.held_out()) for s in sets)} held out; {combined.duplicates} duplicates merged, "
          f"{combined.excluded} left out (held out or in {args.val_split})", flush=True)
    return out, out_labels.astype(np.int32), record


def start_from(model, init_path: Path, architecture: str, spec: PreprocessSpec) -> dict:
    """Put the weights of the model at `init_path` into `model` (the run's freshly built network),
    after checking it is the same architecture with the same input contract; its record for the card."""
    from keras_serve.model.engines import file_sha256 as model_file_sha256
    from keras_serve.model.keras_formats import load_keras_model

    card = ModelCard.read(init_path)
    source = load_keras_model(init_path).model
    name = card.architecture or getattr(source, "name", None)
    if name != architecture:
        recipes = [r for r, recipe in RECIPES.items() if recipe.get("architecture", r) == name]
        raise DatasetError(f"--init-from {init_path.name} is a {name!r} network and this run builds {architecture!r}",
                           f"Pass --arch {recipes[0]}." if recipes else "Fine-tune only a model train.py made.")
    source_input = tuple(source.input_shape[1:])
    if source_input != tuple(spec.input_shape) or (card.scaling and card.scaling != spec.scaling):
        raise DatasetError(f"--init-from {init_path.name} takes {source_input} scaled {card.scaling or '(no card)'}; "
                           f"this run trains on {tuple(spec.input_shape)} scaled {spec.scaling}")
    if tuple(source.output_shape[1:]) != tuple(model.output_shape[1:]):
        raise DatasetError(f"--init-from {init_path.name} has outputs {source.output_shape[1:]}, "
                           f"this run's network {model.output_shape[1:]}")
    weights = source.get_weights()
    expected = [tuple(w.shape) for w in model.get_weights()]
    if [tuple(w.shape) for w in weights] != expected:
        raise DatasetError(f"--init-from {init_path.name}: its weights do not fit the {architecture!r} network "
                           f"({len(weights)} arrays, this one has {len(expected)}; a different width or depth)")
    model.set_weights(weights)
    return {"file": init_path.name, "path": str(init_path), "sha256": model_file_sha256(init_path),
            "architecture": name, "labels": card.labels}


def _mixed_pipeline(model, recipe, pixels, labels, weights, val_pixels, val_labels, spec, batch_size, epochs, lr,
                    args):
    """The resnet recipe: PyDataset + in-graph augmentation; returns what fit needs and the model to compile."""
    import keras

    from keras_serve.training.augmentation import EpochSetter, MixedBatches, build_augmenter

    train_ds = MixedBatches(pixels, labels, weights, spec, batch_size, args.seed, recipe["mix_prob"],
                            recipe["mixup_alpha"], recipe["cutmix_alpha"],
                            mix_until=epochs - recipe["mix_off_epochs"], workers=args.workers)
    val_ds = (to_model_input(val_pixels, spec), val_labels.astype(np.float32)[:, None])
    inputs = keras.Input(spec.input_shape)
    trainer = keras.Model(inputs, model(build_augmenter(recipe["augment"], args.seed)(inputs)), name="trainer")
    trainer.served = model  # what KeepBest saves: the model without its augmentation layers
    # Mixed batches leave the model underconfident: choose the best epoch among the clean ones.
    trainer.select_from = epochs - recipe["mix_off_epochs"] + 1 if recipe["mix_prob"] else 1
    steps = len(train_ds)
    warmup = steps * recipe["warmup_epochs"]
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(1, steps * epochs - warmup), warmup_target=lr, warmup_steps=warmup)
    ema = recipe["ema"]
    optimizer = keras.optimizers.AdamW(schedule, weight_decay=recipe["weight_decay"],
                                       use_ema=bool(ema), ema_momentum=ema or 0.99)
    trainer.compile(optimizer=optimizer,
                    loss=keras.losses.BinaryCrossentropy(label_smoothing=recipe["label_smoothing"]),
                    weighted_metrics=["accuracy"], metrics=[keras.metrics.AUC(name="auc")])
    callbacks = [EpochSetter(train_ds)]
    if ema:  # validate and keep the averaged weights; train on the raw ones
        callbacks.append(keras.callbacks.SwapEMAWeights(swap_on_epoch=True))
    return train_ds, val_ds, trainer, callbacks


def _fit(model, train_ds, val_ds, epochs: int, work_dir: Path, args, extra_callbacks=()) -> list[dict]:
    """model.fit with per-epoch backup (resume) and best-by-validation saving that survive restarts."""
    import keras

    best_file = work_dir / "best.json"
    history_file = work_dir / "history.json"

    class KeepBest(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.t0 = time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            history = json.loads(history_file.read_text()) if history_file.exists() else []
            row = {"epoch": epoch + 1, "seconds": round(time.time() - self.t0, 1),
                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   **{k: round(float(v), 5) for k, v in logs.items() if k != "learning_rate"}}
            history = [h for h in history if h["epoch"] < epoch + 1] + [row]
            history_file.write_text(json.dumps(history, indent=1))
            best = json.loads(best_file.read_text()) if best_file.exists() else {"val_accuracy": -1.0}
            eligible = epoch + 1 >= min(getattr(self.model, "select_from", 1), epochs)
            if eligible and logs.get("val_accuracy", -1.0) > best["val_accuracy"]:
                getattr(self.model, "served", self.model).save(work_dir / "best.keras")
                best = {"epoch": epoch + 1, "val_accuracy": float(logs["val_accuracy"])}
            best["train_seconds"] = sum(h["seconds"] for h in history)
            best_file.write_text(json.dumps(best))

    callbacks = [
        # Restores weights, optimizer state and the epoch counter after an interruption.
        keras.callbacks.BackupAndRestore(str(work_dir / "backup"), save_freq="epoch", delete_checkpoint=False),
        *extra_callbacks,  # before KeepBest: SwapEMAWeights puts the averaged weights in place to be kept
        KeepBest(),
    ]
    model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks, shuffle=False,
              verbose=2 if args.quiet else 1)  # the dataset shuffles itself, over the whole set
    return json.loads(history_file.read_text())


if __name__ == "__main__":
    sys.exit(main())
