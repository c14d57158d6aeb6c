"""`python app.py [options]`: load the model once, then serve HTTP (keras_serve.web.server).

    python app.py                          # default cat/dog model on http://0.0.0.0:8080/
    python app.py --model my.h5 --labels a,b,c --port 9000

Every option is a row of `keras_serve.settings.SETTINGS`.
"""
from __future__ import annotations

import argparse
import logging
import sys

from keras_serve import create_app, settings
from keras_serve.errors import StartupError
from keras_serve.web.request_log import configure_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        given = settings.from_arguments(args)
        effective = settings.resolve(given)
        configure_logging(effective["LOG_FORMAT"])  # JSON lines by default (keras_serve/web/request_log.py)
        logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "task queue depth" is normal under load
        if int(effective["WORKERS"]) > 1:  # several processes: gunicorn forks them (keras_serve/workers.py)
            from keras_serve.web.access import AccessSettings
            from keras_serve.workers import serve_workers

            AccessSettings.from_config(effective)  # one line now, not one per worker after the fork

            return serve_workers(effective)
        app = create_app(given)
    except StartupError as exc:
        print(f"error: {exc.message}" + (f"; {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 2
    except ValueError as exc:  # a malformed KERAS_SERVE_* value
        print(f"error: {exc}", file=sys.stderr)
        return 2
    service = app.extensions["classifier"]
    host, port = app.config["HOST"], int(app.config["PORT"])
    # one write per line, so that log lines from other threads never land inside it
    sys.stdout.write(service.model.summary_line() + "\n")
    sys.stdout.flush()
    sys.stdout.write(f"serving on http://{host}:{port}/ (threads {app.config['THREADS']}, max batch "
                     f"{app.config['MAX_BATCH']}, max wait {app.config['MAX_WAIT_MS']} ms, uploads in "
                     f"{app.config['UPLOAD_DIR']})\n")
    sys.stdout.flush()

    from keras_serve.web import server

    def stop_being_ready() -> None:
        service.ready = False  # /readyz answers 503 from the moment SIGTERM arrives

    with service:  # closes the batcher and the store once every answered request is out
        try:
            server.serve(app, on_drain=stop_being_ready)
        except OSError as exc:
            print(f"error: cannot listen on {host}:{port}: {exc.strerror}", file=sys.stderr)
            return 2
    return 0
