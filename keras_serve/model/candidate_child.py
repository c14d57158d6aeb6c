"""The process a candidate model is checked in: `python -m keras_serve.model.candidate_child`.

Started by keras_serve/model/candidate_check.py, never by hand. It reads one JSON request on
stdin, and writes JSON lines on its own copy of stdout (the model's code and TensorFlow print
to stderr instead): {"ready": true} once TensorFlow is imported, {"stage": ...} as it goes,
and one last line: {"ok": true, "labels", "latency_ms", "peak_mb", ...} or
{"refused": "why"}.

Its memory is capped once TensorFlow is imported: RLIMIT_DATA (private writable memory, what
malloc and TensorFlow's allocator take; unlike RLIMIT_AS it ignores the address space
TensorFlow reserves and never touches) is set to what the process holds then plus the budget.
An allocation past it fails: numpy raises MemoryError, TensorFlow raises or the process dies;
the parent reports either as the budget exceeded. Nothing here can take a serving process down.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Any, Callable

# Single-image passes timed; the fastest is the latency: other processes only ever add to a pass's
# time, and on a busy machine a median of 7 moved from 0.4 to 7 ms for the same tiny model.
LATENCY_RUNS = 7
# How an allocation past the budget reads in the errors of TensorFlow, numpy and C++.
OUT_OF_MEMORY = ("OOM when allocating", "Unable to allocate", "MemoryError", "bad_alloc", "out of memory")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _peak_mb() -> float:
    """The process's peak resident memory, in MB: what a server process holding the model needs."""
    return _status_kb("VmHWM") / 1024


def _reset_peak() -> Callable[[], float]:
    """Start measuring peak memory now; returns a function giving the growth since, in MB."""
    baseline = _status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM, the peak resident size, to the current size
    except OSError:  # older kernels: the peak since start, which the import dominates less than a model
        pass
    return lambda: max(0, _status_kb("VmHWM") - baseline) / 1024


def _activation_mb(model: Any, batch: int) -> float:
    """A lower bound of the memory a forward pass on `batch` images needs: the largest
    input-plus-output of one layer (each layer's output must exist beside its input)."""
    largest = 0
    for layer in getattr(model, "layers", []):
        try:
            shapes = [layer.input.shape, layer.output.shape]
        except Exception:  # a layer with several inputs or none: the others still bound it
            continue
        size = 0
        for shape in shapes:
            count = 1
            for dim in tuple(shape)[1:]:
                count *= int(dim or 1)
            size += count
        largest = max(largest, size)
    return largest * batch * 4 / 2**20


def check(request: dict[str, Any], say: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    import numpy as np

    from keras_serve.errors import CandidateRefused, ServiceError
    from keras_serve.model import probe_images
    from keras_serve.model.served_model import output_problem
    from keras_serve.model.versions import load_candidate, load_for_serving
    from keras_serve.pipeline.preprocessing import preprocess

    name, budget_mb, batch = request["name"], float(request["memory_mb"]), int(request["batch"])
    config, path = request["config"], request["path"]
    grown = _reset_peak()
    say({"stage": "loading"})
    if request["validate"]:
        model = load_candidate(path, config, request["served_labels"])
    else:
        model = load_for_serving(path, config)
    needed = grown() + _activation_mb(model.model, batch)
    if needed > budget_mb:
        raise MemoryError(f"needs at least {needed:.0f} MB to answer a batch of {batch} images")
    say({"stage": "answering the probe images"})
    inputs = []
    for probe, data in probe_images.probes(request.get("probe_dir")):
        try:
            x = preprocess(data, model.spec)
        except ServiceError:  # a photo in the operator's folder the server would refuse too
            continue
        inputs.append(x)
        rows = model.predict_batch(x)
        problem = output_problem(rows, model.output_kind) if request["validate"] else None
        if problem is not None:
            shown = ", ".join(f"{v:.4g}" for v in np.asarray(rows, np.float64).ravel()[:4])
            raise CandidateRefused(f"{name} answers the probe image '{probe}' with [{shown}]: "
                                   f"{problem.replace('_', ' ')}; every served score must be a probability")
    say({"stage": "timing one image"})
    single = inputs[0]
    model.predict_batch(single)  # traced already by the probes; once more so timing sees a warm pass
    times = []
    for _ in range(LATENCY_RUNS):
        started = time.perf_counter()
        model.predict_batch(single)
        times.append((time.perf_counter() - started) * 1000)
    say({"stage": f"answering a batch of {batch}"})
    many = np.concatenate([inputs[i % len(inputs)] for i in range(batch)])
    rows = model.predict_batch(many)
    if request["validate"] and (problem := output_problem(rows, model.output_kind)) is not None:
        raise CandidateRefused(f"{name} answers a batch of the probe images with scores that are "
                               f"{problem.replace('_', ' ')}; every served score must be a probability")
    return {"ok": True, "labels": list(model.labels), "latency_ms": min(times),
            "peak_mb": _peak_mb(), "engine": model.engine_name}


def main() -> int:
    # The protocol gets its own descriptor; whatever the model or TensorFlow print goes to stderr.
    protocol = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def say(message: dict[str, Any]) -> None:
        protocol.write(json.dumps(message) + "\n")

    request = json.loads(sys.stdin.read())
    from keras_serve.model.tf_runtime import import_tensorflow_quietly

    import_tensorflow_quietly()
    import keras_serve.model.versions  # noqa: F401  (and what it imports, before the budget starts)

    limit = _status_kb("VmData") * 1024 + int(float(request["memory_mb"]) * 2**20)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
    say({"ready": True})
    from keras_serve.errors import ServiceError

    try:
        say(check(request, say))
    except MemoryError as exc:
        say({"memory": str(exc) or "an allocation failed"})
    except ServiceError as exc:  # the loader reports TensorFlow's failed allocations as "does not load"
        out_of_memory = any(sign in exc.message for sign in OUT_OF_MEMORY)
        say({"memory": exc.message} if out_of_memory else {"refused": exc.message})
    except Exception as exc:  # TensorFlow's ResourceExhaustedError is an allocation over the budget too
        kind = type(exc).__name__
        text = " ".join(str(exc).split())[:300]
        if kind == "ResourceExhaustedError" or any(sign in text for sign in OUT_OF_MEMORY):
            say({"memory": f"{kind}: {text}"})
        else:
            say({"refused": f"{request['name']} fails its check: {kind}: {text}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
