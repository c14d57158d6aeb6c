"""The machine's limits for this model, measured in-process with no HTTP, in a child process
(`--_limits-out`) so its threads and memory are gone before the server starts:

* raw forward: the served model's `predict_batch` on ready inputs, batch 1..64, per engine;
* pipeline: the same JPEGs decoded (Pillow, JPEG draft), resized and scaled by the product's
  `preprocess` on one thread per usable core, batched and run through `predict_batch` while
  the next batch decodes; the best a server could do on this machine without HTTP, storage
  and batching costs;
* single image: decode + one forward at batch 1, what one client's request cannot beat;
* engines: each engine's speed and its largest output difference and label changes against
  TensorFlow on every image given (the 1,000 validation photos by default).
"""
from __future__ import annotations

import math
import os
import statistics
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

from keras_serve.tools.benchmark.stats import percentile

ENGINES = ("tensorflow", "onnxruntime", "litert")


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system


def measure_batched(predict, inputs, batch_sizes: Sequence[int], seconds: float) -> list[dict[str, Any]]:
    import numpy as np

    rows = []
    for batch_size in batch_sizes:
        reps = math.ceil(batch_size / len(inputs))
        batch = np.ascontiguousarray(np.concatenate([inputs] * reps)[:batch_size])
        for _ in range(3):  # first calls build kernels/primitives for this shape
            predict(batch)
        calls, started, cpu0 = 0, time.perf_counter(), _cpu_s()
        while True:
            predict(batch)
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds and calls >= 3:
                break
        rows.append({"batch": batch_size, "images_per_s": batch_size * calls / elapsed,
                     "ms_per_batch": elapsed / calls * 1000.0,
                     "cpu_ms_per_image": (_cpu_s() - cpu0) * 1000.0 / (batch_size * calls)})
    return rows


def measure_single(model, jpegs: Sequence[bytes], runs: int) -> dict[str, Any]:
    """Decode + one forward at batch 1, one image after another (median of `runs`)."""
    from keras_serve.pipeline.preprocessing import preprocess

    decode_s, forward_s, total_s = [], [], []
    for i in range(runs + 10):
        t0 = time.perf_counter()
        x = preprocess(jpegs[i % len(jpegs)], model.spec)
        t1 = time.perf_counter()
        model.predict_batch(x)
        t2 = time.perf_counter()
        if i >= 10:  # the first few warm caches
            decode_s.append(t1 - t0)
            forward_s.append(t2 - t1)
            total_s.append(t2 - t0)
    return {"runs": len(total_s),
            "decode_ms_median": statistics.median(decode_s) * 1000.0,
            "forward_ms_median": statistics.median(forward_s) * 1000.0,
            "total_ms_median": statistics.median(total_s) * 1000.0,
            "total_ms_p90": percentile(sorted(total_s), 90) * 1000.0}


def measure_pipeline(model, jpegs: Sequence[bytes], batch_size: int, seconds: float,
                     threads: int) -> dict[str, Any]:
    """Images/s of decode + preprocess (on `threads` threads) + batched forward, overlapped:
    two batches are always decoding while the model runs, as in the server at full load."""
    import numpy as np

    from keras_serve.pipeline.preprocessing import preprocess

    spec = model.spec
    with ThreadPoolExecutor(threads, thread_name_prefix="decode") as pool:
        ticket = 0

        def submit():
            nonlocal ticket
            ticket += 1
            return pool.submit(preprocess, jpegs[ticket % len(jpegs)], spec)

        pending = deque(submit() for _ in range(2 * batch_size))
        images, warm_batches = 0, 2
        started = cpu0 = None
        while True:
            inputs = [pending.popleft().result() for _ in range(batch_size)]
            pending.extend(submit() for _ in range(batch_size))
            model.predict_batch(np.concatenate(inputs))
            if warm_batches:
                warm_batches -= 1
                if not warm_batches:
                    started, cpu0 = time.perf_counter(), _cpu_s()
                continue
            images += batch_size
            elapsed = time.perf_counter() - started
            if elapsed >= seconds:
                break
        cpu = _cpu_s() - cpu0
        for future in pending:
            future.cancel()
    return {"batch": batch_size, "threads": threads, "images_per_s": images / elapsed,
            "cpu_ms_per_image": cpu * 1000.0 / images}


