"""Forward-pass speed of several models in one run, the way benchmark.py times the raw model.

    python -m keras_serve.tools.model_speed models/archive/cats_vs_dogs-compact-2026-11-25.h5 models/cats_vs_dogs.h5
    python -m keras_serve.tools.model_speed --arch compact --arch resnet          # fresh, untrained architectures

Each model is called through one tf.function with a free batch axis (no model.predict), on
random inputs; the models take turns, round after round, so a noisy machine hurts all alike.
Prints the median over rounds of ms per call at batch 1 and images/s at batch 32.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", type=Path, help="model files (.h5/.keras)")
    p.add_argument("--arch", action="append", default=[], help="architecture name (untrained)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--seconds", type=float, default=1.0, help="per model, batch size and round")
    args = p.parse_args(argv)

    import numpy as np
    import keras
    import tensorflow as tf

    from keras_serve.model.architectures import ARCHITECTURES

    named = [(str(m), keras.saving.load_model(m, compile=False)) for m in args.models]
    named += [(f"arch {a}", ARCHITECTURES[a]()) for a in args.arch]
    forwards = {}
    for name, model in named:
        shape = model.inputs[0].shape[1:]
        fn = tf.function(lambda x, m=model: m(x, training=False),
                         input_signature=[tf.TensorSpec([None, *shape], tf.float32)])
        batches = {b: tf.constant(np.random.default_rng(0).random((b, *shape), np.float32)) for b in (1, 32)}
        for b in batches.values():
            for _ in range(3):
                fn(b).numpy()
        forwards[name] = (fn, batches, model.count_params())

    results = {name: {1: [], 32: []} for name in forwards}
    for _ in range(args.rounds):
        for name, (fn, batches, _) in forwards.items():
            for size, batch in batches.items():
                calls, started = 0, time.perf_counter()
                while True:
                    fn(batch).numpy()
                    calls += 1
                    elapsed = time.perf_counter() - started
                    if elapsed >= args.seconds and calls >= 3:
                        break
                results[name][size].append(elapsed / calls)
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPU cores; "
          f"median of {args.rounds} interleaved rounds")
    for name, (_, _, params) in forwards.items():
        b1 = statistics.median(results[name][1]) * 1000.0
        b32 = 32.0 / statistics.median(results[name][32])
        spread = [32.0 / t for t in results[name][32]]
        print(f"{name}: {params:,} parameters; batch 1: {b1:.2f} ms "
              f"(range {min(results[name][1]) * 1000:.2f}-{max(results[name][1]) * 1000:.2f}); "
              f"batch 32: {b32:.0f} images/s (range {min(spread):.0f}-{max(spread):.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
