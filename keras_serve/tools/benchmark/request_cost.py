"""What one upload costs in CPU, stage by stage: the server's own code, in process, one at a time.

    .venv/bin/python -m keras_serve.tools.benchmark.request_cost [-n 1000] [--images DIR] [--model FILE]

Process CPU (every thread) per upload, over n uploads of real photos, each stage alone:

    decode     preprocess: bytes -> the model's input (keras_serve.pipeline.preprocessing)
    forward    the model on that input, on this process's share of the cores, as under load
               (one engine thread per worker where `python app.py` runs a worker per core)
    store      UploadStore.save: the image file and its database row, with the photo's answer
    whole app  POST /file/ through the Flask app's WSGI callable, the forward pass inline as
               under load: the stages above plus the multipart parse, request id, access
               control, metrics, access log and JSON answer
    the rest   whole app minus decode, forward and store

No HTTP server and no concurrency: `floor_server.py` measures the HTTP layer, the benchmark
the whole server under load (docs/performance.md). Rounds alternate the stages so that a
change in the machine's speed meets every stage alike; the median round is printed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from keras_serve.settings import DEFAULT_MODEL_PATH
from keras_serve.tools.benchmark.cli import DEFAULT_IMAGES
from keras_serve.tools.benchmark.inputs import find_images, fresh_boundary, multipart_body
from keras_serve.model.engines import usable_cores
from keras_serve.web.request_log import configure_logging

STAGES = ("decode", "forward", "store", "whole app")


def cpu_ms_per_call(call: Callable[[int], Any], n: int) -> float:
    started = time.process_time()  # every thread of the process, at the clock's own resolution
    for i in range(n):
        call(i)
    return (time.process_time() - started) * 1000.0 / n


def wsgi_post(app: Any, body: bytes, boundary: str) -> tuple[str, bytes]:
    """POST /file/ straight to the WSGI callable, as an HTTP server would hand it over."""
    environ = {
        "REQUEST_METHOD": "POST", "PATH_INFO": "/file/", "SCRIPT_NAME": "", "QUERY_STRING": "",
        "SERVER_NAME": "localhost", "SERVER_PORT": "8080", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "localhost:8080",
        "CONTENT_TYPE": f"multipart/form-data; boundary={boundary}", "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body), "wsgi.errors": sys.stderr, "wsgi.url_scheme": "http",
        "wsgi.version": (1, 0), "wsgi.multithread": True, "wsgi.multiprocess": False, "wsgi.run_once": False,
    }
    status: list[str] = []
    answer = b"".join(app(environ, lambda s, headers, exc_info=None: status.append(s)))
    return status[0], answer


def measure(jpegs: Sequence[bytes], n: int, rounds: int, config: dict[str, Any]) -> dict[str, list[float]]:
    from keras_serve import create_app
    from keras_serve.pipeline.preprocessing import image_format, preprocess

    app = create_app(config)
    service = app.extensions["classifier"]
    try:
        model = service.model
        model.share_cores_when(lambda: True)  # the engine as every busy worker runs it
        inputs = [preprocess(data, model.spec) for data in jpegs]
        bodies = []
        for data in jpegs:
            boundary = fresh_boundary()
            bodies.append((multipart_body("file", "photo.jpg", "image/jpeg", data, boundary), boundary))
        # Each photo's record as the app writes it: its answer too (the day counts count it).
        records = [{"client_filename": "photo.jpg", "model": model.info.get("file"),
                    "model_sha256": model.info.get("sha256"), "milliseconds": 10.0, "error": None,
                    "prediction": model.interpret(model.checked_output(model.predict_batch(x)[0])).as_json()}
                   for x in inputs]

        def post(i: int) -> None:
            status, answer = wsgi_post(app, *bodies[i % len(bodies)])
            if not status.startswith("200"):
                raise RuntimeError(f"POST /file/ answered {status}: {answer[:300]!r}")

        calls: dict[str, Callable[[int], Any]] = {
            "decode": lambda i: preprocess(jpegs[i % len(jpegs)], model.spec),
            "forward": lambda i: model.predict_batch(inputs[i % len(inputs)]),  # each (1, *input_shape)
            "store": lambda i: service.store.save(jpegs[i % len(jpegs)], image_format(jpegs[i % len(jpegs)]),
                                                  records[i % len(records)]),
            "whole app": post,
        }
        for call in calls.values():  # warm caches, pools and the engine's kernels
            cpu_ms_per_call(call, 20)
        results: dict[str, list[float]] = {stage: [] for stage in STAGES}
        for _ in range(rounds):
            for stage in STAGES:
                results[stage].append(cpu_ms_per_call(calls[stage], n))
        return results
    finally:
        service.close()


def render(results: dict[str, list[float]]) -> str:
    median = {stage: statistics.median(values) for stage, values in results.items()}
    rest = median["whole app"] - median["decode"] - median["forward"] - median["store"]
    rows = [(stage, median[stage], f"{min(results[stage]):.2f}-{max(results[stage]):.2f}") for stage in STAGES]
    rows.append(("the rest", rest, ""))
    lines = ["| stage | CPU ms per upload (median round) | rounds' range | share of whole app |", "|---|---|---|---|"]
    lines += [f"| {stage} | {ms:.2f} | {spread} | {ms / median['whole app']:.0%} |" for stage, ms, spread in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", type=int, default=500, help="uploads per stage and round (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, stages alternating (default %(default)s)")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES,
                        help="folder of JPEGs (default: %(default)s; synthetic photos if absent)")
    parser.add_argument("--model", type=Path, default=Path(DEFAULT_MODEL_PATH))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="request-cost-") as scratch:
        images = find_images(args.images, 200, Path(scratch))
        jpegs = [path.read_bytes() for path in images.paths]
        # WORKERS: the engine threads of one worker of `python app.py` on this machine (a worker
        # per core); BATCHING off: the forward pass inline, no hand-off to a batcher thread.
        config = {"MODEL_PATH": str(args.model), "UPLOAD_DIR": str(Path(scratch) / "uploads"),
                  "WORKERS": usable_cores(), "BATCHING": "off", "LOG_FORMAT": "json"}
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        configure_logging("json")  # the access log is written, as by a server, here to nowhere
        with open(os.devnull, "w") as nowhere, contextlib.redirect_stderr(nowhere):
            results = measure(jpegs, args.n, args.rounds, config)
    print(f"\n{started}, {usable_cores()} usable CPUs, {len(jpegs)} photos from {images.source}, "
          f"{args.n} uploads per stage and round, {args.rounds} rounds; process CPU per upload, in process, "
          "one at a time")
    print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
