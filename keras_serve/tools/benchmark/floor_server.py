"""The real server with part of its work replaced by a canned answer: what the rest costs alone.

    .venv/bin/python -m keras_serve.tools.benchmark --skip-limits --concurrency 1,32 \\
        --app keras_serve/tools/benchmark/floor_server.py --server-args="--stub model"

    --stub model     decoding and storage run; the batcher and the forward pass do not
                     (every image gets the model's answer to an all-zero input)
    --stub pipeline  nothing after the multipart parse runs: every upload gets one canned answer
                     (HTTP, waitress, Flask, the multipart parse and the JSON answer remain)

Every other option is app.py's. One process only, whatever the CPUs: `--workers` would fork
servers this script does not reach. For measuring (docs/performance.md); never for serving, every answer is the same.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

if __name__ == "__main__" and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    # Run by path (the benchmark's --app): this folder's modules (cli, stats, load, ...) must
    # not shadow top-level ones of the same name.
    del sys.path[0]

import numpy as np
from flask import Flask

import keras_serve
from keras_serve import cli, create_app
from keras_serve.pipeline.service import ClassifiedUpload

STUBS = ("model", "pipeline")


def stubbed(stub: str) -> Callable[[dict[str, Any] | None], Flask]:
    """A `create_app` whose service skips the batcher and forward pass ("model") or all of classify ("pipeline")."""
    if stub not in STUBS:
        raise ValueError(f"--stub must be one of {', '.join(STUBS)}")

    def create_stubbed_app(config: dict[str, Any] | None = None) -> Flask:
        app = create_app(config)
        service = app.extensions["classifier"]
        row = service.model.predict_batch(np.zeros((1, *service.model.spec.input_shape), np.float32))[0]
        if stub == "model":
            def decode_only(prepare: Callable[[], np.ndarray]) -> np.ndarray:
                prepare()  # decoding, with its limits and errors, still runs
                return row

            service.batcher.predict_prepared = decode_only
        else:
            answer = ClassifiedUpload("0" * 32, service.model.interpret(row), 0.0)
            service.classify = lambda data, client_filename=None: answer
        return app

    return create_stubbed_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--stub", choices=STUBS, required=True)
    args, app_argv = parser.parse_known_args(argv)
    given = cli.settings.from_arguments(cli.parse_args(app_argv))
    workers = cli.settings.resolve(given)["WORKERS"]
    if workers not in ("auto", 1):
        print("error: floor_server runs one process; leave out --workers", file=sys.stderr)
        return 2
    app_argv = [*app_argv, "--workers", "1"]  # auto would fork servers that this stub does not reach
    # main() imports create_app from the package when it builds the app (after binding the port)
    keras_serve.create_app = stubbed(args.stub)
    return cli.main(app_argv)


if __name__ == "__main__":
    sys.exit(main())