def measure_fidelity(model, reference, inputs) -> dict[str, Any]:
    """Largest absolute output difference and label changes of `model` against `reference`."""
    import numpy as np

    got, want = [], []
    for start in range(0, len(inputs), 32):
        got.append(model.predict_batch(inputs[start:start + 32]))
        want.append(reference.predict_batch(inputs[start:start + 32]))
    got, want = np.concatenate(got), np.concatenate(want)
    flips = sum(model.interpret(a).label != reference.interpret(b).label for a, b in zip(got, want))
    return {"images": len(inputs), "max_abs_difference": float(np.abs(got - want).max()),
            "label_changes": int(flips)}


def measure_limits(model_path: Path, engine: str, image_paths: Sequence[Path], fidelity_paths: Sequence[Path],
                   phone_path: Path | None, batch_sizes: Sequence[int], seconds: float, single_runs: int,
                   compare_engines: bool) -> dict[str, Any]:
    """Every in-process number the report needs; `engine` is the one the server will use."""
    import numpy as np

    from keras_serve.model.engines import usable_cores
    from keras_serve.model.served_model import ServedModel
    from keras_serve.pipeline.preprocessing import preprocess

    served = ServedModel.load(model_path, engine=engine)
    jpegs = [p.read_bytes() for p in image_paths]
    inputs = np.concatenate([preprocess(b, served.spec) for b in jpegs[:64]])
    cores = usable_cores()

    batched = measure_batched(served.predict_batch, inputs, batch_sizes, seconds)
    best = max(batched, key=lambda row: row["images_per_s"])
    pipeline = [measure_pipeline(served, jpegs, b, 2 * seconds, cores) for b in (16, 32)]
    single = measure_single(served, jpegs, single_runs)

    phone = None
    if phone_path is not None:
        data = phone_path.read_bytes()
        times = []
        for _ in range(6):
            t0 = time.perf_counter()
            preprocess(data, served.spec)
            times.append(time.perf_counter() - t0)
        phone = {"decode_ms_median": statistics.median(times[1:]) * 1000.0}

    engines = []
    if compare_engines:
        fidelity_inputs = np.concatenate([preprocess(p.read_bytes(), served.spec) for p in fidelity_paths])
        reference = served if served.engine_name == "tensorflow" else ServedModel.load(model_path, engine="tensorflow")
        for name in ENGINES:
            candidate = served if name == served.engine_name else ServedModel.load(model_path, engine=name)
            row: dict[str, Any] = {"engine": name, "used": candidate.engine_name == name,
                                   "version": candidate.describe()["engine"]["version"]}
            if not row["used"]:
                row["reason"] = candidate.engine_fallback_reason
                engines.append(row)
                continue
            rows = batched if candidate is served else measure_batched(candidate.predict_batch, inputs,
                                                                        batch_sizes, seconds)
            row["batch1_ms"] = next((r["ms_per_batch"] for r in rows if r["batch"] == 1), math.nan)
            row["best"] = max(rows, key=lambda r: r["images_per_s"])
            row["batch32_images_per_s"] = next((r["images_per_s"] for r in rows if r["batch"] == 32), math.nan)
            row.update(measure_fidelity(candidate, reference, fidelity_inputs))
            engines.append(row)

    import tensorflow as tf

    return {
        "engine": served.describe()["engine"],
        "input_shape": list(served.spec.input_shape),
        "batched": batched,
        "best_images_per_s": best["images_per_s"],
        "best_batch": best["batch"],
        "pipeline": pipeline,
        "pipeline_images_per_s": max(p["images_per_s"] for p in pipeline),
        "single": single,
        "phone_in_process": phone,
        "engines": engines,
        "tf_version": tf.__version__,
        "cores": cores,
    }
