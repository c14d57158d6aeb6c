"""Train an image classifier on a labelled folder and write the .h5 model plus its model card.

    python -m keras_serve.training.train --data ../shared/data/cats_vs_dogs --out models/cats_vs_dogs.h5

Resumable: progress is backed up every epoch under --work-dir; rerunning the same command
continues from the last finished epoch. The best epoch by validation accuracy is the one saved.
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

from keras_serve.model.card import ModelCard
from keras_serve.training.dataset import decode_files, list_labelled_images
from keras_serve.training.metrics import binary_report
from keras_serve.pipeline.preprocessing import PreprocessSpec, to_model_input

RECIPES = {
    # The 2017 Keras-blog recipe: RMSprop, batch 16, shear/zoom/flip augmentation.
    "seed": {"optimizer": "rmsprop", "lr": 1e-3, "batch_size": 16, "epochs": 50,
             "augment": {"flip": True, "shear": 0.2, "zoom": 0.2, "rotate": 0.0, "translate": 0.0}},
    # The default: AdamW with warm-up + cosine decay, a little more geometric augmentation.
    "compact": {"optimizer": "adamw", "lr": 3e-3, "batch_size": 32, "epochs": 16,
                "augment": {"flip": True, "shear": 0.1, "zoom": 0.2, "rotate": 0.05, "translate": 0.1}},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="folder with <split>/<class>/<image> files")
    p.add_argument("--train-splits", default="train,train_extra", help="comma list of training sub-folders")
    p.add_argument("--val-split", default="validation")
    p.add_argument("--out", type=Path, required=True, help="model file to write (.h5)")
    p.add_argument("--arch", choices=sorted(RECIPES), default="compact")
    p.add_argument("--epochs", type=int, help="default: the recipe's")
    p.add_argument("--batch-size", type=int, help="default: the recipe's")
    p.add_argument("--lr", type=float, help="default: the recipe's")
    p.add_argument("--labels", help="comma list of output labels (default: the class folder names)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--work-dir", type=Path, help="checkpoints for resuming (default: <out>.work/)")
    p.add_argument("--cache-dir", type=Path, default=PROJECT_ROOT / ".cache")
    p.add_argument("--quiet", action="store_true", help="one line per epoch instead of a progress bar")
    return p.parse_args(argv)


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
    started = time.time()
    import keras
    import tensorflow as tf

    from keras_serve.model.architectures import ARCHITECTURES

    recipe = RECIPES[args.arch]
    epochs = args.epochs or recipe["epochs"]
    batch_size = args.batch_size or recipe["batch_size"]
    lr = args.lr or recipe["lr"]
    keras.utils.set_random_seed(args.seed)
    spec = PreprocessSpec(150, 150, 3, "1/255")

    splits = [s for s in args.train_splits.split(",") if s]
    paths, labels, class_names = list_labelled_images(args.data, splits)
    val_paths, val_labels, val_classes = list_labelled_images(args.data, [args.val_split])
    if val_classes != class_names or len(class_names) != 2:
        sys.exit(f"train.py trains binary classifiers: found classes {class_names} / {val_classes}")
    output_labels = args.labels.split(",") if args.labels else class_names
    print(f"decoding {len(paths)} training and {len(val_paths)} validation images "
          f"(cached in {args.cache_dir})...", flush=True)
    pixels, ok = decode_files(paths, spec, args.cache_dir)
    pixels, labels = pixels[ok], labels[ok]
    val_pixels, val_ok = decode_files(val_paths, spec, args.cache_dir)
    val_pixels, val_labels = val_pixels[val_ok], val_labels[val_ok]
    counts = np.bincount(labels, minlength=2)
    # Balanced class weights: each class contributes equally to the loss whatever its count.
    class_weight = len(labels) / (2.0 * counts)
    weights = class_weight[labels].astype(np.float32)
    print(f"training images per class: {dict(zip(class_names, counts.tolist()))}; "
          f"class weights {dict(zip(class_names, np.round(class_weight, 3).tolist()))}", flush=True)

    train_ds, val_ds = make_datasets(pixels, labels, weights, val_pixels, val_labels, spec, batch_size,
                                     make_augmenter(recipe["augment"], args.seed), args.seed)
    steps_per_epoch = len(pixels) // batch_size
    model = ARCHITECTURES[args.arch](spec.input_shape)
    if recipe["optimizer"] == "rmsprop":
        optimizer = keras.optimizers.RMSprop(lr)
    else:
        schedule = keras.optimizers.schedules.CosineDecay(
            0.0, decay_steps=max(1, steps_per_epoch * (epochs - 1)), warmup_target=lr, warmup_steps=steps_per_epoch)
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=5e-4)
    model.compile(optimizer=optimizer, loss="binary_crossentropy", weighted_metrics=["accuracy"],
                  metrics=[keras.metrics.AUC(name="auc")])

    work_dir = args.work_dir or args.out.with_suffix(".work")
    work_dir.mkdir(parents=True, exist_ok=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    history = _fit(model, train_ds, val_ds, epochs, work_dir, args)

    best = json.loads((work_dir / "best.json").read_text())
    best_model = keras.models.load_model(work_dir / "best.keras")
    best_model.save(args.out, include_optimizer=False)  # full model (architecture + weights) in HDF5, as the server expects
    val_scores = best_model.predict(to_model_input(val_pixels, spec), batch_size=64, verbose=0)[:, 0]
    report = binary_report(val_labels, val_scores, output_labels)
    # Epoch time summed over every (possibly resumed) run: the cost of training this file.
    elapsed = best.get("train_seconds", 0.0)
    card = ModelCard(
        model_file=args.out.name, architecture=args.arch, parameters=int(best_model.count_params()),
        height=spec.height, width=spec.width, channels=spec.channels, layout="channels_last",
        scaling=spec.scaling, output="sigmoid", labels=output_labels, threshold=0.5,
        extra={
            "training": {
                "data": str(args.data), "splits": splits, "images": int(len(labels)),
                "images_per_class": dict(zip(output_labels, counts.tolist())),
                "class_weight": dict(zip(output_labels, np.round(class_weight, 4).tolist())),
                "epochs": epochs, "best_epoch": best["epoch"], "batch_size": batch_size, "learning_rate": lr,
                "optimizer": recipe["optimizer"], "augmentation": recipe["augment"], "seed": args.seed,
                "epoch_seconds_total": round(elapsed, 1),
                "wall_seconds_this_run": round(time.time() - started, 1),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                           f"{'GPU' if tf.config.list_physical_devices('GPU') else 'no GPU'}",
                "tensorflow": tf.__version__, "keras": keras.__version__,
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


def _fit(model, train_ds, val_ds, epochs: int, work_dir: Path, args) -> list[dict]:
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
            if logs.get("val_accuracy", -1.0) > best["val_accuracy"]:
                self.model.save(work_dir / "best.keras")
                best = {"epoch": epoch + 1, "val_accuracy": float(logs["val_accuracy"])}
            best["train_seconds"] = sum(h["seconds"] for h in history)
            best_file.write_text(json.dumps(best))

    callbacks = [
        # Restores weights, optimizer state and the epoch counter after an interruption.
        keras.callbacks.BackupAndRestore(str(work_dir / "backup"), save_freq="epoch", delete_checkpoint=False),
        KeepBest(),
    ]
    model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=callbacks, shuffle=False,
              verbose=2 if args.quiet else 1)  # the dataset shuffles itself, over the whole set
    return json.loads(history_file.read_text())


if __name__ == "__main__":
    sys.exit(main())
