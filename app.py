"""Serve a Keras image classifier: an upload form for people, POST /file/ for programs.

    python app.py                          # default cat/dog model on http://0.0.0.0:8080/
    python app.py --model my.h5 --labels a,b,c --port 9000

Settings come from defaults, then KERAS_SERVE_* environment variables, then the command line
(or the `config` argument of `create_app`).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # keep TensorFlow's start-up chatter out of the logs

from flask import Flask

from errors import ModelLoadError
from preprocessing import SCALINGS

ROOT = Path(__file__).resolve().parent
ENV_PREFIX = "KERAS_SERVE"

DEFAULTS: dict[str, Any] = {
    "MODEL_PATH": str(ROOT / "models" / "cats_vs_dogs.h5"),
    "MODEL": None,            # a ready model object (tests); when set, MODEL_PATH is not read
    "LABELS": None,           # comma list or file; default from the model card
    "SCALING": None,          # "1/255", "none", "-1..1"; default from the model card
    "ARCH": None,             # architecture name for weights-only files
    "UPLOAD_DIR": str(ROOT / "uploads"),
    "UPLOAD_RETENTION_DAYS": 30,
    "UPLOAD_FSYNC": False,    # fdatasync each upload before answering: survives power loss, +1 ms at 1 client
    "MAX_CONTENT_LENGTH": 16 * 1024 * 1024,
    "MAX_PIXELS": 50_000_000,
    "MAX_BATCH": 32,
    "MAX_WAIT_MS": 2.0,
    "HOST": "0.0.0.0",
    "PORT": 8080,
    "THREADS": 64,            # measured: more than 32 helps 64 clients, costs nothing at 1 or 32
}


def create_app(config: dict[str, Any] | None = None) -> Flask:
    """Build the app and load the model once; raises ModelLoadError if it cannot be served."""
    from multipart_form import ServingRequest

    app = Flask(__name__)
    app.request_class = ServingRequest  # python-multipart for uploads; see multipart_form.py
    app.config.from_mapping(DEFAULTS)
    app.config.from_prefixed_env(ENV_PREFIX)
    if config:
        app.config.update(config)

    from batcher import DynamicBatcher
    from classifier import ClassifierService
    from http_errors import register_error_handlers
    from model_loader import ServedModel
    from routes import bp
    from uploads import UploadStore

    model = app.config["MODEL"] or ServedModel.load(
        app.config["MODEL_PATH"], labels=app.config["LABELS"], scaling=app.config["SCALING"],
        arch=app.config["ARCH"], max_pixels=int(app.config["MAX_PIXELS"]))
    max_batch = int(app.config["MAX_BATCH"])
    model.warm_up(tuple(range(1, max_batch + 1)))  # every batch size the batcher can form
    batcher = DynamicBatcher(model.predict_batch, max_batch, float(app.config["MAX_WAIT_MS"]))
    store = UploadStore(app.config["UPLOAD_DIR"], float(app.config["UPLOAD_RETENTION_DAYS"] or 0),
                        fsync=bool(app.config["UPLOAD_FSYNC"]))
    store.prune()
    service = ClassifierService(model, batcher, store)
    app.extensions["classifier"] = service

    app.register_blueprint(bp)
    register_error_handlers(app)

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Content-Security-Policy",
                                    "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'")
        return response

    service.ready = True
    return app


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", help=f"address to listen on (default {DEFAULTS['HOST']}; env {ENV_PREFIX}_HOST)")
    p.add_argument("--port", type=int, help=f"port (default {DEFAULTS['PORT']}; env {ENV_PREFIX}_PORT)")
    p.add_argument("--model", dest="MODEL_PATH", help=f"model file, .h5 or .keras (default the shipped cat/dog "
                   f"model; env {ENV_PREFIX}_MODEL_PATH)")
    p.add_argument("--labels", help="output labels: comma list or a file with one per line (default: model card)")
    p.add_argument("--scaling", choices=sorted(SCALINGS), help="pixel scaling (default: model card, else 1/255)")
    p.add_argument("--arch", choices=["seed", "compact", "resnet"], help="architecture for a weights-only .h5 file")
    p.add_argument("--upload-dir", help="where uploads and their predictions are stored (default ./uploads)")
    p.add_argument("--max-upload-mb", type=float, help="largest request body in MB (default 16)")
    p.add_argument("--max-pixels", type=int, help="largest image in pixels (default 50,000,000)")
    p.add_argument("--max-batch", type=int, help="largest inference batch (default 32)")
    p.add_argument("--max-wait-ms", type=float, help="how long a batch waits for more requests (default 2)")
    p.add_argument("--threads", type=int, help="request threads (default 64)")
    p.add_argument("--fsync-uploads", action=argparse.BooleanOptionalAction, default=None,
                   help="fdatasync every upload before answering, so it survives power loss (default off)")
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Only the options given on the command line, as config keys (so env values survive)."""
    mapping = {
        "HOST": args.host, "PORT": args.port, "MODEL_PATH": args.MODEL_PATH, "LABELS": args.labels,
        "SCALING": args.scaling, "ARCH": args.arch, "UPLOAD_DIR": args.upload_dir,
        "MAX_CONTENT_LENGTH": int(args.max_upload_mb * 1024 * 1024) if args.max_upload_mb else None,
        "MAX_PIXELS": args.max_pixels, "MAX_BATCH": args.max_batch, "MAX_WAIT_MS": args.max_wait_ms,
        "THREADS": args.threads, "UPLOAD_FSYNC": args.fsync_uploads,
    }
    return {key: value for key, value in mapping.items() if value is not None}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" is normal under load
    try:
        app = create_app(config_from_args(args))
    except ModelLoadError as exc:
        print(f"error: {exc.message}" + (f"; {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 2
    service = app.extensions["classifier"]
    host, port = app.config["HOST"], int(app.config["PORT"])
    print(service.model.summary_line(), flush=True)
    print(f"serving on http://{host}:{port}/ (threads {app.config['THREADS']}, max batch "
          f"{app.config['MAX_BATCH']}, max wait {app.config['MAX_WAIT_MS']} ms, uploads in "
          f"{app.config['UPLOAD_DIR']})", flush=True)

    import signal

    import waitress

    def stop(signum, frame):
        raise KeyboardInterrupt  # waitress shuts down cleanly on it; containers send SIGTERM

    signal.signal(signal.SIGTERM, stop)
    try:
        waitress.serve(
            app, host=host, port=port, threads=int(app.config["THREADS"]), ident="keras-serve",
            # Flask answers oversize bodies with a proper 413 page; waitress only stops absurd ones.
            max_request_body_size=4 * int(app.config["MAX_CONTENT_LENGTH"]),
            connection_limit=1000, channel_timeout=60,
        )
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        service.batcher.close()
        service.store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
